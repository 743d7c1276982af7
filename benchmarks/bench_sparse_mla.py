"""Sparse MLA decode and prefill: ours vs SGLang 0.5.23's Triton kernels, FlashMLA
(prefill) and FA3 (decode) as its ``dsa`` backend calls them, its tilelang kernel (what
its fallback for GPUs without FlashMLA runs for BF16 decode and prefill), where they
load, and torch.

Decode: T = 1..128 query tokens, H = 8/16/32/64/128 heads (8 and 16: one TP-8 rank of
GLM-5 and of DeepSeek-V3.2), top-k 2048 random slots of a cache of 2^20 slots (1.2 GB
BF16, 0.69 GB FP8), so gathers miss L2.
Prefill: T = 4096 tokens, each attending top-k 2048 of its causal prefix in an
8K..12K-token context spread over the same cache; and "prefill-fresh", the first
4096 tokens of a new prompt (token t has min(t + 1, 2048) valid entries, then
-1), with our whole-row pass beside the default that stops after them.

FLOPs count 2*(576+512) per (token, head, valid index); bytes count the
gathered KV rows (1152 B BF16, 656 B FP8) plus q and the output. Prefill rows
are shared between tokens (as in real prefill) so most of its gathers hit L2:
its GB/s is "logical" and TFLOP/s is the figure to read. Percentages: of the copy
bandwidth and the cuBLAS bf16 matmul (%bw, %mma), and of the SM80-class path's own
ceilings measured in the same run (benchmarks/sm80_ceilings.py): bf16 mma_v2 (%v2)
and the read rate of random row gathers of the cache's row size (%gath).

    python benchmarks/bench_sparse_mla.py --out results.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.dirname(__file__))

import sglang_baselines  # noqa: E402
from sm80_ceilings import gather_gbs, mma_v2_tflops  # noqa: E402
from timing import Ceilings, measure_ceilings, rotation_count, time_launches  # noqa: E402

from sglang_sparse_mla.kernels import (  # noqa: E402
    SparseMLAConfig,
    device_info,
    quantize_kv_fp8,
    select_config,
    sparse_mla_forward,
    triton_config,
)

TOPK = 2048
NUM_SLOTS = 1 << 20
SM_SCALE = 576**-0.5
ROW_BYTES = {"bf16": 1152, "fp8": 656}


def torch_gather_attention(q, kv, idx, chunk=512):
    """The plain torch path: gather rows, bf16 matmuls, fp32 softmax (no float64)."""
    outs = []
    for t0 in range(0, q.shape[0], chunk):
        i = idx[t0 : t0 + chunk]
        k = kv[i.clamp_min(0).long()]  # [t, topk, 576]
        s = torch.matmul(q[t0 : t0 + chunk], k.transpose(1, 2)).float() * SM_SCALE
        s = s.masked_fill((i < 0)[:, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).to(torch.bfloat16)
        outs.append(torch.matmul(p, k[..., :512]))
    return torch.cat(outs)


def decode_inputs(tokens, heads, sets, gen):
    qs = [torch.randn(tokens, heads, 576, device="cuda", generator=gen).bfloat16() for _ in range(sets)]
    idx = [
        torch.randint(0, NUM_SLOTS, (tokens, TOPK), device="cuda", generator=gen, dtype=torch.int32)
        for _ in range(sets)
    ]
    return qs, idx


def prefill_inputs(tokens, heads, sets, gen):
    """Token t sees the first 8192 + t positions of a request whose positions
    live at random cache slots; it attends 2048 random distinct ones."""
    qs, idxs = [], []
    for _ in range(sets):
        context = 8192 + tokens
        slots = torch.randperm(NUM_SLOTS, device="cuda", generator=gen)[:context].to(torch.int32)
        visible = torch.arange(context, device="cuda")[None, :] < (8192 + torch.arange(tokens, device="cuda"))[:, None]
        keys = torch.rand(tokens, context, device="cuda", generator=gen).masked_fill(~visible, 2.0)
        pos = keys.topk(TOPK, dim=1, largest=False).indices
        idxs.append(slots[pos].contiguous())
        qs.append(torch.randn(tokens, heads, 576, device="cuda", generator=gen).bfloat16())
    return qs, idxs


def fresh_prompt_inputs(tokens, heads, sets, gen):
    """The first chunk of a new prompt: token t sees positions 0..t (random
    cache slots) and attends min(t + 1, 2048) of them, listed first in its
    row as top-k writes them, then -1."""
    qs, idxs = [], []
    for _ in range(sets):
        slots = torch.randperm(NUM_SLOTS, device="cuda", generator=gen)[:tokens].to(torch.int32)
        visible = torch.arange(tokens, device="cuda")[None, :] <= torch.arange(tokens, device="cuda")[:, None]
        keys = torch.rand(tokens, tokens, device="cuda", generator=gen).masked_fill(~visible, 2.0)
        pos = keys.topk(min(TOPK, tokens), dim=1, largest=False).indices.sort(dim=1).values
        idx = torch.where(keys.gather(1, pos) < 2.0, slots[pos], -1)
        idx = torch.nn.functional.pad(idx, (0, TOPK - idx.shape[1]), value=-1)
        idx = idx.gather(1, torch.sort((idx < 0).to(torch.int8), dim=1, stable=True).indices)  # valid first
        idxs.append(idx.contiguous())
        qs.append(torch.randn(tokens, heads, 576, device="cuda", generator=gen).bfloat16())
    return qs, idxs


INPUTS = {"decode": decode_inputs, "prefill": prefill_inputs, "prefill-fresh": fresh_prompt_inputs}


def config_label(cfg):
    if cfg is None:
        return "auto"
    kind = "ws " if cfg.warp_specialized else "gluon-sm80 " if cfg.gluon_sm80 else ""
    label = f"{kind}h{cfg.block_h} n{cfg.block_n} w{cfg.num_warps} st{cfg.num_stages}"
    for field, variant in (("word_dequant", "words"), ("dequant_ahead", "ahead"), ("plane_warps", "planes")):
        if getattr(cfg, field, False):  # an earlier package (bench-before) may not have the field
            label += f" {variant}"
    return label


def measure(label, calls, flops, bytes_, ceilings: Ceilings, shape):
    timing = time_launches(calls)
    us = timing.ms * 1e3
    tflops = flops / (timing.ms * 1e-3) / 1e12
    gbs = bytes_ / (timing.ms * 1e-3) / 1e9
    return dict(
        shape,
        impl=label,
        us=us,
        tflops=tflops,
        gbs=gbs,
        pct_mma=100 * tflops / ceilings.bf16_tflops,
        pct_bw=100 * gbs / ceilings.copy_gbs,
        pct_mma_v2=100 * tflops / ceilings.mma_v2_tflops if ceilings.mma_v2_tflops else None,
        pct_gather=100 * gbs / ceilings.gather_gbs[ROW_BYTES[shape["kv"]]] if ceilings.gather_gbs else None,
        spread=timing.spread,
        timing=timing.method,
    )


def flash_mla_prefill_calls(kv, qs, idxs):
    """FlashMLA's sparse prefill as SGLang's ``dsa`` backend calls it on SM90: query heads zero-padded
    to a multiple of 64 (done here, outside the timing), indices ``[T, 1, topk]``."""
    fn, why = sglang_baselines.flash_mla_sparse_prefill()
    if fn is None:
        return why
    kv3 = kv.view(-1, 1, 576)
    padded = []
    for q in qs:
        heads = -(-q.shape[1] // 64) * 64
        padded.append(torch.nn.functional.pad(q, (0, 0, 0, heads - q.shape[1])) if heads != q.shape[1] else q)
    return [(lambda q=q, i=i: fn(q, kv3, i.unsqueeze(1), SM_SCALE, 512)) for q, i in zip(padded, idxs, strict=True)]


def fa3_decode_calls(kv, qs, idxs):
    """FA3's paged decode as SGLang's ``dsa`` backend runs it over a BF16 cache: one-token
    sequences, page size 1, the top-k slots as page table, the valid count as the cache length
    (all of a decode row's entries are valid here)."""
    fn, why = sglang_baselines.fa3_sparse_decode()
    if fn is None:
        return why
    pages = kv.view(-1, 1, 1, 576)
    rope_cache, latent_cache = pages[..., 512:], pages[..., :512]
    calls = []
    for q, i in zip(qs, idxs, strict=True):
        lengths = (i >= 0).sum(1, dtype=torch.int32)
        cu_k = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
        calls.append(
            lambda q=q, i=i, lengths=lengths, cu_k=cu_k, cu_q=cu_q: fn(
                q=q[..., 512:], k_cache=rope_cache, v_cache=latent_cache, qv=q[..., :512], page_table=i,
                cache_seqlens=lengths, cu_seqlens_q=cu_q, cu_seqlens_k_new=cu_k, max_seqlen_q=1,
                softmax_scale=SM_SCALE, causal=True, num_splits=0,
            )
        )  # fmt: skip
    return calls


def baseline_calls(phase, tokens, kv_format, heads, kv, qs, idxs):
    """(label, calls or the reason it is unavailable) for each baseline."""
    if kv_format == "bf16":
        if phase == "decode":
            fn, why = sglang_baselines.sparse_mla_decode()
            kv3 = kv.view(-1, 1, 576)
            calls = [
                (lambda q=q, i=i: fn(q[..., :512], q[..., 512:], kv3, i.view(tokens, 1, TOPK), SM_SCALE, 512))
                for q, i in zip(qs, idxs)
            ]
        else:
            fn, why = sglang_baselines.sparse_mla_prefill()
            calls = [(lambda q=q, i=i: fn(q, kv, i, SM_SCALE, 512)) for q, i in zip(qs, idxs)]
        yield "sglang-triton", calls if fn is not None else why
    if kv_format == "bf16" and phase != "prefill-fresh":
        fn, why = sglang_baselines.tilelang_sparse_attention()
        kv3 = kv.view(-1, 1, 576)
        calls = [(lambda q=q, i=i: fn(q, kv3, i.view(tokens, 1, TOPK), SM_SCALE, 512)) for q, i in zip(qs, idxs)]
        yield "tilelang (fallback)", calls if fn is not None else why
    if phase != "decode" and kv_format == "bf16":
        yield "flashmla", flash_mla_prefill_calls(kv, qs, idxs)
    if phase == "decode" and kv_format == "bf16":
        yield "fa3 (dsa decode)", fa3_decode_calls(kv, qs, idxs)
    if phase == "decode" and kv_format == "bf16" and heads <= 32:
        yield "torch-gather", [(lambda q=q, i=i: torch_gather_attention(q, kv, i)) for q, i in zip(qs, idxs)]


def run_case(phase, tokens, heads, kv_format, caches, ceilings, gen, configs, split_options, baselines):
    sets = min(rotation_count(tokens * TOPK * ROW_BYTES[kv_format]), 32) if phase == "decode" else 2
    qs, idxs = INPUTS[phase](tokens, heads, sets, gen)
    kv = caches[kv_format]
    valid = (idxs[0] >= 0).sum().item()  # per call (every set has the same count)
    flops = 2 * valid * heads * (576 + 512)
    bytes_ = valid * ROW_BYTES[kv_format] + tokens * heads * (576 + 512) * 2
    shape = dict(phase=phase, tokens=tokens, heads=heads, kv=kv_format, topk=TOPK)
    rows = []
    # Prefill stops each row after its last valid entry (as sparse_mla_prefill does); "whole rows" beside.
    skip_options = [True, False] if phase == "prefill-fresh" else [phase != "decode"]
    for cfg, splits, skip in ((c, s, k) for c in configs for s in split_options for k in skip_options):
        name = "ours" if cfg is None and splits is None else f"ours[{config_label(cfg)} s={splits}]"
        name += "" if skip or phase == "decode" else "[whole rows]"
        calls = [
            (
                lambda q=q, i=i, splits=splits, cfg=cfg, skip=skip: sparse_mla_forward(
                    q, kv, i, SM_SCALE, num_kv_splits=splits, config=cfg, skip_invalid_tail=skip
                )
            )
            for q, i in zip(qs, idxs)
        ]
        try:
            rows.append(measure(name, calls, flops, bytes_, ceilings, shape))
        except Exception as err:  # a sweep config that does not fit this GPU
            rows.append(dict(shape, impl=name, error=f"{type(err).__name__}: {err}"[:200]))
    if not baselines:
        return rows
    for label, calls in baseline_calls(phase, tokens, kv_format, heads, kv, qs, idxs):
        if isinstance(calls, str):
            rows.append(dict(shape, impl=label, error=calls))
            continue
        try:
            rows.append(measure(label, calls, flops, bytes_, ceilings, shape))
        except Exception as err:  # a baseline that fails on this shape is reported, not fatal
            rows.append(dict(shape, impl=label, error=f"{type(err).__name__}: {err}"[:200]))
    return rows


SWEEP_CONFIGS = {
    ("bf16", 16): [(16, 32, 4, 2), (16, 64, 4, 2)],
    ("fp8", 16): [(16, 16, 4, 2), (16, 32, 4, 2), (16, 32, 8, 2), (16, 32, 4, 3)],
    ("bf16", 32): [(32, 64, 8, 2), (32, 32, 8, 2)],
    ("fp8", 32): [(32, 32, 8, 2), (32, 64, 8, 2), (32, 16, 8, 2)],
    ("bf16", 128): [(64, 64, 8, 2, True), (64, 64, 8, 3), (64, 32, 8, 3), (32, 64, 8, 2)],
    ("fp8", 128): [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2), (32, 64, 8, 2)],
}


