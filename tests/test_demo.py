"""``python -m sglang_sparse_mla.demo``: the kernel-chain path (the CPU demo; native with --chain on a
GPU), and the serving path's checks over a stub server."""

from __future__ import annotations

import pytest
import torch

import sglang_sparse_mla.testing.chain_check as chain_check
from sglang_sparse_mla import demo

# Tiny requests and a small top-k, so that the interpreter runs them in seconds
# and most query tokens still see more positions than the top-k keeps.
TINY = ["--chain", "--prompt-lengths", "70,20", "--index-topk", "32"]


def test_chain_demo_passes(capsys):
    assert demo.main([*TINY, "--arch", "deepseek-v3.2"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    for stage in ("fp8_mqa_logits", "topk_indices", "topk_to_kv_slots", "fp8_paged_mqa_logits"):
        assert stage in out
    for kernel in ("sparse_mla_prefill), BF16 KV", "sparse_mla_prefill), FP8 KV", "sparse_mla_decode), FP8 KV"):
        assert kernel in out
    assert "64 index heads" in out and "index_topk 32" in out


def test_chain_demo_shows_progress_before_each_long_step(capsys):
    assert demo.main([*TINY, "--arch", "glm-5", "--prompt-lengths", "40,10", "--index-topk", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("glm-5 (GlmMoeDsaForCausalLM)"))
    table = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    steps = [line.split("] ", 1)[1] for line in lines[header:table] if line.lstrip().startswith("[")]
    assert steps == [
        "index keys: rotation, FP8 quantization and page store; KV rows ...",
        "prefill: indexer logits (fp8_mqa_logits) ...",
        "prefill: top-k and KV slots ...",
        "prefill: sparse MLA over the BF16 and FP8 caches ...",
        "decode: indexer logits, top-k and KV slots ...",
        "decode: sparse MLA over the BF16 and FP8 caches ...",
    ]


def test_chain_demo_fails_on_a_wrong_kernel(capsys, monkeypatch):
    real = chain_check.sparse_mla_decode

    def off_by_a_little(q, kv_cache, indices, sm_scale):
        out, lse = real(q, kv_cache, indices, sm_scale)
        return out * 1.05, lse

    monkeypatch.setattr(chain_check, "sparse_mla_decode", off_by_a_little)
    assert demo.main([*TINY, "--arch", "glm-5", "--prompt-lengths", "40,10", "--index-topk", "16"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.endswith("FAIL")]
    assert failed and all("sparse_mla_decode" in line and "out rel. error" in line for line in failed)
    assert "32 index heads" in out and out.rstrip().splitlines()[-1].startswith("FAIL")


def test_sample_rows_keeps_sparse_rows_and_spreads_the_rest():
    lengths = torch.arange(1, 301, dtype=torch.int32)
    rows = chain_check.sample_rows(lengths, topk=256, budget=40)
    assert rows.numel() <= 40 and torch.equal(rows, rows.unique())
    assert (lengths[rows] > 256).sum() == 20 and rows[0] == 0 and rows[-1] == 299


class _StubServer:
    """Stands in for :class:`sglang_sparse_mla.testing.serving.server.Server`; records the launch arguments."""

    launched: list[list[str]] = []

    def __init__(self, model, args, *, log_path):
        self.url = "http://stub"
        _StubServer.launched.append(list(args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize(
    ("default_numerics", "one_by_one_drift", "passes"),
    [
        (False, None, True),
        (False, "logprob", False),  # deterministic mode: the same tokens with other logprobs fail
        (True, "logprob", True),
        (True, "near_tie", True),  # default numerics: a flip where the top two are within the margin
        (True, "flip", False),
    ],
)
def test_serving_demo_judges_batch_against_one_by_one(monkeypatch, capsys, default_numerics, one_by_one_drift, passes):
    from sglang_sparse_mla.testing.serving import client, server, workload
    from sglang_sparse_mla.testing.serving.client import Completion

    def completion(prompt_index: int, drift: str | None, cached: int) -> Completion:
        ids, logprobs, margins = [prompt_index, 1, 2, 3], [-1.0, -1.5, -2.0, -0.5], [0.5, 0.5, 0.5, 0.5]
        if drift == "logprob":
            logprobs[2] += 1e-3
        elif drift in ("near_tie", "flip"):
            ids[2], margins[2] = 99, (0.01 if drift == "near_tie" else 1.0)
        return Completion("x", ids, logprobs, margins, prompt_tokens=100, cached_tokens=cached)

    prompts = workload.shared_prefix_prompts(4) + workload.unrelated_prompts()
    calls = {"n": 0}

    def generate(url, batch, max_new_tokens, **kwargs):
        calls["n"] += 1
        one_by_one = len(batch) == 1 and calls["n"] > 2
        index = [prompts.index(p) for p in batch]
        drift = one_by_one_drift if one_by_one and index == [5] else None
        return [completion(i, drift, 64 if 0 < i < 4 and not one_by_one else 0) for i in index]

    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(demo.torch.cuda, "get_device_name", lambda: "stub GPU")
    monkeypatch.setattr(server, "Server", _StubServer)
    monkeypatch.setattr(client, "generate", generate)
    monkeypatch.setattr(client, "flush_cache", lambda url: None)
    _StubServer.launched.clear()
    argv = ["--max-new-tokens", "4", *(["--default-numerics"] if default_numerics else [])]
    status = demo.run_serving_demo(demo.build_parser().parse_args(argv))
    out = capsys.readouterr().out
    assert status == (0 if passes else 1) and out.rstrip().endswith("PASS" if passes else "FAIL")
    deterministic = "--enable-deterministic-inference" in _StubServer.launched[0]
    assert deterministic != default_numerics
    assert ("identical, batch vs one by one" in out) != default_numerics
    assert ("token 2 (|d| 0.001)" in out) == (one_by_one_drift == "logprob")
    # A line before each long step: the model, the server's start, the batch, the one-by-one requests.
    steps = [line.split("] ", 1)[1] for line in out.splitlines() if line.lstrip().startswith("[")]
    assert [step.split(" ")[0] for step in steps] == ["writing", "starting", "server", "8", "the", "stopping"]
    assert "--attention-backend triton_sparse_mla" in steps[1]
