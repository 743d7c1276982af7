"""Sparse MLA attention over top-k selected KV slots (DeepSeek Sparse Attention).

For each query token ``t`` and head ``h`` (absorbed MLA, one shared latent KV
row per slot)::

    s_j   = sm_scale * q[t, h] . kv[indices[t, j]]           (576-dim dot)
    out   = sum_j softmax(s)_j * kv[indices[t, j], :512]       (V = latent)
    lse   = log(sum_j exp(s_j))

over the valid entries ``j`` (``0 <= indices[t, j] < num_slots``); ``-1`` marks
"no token". Duplicated slots count once per occurrence.

One Triton kernel serves decode and prefill: a program owns one token, a block
of heads and a contiguous range of the top-k list (its KV split), streams the
selected rows through an online softmax and writes either the final bf16
output (single pass) or a normalized fp32 partial with its log-sum-exp, which
a second kernel merges (split-KV). A gathered tile of latent rows serves as K
(with the rope part) and as V; both products run on bf16 tensor cores. FP8
caches run the Gluon kernel of :mod:`.sparse_mla_sm80` on every GPU from SM80
on (same grid, arguments and results; ``cp.async`` gathers, each tile
dequantized once into shared memory, ``mma_v2``), as do BF16 caches of at
most 16 heads on SM90; the Triton FP8 kernel here, which dequantizes in
registers, serves where Gluon cannot run (``SGLANG_SPARSE_MLA_GLUON_SM80=0``,
cache rows not on 16-byte boundaries). Prefill first finds each row's
last valid entry (a small scan kernel) so that programs stop there: the first
top-k tokens of a prompt have fewer entries than top-k. On SM90 GPUs a BF16
cache with more than 32 heads runs the warp-specialized Gluon kernel of
:mod:`.sparse_mla_sm90_ws` instead (same grid, arguments and results), unless
``SGLANG_SPARSE_MLA_WARP_SPECIALIZED=0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .checks import check_dim, check_dtype, check_last_dim_contiguous, check_ndim, check_same_device
from .device_info import DeviceInfo, device_info, is_interpreter
from .fp8_convert import EMULATED_FP8_FACTOR, fp8_e4m3_to_f32, round_to_bf16
from .kv_cache_layout import D_LATENT, D_QK, D_ROPE, FP8_ROPE_OFFSET, FP8_SCALE_OFFSET, as_slot_rows
from .sparse_mla_configs import (
    SparseMLAConfig,
    batch_invariant_num_kv_splits,
    choose_num_kv_splits,
    select_config,
    triton_config,
)

_LOG2E = 1.4426950408889634
# Column of the first scale word / bf16 rope value in an FP8 row's typed views.
_FP8_SCALE_COL = tl.constexpr(FP8_SCALE_OFFSET // 4)
_FP8_ROPE_COL = tl.constexpr(FP8_ROPE_OFFSET // 2)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bf16 operands wrongly: fp32 there only.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _program_keys(idx_ptr, ends_ptr, num_heads, topk, keys_per_split, stride_it, BLOCK_H: tl.constexpr,
                  SKIP_INVALID_TAIL: tl.constexpr):  # fmt: skip
    """Grid ``(tokens, head blocks, splits)``: this program's token ``t`` (int64), split, heads
    and their mask, entries ``[start, end)`` of the token's top-k row (its split, cut at the
    row's valid end with ``SKIP_INVALID_TAIL``) and that row's pointer; the Gluon kernels'
    twin is :func:`.sparse_mla_gluon_common.program_keys`."""
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, topk)
    if SKIP_INVALID_TAIL:
        end = tl.minimum(end, tl.load(ends_ptr + t))
    return t, split, heads, heads < num_heads, start, end, idx_ptr + t * stride_it


@triton.jit
def _slots(idx_row, n0, end, num_slots, BLOCK_N: tl.constexpr):
    """Slots ``n0 .. n0 + BLOCK_N`` of a top-k row: (int64 slot, valid mask);
    entries past ``end``, negative or out of range are invalid (slot 0)."""
    offs = n0 + tl.arange(0, BLOCK_N)
    slot = tl.load(idx_row + offs, mask=offs < end, other=-1)
    valid = (slot >= 0) & (slot < num_slots)
    return tl.where(valid, slot, 0).to(tl.int64), valid


@triton.jit
def _softmax_step(s, valid, m_i, l_i, qk_scale_log2):
    """Online-softmax update for one tile of raw scores ``s [BLOCK_H, BLOCK_N]``.

    Returns the tile's unnormalized probabilities, the factor that rescales
    what was accumulated so far, and the new running max / sum (log2 domain).
    Rows that have seen no valid key keep ``m = -inf`` and never produce NaN.
    """
    s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_base)
    p = tl.exp2(s - m_base[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _store_lse(lse_ptr, t, split, heads, head_mask, m_i, l_i, stride_lt, stride_lh, stride_ls, SPLIT_OUTPUT: tl.constexpr):
    """Split partials keep log2-sum-exp for the merge; the final lse is natural log."""
    has_keys = l_i > 0.0
    lse_log2 = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    if SPLIT_OUTPUT:
        tl.store(lse_ptr + t * stride_lt + split * stride_ls + heads * stride_lh, lse_log2, mask=head_mask)
    else:
        tl.store(lse_ptr + t * stride_lt + heads * stride_lh, lse_log2 * 0.6931471805599453, mask=head_mask)


@triton.jit
def _store_out(out_rows, acc, l_i, cols, head_mask):
    """Normalized ``acc [BLOCK_H, W]`` into output columns ``cols [W]``."""
    has_keys = l_i > 0.0
    inv_l = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    tl.store(out_rows + cols[None, :], (acc * inv_l[:, None]).to(out_rows.dtype.element_ty), mask=head_mask[:, None])


@triton.jit
def _sparse_mla_bf16_kernel(
    q_ptr,
    qr_ptr,
    kv_ptr,
    idx_ptr,
    ends_ptr,
    out_ptr,
    lse_ptr,
    num_heads,
    num_slots,
    topk,
    keys_per_split,
    qk_scale_log2,
    stride_qt,
    stride_qh,
    stride_qrt,
    stride_qrh,
    stride_kv,
    stride_it,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    stride_ls,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_OUTPUT: tl.constexpr,
    SKIP_INVALID_TAIL: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """BF16 cache: one ``[BLOCK_N, 512]`` tile per step is K (with its rope
    part) and V; the pipeliner streams it through shared memory."""
    t, split, heads, head_mask, start, end, idx_row = _program_keys(
        idx_ptr, ends_ptr, num_heads, topk, keys_per_split, stride_it, BLOCK_H, SKIP_INVALID_TAIL
    )
    q_rows = q_ptr + t * stride_qt + heads[:, None] * stride_qh
    d_latent = tl.arange(0, 512)
    d_rope = tl.arange(0, 64)
    q_nope = tl.load(q_rows + d_latent[None, :], mask=head_mask[:, None], other=0.0)
    qr_rows = qr_ptr + t * stride_qrt + heads[:, None] * stride_qrh
    q_rope = tl.load(qr_rows + d_rope[None, :], mask=head_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, 512], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        slot, valid = _slots(idx_row, n0, end, num_slots, BLOCK_N)
        rows = kv_ptr + slot * stride_kv
        k = tl.load(rows[:, None] + d_latent[None, :], mask=valid[:, None], other=0.0)
        k_rope = tl.load(rows[:, None] + (d_rope + 512)[None, :], mask=valid[:, None], other=0.0)
        s = _dot(q_rope, tl.trans(k_rope), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), UPCAST)
        s = _dot(q_nope, tl.trans(k), s, UPCAST)
        p, alpha, m_i, l_i = _softmax_step(s, valid, m_i, l_i, qk_scale_log2)
        acc = _dot(p.to(tl.bfloat16), k, acc * alpha[:, None], UPCAST)

    _store_lse(lse_ptr, t, split, heads, head_mask, m_i, l_i, stride_lt, stride_lh, stride_ls, SPLIT_OUTPUT)
    out_rows = out_ptr + t * stride_ot + split * stride_os + heads[:, None] * stride_oh
    _store_out(out_rows, acc, l_i, d_latent, head_mask)


@triton.jit
def _to_bf16(x, INTERPRETED: tl.constexpr):
    """fp32 -> bf16 rounded to nearest even. The interpreter's cast truncates (and mangles
    subnormals): there the value is rounded first and its upper half taken bit for bit."""
    if INTERPRETED:
        bits = round_to_bf16(x).to(tl.uint32, bitcast=True)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _fp8_plane(
    words, scale, BYTE: tl.constexpr, BLOCK_N: tl.constexpr, FP8_NATIVE: tl.constexpr, INTERPRETED: tl.constexpr
):
    """Byte ``BYTE`` of every latent word, dequantized: ``[BLOCK_N, 128]`` bf16
    holding latent columns ``4 * j + BYTE``. Word ``j`` lies in scale group
    ``j // 32``, so the scale multiplies through a free ``[BLOCK_N, 4, 32]`` view."""
    values = fp8_e4m3_to_f32((words >> (8 * BYTE)) & 0xFF, FP8_NATIVE)
    values = (values.reshape(BLOCK_N, 4, 32) * scale[:, :, None]).reshape(BLOCK_N, 128)
    return _to_bf16(values, INTERPRETED)