def sweep_cases(caches, ceilings, gen, kv_formats):
    """Candidate tile configs (heuristic split count) and split counts (default
    config) on the shapes that decide the dispatch tables."""
    rows = []
    for kv_format in kv_formats:
        for heads in (16, 32, 128):
            configs = [SparseMLAConfig(*c) for c in SWEEP_CONFIGS[kv_format, heads]]
            for tokens in (2, 4, 8, 32, 128) if (kv_format, heads) == ("bf16", 128) else (32, 128):
                few = [SparseMLAConfig(16, 64, 4, 2)] if tokens < 32 else []
                candidates = configs + few
                rows += run_case("decode", tokens, heads, kv_format, caches, ceilings, gen, candidates, [None], False)
                rows += run_case("decode", tokens, heads, kv_format, caches, ceilings, gen, [None], [1, 2, 4, 8], False)
            rows += run_case("prefill", 4096, heads, kv_format, caches, ceilings, gen, configs, [None], False)
            torch.cuda.empty_cache()
    return rows


# BF16 caches: the Gluon SM80-class kernel's candidates, timed beside the dispatched kernel.
GLUON_BF16_CANDIDATES = {16: SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True), 32: SparseMLAConfig(32, 32, 8, 2, gluon_sm80=True)}


def kernel_candidates(heads: int, kv_format: str, info) -> list:
    """The dispatched kernel (``None``), then the Triton kernel where a Gluon one is dispatched,
    and the Gluon SM80-class kernel for BF16 caches where it could run."""
    fp8 = kv_format == "fp8"
    chosen = select_config(heads, fp8, info)
    configs = [None]
    if chosen.warp_specialized or chosen.gluon_sm80:
        configs.append(triton_config(heads, fp8, info))
    gluon_bf16 = GLUON_BF16_CANDIDATES.get(16 if heads <= 16 else 32)
    if not fp8 and info.gluon_sm80 and not chosen.gluon_sm80 and heads <= 32:
        configs.append(gluon_bf16)
    return configs


