"""Sparse MLA decode with DeepSeek-V3.2's attention shapes, checked against the float64 reference.

    python examples/sparse_mla_decode.py                 # GPU: 128 heads, top-k 2048, 32 requests
    python examples/sparse_mla_decode.py --kv-dtype fp8  # the 656-byte FP8 KV rows
    python examples/sparse_mla_decode.py --heads 16 --topk 64 --batch 2 --context 256   # CPU-sized

Without a CUDA GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set here
before the package is imported) on CPU tensors; the interpreter is slow, so without size flags a
CPU run takes small sizes (printed) instead of the released ones (``--heads 128 --topk 2048
--batch 1 --context 4096`` takes about 30 s there).

What one decode step of a DSA layer hands the kernel, as SGLang's absorbed MLA path does:

* ``q [batch, heads, 576]`` bf16: the absorbed ``q_nope`` (``kv_lora_rank`` 512, after ``W_UK``)
  followed by the rotated ``q_rope`` (64);
* ``kv_cache [slots, 576]`` bf16 (latent 512 ‖ rope 64 per token), or ``[slots, 656]`` uint8 in
  the FP8 layout (FlashMLA's: 512 e4m3 codes, 4 float32 scales, 64 bf16 rope values);
* ``indices [batch, index_topk]`` int32 KV slots chosen by the lightning indexer (here random
  positions of each request's context, mapped to slots with ``topk_to_kv_slots``); ``-1`` = none.

It returns ``out [batch, heads, 512]`` bf16 (still in the latent space: the model applies
``W_UV`` and ``o_proj`` after it) and ``lse [batch, heads]`` float32.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

# DeepSeek-V3.2 (config.json of deepseek-ai/DeepSeek-V3.2).
NUM_HEADS = 128  # num_attention_heads: all of them on one rank at TP 1 (TP N: 128 / N)
KV_LORA_RANK = 512  # the latent width: V and the non-rope part of K
QK_ROPE_HEAD_DIM = 64
QK_NOPE_HEAD_DIM = 128
INDEX_TOPK = 2048  # positions the indexer keeps per query token
ROPE_SCALING = {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0}

# Sizes a CPU run takes unless given: the interpreter executes every program in Python.
CPU_DEFAULTS = {"heads": 16, "topk": 64, "batch": 2, "context": 256}
GPU_DEFAULTS = {"heads": NUM_HEADS, "topk": INDEX_TOPK, "batch": 32, "context": 8192}


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention-magnitude correction (SGLang's ``yarn_get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(qk_nope_head_dim: int, qk_rope_head_dim: int, rope_scaling: dict | None) -> float:
    """The ``sm_scale`` the backend passes to the kernels.

    The backend hands the kernels ``layer.scaling`` of SGLang's attention layer
    (``sglang_sparse_mla/backend/attention_backend.py``), which SGLang's DeepSeek model computes as
    ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)`` (192 for DeepSeek-V3.2: the absorbed
    512-wide product equals the per-head 128 + 64 one) times ``mscale ** 2`` when the config's
    ``rope_scaling`` asks for YaRN (``compute_mla_mscale_scaling``: ``mscale =
    yarn_mscale(factor, mscale_all_dim)``). For DeepSeek-V3.2 (factor 40, mscale_all_dim 1):
    ``192 ** -0.5 * 1.3689 ** 2 = 0.1352``.
    """
    scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
    if rope_scaling and (rope_scaling.get("rope_type") or rope_scaling.get("type")) != "default":
        mscale = yarn_mscale(rope_scaling.get("factor", 1.0), float(rope_scaling.get("mscale_all_dim", False)))
        scale *= mscale * mscale
    return scale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, help=f"query heads on this rank (DeepSeek-V3.2 at TP 1: {NUM_HEADS})")
    parser.add_argument("--topk", type=int, help=f"indexer top-k per token (DeepSeek-V3.2: {INDEX_TOPK})")
    parser.add_argument("--batch", type=int, help="decode requests (one query token each)")
    parser.add_argument("--context", type=int, help="tokens already in each request's KV cache")
    parser.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16", help="KV cache layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 reference comparison")
    args = parser.parse_args(argv)
    defaults = GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    args.defaulted = [name for name in defaults if getattr(args, name) is None]
    for name in args.defaulted:
        setattr(args, name, defaults[name])
    if args.topk > args.context:
        print(f"note: top-k {args.topk} > context {args.context}: each row is padded with -1 entries")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates the kernels (first import below)
    from sglang_sparse_mla.kernels import quantize_kv_fp8, sparse_mla_decode, store_latent_rows, topk_to_kv_slots
    from sglang_sparse_mla.kernels.reference import sparse_mla_reference

    device = torch.device("cuda" if on_gpu else "cpu")
    where = torch.cuda.get_device_name() if on_gpu else "CPU, Triton interpreter"
    if args.defaulted and not on_gpu:
        print(f"no CUDA GPU: small sizes ({', '.join(f'--{n} {getattr(args, n)}' for n in args.defaulted)})")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    B, H, K, L = args.batch, args.heads, args.topk, args.context
    d_qk = KV_LORA_RANK + QK_ROPE_HEAD_DIM  # 576

    # KV cache: SGLang's req_to_token table gives request r's position p a slot; here the slots of
    # all requests are a random permutation of a pool with a few spare slots.
    num_slots = B * L + 100
    req_to_token = torch.randperm(num_slots, generator=gen, device=device)[: B * L].view(B, L).int()
    kv_cache = torch.zeros(num_slots, d_qk, dtype=torch.bfloat16, device=device)
    k_nope = torch.randn(B * L, KV_LORA_RANK, generator=gen, device=device)  # kv_a_layernorm output
    k_rope = torch.randn(B * L, QK_ROPE_HEAD_DIM, generator=gen, device=device)  # rotated k_pe
    store_latent_rows(kv_cache, req_to_token.view(-1), k_nope, k_rope)  # what the backend does per step
    if args.kv_dtype == "fp8":
        kv_cache = quantize_kv_fp8(kv_cache)  # [slots, 656] uint8; store_latent_rows writes it as well

    # The indexer's choice: K distinct positions of each request's context (all of them, then
    # -1 padding, when the context is shorter), mapped to KV slots.
    positions = torch.full((B, K), -1, dtype=torch.int32, device=device)
    for r in range(B):
        chosen = torch.randperm(L, generator=gen, device=device)[: min(K, L)]
        positions[r, : chosen.numel()] = chosen.int()
    slots = topk_to_kv_slots(positions, req_to_token, torch.arange(B, dtype=torch.int32, device=device))

    # Absorbed query: q_nope @ W_UK (512) and the rotated q_pe (64), one token per request.
    q = torch.randn(B, H, d_qk, generator=gen, device=device).bfloat16()
    sm_scale = softmax_scale(QK_NOPE_HEAD_DIM, QK_ROPE_HEAD_DIM, ROPE_SCALING)

    print(
        f"sparse_mla_decode on {where}: batch {B} x {H} heads, top-k {K} of {L} cached tokens, "
        f"{args.kv_dtype} KV {tuple(kv_cache.shape)} {kv_cache.dtype}, sm_scale {sm_scale:.4f}"
    )
    start = time.perf_counter()
    out, lse = sparse_mla_decode(q, kv_cache, slots, sm_scale)
    if on_gpu:
        torch.cuda.synchronize()
    print(f"out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)} {lse.dtype} ({time.perf_counter() - start:.2f} s)")
    if on_gpu:
        # Steady state: the first call above compiled the kernels.
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            sparse_mla_decode(q, kv_cache, slots, sm_scale)
        end.record()
        torch.cuda.synchronize()
        print(f"{start.elapsed_time(end) / 20 * 1e3:.1f} us per call (20 back to back, not CUDA-graph timed)")

    if args.no_check:
        return 0
    ref_out, ref_lse = sparse_mla_reference(q, kv_cache, slots, sm_scale)
    out_error = ((out.double() - ref_out).norm() / ref_out.norm()).item()
    lse_error = (lse.double() - ref_lse).abs().max().item()
    # The test suite's limits: bf16 output and bf16 probabilities in the PV product.
    passed = out_error < 1.5e-2 and lse_error < 2e-3 and bool(torch.isfinite(out).all())
    print(f"vs float64 reference: out rel. error {out_error:.2e}, lse max |diff| {lse_error:.2e}")
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
