"""Lightning-indexer kernels against SGLang 0.5.23's torch fallbacks, on a GPU.

    python benchmarks/bench_indexer.py [--out results.json] [--sweep] [--graph-only]
        [--sections paged,prefill,topk] [--copy-gbs X] [--mma-tflops X]

Sections: paged decode logits (``fp8_paged_mqa_logits`` vs SGLang's
``_fp8_paged_mqa_logits_torch``), ragged prefill logits (``fp8_mqa_logits`` vs
``_fp8_mqa_logits_torch`` and, where it loads, DeepGEMM's ``fp8_mqa_logits``)
and top-k 2048 (``topk_indices`` as dispatched, its one-program-per-row path
forced, ``torch.topk`` and, where it loads, sgl-kernel's ``fast_topk_v2``, the
top-k of SGLang's ``dsa`` backend). ``--sweep`` times every
candidate configuration of our kernels instead of the default one (no
baselines).

Timing: ``timing.time_launches`` (one launch per input set, enough sets to
exceed the L2 twice, captured in a CUDA graph and replayed; median replay over
the number of launches), so that Python launch overhead does not count on
short kernels. Counting conventions:

* TFLOP/s counts ``2 * heads * 128`` flops per *valid* score only (positions
  inside each row's window / context; masked columns are free), for every
  implementation alike.
* GB/s counts the bytes an ideal kernel must move: logits: the keys and
  scales of the valid positions (paged) or all keys (ragged), the queries and
  weights, and the fp32 logits written; top-k: the logits read and the
  indices written.
* Ceilings are measured by ``timing`` (a 2 GiB device copy; an 8192^3 FP8
  ``_scaled_mm``, else a bf16 matmul) unless given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sglang_baselines  # noqa: E402
from sm80_ceilings import mma_v2_tflops  # noqa: E402
from timing import measure_copy_gbs, measure_matmul_tflops, time_launches  # noqa: E402

from sglang_sparse_mla.kernels import device_info, fp8_mqa_logits, fp8_paged_mqa_logits, topk_indices  # noqa: E402
from sglang_sparse_mla.kernels.topk import default_config as topk_default_config  # noqa: E402
from sglang_sparse_mla.kernels.topk import sweep_configs as topk_sweep_configs  # noqa: E402
from sglang_sparse_mla.kernels.topk import use_split_rows  # noqa: E402

ragged_module = importlib.import_module("sglang_sparse_mla.kernels.fp8_mqa_logits")
paged_module = importlib.import_module("sglang_sparse_mla.kernels.fp8_paged_mqa_logits")

HEADS = 64
DIM = 128
BLOCK_SIZE = 64
TOPK = 2048
FLOPS_PER_SCORE = 2 * HEADS * DIM
MAX_INPUT_SETS = 8
DEVICE = torch.device("cuda")

# (batch, context, next_n, width): the logits are ``width`` columns wide. Width = context are
# kernel shapes; a wider one is a CUDA-graph decode batch, whose block table spans the longest
# context the server allows (32768 for the tiny released model, 163840 for DeepSeek-V3.2), timed
# as the backend calls it (``clean_logits=False``).
PAGED_SHAPES = [(b, ctx, 1, ctx) for b in (1, 8, 32, 128) for ctx in (4096, 32768, 131072)]
PAGED_SHAPES += [(32, 32768, 2, 32768)]  # MTP: ours only, SGLang's fallback has no next_n > 1
PAGED_SHAPES += [(b, 8448, 1, w) for b in (1, 32) for w in (32768, 163840)]
PREFILL_SHAPES = [(4096, n) for n in (4096, 16384, 65536)]
# (rows, width, length): decode rows (one per request) at batch 1, 8, 32 (the split-row path),
# then 64 long rows and a prefill-sized batch (one program per row); then CUDA-graph decode
# batches, rows of 8448 positions in logits 32768 / 163840 wide.
TOPK_SHAPES = [(b, c, c) for b in (1, 8, 32) for c in (8192, 32768, 131072)] + [(64, 131072, 131072), (4096, 8192, 8192)]
TOPK_SHAPES += [(b, w, 8448) for b in (1, 32) for w in (32768, 163840)]


# ---------------------------------------------------------------------------
# Timing and ceilings
# ---------------------------------------------------------------------------


def input_sets(make: Callable[[], dict], bytes_per_set: int) -> list[dict]:
    """Enough input sets that cycling through them streams past the L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    count = min(MAX_INPUT_SETS, max(1, math.ceil(2 * l2 / max(bytes_per_set, 1))))
    return [make() for _ in range(count)]