def _gluon(block_h, block_n, num_warps, num_stages, **variant) -> SparseMLAConfig:
    return SparseMLAConfig(block_h, block_n, num_warps, num_stages, gluon_sm80=True, **variant)


# Candidates of the Gluon SM80-class kernels per (cache, head bucket), timed on the native and the
# forced SM80 path (``--sweep-gluon``): key tile, warps and ring depth, the FP8 tile dequantized one
# iteration ahead, and the one-warp-a-plane kernel. Built on use: the benchmark also times earlier
# packages (gpu_suite.sh bench-before) whose configs lack these variants.
def gluon_sweep_candidates() -> dict[tuple[str, int], list[SparseMLAConfig]]:
    word = dict(word_dequant=True)
    ahead, planes = dict(word, dequant_ahead=True), dict(plane_warps=True)
    return {
        ("fp8", 16): [_gluon(16, 32, 4, 2), _gluon(16, 32, 4, 2, **word), _gluon(16, 32, 8, 2, **word),
                      _gluon(16, 32, 4, 3, **ahead), _gluon(16, 32, 8, 3, **ahead), _gluon(16, 16, 4, 3, **ahead),
                      _gluon(16, 32, 4, 2, **planes), _gluon(16, 32, 4, 3, **planes)],
        ("fp8", 128): [_gluon(32, 32, 8, 2), _gluon(32, 32, 8, 2, **word), _gluon(32, 64, 8, 2, **word),
                       _gluon(32, 32, 8, 3, **ahead), _gluon(32, 32, 8, 2, **planes)],
        ("bf16", 16): [_gluon(16, 32, 4, 2), _gluon(16, 32, 4, 2, **word), _gluon(16, 32, 4, 3), _gluon(16, 64, 8, 2),
                       _gluon(16, 32, 4, 2, **planes)],
    }  # fmt: skip


