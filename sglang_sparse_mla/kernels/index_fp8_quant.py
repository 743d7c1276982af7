"""The DSA indexer's FP8 keys and queries of a layer in one launch.

Before scoring, the indexer rotates its 128-wide queries and keys with the
orthonormal Walsh-Hadamard matrix (where the model's writer does), quantizes
each 128-value row to float8_e4m3fn with one float32 scale, stores the keys in
the paged index-K cache and turns the per-head gates into score weights. In
torch that is some thirty small launches per layer; here it is one kernel
whose first blocks take the keys and the others the queries
(:func:`quantize_index_keys_and_queries`; each part alone:
:func:`quantize_index_keys_to_cache`, :func:`quantize_index_queries`).

Per row ``x`` (128 values):

* either the rotation (optional; SGLang's unfused indexer):
  ``bf16((x @ H) * 128 ** -0.5)``, ``H`` the ``+-1`` Walsh-Hadamard matrix,
  products exact and summed in fp32, rounded once to bf16, as SGLang's fast
  Hadamard transform;
* or (SGLang's fused indexer, e.g. GLM-5 on CUDA) LayerNorm (keys) and the
  interleaved rope of the first 64 values (:class:`IndexRope`, :class:`IndexNorm`)
  applied here in fp32 to the raw projections, keys then rounded to bf16
  once, queries not at all, as its fused CUDA kernels do (the module's own
  LayerNorm and rope would round after each);
* the scale and codes in one of SGLang's two formats (``scale_format``):

  - ``"ue8m0"`` (its ``act_quant`` with ``scale_fmt="ue8m0"``, the unfused
    indexer's queries): ``scale = max(amax, 1e-4) * (1 / 448)`` in fp32,
    rounded up to a power of two (exactly: the next power of two unless it
    is one), ``codes = e4m3(clamp(x / scale, -448, 448))``;
  - ``"fp32"`` (its CUDA index writers: the index-K store of every indexer,
    the fused indexer's queries): ``scale = max(amax, 1e-4) / 448`` and
    ``codes = e4m3(clamp(x * (1 / scale), -448, 448))``, each operation one
    IEEE fp32 rounding;

  e4m3 rounding to nearest even;
* queries: ``weight = ((gate * head_scale) * scale) * softmax_scale`` in fp32;
* keys: code bytes and scale written at slot ``loc`` of the paged index-K cache
  ``[pages, page_size, 1, 132]`` uint8 (per page: ``page_size`` keys of 128
  bytes, then their float32 scales), SGLang's DSA layout.

The FP8 codes are computed from the fp32 bits (no FP8 hardware needed), so
the kernel runs on SM80/86 as well.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .checks import check_dim, check_dtype, check_last_dim_contiguous, check_ndim, check_same_device
from .device_info import is_interpreter
from .fp8_convert import round_to_bf16
from .index_format import INDEX_HEAD_DIM as HEAD_DIM  # the name test_indexer_compile.py reads
from .index_format import INDEX_ROW_BYTES, ROPE_DIM, SCALE_FORMATS, IndexNorm, IndexRope, hadamard_signs

BLOCK_ROWS = 32  # rows per program; fixed, so a row's result never depends on the batch
NUM_WARPS = 8  # 4 spilled on sm110 once keys and queries shared a launch (Triton 3.8)


@triton.jit
def _negate(x):
    """``-x`` for fp32 ``x`` by flipping the sign bit. Triton 3.6 lowers unary minus as ``0 - x`` (for a
    product fused into ``fma(-a, b, +0)``), which gives ``+0`` where IEEE negation gives ``-0``."""
    return (x.to(tl.int32, bitcast=True) ^ -2147483648).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_codes(y):
    """float8_e4m3fn codes (uint8) of fp32 ``y`` with ``|y| <= 448``, round to nearest even.

    Integer arithmetic on the fp32 bits, so it needs no FP8 hardware (SM80/86)
    and matches torch's conversion under the interpreter, whose own fp32 ->
    e4m3 cast does not round to nearest. Normal codes (``|y| >= 2**-6``): the
    fp32 exponent rebiased (127 -> 7) and the mantissa rounded to 3 bits, a
    carry moving into the exponent; subnormal codes: ``|y| * 2**9`` rounded
    to an integer (by adding and subtracting ``2**23`` in fp32).
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    subnormal = ((tl.abs(y) * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    return (sign | tl.where(magnitude >= 0x3C800000, normal, subnormal)).to(tl.uint8)


@triton.jit
def _row_scale(amax, UE8M0: tl.constexpr):
    """Per-row FP8 scale from ``amax`` (already ``max(amax, 1e-4)``), in SGLang's format."""
    if UE8M0:
        bits = (amax * (1.0 / 448.0)).to(tl.int32, bitcast=True)
        exponent = bits & 0x7F800000
        return tl.where((bits & 0x7FFFFF) != 0, exponent + 0x800000, exponent).to(tl.float32, bitcast=True)
    else:
        return tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))