def bench(fn: Callable[[dict], object], sets: list[dict]) -> float:
    """Median milliseconds of ``fn`` per input set, the sets run in rotation
    inside one CUDA graph (eagerly between events if capture fails)."""
    return time_launches([functools.partial(fn, s) for s in sets], repeats=30, warmup=5).ms


def try_bench(fn, sets) -> tuple[float | None, str | None]:
    try:
        return bench(fn, sets), None
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return None, f"out of memory: {err}".splitlines()[0]
    except Exception as err:  # a baseline failing must not stop the run
        torch.cuda.synchronize()
        return None, f"{type(err).__name__}: {err}".splitlines()[0][:300]


def measure_ceilings(copy_gbs: float | None, mma_tflops: float | None) -> dict:
    """The copy and MMA ceilings (FP8: the indexer's products are FP8), measured by
    ``timing`` unless given on the command line."""
    out = {}
    if copy_gbs is None:
        copy_gbs = measure_copy_gbs()
        out["copy_source"] = "measured: 2 GiB device copy (read + write)"
    else:
        out["copy_source"] = "command line"
    if mma_tflops is None:
        mma_tflops, what = measure_matmul_tflops(fp8=True)
        out["mma_source"] = f"measured: {what}"
    else:
        out["mma_source"] = "command line"
    torch.cuda.empty_cache()
    out.update(copy_gbs=copy_gbs, mma_tflops=mma_tflops)
    return out


def rates(ms: float | None, flops: float, nbytes: float, ceilings: dict) -> dict:
    if ms is None:
        return {"ms": None}
    tflops = flops / (ms * 1e-3) / 1e12
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {
        "ms": ms,
        "tflops": tflops,
        "gbs": gbs,
        "pct_mma": 100 * tflops / ceilings["mma_tflops"],
        "pct_mma_v2": 100 * tflops / ceilings["mma_v2_tflops"] if ceilings.get("mma_v2_tflops") else None,
        "pct_bw": 100 * gbs / ceilings["copy_gbs"],
    }


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def fp8(*shape) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).mul_(2).clamp_(-448, 448).to(torch.float8_e4m3fn)


def paged_inputs(batch: int, context: int, next_n: int, width: int) -> dict:
    """A cache holding each request's ``context`` positions in shuffled blocks; the block table
    spans ``width`` positions (the blocks past the context point at block 0, never read)."""
    blocks = triton.cdiv(context, BLOCK_SIZE)
    cache = torch.empty(batch * blocks, BLOCK_SIZE, 1, DIM + 4, dtype=torch.uint8, device=DEVICE)
    flat = cache.view(batch * blocks, -1)
    flat[:, : BLOCK_SIZE * DIM] = fp8(batch * blocks, BLOCK_SIZE * DIM).view(torch.uint8)
    scales = torch.rand(batch * blocks, BLOCK_SIZE, device=DEVICE) * 0.01 + 1e-3
    flat[:, BLOCK_SIZE * DIM :] = scales.view(torch.uint8)
    table = torch.zeros(batch, triton.cdiv(width, BLOCK_SIZE), dtype=torch.int32, device=DEVICE)
    table[:, :blocks] = torch.randperm(batch * blocks, device=DEVICE, dtype=torch.int32).view(batch, blocks)
    return {
        "q": fp8(batch, next_n, HEADS, DIM),
        "cache": cache,
        "weights": torch.randn(batch * next_n, HEADS, device=DEVICE) * HEADS**-0.5,
        "context": torch.full((batch,), context, dtype=torch.int32, device=DEVICE),
        "table": table,
        "max_len": width,
    }


def paged_counts(batch: int, context: int, next_n: int) -> tuple[float, float]:
    scores = batch * sum(context - next_n + j + 1 for j in range(next_n))
    nbytes = batch * context * (DIM + 4) + batch * next_n * (HEADS * DIM + HEADS * 4 + context * 4)
    return scores * FLOPS_PER_SCORE, nbytes


def prefill_inputs(tokens: int, keys: int) -> dict:
    """One request's chunked prefill: the last ``tokens`` of ``keys`` positions,
    token ``t`` seeing keys ``[0, keys - tokens + t + 1)``."""
    ke = torch.arange(keys - tokens + 1, keys + 1, device=DEVICE, dtype=torch.int32)
    return {
        "q": fp8(tokens, HEADS, DIM),
        "k": fp8(keys, DIM),
        "k_scale": torch.rand(keys, device=DEVICE) * 0.01 + 1e-3,
        "weights": torch.randn(tokens, HEADS, device=DEVICE) * HEADS**-0.5,
        "ks": torch.zeros(tokens, dtype=torch.int32, device=DEVICE),
        "ke": ke,
    }