def gluon_sweep(caches, ceilings, gen, kv_formats, heads_list=None, decode_tokens=None):
    rows = []
    for (kv_format, heads), candidates in gluon_sweep_candidates().items():
        if kv_format not in kv_formats or (heads_list and heads not in heads_list):
            continue
        configs = [None] + candidates
        for tokens in decode_tokens or (32, 128):
            rows += run_case("decode", tokens, heads, kv_format, caches, ceilings, gen, configs, [None], False)
        rows += run_case("prefill", 4096, heads, kv_format, caches, ceilings, gen, configs, [None], False)
        torch.cuda.empty_cache()
    return rows


def full_table(caches, ceilings, gen, quick, baselines, heads_list=None, decode_tokens=None, kv_formats=("bf16", "fp8")):
    rows = []
    info = device_info(torch.device("cuda"))
    decode_tokens = decode_tokens or ([1, 32, 128] if quick else [1, 8, 32, 64, 128])
    heads_list = heads_list or ([16, 128] if quick else [8, 16, 32, 64, 128])
    for kv_format in kv_formats:
        for heads in heads_list:
            configs = kernel_candidates(heads, kv_format, info)
            for tokens in decode_tokens:
                rows += run_case("decode", tokens, heads, kv_format, caches, ceilings, gen, configs, [None], baselines)
            rows += run_case("prefill", 4096, heads, kv_format, caches, ceilings, gen, configs, [None], baselines)
            rows += run_case("prefill-fresh", 4096, heads, kv_format, caches, ceilings, gen, [None], [None], baselines)
            torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--sweep", action="store_true", help="time candidate tile configs and split counts instead")
    parser.add_argument("--sweep-gluon", action="store_true", help="time the Gluon SM80-class kernel's candidates")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--kv", default="bf16,fp8", help="cache formats to sweep (and of --sweep-gluon)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--heads", help="comma-separated head counts of the full table (default 8,16,32,64,128; --sweep-gluon: its 16, 128)")
    parser.add_argument("--tokens", help="comma-separated decode token counts (default 1,8,32,64,128; --sweep-gluon: 32,128)")
    args = parser.parse_args()
    ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731

    gen = torch.Generator(device="cuda").manual_seed(0)
    ceilings = measure_ceilings()
    ceilings = replace(ceilings, mma_v2_tflops=mma_v2_tflops(),
                       gather_gbs={b: gather_gbs(b, gen) for b in sorted(set(ROW_BYTES.values()))})  # fmt: skip
    kv = torch.randn(NUM_SLOTS, 576, device="cuda", generator=gen).bfloat16()
    caches = {"bf16": kv, "fp8": quantize_kv_fp8(kv)}
    if args.sweep_gluon:
        rows = gluon_sweep(caches, ceilings, gen, args.kv.split(","), ints(args.heads), ints(args.tokens))
    elif args.sweep:
        rows = sweep_cases(caches, ceilings, gen, args.kv.split(","))
    else:
        rows = full_table(caches, ceilings, gen, args.quick, not args.no_baselines, ints(args.heads), ints(args.tokens),
                          args.kv.split(","))  # fmt: skip
    result = dict(
        device=torch.cuda.get_device_name(),
        forced_sm80=os.environ.get("SGLANG_SPARSE_MLA_FORCE_SM80", "0") not in ("", "0"),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        sglang=sglang_baselines.sglang_version(),
        ceilings=asdict(ceilings),
        rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)


