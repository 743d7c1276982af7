"""``python -m sglang_sparse_mla.demo``: serve a DSA model with the Triton backend, or check its kernels on a CPU.

With a CUDA GPU and SGLang installed: writes the tiny DeepSeek-V3.2-architecture
model (:mod:`.testing.tiny_model`, random weights) to a temporary directory, serves it
with ``python -m sglang.launch_server --attention-backend triton_sparse_mla``
(CUDA graphs on, ``--enable-deterministic-inference``), then sends

* one request with a ~1000-token prefix, so that the radix cache holds it;
* a batch of requests sharing that prefix, plus unrelated prompts;
* the same requests one by one, the cache flushed before each;

and checks that every output is non-empty with finite log-probabilities, that
the shared-prefix requests hit the radix cache, and that the batched (cached)
and one-by-one greedy outputs are identical: deterministic inference makes a
request's numerics independent of its batch. With ``--default-numerics`` the
server runs without it, a token's rounding then depends on its batch (split-KV
counts, GEMM tilings), and on the random-weight model the outputs need only
agree up to near ties (:mod:`.testing.serving.workload`). Prints a report and shuts
the server down.

Without a GPU (or with ``--chain``): runs the tiny models' attention chain,
indexer logits -> top-k -> KV slots -> sparse MLA prefill and decode over BF16
and FP8 caches, through Triton's interpreter (natively on a GPU with
``--chain``) at shapes taken from the models' configs, and compares every
stage with the float64 references (:mod:`.testing.chain_check`).

Exit status 0 when every check passed, 1 when one failed, 2 when the serving
demo cannot run (SGLang missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .testing.tiny_model import ARCHITECTURES, tiny_config

BACKEND = "triton_sparse_mla"


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _progress(start: float):
    """A callback printing ``[  12 s] step ...`` lines, flushed, timed from ``start``."""

    def report(step: str) -> None:
        print(f"  [{time.perf_counter() - start:4.0f} s] {step} ...", flush=True)

    return report


def _prompt_lengths(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


def run_chain_demo(args) -> int:
    """The attention chain of each chosen architecture's tiny model, stage by stage."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates the kernels
    from .testing.chain_check import run_chain

    device = "cuda" if on_gpu else "cpu"
    where = f"natively on {torch.cuda.get_device_name()}" if on_gpu else "through the Triton interpreter (CPU)"
    print(f"Attention chain of the tiny DSA models {where}, each stage against its float64 reference.")
    if not on_gpu:
        print("The interpreter runs every kernel program in Python: about a minute and a half per model.")
    passed = True
    for arch in args.arch or ARCHITECTURES:
        config = tiny_config(arch)
        start = time.perf_counter()
        topk = args.index_topk or config["index_topk"]
        print(
            f"\n{arch} ({config['architectures'][0]}): {config['num_attention_heads']} query heads, "
            f"{config['index_n_heads']} index heads x {config['index_head_dim']}, index_topk {topk}; "
            f"prompts of {', '.join(map(str, args.prompt_lengths))} tokens + 1 decode step each",
            flush=True,
        )
        report = run_chain(
            config, args.prompt_lengths, args.index_topk, args.seed, device, progress=_progress(start)
        )
        print(
            f"{report.sparse_rows} of {report.rows} query tokens see more than index_topk positions "
            f"({time.perf_counter() - start:.0f} s)"
        )
        rows = [
            (c.stage, c.metric, f"{c.value:.2e}", f"{c.limit:.1e}", "ok" if c.passed else "FAIL") for c in report.checks
        ]
        print(_table(("stage", "metric", "value", "limit", ""), rows))
        passed &= report.passed
    print(f"\n{'PASS' if passed else 'FAIL'}: {'every stage matches' if passed else 'a stage is outside its limit'}")
    return 0 if passed else 1


