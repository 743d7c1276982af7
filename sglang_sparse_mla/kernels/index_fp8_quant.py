"""The DSA indexer's FP8 queries and keys in one launch each.

Before scoring, the indexer rotates its 128-wide queries and keys with the
orthonormal Walsh-Hadamard matrix (where the model's writer does), quantizes
each 128-value row to float8_e4m3fn with one float32 scale, stores the keys in
the paged index-K cache and turns the per-head gates into score weights. In
torch that is some thirty small launches per layer; here it is one kernel,
called once for the keys and once for the queries.

Per row ``x`` (128 values):

* rotation (optional): ``bf16((x @ H) * 128 ** -0.5)``, ``H`` the ``+-1``
  Walsh-Hadamard matrix, products exact and summed in fp32, rounded once to
  bf16, as SGLang's fast Hadamard transform;
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

import torch
import triton
import triton.language as tl

from .checks import check_dim, check_dtype, check_last_dim_contiguous, check_ndim, check_same_device
from .device_info import is_interpreter

HEAD_DIM = 128
ROW_BYTES = HEAD_DIM + 4  # an index-K slot: 128 code bytes + one float32 scale
BLOCK_ROWS = 32  # rows per program; fixed, so a row's result never depends on the batch
NUM_WARPS = 4


@triton.jit
def _round_to_bf16(y):
    """fp32 ``y`` rounded to the nearest bf16 (ties to even), kept in fp32: integer arithmetic on the
    bits, as the interpreter's own fp32 -> bf16 cast truncates."""
    bits = y.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


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
def _index_fp8_kernel(
    x_ptr,
    stride_xt,
    stride_xh,
    num_rows,
    heads,
    signs_ptr,
    codes_ptr,
    scales_ptr,
    loc_ptr,
    page_size,
    gate_ptr,
    stride_gt,
    head_scale,
    softmax_scale,
    weights_ptr,
    ROTATE: tl.constexpr,
    ROTATE_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    UE8M0: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_GATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < num_rows
    token = (rows // heads).to(tl.int64)
    head = rows % heads
    d = tl.arange(0, D)
    x_rows = x_ptr + token * stride_xt + head * stride_xh
    x = tl.load(x_rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    if ROTATE:
        signs = tl.load(signs_ptr + d[:, None] * D + d[None, :])
        if DOT_FP32:  # the interpreter's bf16 dot is wrong; fp32 products of bf16 values are exact too
            rotated = tl.dot(x.to(tl.float32), signs.to(tl.float32))
        else:
            rotated = tl.dot(x, signs)
        xf = _round_to_bf16(rotated * ROTATE_SCALE)
    else:
        xf = x.to(tl.float32)

    amax = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-4)
    if UE8M0:
        bits = (amax * (1.0 / 448.0)).to(tl.int32, bitcast=True)
        exponent = bits & 0x7F800000
        scale = tl.where((bits & 0x7FFFFF) != 0, exponent + 0x800000, exponent).to(tl.float32, bitcast=True)
        scaled = tl.math.div_rn(xf, scale[:, None])  # exact: a power of two
    else:
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
        scaled = xf * tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), scale)[:, None]
    codes = _e4m3_codes(tl.minimum(tl.maximum(scaled, -448.0), 448.0))

    if PAGED:
        slot = tl.load(loc_ptr + rows, mask=ok, other=0).to(tl.int64)
        page, offset = slot // page_size, slot % page_size
        page_bytes = page * page_size * (D + 4)
        tl.store(codes_ptr + (page_bytes + offset * D)[:, None] + d[None, :], codes, mask=ok[:, None])
        tl.store(scales_ptr + (page_bytes + page_size * D) // 4 + offset, scale, mask=ok)
    else:
        rows64 = rows.to(tl.int64)
        tl.store(codes_ptr + rows64[:, None] * D + d[None, :], codes, mask=ok[:, None])
        tl.store(scales_ptr + rows64, scale, mask=ok)
    if HAS_GATE:
        gate = tl.load(gate_ptr + token * stride_gt + head, mask=ok, other=0.0).to(tl.float32)
        tl.store(weights_ptr + rows, ((gate * head_scale) * scale) * softmax_scale, mask=ok)


@functools.lru_cache(maxsize=8)
def hadamard_signs(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``dim x dim`` Walsh-Hadamard matrix of ``+-1`` (``dim`` a power of two; exact in every float
    dtype)."""
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(dtype=dtype, device=device)


SCALE_FORMATS = ("ue8m0", "fp32")


def _is_ue8m0(scale_format: str) -> bool:
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    return scale_format == "ue8m0"


def _check_rows(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    check_dtype(name, x, torch.bfloat16)
    check_ndim(name, x, ndim, layout)
    check_dim(name, x, -1, HEAD_DIM, "index head dim")
    check_last_dim_contiguous(name, x)


def quantize_index_queries(
    q: torch.Tensor,
    gate: torch.Tensor,
    head_scale: float,
    softmax_scale: float,
    *,
    rotate: bool,
    scale_format: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 index queries and their score weights (see module doc).

    Args:
        q: ``[T, H, 128]`` bf16 queries, rope applied, not yet rotated;
            the last dimension contiguous.
        gate: ``[T, H]`` per-head gates (fp32/bf16/fp16; the last dimension
            contiguous, e.g. a column slice of a fused projection).
        head_scale, softmax_scale: the weight's fp32 factors (``H ** -0.5`` and
            the indexer's softmax scale for DSA models).
        rotate: apply the Hadamard rotation first.
        scale_format: ``"ue8m0"`` or ``"fp32"`` (see module doc).

    Returns:
        ``(codes [T, H, 128] float8_e4m3fn, scales [T, H] float32, weights [T, H] float32)``.
    """
    _check_rows("q", q, 3, "[T, H, 128]")
    check_dtype("gate", gate, torch.float32, torch.bfloat16, torch.float16)
    check_ndim("gate", gate, 2, "[T, H]")
    if tuple(gate.shape) != tuple(q.shape[:2]):
        raise ValueError(f"gate must be [T, H] = {tuple(q.shape[:2])}, got shape {tuple(gate.shape)}")
    check_last_dim_contiguous("gate", gate)
    device = check_same_device([("q", q), ("gate", gate)])
    tokens, heads = q.shape[0], q.shape[1]
    codes = torch.empty(tokens, heads, HEAD_DIM, dtype=torch.float8_e4m3fn, device=device)
    scales = torch.empty(tokens, heads, dtype=torch.float32, device=device)
    weights = torch.empty(tokens, heads, dtype=torch.float32, device=device)
    rows = tokens * heads
    if rows == 0:
        return codes, scales, weights
    interpret = is_interpreter()
    _index_fp8_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        q, q.stride(0), q.stride(1), rows, heads,
        hadamard_signs(HEAD_DIM, torch.float32 if interpret else q.dtype, device),
        codes.view(torch.uint8), scales, scales, 1,
        gate, gate.stride(0), head_scale, softmax_scale, weights,
        ROTATE=rotate, ROTATE_SCALE=HEAD_DIM**-0.5, DOT_FP32=interpret, UE8M0=_is_ue8m0(scale_format),
        PAGED=False, HAS_GATE=True, BLOCK_R=BLOCK_ROWS, D=HEAD_DIM, num_warps=NUM_WARPS,
    )  # fmt: skip
    return codes, scales, weights


def quantize_index_keys_to_cache(
    k: torch.Tensor,
    loc: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    rotate: bool,
    scale_format: str,
) -> None:
    """Quantize index keys and write them at their slots of the paged index-K cache (see module doc).

    Args:
        k: ``[T, 128]`` bf16 keys, normalized, rope applied, not yet
            rotated; the last dimension contiguous.
        loc: ``[T]`` int32/int64 cache slots (``page * page_size + offset``),
            all in range.
        kv_cache: contiguous ``[num_pages, page_size, 1, 132]`` uint8, written
            at ``loc`` only.
        rotate, scale_format: as :func:`quantize_index_queries`.
    """
    _check_rows("k", k, 2, "[T, 128]")
    check_dtype("loc", loc, torch.int32, torch.int64)
    check_ndim("loc", loc, 1, "[T]")
    check_dim("loc", loc, 0, k.shape[0], "one slot per key")
    check_dtype("kv_cache", kv_cache, torch.uint8)
    check_ndim("kv_cache", kv_cache, 4, f"[num_pages, page_size, 1, {ROW_BYTES}]")
    if kv_cache.shape[2:] != (1, ROW_BYTES) or not kv_cache.is_contiguous():
        raise ValueError(
            f"kv_cache must be a contiguous [num_pages, page_size, 1, {ROW_BYTES}] uint8 tensor, "
            f"got shape {tuple(kv_cache.shape)}"
        )
    device = check_same_device([("k", k), ("loc", loc), ("kv_cache", kv_cache)])
    rows = k.shape[0]
    if rows == 0:
        return
    interpret = is_interpreter()
    _index_fp8_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        k, k.stride(0), 0, rows, 1,
        hadamard_signs(HEAD_DIM, torch.float32 if interpret else k.dtype, device),
        kv_cache, kv_cache.view(torch.float32), loc.contiguous(), kv_cache.shape[1],
        kv_cache, 0, 1.0, 1.0, kv_cache,
        ROTATE=rotate, ROTATE_SCALE=HEAD_DIM**-0.5, DOT_FP32=interpret, UE8M0=_is_ue8m0(scale_format),
        PAGED=True, HAS_GATE=False, BLOCK_R=BLOCK_ROWS, D=HEAD_DIM, num_warps=NUM_WARPS,
    )  # fmt: skip