def print_table(result):
    c = result["ceilings"]
    print(f"# {result['device']}  torch {result['torch']}  triton {result['triton']}  sglang {result['sglang']}")
    print(f"# ceilings: copy {c['copy_gbs']:.0f} GB/s, bf16 matmul {c['bf16_tflops']:.0f} TFLOP/s; SM80-class: "
          f"mma_v2 {c['mma_v2_tflops'] or 0:.0f} TFLOP/s, row gathers "
          + ", ".join(f"{b} B {g:.0f} GB/s" for b, g in (c["gather_gbs"] or {}).items()))  # fmt: skip
    print(f"{'phase':14}{'kv':5}{'H':>4}{'T':>6}  {'impl':44}{'us':>9}{'TFLOP/s':>9}{'GB/s':>8}{'%bw':>6}{'%mma':>6}"
          f"{'%v2':>6}{'%gath':>6}")  # fmt: skip
    for r in result["rows"]:
        head = f"{r['phase']:14}{r['kv']:5}{r['heads']:>4}{r['tokens']:>6}  {r['impl'][:43]:44}"
        if "error" in r:
            print(head + "  n/a: " + r["error"][:90])
        else:
            extra = "".join(f"{r[k]:6.0f}" if r.get(k) is not None else f"{'-':>6}" for k in ("pct_mma_v2", "pct_gather"))
            print(head + f"{r['us']:9.1f}{r['tflops']:9.1f}{r['gbs']:8.0f}{r['pct_bw']:6.0f}{r['pct_mma']:6.0f}" + extra)


if __name__ == "__main__":
    main()