def prefill_counts(tokens: int, keys: int) -> tuple[float, float]:
    scores = sum(range(keys - tokens + 1, keys + 1))
    nbytes = keys * (DIM + 4) + tokens * (HEADS * DIM + HEADS * 4) + tokens * keys * 4
    return scores * FLOPS_PER_SCORE, nbytes


def topk_inputs(rows: int, cols: int, length: int) -> dict:
    """Logits ``cols`` wide whose rows hold ``length`` positions (random values past them too)."""
    return {
        "logits": torch.randn(rows, cols, device=DEVICE),
        "lengths": torch.full((rows,), length, dtype=torch.int32, device=DEVICE),
    }


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def paged_baselines() -> list[tuple[str, Callable | None, str | None]]:
    """SGLang's wrapper, then the unchunked function it delegates to (the
    wrapper sizes its chunks from server state that may be missing here)."""
    wrapper, reason = sglang_baselines.fp8_paged_mqa_logits_torch()
    try:
        inner = importlib.import_module("sglang.srt.layers.attention.dsv4.indexer").fp8_paged_mqa_logits_torch
        inner_reason = None
    except Exception as err:  # any import failure makes the baseline unavailable
        inner, inner_reason = None, f"{type(err).__name__}: {err}"
    return [("_fp8_paged_mqa_logits_torch", wrapper, reason), ("dsv4 fp8_paged_mqa_logits_torch", inner, inner_reason)]


def _ours_paged(graph: bool) -> Callable:
    """Our paged logits as the backend calls them: without the ``-inf`` tail in a CUDA-graph
    batch. A tree from before ``clean_logits`` existed (a before/after run of this script
    against an older checkout) writes the tail whatever the shape."""
    if graph and "clean_logits" in inspect.signature(fp8_paged_mqa_logits).parameters:
        return functools.partial(fp8_paged_mqa_logits, clean_logits=False)
    return fp8_paged_mqa_logits


def _deep_gemm_paged(fns, s) -> torch.Tensor:
    """DeepGEMM as ``dsa`` calls it, its schedule (computed once a step there) made once per input set."""
    logits_fn, schedule_fn = fns
    if "dg_schedule" not in s:
        s["dg_context"] = s["context"].view(-1, 1).contiguous()
        s["dg_schedule"] = schedule_fn(s["dg_context"], BLOCK_SIZE, device_info(DEVICE).num_sms)
    return logits_fn(s["q"], s["cache"], s["weights"], s["dg_context"], s["table"], s["dg_schedule"], s["max_len"],
                     clean_logits=False)  # fmt: skip


def paged_section(ceilings, sweep: bool) -> list[dict]:
    baselines = paged_baselines()
    deep_gemm, deep_gemm_reason = sglang_baselines.deep_gemm_paged_mqa_logits()
    configs = paged_module.CONFIGS.candidates(device_info(DEVICE)) if sweep else [None]
    records = []
    for batch, context, next_n, width in PAGED_SHAPES:
        flops, nbytes = paged_counts(batch, context, next_n)
        sets = input_sets(lambda: paged_inputs(batch, context, next_n, width), nbytes)
        ours = _ours_paged(width > context)
        for cfg in configs:
            ms, err = try_bench(
                lambda s: ours(s["q"], s["cache"], s["weights"], s["context"], s["table"], s["max_len"], config=cfg),
                sets,
            )
            rec = {"section": "paged", "batch": batch, "context": context, "next_n": next_n, "width": width,
                   "config": str(cfg) if cfg else "default", "ours": rates(ms, flops, nbytes, ceilings), "error": err}
            if not sweep:
                rec["sglang_torch"] = _first_baseline(baselines, next_n == 1 and width == context, lambda fn, s: fn(
                    s["q"], s["cache"], s["weights"], s["context"], s["table"], None, s["max_len"], clean_logits=False
                ), sets[:1], flops, nbytes, ceilings)
                rec["deepgemm"] = _first_baseline(
                    [("deep_gemm.fp8_paged_mqa_logits", deep_gemm, deep_gemm_reason)], next_n == 1,
                    _deep_gemm_paged, sets, flops, nbytes, ceilings,
                )
            records.append(rec)
            _print_row(rec)
        del sets
        torch.cuda.empty_cache()
    return records


