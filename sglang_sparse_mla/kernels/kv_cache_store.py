"""Writing new tokens' latent KV rows into the cache.

``store_latent_rows(kv_cache, loc, k_nope, k_rope)`` writes token ``t``'s row
``k_nope[t] (512) ‖ k_rope[t] (64)`` at slot ``loc[t]``, in the cache's
layout (:mod:`.kv_cache_layout`). The two parts may come apart (SGLang's
absorbed MLA holds them in separate tensors): a BF16 cache is filled by one
Triton kernel straight from both, without a concatenated copy; an FP8 cache
takes the rows through :func:`quantize_kv_fp8`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_dim, check_dtype, check_last_dim_contiguous, check_ndim, check_same_device
from .kv_cache_layout import D_LATENT, D_QK, D_ROPE, as_slot_rows, quantize_kv_fp8


@triton.jit
def _store_bf16_rows_kernel(
    rows_ptr, loc_ptr, nope_ptr, rope_ptr, num_slots, stride_row, stride_nope, stride_rope,
    D_NOPE: tl.constexpr, D_PE: tl.constexpr,
):  # fmt: skip
    """Row ``t``'s two parts to slot ``loc[t]``; a slot outside ``[0, num_slots)`` is not written."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    ok = (slot >= 0) & (slot < num_slots)
    dst = rows_ptr + slot * stride_row
    d = tl.arange(0, D_NOPE)
    r = tl.arange(0, D_PE)
    nope = tl.load(nope_ptr + t * stride_nope + d)
    rope = tl.load(rope_ptr + t * stride_rope + r)
    tl.store(dst + d, nope.to(rows_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + D_NOPE + r, rope.to(rows_ptr.dtype.element_ty), mask=ok)


def _token_rows(name: str, x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as ``[T, width]`` rows: ``[T, width]`` or ``[T, 1, width]``, any row stride."""
    if x.dim() == 3 and x.shape[1] == 1:
        x = x[:, 0]
    check_ndim(name, x, 2, f"[tokens, {width}] or [tokens, 1, {width}]")
    check_dim(name, x, 1, width, "row width")
    check_last_dim_contiguous(name, x)
    return x


def store_latent_rows(
    kv_cache: torch.Tensor, loc: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor | None = None
) -> None:
    """Write ``T`` latent KV rows into ``kv_cache`` at slots ``loc``.

    Args:
        kv_cache: the cache in the BF16 (``[num_slots, 576]`` bfloat16) or FP8
            (``[num_slots, 656]`` uint8 / float8_e4m3fn) layout; the
            ``[num_slots, 1, D]`` and paged views of :func:`as_slot_rows` too.
        loc: ``[T]`` int32/int64 slots, distinct (as SGLang allocates them).
        k_nope: ``[T, 512]`` (or ``[T, 1, 512]``) latent values; with
            ``k_rope=None``, ``[T, 576]`` whole rows (latent ‖ rope). bf16 or fp32.
        k_rope: ``[T, 64]`` (or ``[T, 1, 64]``) rope values, or None.

    A BF16 cache takes the values rounded to bf16; a slot outside the cache
    is skipped there (CUDA-graph padding rows). An FP8 cache gets
    :func:`quantize_kv_fp8` of the bf16 rows, whose indexing rejects such
    slots.
    """
    rows = as_slot_rows(kv_cache)
    check_dtype("loc", loc, torch.int32, torch.int64)
    check_ndim("loc", loc, 1, "[tokens]")
    if k_rope is None:
        whole = _token_rows("k_nope", k_nope, D_QK)
        k_nope, k_rope = whole[:, :D_LATENT], whole[:, D_LATENT:]
    else:
        k_nope = _token_rows("k_nope", k_nope, D_LATENT)
        k_rope = _token_rows("k_rope", k_rope, D_ROPE)
    for name, part in (("k_nope", k_nope), ("k_rope", k_rope)):
        check_dtype(name, part, torch.bfloat16, torch.float32)
        if part.shape[0] != loc.shape[0]:
            raise ValueError(f"{name} has {part.shape[0]} rows but loc has {loc.shape[0]} slots; they must match")
    check_same_device([("kv_cache", kv_cache), ("loc", loc), ("k_nope", k_nope), ("k_rope", k_rope)])
    if loc.shape[0] == 0:
        return
    if rows.is_fp8:
        whole = torch.cat([k_nope.to(torch.bfloat16), k_rope.to(torch.bfloat16)], dim=1)
        rows.latent[loc.long()] = quantize_kv_fp8(whole)
        return
    _store_bf16_rows_kernel[(loc.shape[0],)](
        rows.latent, loc, k_nope, k_rope, rows.num_slots, rows.latent.stride(0), k_nope.stride(0), k_rope.stride(0),
        D_NOPE=D_LATENT, D_PE=D_ROPE, num_warps=2,
    )  # fmt: skip