@triton.jit
def _codes_of(x, inv_scale):
    """e4m3 codes of ``x [R, W] * inv_scale [R]``, clamped to +-448. For power-of-two scales the
    product equals the quotient ``x / scale`` exactly."""
    return _e4m3_codes(tl.minimum(tl.maximum(x * inv_scale[:, None], -448.0), 448.0))


@triton.jit
def _store_codes(codes, cols, rows, ok, codes_ptr, loc_ptr, page_size, PAGED: tl.constexpr, D: tl.constexpr):
    """Codes ``[R, W]`` of rows ``rows`` at columns ``cols [W]``: at each row's slot of the paged
    index-K cache (``PAGED``), else at row ``rows`` of a dense ``[rows, D]`` array."""
    if PAGED:
        slot = tl.load(loc_ptr + rows, mask=ok, other=0).to(tl.int64)
        start = (slot // page_size) * page_size * (D + 4) + (slot % page_size) * D
    else:
        start = rows.to(tl.int64) * D
    tl.store(codes_ptr + start[:, None] + cols[None, :], codes, mask=ok[:, None])


@triton.jit
def _store_scale_and_weight(
    scale, rows, ok, token, head, scales_ptr, loc_ptr, page_size,
    gate_ptr, stride_gt, head_scale, softmax_scale, weights_ptr,
    PAGED: tl.constexpr, HAS_GATE: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """The scales (after a page's codes, or dense) and, for queries, ``((gate * head_scale) * scale)
    * softmax_scale`` in fp32."""
    if PAGED:
        slot = tl.load(loc_ptr + rows, mask=ok, other=0).to(tl.int64)
        page, offset = slot // page_size, slot % page_size
        tl.store(scales_ptr + (page * page_size * (D + 4) + page_size * D) // 4 + offset, scale, mask=ok)
    else:
        tl.store(scales_ptr + rows.to(tl.int64), scale, mask=ok)
    if HAS_GATE:
        gate = tl.load(gate_ptr + token * stride_gt + head, mask=ok, other=0.0).to(tl.float32)
        tl.store(weights_ptr + rows, ((gate * head_scale) * scale) * softmax_scale, mask=ok)


@triton.jit
def _rotated_rows(ok, x_rows, signs_ptr, ROTATE: tl.constexpr, ROTATE_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
                  D: tl.constexpr):  # fmt: skip
    """Rows at ``x_rows`` as given (norm and rope already applied), optionally Hadamard-rotated:
    ``[R, D]`` fp32."""
    d = tl.arange(0, D)
    x = tl.load(x_rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    if ROTATE:
        signs = tl.load(signs_ptr + d[:, None] * D + d[None, :])
        if DOT_FP32:  # the interpreter's bf16 dot is wrong; fp32 products of bf16 values are exact too
            rotated = tl.dot(x.to(tl.float32), signs.to(tl.float32))
        else:
            rotated = tl.dot(x, signs)
        return round_to_bf16(rotated * ROTATE_SCALE)
    else:
        return x.to(tl.float32)


@triton.jit
def _roped_rows(
    ok, token, x_rows, positions_ptr, cos_sin_ptr, stride_cs, norm_weight_ptr, norm_bias_ptr, eps,
    NORM: tl.constexpr, ROUND_BF16: tl.constexpr, D: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """Raw rows at ``x_rows``: LayerNorm (``NORM``) and the interleaved rope of the leading
    ``2 * PAIRS`` values in fp32, then (``ROUND_BF16``) one rounding to bf16. Returns the row as its
    even and odd rope values and its ``D - 2 * PAIRS`` others (fp32)."""
    even = 2 * tl.arange(0, PAIRS)
    rest = 2 * PAIRS + tl.arange(0, D - 2 * PAIRS)
    xe = tl.load(x_rows[:, None] + even[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    xo = tl.load(x_rows[:, None] + (even + 1)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    xr = tl.load(x_rows[:, None] + rest[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if NORM:
        mean = (tl.sum(xe, 1) + tl.sum(xo, 1) + tl.sum(xr, 1)) * (1.0 / D)
        xe, xo, xr = xe - mean[:, None], xo - mean[:, None], xr - mean[:, None]
        var = (tl.sum(xe * xe, 1) + tl.sum(xo * xo, 1) + tl.sum(xr * xr, 1)) * (1.0 / D)
        inv_std = tl.math.rsqrt(var + eps)[:, None]
        xe = xe * inv_std * tl.load(norm_weight_ptr + even)[None, :] + tl.load(norm_bias_ptr + even)[None, :]
        xo = xo * inv_std * tl.load(norm_weight_ptr + even + 1)[None, :] + tl.load(norm_bias_ptr + even + 1)[None, :]
        xr = xr * inv_std * tl.load(norm_weight_ptr + rest)[None, :] + tl.load(norm_bias_ptr + rest)[None, :]
    position = tl.load(positions_ptr + token, mask=ok, other=0).to(tl.int64)
    cs_rows = cos_sin_ptr + position * stride_cs
    pair = tl.arange(0, PAIRS)
    cos = tl.load(cs_rows[:, None] + pair[None, :], mask=ok[:, None], other=1.0).to(tl.float32)
    sin = tl.load(cs_rows[:, None] + (PAIRS + pair)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    # The products contracted as nvcc contracts SGLang's ``x * c - y * s`` and ``x * s + y * c``
    # (the first one fused); left to itself Triton's LLVM fuses the second of the sum. The negation keeps
    # the sign of a zero product, so that an all-zero row gives SGLang's -0 codes (0x80) where cos < 0 < sin.
    re = tl.fma(xe, cos, _negate(xo * sin))
    ro = tl.fma(xe, sin, xo * cos)
    if ROUND_BF16:
        re, ro, xr = round_to_bf16(re), round_to_bf16(ro), round_to_bf16(xr)
    return re, ro, xr


@triton.jit
def _rows_block(
    block, x_ptr, stride_xt, stride_xh, num_rows, heads, codes_ptr, scales_ptr, loc_ptr, page_size,
    gate_ptr, stride_gt, head_scale, softmax_scale, weights_ptr,
    signs_ptr, positions_ptr, cos_sin_ptr, stride_cs, norm_weight_ptr, norm_bias_ptr, eps,
    ROPE: tl.constexpr, NORM: tl.constexpr, ROUND_BF16: tl.constexpr, ROTATE: tl.constexpr,
    ROTATE_SCALE: tl.constexpr, DOT_FP32: tl.constexpr, UE8M0: tl.constexpr, PAGED: tl.constexpr,
    HAS_GATE: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """Quantize and store rows ``block * BLOCK_R ...`` of one tensor (keys or queries): roped
    (``ROPE``, :func:`_roped_rows`) or as given (:func:`_rotated_rows`)."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < num_rows
    token = (rows // heads).to(tl.int64)
    head = rows % heads
    x_rows = x_ptr + token * stride_xt + head * stride_xh
    if ROPE:
        re, ro, xr = _roped_rows(
            ok, token, x_rows, positions_ptr, cos_sin_ptr, stride_cs, norm_weight_ptr, norm_bias_ptr, eps,
            NORM, ROUND_BF16, D, PAIRS,
        )  # fmt: skip
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(re), axis=1), tl.max(tl.abs(ro), axis=1)), tl.max(tl.abs(xr), axis=1))
        scale = _row_scale(tl.maximum(amax, 1e-4), UE8M0)
        inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        even = 2 * tl.arange(0, PAIRS)
        rest = 2 * PAIRS + tl.arange(0, D - 2 * PAIRS)
        _store_codes(_codes_of(re, inv_scale), even, rows, ok, codes_ptr, loc_ptr, page_size, PAGED, D)
        _store_codes(_codes_of(ro, inv_scale), even + 1, rows, ok, codes_ptr, loc_ptr, page_size, PAGED, D)
        _store_codes(_codes_of(xr, inv_scale), rest, rows, ok, codes_ptr, loc_ptr, page_size, PAGED, D)
    else:
        xf = _rotated_rows(ok, x_rows, signs_ptr, ROTATE, ROTATE_SCALE, DOT_FP32, D)
        scale = _row_scale(tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-4), UE8M0)
        inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        _store_codes(_codes_of(xf, inv_scale), tl.arange(0, D), rows, ok, codes_ptr, loc_ptr, page_size, PAGED, D)
    _store_scale_and_weight(
        scale, rows, ok, token, head, scales_ptr, loc_ptr, page_size,
        gate_ptr, stride_gt, head_scale, softmax_scale, weights_ptr, PAGED, HAS_GATE, D,
    )  # fmt: skip


@triton.jit
def _index_fp8_kernel(
    k_ptr, stride_kt, key_rows, cache_ptr, cache_scales_ptr, loc_ptr, page_size,
    q_ptr, stride_qt, stride_qh, query_rows, heads, q_codes_ptr, q_scales_ptr,
    gate_ptr, stride_gt, head_scale, softmax_scale, weights_ptr,
    signs_ptr, positions_ptr, cos_sin_ptr, stride_cs, norm_weight_ptr, norm_bias_ptr, eps,
    ROPE: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr, ROTATE_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr, KEY_UE8M0: tl.constexpr, QUERY_UE8M0: tl.constexpr,
    BLOCK_R: tl.constexpr, D: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """The keys' blocks first (stored in the paged cache, bf16-rounded after a rope), then the queries'
    (dense codes and scales, the gates turned into weights): one launch for a layer's index rows."""
    block = tl.program_id(0)
    key_blocks = tl.cdiv(key_rows, BLOCK_R)
    if block < key_blocks:
        _rows_block(
            block, k_ptr, stride_kt, 0, key_rows, 1, cache_ptr, cache_scales_ptr, loc_ptr, page_size,
            gate_ptr, 0, 1.0, 1.0, weights_ptr,
            signs_ptr, positions_ptr, cos_sin_ptr, stride_cs, norm_weight_ptr, norm_bias_ptr, eps,
            ROPE, NORM, True, ROTATE, ROTATE_SCALE, DOT_FP32, KEY_UE8M0, True, False, BLOCK_R, D, PAIRS,
        )  # fmt: skip
    else:
        _rows_block(
            block - key_blocks, q_ptr, stride_qt, stride_qh, query_rows, heads, q_codes_ptr, q_scales_ptr,
            loc_ptr, 1, gate_ptr, stride_gt, head_scale, softmax_scale, weights_ptr,
            signs_ptr, positions_ptr, cos_sin_ptr, stride_cs, norm_weight_ptr, norm_bias_ptr, eps,
            ROPE, False, False, ROTATE, ROTATE_SCALE, DOT_FP32, QUERY_UE8M0, False, True, BLOCK_R, D, PAIRS,
        )  # fmt: skip


def _is_ue8m0(scale_format: str) -> bool:
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    return scale_format == "ue8m0"


def _check_rows(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    check_dtype(name, x, torch.bfloat16)
    check_ndim(name, x, ndim, layout)
    check_dim(name, x, -1, HEAD_DIM, "index head dim")
    check_last_dim_contiguous(name, x)


def _check_rope(rope: IndexRope, tokens: int, rotate: bool) -> list[tuple[str, torch.Tensor]]:
    if rotate:
        raise ValueError("rope and rotate exclude each other: SGLang's fused kernels skip the Hadamard rotation")
    check_dtype("rope.cos_sin_cache", rope.cos_sin_cache, torch.float32, torch.bfloat16)
    check_ndim("rope.cos_sin_cache", rope.cos_sin_cache, 2, f"[max_position, {ROPE_DIM}]")
    check_dim("rope.cos_sin_cache", rope.cos_sin_cache, 1, ROPE_DIM, "cos and sin of 32 angles")
    check_last_dim_contiguous("rope.cos_sin_cache", rope.cos_sin_cache)
    check_dtype("rope.positions", rope.positions, torch.int32, torch.int64)
    check_ndim("rope.positions", rope.positions, 1, "[T]")
    check_dim("rope.positions", rope.positions, 0, tokens, "one position per token")
    return [("rope.cos_sin_cache", rope.cos_sin_cache), ("rope.positions", rope.positions)]


def _check_norm(norm: IndexNorm) -> list[tuple[str, torch.Tensor]]:
    for name, t in (("norm.weight", norm.weight), ("norm.bias", norm.bias)):
        check_dtype(name, t, torch.float32)
        check_ndim(name, t, 1, f"[{HEAD_DIM}]")
        check_dim(name, t, 0, HEAD_DIM, "index head dim")
        check_last_dim_contiguous(name, t)
    return [("norm.weight", norm.weight), ("norm.bias", norm.bias)]


def _check_queries(q: torch.Tensor, gate: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    _check_rows("q", q, 3, "[T, H, 128]")
    check_dtype("gate", gate, torch.float32, torch.bfloat16, torch.float16)
    check_ndim("gate", gate, 2, "[T, H]")
    if tuple(gate.shape) != tuple(q.shape[:2]):
        raise ValueError(f"gate must be [T, H] = {tuple(q.shape[:2])}, got shape {tuple(gate.shape)}")
    check_last_dim_contiguous("gate", gate)
    return [("q", q), ("gate", gate)]


def _check_keys(k: torch.Tensor, loc: torch.Tensor, kv_cache: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    _check_rows("k", k, 2, "[T, 128]")
    check_dtype("loc", loc, torch.int32, torch.int64)
    check_ndim("loc", loc, 1, "[T]")
    check_dim("loc", loc, 0, k.shape[0], "one slot per key")
    check_dtype("kv_cache", kv_cache, torch.uint8)
    check_ndim("kv_cache", kv_cache, 4, f"[num_pages, page_size, 1, {INDEX_ROW_BYTES}]")
    if kv_cache.shape[2:] != (1, INDEX_ROW_BYTES) or not kv_cache.is_contiguous():
        raise ValueError(
            f"kv_cache must be a contiguous [num_pages, page_size, 1, {INDEX_ROW_BYTES}] uint8 tensor, "
            f"got shape {tuple(kv_cache.shape)}"
        )
    return [("k", k), ("loc", loc), ("kv_cache", kv_cache)]


def _check_rope_and_norm(rope, norm, tokens: int, rotate: bool) -> list[tuple[str, torch.Tensor]]:
    if norm is not None and rope is None:
        raise ValueError("norm is applied only together with rope (SGLang's fused key kernel)")
    tensors = _check_rope(rope, tokens, rotate) if rope is not None else []
    return tensors + (_check_norm(norm) if norm is not None else [])


class _Keys(NamedTuple):
    k: torch.Tensor  # [T, 128] bf16
    loc: torch.Tensor  # [T] slots
    kv_cache: torch.Tensor  # [pages, page_size, 1, 132] uint8
    ue8m0: bool  # the scale format (validated by _is_ue8m0)


class _Queries(NamedTuple):
    q: torch.Tensor  # [T, H, 128] bf16
    gate: torch.Tensor  # [T, H]
    head_scale: float
    softmax_scale: float
    codes: torch.Tensor  # [T, H, 128] uint8 view of the output codes
    scales: torch.Tensor  # [T, H] float32
    weights: torch.Tensor  # [T, H] float32
    ue8m0: bool


@functools.lru_cache(maxsize=8)
def _no_slots(device: torch.device) -> torch.Tensor:
    """A slot pointer for launches without keys (never read), typed as the backend's slots."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def _launch(keys: _Keys | None, queries: _Queries | None, *, rotate: bool, rope, norm) -> None:
    """One launch: the keys' blocks, then the queries'. A missing part gets no blocks; its pointers
    are stand-ins of the other part's (never dereferenced)."""
    key_rows = keys.k.shape[0] if keys is not None else 0
    query_rows = queries.q.shape[0] * queries.q.shape[1] if queries is not None else 0
    blocks = triton.cdiv(key_rows, BLOCK_ROWS) + triton.cdiv(query_rows, BLOCK_ROWS)
    if blocks == 0:
        return
    some = keys.k if keys is not None else queries.q
    if keys is not None:
        cache, k = keys.kv_cache, keys.k
        key_args = (k, k.stride(0), key_rows, cache, cache.view(torch.float32), keys.loc.contiguous(), cache.shape[1])
    else:
        key_args = (queries.q, 0, 0, queries.codes, queries.scales, _no_slots(some.device), 1)
    if queries is not None:
        q, heads = queries.q, queries.q.shape[1]
        query_args = (
            q, q.stride(0), q.stride(1), query_rows, heads, queries.codes, queries.scales,
            queries.gate, queries.gate.stride(0), queries.head_scale, queries.softmax_scale, queries.weights,
        )  # fmt: skip
    else:
        f32 = keys.kv_cache.view(torch.float32)
        query_args = (keys.k, 0, 0, 0, 1, keys.kv_cache, f32, f32, 0, 1.0, 1.0, f32)
    interpret = is_interpreter()
    if rope is None:
        signs = hadamard_signs(HEAD_DIM, torch.float32 if interpret else some.dtype, some.device)
        rope_args = (signs, signs, signs, 0, signs, signs, 0.0)
    else:
        cache = rope.cos_sin_cache
        weight, bias, eps = (norm.weight, norm.bias, norm.eps) if norm is not None else (cache, cache, 0.0)
        rope_args = (cache, rope.positions.contiguous(), cache, cache.stride(0), weight, bias, eps)
    _index_fp8_kernel[(blocks,)](
        *key_args, *query_args, *rope_args,
        ROPE=rope is not None, NORM=norm is not None, ROTATE=rotate, ROTATE_SCALE=HEAD_DIM**-0.5,
        DOT_FP32=interpret, KEY_UE8M0=keys is not None and keys.ue8m0,
        QUERY_UE8M0=queries is not None and queries.ue8m0,
        BLOCK_R=BLOCK_ROWS, D=HEAD_DIM, PAIRS=ROPE_DIM // 2, num_warps=NUM_WARPS,
    )  # fmt: skip


def _query_outputs(q: torch.Tensor, gate, head_scale, softmax_scale, scale_format: str) -> _Queries:
    ue8m0 = _is_ue8m0(scale_format)
    tokens, heads = q.shape[0], q.shape[1]
    codes = torch.empty(tokens, heads, HEAD_DIM, dtype=torch.float8_e4m3fn, device=q.device)
    scales = torch.empty(tokens, heads, dtype=torch.float32, device=q.device)
    weights = torch.empty(tokens, heads, dtype=torch.float32, device=q.device)
    return _Queries(q, gate, head_scale, softmax_scale, codes.view(torch.uint8), scales, weights, ue8m0)


def _results(queries: _Queries) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return queries.codes.view(torch.float8_e4m3fn), queries.scales, queries.weights


def quantize_index_queries(
    q: torch.Tensor,
    gate: torch.Tensor,
    head_scale: float,
    softmax_scale: float,
    *,
    rotate: bool,
    scale_format: str,
    rope: IndexRope | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 index queries and their score weights (see module doc).

    Args:
        q: ``[T, H, 128]`` bf16 queries, rope applied unless ``rope`` is
            given, not yet rotated; the last dimension contiguous.
        gate: ``[T, H]`` per-head gates (fp32/bf16/fp16; the last dimension
            contiguous, e.g. a column slice of a fused projection).
        head_scale, softmax_scale: the weight's fp32 factors (``H ** -0.5`` and
            the indexer's softmax scale for DSA models).
        rotate: apply the Hadamard rotation first.
        scale_format: ``"ue8m0"`` or ``"fp32"`` (see module doc).
        rope: apply this rope in fp32 first and quantize the fp32 result (no
            bf16 rounding), as SGLang's fused indexer's query kernel does; not
            with ``rotate``.

    Returns:
        ``(codes [T, H, 128] float8_e4m3fn, scales [T, H] float32, weights [T, H] float32)``.
    """
    tensors = _check_queries(q, gate) + _check_rope_and_norm(rope, None, q.shape[0], rotate)
    check_same_device(tensors)
    queries = _query_outputs(q, gate, head_scale, softmax_scale, scale_format)
    _launch(None, queries, rotate=rotate, rope=rope, norm=None)
    return _results(queries)


def quantize_index_keys_to_cache(
    k: torch.Tensor,
    loc: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    rotate: bool,
    scale_format: str,
    rope: IndexRope | None = None,
    norm: IndexNorm | None = None,
) -> None:
    """Quantize index keys and write them at their slots of the paged index-K cache (see module doc).

    Args:
        k: ``[T, 128]`` bf16 keys, normalized and rope applied unless ``norm``
            / ``rope`` are given, not yet rotated; the last dimension
            contiguous (a column slice of a fused projection is fine).
        loc: ``[T]`` int32/int64 cache slots (``page * page_size + offset``),
            all in range.
        kv_cache: contiguous ``[num_pages, page_size, 1, 132]`` uint8, written
            at ``loc`` only.
        rotate, scale_format: as :func:`quantize_index_queries`.
        rope, norm: apply the LayerNorm (optional, only with ``rope``) and the
            rope in fp32 first, then round to bf16 once, as SGLang's fused
            indexer's key kernel does; not with ``rotate``.
    """
    tensors = _check_keys(k, loc, kv_cache) + _check_rope_and_norm(rope, norm, k.shape[0], rotate)
    check_same_device(tensors)
    _launch(_Keys(k, loc, kv_cache, _is_ue8m0(scale_format)), None, rotate=rotate, rope=rope, norm=norm)


def quantize_index_keys_and_queries(
    k: torch.Tensor,
    loc: torch.Tensor,
    kv_cache: torch.Tensor,
    q: torch.Tensor,
    gate: torch.Tensor,
    head_scale: float,
    softmax_scale: float,
    *,
    rotate: bool,
    key_format: str,
    query_format: str,
    rope: IndexRope | None = None,
    norm: IndexNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_index_keys_to_cache` and :func:`quantize_index_queries` of one forward in one
    launch, bit for bit the results of the two calls.

    The queries are those of the keys' first ``Tq <= Tk`` tokens (a data-parallel batch's real
    rows, the keys' padded ones included): ``rope.positions`` is ``[Tk]`` and query token ``t``
    turns by ``rope.positions[t]``. ``norm`` applies to the keys only.

    Args:
        k, loc, kv_cache: as :func:`quantize_index_keys_to_cache` (``k [Tk, 128]``).
        q, gate, head_scale, softmax_scale: as :func:`quantize_index_queries` (``q [Tq, H, 128]``).
        rotate, rope: as both (shared by keys and queries).
        key_format, query_format: the keys' and the queries' scale formats.

    Returns:
        The queries' ``(codes [Tq, H, 128] float8_e4m3fn, scales [Tq, H] float32, weights [Tq, H]
        float32)``; the keys are written to ``kv_cache``.
    """
    tensors = _check_keys(k, loc, kv_cache) + _check_queries(q, gate)
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"queries are those of the keys' first tokens: {q.shape[0]} queries > {k.shape[0]} keys")
    check_same_device(tensors + _check_rope_and_norm(rope, norm, k.shape[0], rotate))
    keys = _Keys(k, loc, kv_cache, _is_ue8m0(key_format))
    queries = _query_outputs(q, gate, head_scale, softmax_scale, query_format)
    _launch(keys, queries, rotate=rotate, rope=rope, norm=norm)
    return _results(queries)