def prefill_section(ceilings, sweep: bool) -> list[dict]:
    baseline, reason = sglang_baselines.fp8_mqa_logits_torch()
    deep_gemm, deep_gemm_reason = sglang_baselines.deep_gemm_mqa_logits()
    configs = ragged_module.CONFIGS.candidates(device_info(DEVICE)) if sweep else [None]
    records = []
    for tokens, keys in PREFILL_SHAPES:
        flops, nbytes = prefill_counts(tokens, keys)
        sets = input_sets(lambda: prefill_inputs(tokens, keys), nbytes)
        for cfg in configs:
            ms, err = try_bench(
                lambda s: fp8_mqa_logits(s["q"], s["k"], s["k_scale"], s["weights"], s["ks"], s["ke"], config=cfg),
                sets,
            )
            rec = {"section": "prefill", "tokens": tokens, "keys": keys, "config": str(cfg) if cfg else "default",
                   "ours": rates(ms, flops, nbytes, ceilings), "error": err}
            if not sweep:
                rec["sglang_torch"] = _first_baseline(
                    [("_fp8_mqa_logits_torch", baseline, reason)], True,
                    lambda fn, s: fn(s["q"], (s["k"], s["k_scale"]), s["weights"], s["ks"], s["ke"]),
                    sets[:1], flops, nbytes, ceilings,
                )
                rec["deepgemm"] = _first_baseline(
                    [("deep_gemm.fp8_mqa_logits", deep_gemm, deep_gemm_reason)], True,
                    lambda fn, s: fn(s["q"], (s["k"], s["k_scale"]), s["weights"], s["ks"], s["ke"], clean_logits=False),
                    sets, flops, nbytes, ceilings,
                )
            records.append(rec)
            _print_row(rec)
        del sets
        torch.cuda.empty_cache()
    return records


def topk_section(ceilings, sweep: bool) -> list[dict]:
    configs = topk_sweep_configs(TOPK) if sweep else [None]
    per_row = dataclasses.replace(topk_default_config(TOPK), split_rows=False)
    sgl_topk, sgl_reason = sglang_baselines.sgl_kernel_fast_topk()
    num_sms = device_info(DEVICE).num_sms
    records = []
    for rows, cols, length in TOPK_SHAPES:
        nbytes = rows * length * 4 + rows * TOPK * 4
        sets = input_sets(lambda: topk_inputs(rows, cols, length), nbytes)
        for cfg in configs:
            ms, err = try_bench(lambda s: topk_indices(s["logits"], s["lengths"], TOPK, config=cfg), sets)
            path = "split" if use_split_rows(rows, cols, num_sms, cfg or topk_default_config(TOPK)) else "per_row"
            rec = {"section": "topk", "rows": rows, "cols": cols, "length": length, "k": TOPK,
                   "config": str(cfg) if cfg else "default", "path": path, "ours": rates(ms, 0.0, nbytes, ceilings),
                   "error": err}  # fmt: skip
            if not sweep:
                row_ms, row_err = try_bench(lambda s: topk_indices(s["logits"], s["lengths"], TOPK, config=per_row), sets)
                rec["ours_per_row"] = {**rates(row_ms, 0.0, nbytes, ceilings), "error": row_err}
                # torch.topk takes no lengths: it gets the rows' positions only.
                base_ms, base_err = try_bench(lambda s: torch.topk(s["logits"][:, :length], TOPK, dim=-1), sets)
                rec["torch_topk"] = {**rates(base_ms, 0.0, nbytes, ceilings), "error": base_err}
                rec["sgl_kernel_topk"] = _first_baseline(
                    [("sgl_kernel.fast_topk_v2", sgl_topk, sgl_reason)], True,
                    lambda fn, s: fn(s["logits"], s["lengths"], TOPK), sets, 0.0, nbytes, ceilings,
                )
            records.append(rec)
            _print_row(rec)
        del sets
        torch.cuda.empty_cache()
    return records


def _first_baseline(candidates, supported, call, sets, flops, nbytes, ceilings) -> dict:
    """Time the first candidate baseline that loads and runs; report why not."""
    if not supported:
        return {"ms": None, "error": "not supported by the baseline"}
    errors = []
    for name, fn, reason in candidates:
        if fn is None:
            errors.append(f"{name} unavailable: {reason}")
            continue
        ms, err = try_bench(lambda s: call(fn, s), sets)
        if ms is not None:
            return {**rates(ms, flops, nbytes, ceilings), "baseline": name, "error": "; ".join(errors) or None}
        errors.append(f"{name}: {err}")
    return {"ms": None, "error": "; ".join(errors)}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(r: dict | None) -> str:
    if not r or r.get("ms") is None:
        return f"{'-':>9} {(r or {}).get('error') or '':.60}"
    extra = f"{r['tflops']:7.1f} TF/s {r['pct_mma']:5.1f}%mma " if r.get("tflops") else ""
    if r.get("tflops") and r.get("pct_mma_v2") is not None:
        extra += f"{r['pct_mma_v2']:5.1f}%v2 "
    return f"{r['ms'] * 1e3:9.1f}us {extra}{r['gbs']:7.0f} GB/s {r['pct_bw']:5.1f}%bw"