def run_serving_demo(args) -> int:
    """Serve the tiny model with our backend and check the answers (see the module docstring)."""
    if importlib.util.find_spec("sglang") is None:
        print("SGLang is not installed: pip install 'sglang-sparse-mla[sglang]' (or run with --chain).")
        return 2
    from .testing.serving.client import flush_cache, generate
    from .testing.serving.server import Server, ServerError
    from .testing.serving.workload import (
        bit_identical,
        compare_greedy,
        first_logprob_difference,
        shared_prefix_prompts,
        unrelated_prompts,
    )
    from .testing.tiny_model import write_tiny_model

    arch = (args.arch or ["deepseek-v3.2"])[0]
    shared, unrelated = shared_prefix_prompts(4), unrelated_prompts()
    prompts = shared + unrelated
    start = time.perf_counter()
    step = _progress(start)
    with tempfile.TemporaryDirectory(prefix="sglang-sparse-mla-demo-") as tmp:
        gpu = torch.cuda.get_device_name()
        print(f"Serving a tiny {arch} model (random weights) with --attention-backend {BACKEND} on {gpu}")
        step("writing the model (random weights, a local tokenizer)")
        model = write_tiny_model(Path(tmp) / "model", arch, args.seed)
        numerics = [] if args.default_numerics else ["--enable-deterministic-inference"]
        server_args = ["--attention-backend", BACKEND, *numerics, *args.server_arg]
        log_path = args.server_log or Path(tmp) / "server.log"
        step(f"starting sglang.launch_server {' '.join(server_args)} (compiles kernels, captures CUDA graphs)")
        try:
            with Server(model, server_args, log_path=log_path) as server:
                step("server ready; one request puts the shared prefix into the radix cache")
                generate(server.url, [shared[0]], 1)
                step(f"{len(prompts)} requests in one batch ({args.max_new_tokens} tokens each)")
                batch = generate(server.url, prompts, args.max_new_tokens)
                step(f"the same {len(prompts)} requests one by one, the cache flushed before each")
                single = []
                for prompt in prompts:
                    flush_cache(server.url)
                    single += generate(server.url, [prompt], args.max_new_tokens)
                step("stopping the server")
        except (ServerError, OSError) as err:
            print(f"FAIL: the server did not serve: {err}")
            return 1

    matches = [compare_greedy(b, s) for b, s in zip(batch, single, strict=True)]
    rows = []
    for i, (b, s, m) in enumerate(zip(batch, single, matches, strict=True)):
        kind = "shared prefix" if i < len(shared) else "unrelated"
        drift = first_logprob_difference(b, s)
        first = "none" if drift is None else f"token {drift[0]} (|d| {drift[1]:.2g})"
        finite = "yes" if b.finite and s.finite else "NO"
        rows.append((i, kind, b.prompt_tokens, b.cached_tokens, len(b.output_ids), m.describe(), first, finite))
    header = ("#", "prompt", "tokens", "cached", "output", "batch (radix cache) vs one by one", "first logprob diff")
    print(_table((*header, "finite"), rows))
    if args.default_numerics:
        agreement = "greedy outputs agree up to near ties, batch vs one by one"
        agreed = all(m.agrees() for m in matches)
    else:
        agreement = "greedy outputs and logprobs identical, batch vs one by one"
        agreed = all(bit_identical(b, s) for b, s in zip(batch, single, strict=True))
    checks = {
        "outputs non-empty with finite logprobs": all(c.finite for c in batch + single),
        "shared-prefix requests hit the radix cache": all(c.cached_tokens > 0 for c in batch[1 : len(shared)]),
        agreement: agreed,
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    sample = batch[0].text.replace("\n", " ")[:80]
    print(f"sample output (random weights, so gibberish): {sample!r}")
    passed = all(checks.values())
    if not passed and args.server_log:
        print(f"server log: {args.server_log}")
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Serve a tiny DSA model with --attention-backend triton_sparse_mla (GPU), "
        "or check the attention chain against float64 references (CPU / --chain)."
    )
    parser.add_argument("--chain", action="store_true", help="run the kernel chain check even on a GPU")
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES, help="model(s) to use (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-lengths", type=_prompt_lengths, default=(300, 90), help="chain: e.g. 300,90")
    parser.add_argument("--index-topk", type=int, default=None, help="chain: override the config's index_topk")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="serving: tokens per request")
    parser.add_argument("--server-arg", action="append", default=[], help="serving: extra launch_server argument")
    parser.add_argument("--server-log", type=Path, default=None, help="serving: keep the server's log in this file")
    parser.add_argument(
        "--default-numerics",
        action="store_true",
        help="serving: without --enable-deterministic-inference (batch vs one by one then agree up to near ties)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.chain or not torch.cuda.is_available():
        if not torch.cuda.is_available():
            print("No CUDA GPU found: checking the attention chain on the CPU instead of serving.")
        return run_chain_demo(args)
    return run_serving_demo(args)


if __name__ == "__main__":
    sys.exit(main())
