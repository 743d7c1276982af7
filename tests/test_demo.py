"""``python -m sglang_sparse_mla.demo``'s kernel-chain path (the CPU demo; native with --chain on a GPU)."""

from __future__ import annotations

import torch

import sglang_sparse_mla.chain_check as chain_check
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