@triton.jit
def _sparse_mla_fp8_kernel(
    q_ptr,
    qr_ptr,
    words_ptr,
    rope_ptr,
    idx_ptr,
    ends_ptr,
    out_ptr,
    lse_ptr,
    num_heads,
    num_slots,
    topk,
    keys_per_split,
    qk_scale_log2,
    stride_qt,
    stride_qh,
    stride_qrt,
    stride_qrh,
    stride_words,
    stride_rope,
    stride_it,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    stride_ls,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
    FP8_FACTOR: tl.constexpr,
    SPLIT_OUTPUT: tl.constexpr,
    SKIP_INVALID_TAIL: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """FP8 cache (656-byte rows), read as 32-bit words so that Triton streams
    them through shared memory (it does not pipeline byte loads that feed
    arithmetic). Rather than reorder bytes, the kernel works on byte planes:
    plane ``b`` holds latent columns ``4j + b``, the queries are loaded in the
    same column order, and each plane's output is stored back to its columns.
    Dequantized values are rounded to bf16 and both products run in bf16.
    """
    t, split, heads, head_mask, start, end, idx_row = _program_keys(
        idx_ptr, ends_ptr, num_heads, topk, keys_per_split, stride_it, BLOCK_H, SKIP_INVALID_TAIL
    )
    q_rows = q_ptr + t * stride_qt + heads[:, None] * stride_qh
    plane_cols = 4 * tl.arange(0, 128)
    q0 = tl.load(q_rows + plane_cols[None, :], mask=head_mask[:, None], other=0.0)
    q1 = tl.load(q_rows + (plane_cols + 1)[None, :], mask=head_mask[:, None], other=0.0)
    q2 = tl.load(q_rows + (plane_cols + 2)[None, :], mask=head_mask[:, None], other=0.0)
    q3 = tl.load(q_rows + (plane_cols + 3)[None, :], mask=head_mask[:, None], other=0.0)
    d_rope = tl.arange(0, 64)
    qr_rows = qr_ptr + t * stride_qrt + heads[:, None] * stride_qrh
    q_rope = tl.load(qr_rows + d_rope[None, :], mask=head_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc1 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc2 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc3 = tl.zeros([BLOCK_H, 128], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        slot, valid = _slots(idx_row, n0, end, num_slots, BLOCK_N)
        word_rows = words_ptr + slot * stride_words
        words = tl.load(word_rows[:, None] + tl.arange(0, 128)[None, :], mask=valid[:, None], other=0)
        scale_bits = tl.load(word_rows[:, None] + (tl.arange(0, 4) + _FP8_SCALE_COL)[None, :], mask=valid[:, None], other=0)
        scale = scale_bits.to(tl.float32, bitcast=True) * FP8_FACTOR
        rope_rows = rope_ptr + slot * stride_rope + _FP8_ROPE_COL
        k_rope = tl.load(rope_rows[:, None] + d_rope[None, :], mask=valid[:, None], other=0.0)
        k0 = _fp8_plane(words, scale, 0, BLOCK_N, FP8_NATIVE, UPCAST)
        k1 = _fp8_plane(words, scale, 1, BLOCK_N, FP8_NATIVE, UPCAST)
        k2 = _fp8_plane(words, scale, 2, BLOCK_N, FP8_NATIVE, UPCAST)
        k3 = _fp8_plane(words, scale, 3, BLOCK_N, FP8_NATIVE, UPCAST)

        s = _dot(q_rope, tl.trans(k_rope), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), UPCAST)
        s = _dot(q0, tl.trans(k0), s, UPCAST)
        s = _dot(q1, tl.trans(k1), s, UPCAST)
        s = _dot(q2, tl.trans(k2), s, UPCAST)
        s = _dot(q3, tl.trans(k3), s, UPCAST)
        p, alpha, m_i, l_i = _softmax_step(s, valid, m_i, l_i, qk_scale_log2)
        p = p.to(tl.bfloat16)
        acc0 = _dot(p, k0, acc0 * alpha[:, None], UPCAST)
        acc1 = _dot(p, k1, acc1 * alpha[:, None], UPCAST)
        acc2 = _dot(p, k2, acc2 * alpha[:, None], UPCAST)
        acc3 = _dot(p, k3, acc3 * alpha[:, None], UPCAST)

    _store_lse(lse_ptr, t, split, heads, head_mask, m_i, l_i, stride_lt, stride_lh, stride_ls, SPLIT_OUTPUT)
    out_rows = out_ptr + t * stride_ot + split * stride_os + heads[:, None] * stride_oh
    _store_out(out_rows, acc0, l_i, plane_cols, head_mask)
    _store_out(out_rows, acc1, l_i, plane_cols + 1, head_mask)
    _store_out(out_rows, acc2, l_i, plane_cols + 2, head_mask)
    _store_out(out_rows, acc3, l_i, plane_cols + 3, head_mask)


@triton.jit
def _valid_ends_kernel(idx_ptr, ends_ptr, topk, num_slots, stride_it, SCAN: tl.constexpr):
    """``ends[t]``: one past the last valid entry of top-k row ``t`` (0 if none).
    The tiles after it hold no valid entry and would add exactly nothing
    (``p = 0``, ``alpha = 1``): stopping there changes no bit of the result."""
    t = tl.program_id(0).to(tl.int64)
    row = idx_ptr + t * stride_it
    last = tl.full([SCAN], -1, tl.int32)
    for j in range(0, topk, SCAN):
        _, valid = _slots(row, j, topk, num_slots, SCAN)
        last = tl.maximum(last, tl.where(valid, j + tl.arange(0, SCAN), -1))
    tl.store(ends_ptr + t, tl.max(last, 0) + 1)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    num_splits,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_plt,
    stride_plh,
    stride_pls,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Combine the normalized split partials of one (token, head) and one
    ``BLOCK_D`` slice of the output by their log2-sum-exp weights."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d_block = tl.program_id(2)
    s = tl.arange(0, SPLITS)
    lse_s = tl.load(part_lse_ptr + t * stride_plt + h * stride_plh + s * stride_pls, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_base = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_base)
    weight_sum = tl.sum(w, 0)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    parts = tl.load(part_out_ptr + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + d[None, :], mask=(s < num_splits)[:, None], other=0.0)
    has_keys = weight_sum > 0.0
    out = tl.sum(parts * w[:, None], 0) * tl.where(has_keys, 1.0 / tl.where(has_keys, weight_sum, 1.0), 0.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))
    if d_block == 0:
        lse = tl.where(has_keys, (m + tl.log2(tl.where(has_keys, weight_sum, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + t * stride_lt + h * stride_lh, lse)


def _query_parts(q: torch.Tensor, q_rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_nope [T, H, 512], q_rope [T, H, 64])`` views of a whole or split query."""
    check_dtype("q", q, torch.bfloat16)
    if q_rope is None:
        check_ndim("q", q, 3, f"[tokens, heads, {D_QK}]")
        check_dim("q", q, 2, D_QK, f"latent {D_LATENT} + rope {D_ROPE}")
        check_last_dim_contiguous("q", q)
        return q[..., :D_LATENT], q[..., D_LATENT:]
    check_ndim("q", q, 3, f"[tokens, heads, {D_LATENT}] (q_nope, q_rope given apart)")
    check_dim("q", q, 2, D_LATENT, "latent; q_rope holds the rope part")
    check_last_dim_contiguous("q", q)
    check_dtype("q_rope", q_rope, torch.bfloat16)
    check_ndim("q_rope", q_rope, 3, f"[tokens, heads, {D_ROPE}]")
    check_dim("q_rope", q_rope, 2, D_ROPE, "rope")
    check_last_dim_contiguous("q_rope", q_rope)
    if q_rope.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q_rope is {tuple(q_rope.shape)} but q is {tuple(q.shape)}; tokens and heads must match"
        )
    return q, q_rope


def _validate(q: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, d_v: int):
    check_dtype("indices", indices, torch.int32)
    check_ndim("indices", indices, 2, "[tokens, topk]")
    check_last_dim_contiguous("indices", indices)
    if indices.shape[0] != q.shape[0]:
        raise ValueError(
            f"indices has {indices.shape[0]} rows but q has {q.shape[0]} tokens; "
            "they must match"
        )
    if d_v != D_LATENT:
        raise ValueError(f"d_v must be {D_LATENT} (V is the MLA latent), got {d_v}")
    if q.shape[1] == 0:
        raise ValueError("q must have at least one head")
    check_same_device([("q", q), ("q_rope", q_rope), ("kv_cache", kv_cache), ("indices", indices)])
    return as_slot_rows(kv_cache)


def _rows_16_byte_aligned(rows) -> bool:
    """Whether every cache row starts on a 16-byte boundary (the Gluon kernel's copies need it)."""
    view = rows.words if rows.is_fp8 else rows.latent
    return view.data_ptr() % 16 == 0 and (view.shape[0] <= 1 or view.stride(0) * view.element_size() % 16 == 0)


def _output_buffer(name, buf, shape, dtype, device) -> torch.Tensor:
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_dtype(name, buf, dtype)
    if tuple(buf.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(buf.shape)}")
    if buf.device != device:
        raise ValueError(f"{name} is on {buf.device}, expected {device}")
    check_last_dim_contiguous(name, buf)
    return buf


@dataclass(frozen=True)
class SparseMLAPlan:
    """What one sparse MLA launch runs: the tile configuration, the split of each top-k row
    into ``num_kv_splits`` ranges of ``keys_per_split`` entries (a multiple of ``block_n``),
    and the grid ``(tokens, head blocks, splits)``."""

    config: SparseMLAConfig
    num_tokens: int
    head_blocks: int
    num_kv_splits: int
    keys_per_split: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.num_tokens, self.head_blocks, self.num_kv_splits)

    @property
    def split_output(self) -> bool:
        """Programs write normalized fp32 partials that a second kernel merges."""
        return self.num_kv_splits > 1


def plan_sparse_mla(
    num_tokens: int,
    num_heads: int,
    topk: int,
    kv_fp8: bool,
    rows_aligned: bool,
    info: DeviceInfo,
    num_kv_splits: int | None = None,
    config: SparseMLAConfig | None = None,
    batch_invariant: bool = False,
) -> SparseMLAPlan:
    """The launch :func:`sparse_mla_forward` makes for these shapes on ``info``'s device.

    ``rows_aligned``: every cache row starts on a 16-byte boundary (the Gluon SM80-class
    kernel needs it; without it the Triton kernel runs, and an explicit Gluon ``config``
    is refused). ``num_kv_splits=None`` splits by occupancy, or by the top-k width alone
    with ``batch_invariant``.
    """
    # The head block may follow the batch size only where the split does too.
    by_occupancy = num_kv_splits is None and not batch_invariant
    cfg = config or select_config(num_heads, kv_fp8, info, num_tokens if by_occupancy else None)
    if cfg.gluon_sm80:
        if config is None and not rows_aligned:
            cfg = triton_config(num_heads, kv_fp8, info)
        elif not (info.gluon_sm80 and rows_aligned):
            raise ValueError(
                f"{cfg} is the Gluon SM80-class kernel: it needs a GPU, Triton with Gluon's Ampere ops, "
                f"SGLANG_SPARSE_MLA_GLUON_SM80 unset or 1 (usable here: {info.gluon_sm80}) and cache rows "
                f"on 16-byte boundaries (here: {rows_aligned})"
            )
    if cfg.warp_specialized and (kv_fp8 or not info.warp_specialized):
        raise ValueError(
            f"{cfg} is the warp-specialized kernel: it needs a BF16 cache on an SM90 GPU, Triton 3.6+ and "
            f"SGLANG_SPARSE_MLA_WARP_SPECIALIZED unset or 1; got a {'FP8' if kv_fp8 else 'BF16'} cache "
            f"on sm{info.capability[0]}{info.capability[1]} (warp-specialized kernels usable: {info.warp_specialized})"
        )
    head_blocks = triton.cdiv(num_heads, cfg.block_h)
    if num_kv_splits is None and batch_invariant:
        num_kv_splits = batch_invariant_num_kv_splits(topk)
    elif num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(num_tokens * head_blocks, topk, cfg, kv_fp8, info)
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    keys_per_split = triton.cdiv(triton.cdiv(max(topk, 1), num_kv_splits), cfg.block_n) * cfg.block_n
    num_kv_splits = max(1, triton.cdiv(topk, keys_per_split))
    return SparseMLAPlan(cfg, num_tokens, head_blocks, num_kv_splits, keys_per_split)


def sparse_mla_forward(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = D_LATENT,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: SparseMLAConfig | None = None,
    batch_invariant: bool = False,
    skip_invalid_tail: bool = False,
    q_rope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA attention; see :func:`sparse_mla_decode` for the contract.

    ``config`` overrides the tile configuration (benchmarks and tests only).
    ``skip_invalid_tail``: a first launch finds the last valid entry of each
    top-k row and the attention stops there; the result is bit-identical. It
    pays where rows end in ``-1`` padding (prefill: a token at position
    ``p < topk`` has ``p + 1`` entries, which top-k lists first) and costs one
    read of the indices.
    """
    q, q_rope = _query_parts(q, q_rope)
    rows = _validate(q, q_rope, kv_cache, indices, d_v)
    num_tokens, num_heads, _ = q.shape
    out = _output_buffer("out", out, (num_tokens, num_heads, d_v), torch.bfloat16, q.device)
    lse = _output_buffer("lse", lse, (num_tokens, num_heads), torch.float32, q.device)
    if num_tokens == 0:
        return out, lse
    info = device_info(q.device)
    aligned = _rows_16_byte_aligned(rows)
    plan = plan_sparse_mla(
        num_tokens, num_heads, indices.shape[1], rows.is_fp8, aligned, info, num_kv_splits, config, batch_invariant
    )
    _launch(plan, q, q_rope, rows, indices, sm_scale, out, lse, skip_invalid_tail, info)
    return out, lse


def _launch(plan: SparseMLAPlan, q, q_rope, rows, indices, sm_scale, out, lse, skip_invalid_tail, info) -> None:
    """Run ``plan``: the valid-end scan (``skip_invalid_tail``), the attention kernel its
    configuration names, and the merge of the split partials into ``out`` and ``lse``."""
    cfg = plan.config
    num_tokens, num_heads, d_v = out.shape
    topk = indices.shape[1]
    if plan.split_output:
        part_out = torch.empty(num_tokens, num_heads, plan.num_kv_splits, d_v, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_tokens, num_heads, plan.num_kv_splits, dtype=torch.float32, device=q.device)
        stride_os, stride_ls = part_out.stride(2), part_lse.stride(2)
    else:
        part_out, part_lse = out, lse
        stride_os, stride_ls = 0, 0

    ends = indices  # unread unless skip_invalid_tail
    if skip_invalid_tail:
        ends = torch.empty(num_tokens, dtype=torch.int32, device=q.device)
        _valid_ends_kernel[(num_tokens,)](
            idx_ptr=indices, ends_ptr=ends, topk=topk, num_slots=rows.num_slots, stride_it=indices.stride(0),
            SCAN=1024, num_warps=4,
        )  # fmt: skip
    # The arguments every attention kernel takes, by name (see _sparse_mla_bf16_kernel).
    common = dict(
        q_ptr=q, qr_ptr=q_rope, idx_ptr=indices, ends_ptr=ends, out_ptr=part_out, lse_ptr=part_lse,
        num_heads=num_heads, num_slots=rows.num_slots, topk=topk, keys_per_split=plan.keys_per_split,
        qk_scale_log2=sm_scale * _LOG2E,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_qrt=q_rope.stride(0), stride_qrh=q_rope.stride(1),
        stride_it=indices.stride(0),
        stride_ot=part_out.stride(0), stride_oh=part_out.stride(1), stride_os=stride_os,
        stride_lt=part_lse.stride(0), stride_lh=part_lse.stride(1), stride_ls=stride_ls,
        BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, SPLIT_OUTPUT=plan.split_output,
        SKIP_INVALID_TAIL=skip_invalid_tail, num_warps=cfg.num_warps,
    )  # fmt: skip
    fp8_format = dict(FP8_NATIVE=info.native_fp8, FP8_FACTOR=1.0 if info.native_fp8 else EMULATED_FP8_FACTOR)
    if cfg.gluon_sm80:  # imports Gluon: only where info.gluon_sm80 says it exists
        if cfg.plane_warps:
            from .sparse_mla_sm80_planes import sparse_mla_sm80_planes_kernel as kernel

            variant = {}
        else:
            from .sparse_mla_sm80 import sparse_mla_sm80_kernel as kernel

            variant = dict(WORD_DEQUANT=cfg.word_dequant, DEQUANT_AHEAD=cfg.dequant_ahead, **fp8_format)
        kv, rope = (rows.words, rows.rope) if rows.is_fp8 else (rows.latent, rows.latent)
        kernel[plan.grid](
            **common, kv_ptr=kv, rope_ptr=rope, stride_kv=kv.stride(0), stride_rope=rope.stride(0),
            STAGES=cfg.num_stages, WARPS_M=cfg.warps_m, KV_FP8=rows.is_fp8, **variant,
        )  # fmt: skip
    elif rows.is_fp8:
        _sparse_mla_fp8_kernel[plan.grid](
            **common, words_ptr=rows.words, rope_ptr=rows.rope,
            stride_words=rows.words.stride(0), stride_rope=rows.rope.stride(0),
            UPCAST=is_interpreter(), num_stages=cfg.num_stages, **fp8_format,
        )  # fmt: skip
    elif cfg.warp_specialized:
        from . import sparse_mla_sm90_ws as ws  # imports Gluon: only where info.warp_specialized says it exists

        ws.sparse_mla_sm90_ws_kernel[plan.grid](
            **common, kv_ptr=rows.latent, stride_kv=rows.latent.stride(0),
            STAGES=cfg.num_stages, LOADER_WARPS=ws.LOADER_WARPS, LOADER_REGS=ws.LOADER_REGS,
            VALUES_REGS=ws.VALUES_REGS,
        )  # fmt: skip
    else:
        _sparse_mla_bf16_kernel[plan.grid](
            **common, kv_ptr=rows.latent, stride_kv=rows.latent.stride(0),
            UPCAST=is_interpreter(), num_stages=cfg.num_stages,
        )  # fmt: skip
    if plan.split_output:
        splits_pow2 = triton.next_power_of_2(plan.num_kv_splits)
        merge_block_d = min(d_v, max(64, 4096 // splits_pow2))  # <= 4096 partial values per program
        _merge_splits_kernel[(num_tokens, num_heads, d_v // merge_block_d)](
            part_out_ptr=part_out, part_lse_ptr=part_lse, out_ptr=out, lse_ptr=lse, num_splits=plan.num_kv_splits,
            stride_pt=part_out.stride(0), stride_ph=part_out.stride(1), stride_ps=part_out.stride(2),
            stride_plt=part_lse.stride(0), stride_plh=part_lse.stride(1), stride_pls=part_lse.stride(2),
            stride_ot=out.stride(0), stride_oh=out.stride(1), stride_lt=lse.stride(0), stride_lh=lse.stride(1),
            SPLITS=splits_pow2, BLOCK_D=merge_block_d, num_warps=4,
        )  # fmt: skip


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    *,
    d_v: int = D_LATENT,
    num_kv_splits: int | None = None,
    batch_invariant: bool = False,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    q_rope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA decode: each query token attends to its own top-k KV slots.

    Args:
        q: ``[T, H, 576]`` bfloat16, absorbed ``q_nope (512) ‖ q_rope (64)``;
            T is the batch (one token per request) or, for MTP, tokens. With
            ``q_rope`` given, ``[T, H, 512]``: the latent part alone. Token and
            head strides are free; the last dimension must be contiguous.
        kv_cache: ``[num_slots, 576]`` bfloat16, or ``[num_slots, 656]`` uint8 in
            the FP8 layout of :mod:`.kv_cache_layout`; ``[num_slots, 1, D]`` and
            paged ``[num_pages, page_size, 1, D]`` views are accepted.
        indices: ``[T, topk]`` int32 slot numbers; ``-1`` (or any value outside
            ``[0, num_slots)``) means "no token" and is skipped; a duplicated
            slot is attended once per occurrence.
        sm_scale: softmax scale applied to ``q . k``.
        d_v: value width; must be 512 (V is the latent part of the row).
        num_kv_splits: ``None`` picks by occupancy (split the top-k list across
            programs and merge when ``T * ceil(H / block_h)`` leaves the GPU
            idle; 1-2 token BF16 launches also take smaller head blocks), so a
            token's rounding can change with the batch size; an explicit count
            (``1``: the single pass) fixes it.
        batch_invariant: with ``num_kv_splits=None``, split by the top-k width
            alone (one split per 512 entries): a token's result is then
            bit-identical whatever batch it runs in, the property SGLang's
            ``--enable-deterministic-inference`` needs.
        out, lse: optional preallocated results (``[T, H, 512]`` bf16, ``[T, H]``
            float32, last dim contiguous), e.g. the layer's attention output.
        q_rope: optional ``[T, H, 64]`` bfloat16 rope part of the query, when
            the caller holds it apart from ``q`` (SGLang's absorbed MLA does):
            no concatenated copy of the query is made.

    Returns:
        ``(out, lse)``: ``out`` ``[T, H, 512]`` bfloat16, the softmax-weighted sum
        of V; ``lse`` ``[T, H]`` float32, the natural-log log-sum-exp of the
        scaled scores. A row with no valid index gives ``out = 0`` and
        ``lse = -inf`` (never NaN).
    """
    return sparse_mla_forward(
        q, kv_cache, indices, sm_scale, d_v, num_kv_splits, out, lse, batch_invariant=batch_invariant, q_rope=q_rope
    )


def sparse_mla_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    *,
    d_v: int = D_LATENT,
    batch_invariant: bool = False,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    q_rope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill/extend: every token of a chunk over its own top-k slots.

    Same arguments (``q_rope`` included) and results as :func:`sparse_mla_decode` with ``T`` the
    number of extend tokens; causality is encoded in ``indices`` (a token's
    top-k only lists slots it may see). Large ``T`` runs the single pass; a
    short extend is split across the top-k list like a decode batch, unless
    ``batch_invariant`` fixes the split by the top-k width. Tiles after a
    row's last valid entry are skipped (early tokens of a prompt see fewer
    than top-k positions), with the same result bits.
    """
    return sparse_mla_forward(
        q, kv_cache, indices, sm_scale, d_v, None, out, lse, batch_invariant=batch_invariant, skip_invalid_tail=True,
        q_rope=q_rope,
    )