_ABBREV = {"block_n": "n", "tokens": "t", "num_warps": "w", "num_stages": "s", "chunks": "ch", "cap": "cap",
           "split_rows": "split=", "split_block": "sb", "split_programs_per_sm": "spp"}


def _short(config: str) -> str:
    """``MQALogitsConfig(block_n=64, tokens=4, ...)`` -> ``n64 t4 w4 s5``."""
    if config == "default":
        return config
    fields = [part.split("=") for part in config[config.index("(") + 1 : -1].split(", ")]
    return " ".join(f"{_ABBREV.get(name, name)}{value}" for name, value in fields)


def _print_row(rec: dict) -> None:
    if rec["section"] == "paged":
        shape = f"paged   B={rec['batch']:<4} ctx={rec['context']:<6} next_n={rec['next_n']} width={rec['width']}"
    elif rec["section"] == "prefill":
        shape = f"prefill T={rec['tokens']:<5} N={rec['keys']:<6}"
    else:
        shape = f"topk    rows={rec['rows']:<5} len={rec['length']:<6} width={rec['cols']:<6} {rec['path']}"
    line = f"{shape:<50} {_short(rec['config']):<18} ours {_fmt(rec['ours'])}"
    if rec.get("error"):
        line += f"  ERROR {rec['error']}"
    for key in ("sglang_torch", "deepgemm", "ours_per_row", "torch_topk", "sgl_kernel_topk"):
        base = rec.get(key)
        if base is None:
            continue
        name = {"torch_topk": "torch.topk", "ours_per_row": "ours per-row"}.get(key) or base.get("baseline", key)
        line += f" | {name} {_fmt(base)}"
        if base.get("ms") and rec["ours"].get("ms"):
            line += f" | x{base['ms'] / rec['ours']['ms']:.1f}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--sweep", action="store_true", help="time every candidate config (no baselines)")
    parser.add_argument("--copy-gbs", type=float, help="bandwidth ceiling (GB/s) instead of measuring it")
    parser.add_argument("--mma-tflops", type=float, help="MMA ceiling (TFLOP/s) instead of measuring it")
    parser.add_argument("--sections", default="paged,prefill,topk", help="comma-separated subset to run")
    parser.add_argument("--graph-only", action="store_true",
                        help="paged and top-k: only the CUDA-graph decode shapes (logits wider than the rows)")
    args = parser.parse_args()
    if args.graph_only:
        PAGED_SHAPES[:] = [shape for shape in PAGED_SHAPES if shape[3] > shape[1]]
        TOPK_SHAPES[:] = [shape for shape in TOPK_SHAPES if shape[1] > shape[2]]

    props = torch.cuda.get_device_properties(0)
    env = {
        "gpu": props.name,
        "capability": f"sm{props.major}{props.minor}",
        "sms": props.multi_processor_count,
        "l2_mb": props.L2_cache_size >> 20,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "sglang": sglang_baselines.sglang_version(),
        "native_fp8_path": device_info(DEVICE).native_fp8,
    }
    ceilings = measure_ceilings(args.copy_gbs, args.mma_tflops)
    ceilings["mma_v2_tflops"] = mma_v2_tflops()  # the SM80-class path's tensor-core ceiling
    print(f"# {env}")
    print(f"# ceilings: copy {ceilings['copy_gbs']:.0f} GB/s ({ceilings['copy_source']}), "
          f"MMA {ceilings['mma_tflops']:.0f} TFLOP/s ({ceilings['mma_source']}), "
          f"bf16 mma_v2 {ceilings['mma_v2_tflops'] or 0:.0f} TFLOP/s (benchmarks/sm80_ceilings.py)")
    print("# TFLOP/s: 2*64*128 flops per valid score; GB/s: ideal bytes moved (see module doc); "
          "times: CUDA-graph replays over rotated input sets, median", flush=True)

    sections = {"paged": paged_section, "prefill": prefill_section, "topk": topk_section}
    records = []
    for name in args.sections.split(","):
        records += sections[name](ceilings, args.sweep)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "ceilings": ceilings, "sweep": args.sweep, "records": records}, indent=1))


if __name__ == "__main__":
    main()
