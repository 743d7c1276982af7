"""Sparse MLA with Ampere-class instructions, one warp a latent plane (experimental candidate).

The same grid, arguments and results as :mod:`.sparse_mla_sm80`, another split of the work:
each of the four warps (per 16 heads) owns one 128-column plane of the latent for both products
(``QK^T`` as four partial scores, summed through shared memory; ``PV`` into that plane's output
columns), with the query held in registers, as batched ``[4, heads, ...]`` ``mma_v2`` products.
The softmax runs once on the summed scores and hands ``p`` and the rescale factor back to the
planes through shared memory: four CTA barriers a tile.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from .sparse_mla_gluon_common import cta_barrier, online_softmax_step, program_keys, store_lse
from .sparse_mla_sm80 import (
    _ROPE_COL,
    _async_load,
    _issue_fp8_codes,
    _issue_rope,
    _load_codes,
    _rebuild_pair,
    _tile_slots,
)


@gluon.jit
def _dequantize_planes(words_smem, scale_smem, planes, BLOCK_N: gl.constexpr):
    """As :func:`.sparse_mla_sm80._dequantize_tile`, into the planes ``[4, BLOCK_N, 128]`` of a rank-3
    layout (which the batched products read)."""
    words, scale = _load_codes(words_smem, scale_smem, 256.0)
    for half in gl.static_range(2):
        low, high = _rebuild_pair(words, scale, half)
        planes.slice(half, 1, dim=0).store(gl.reshape(low, [1, BLOCK_N, 128]))
        planes.slice(half + 2, 1, dim=0).store(gl.reshape(high, [1, BLOCK_N, 128]))


@gluon.jit
def _issue_planes_tile(kv_ptr, rope_ptr, idx_row, n0, end, num_slots, stride_kv, stride_rope, stage,
                       kv_ring, scale_ring, kr_ring, KV_FP8: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """As :func:`.sparse_mla_sm80._issue_tile`; BF16 latent rows land as ``[4, BLOCK_N, 128]`` blocks."""
    _issue_rope(rope_ptr, idx_row, n0, end, num_slots, stride_rope, kr_ring.index(stage), BLOCK_N)
    if KV_FP8:
        _issue_fp8_codes(kv_ptr, idx_row, n0, end, num_slots, stride_kv, kv_ring.index(stage), scale_ring.index(stage),
                         BLOCK_N)  # fmt: skip
    else:
        nw: gl.constexpr = gl.num_warps()
        latent_l: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 2, 16], [1, nw, 1], [2, 1, 0])
        slot, valid = _tile_slots(idx_row, n0, end, num_slots, gl.SliceLayout(0, gl.SliceLayout(2, latent_l)), BLOCK_N)
        b = gl.arange(0, 4, gl.SliceLayout(1, gl.SliceLayout(2, latent_l)))
        j = gl.arange(0, 128, gl.SliceLayout(0, gl.SliceLayout(1, latent_l)))
        ptrs = (kv_ptr + slot * stride_kv)[None, :, None] + (128 * b)[:, None, None] + j[None, None, :]
        _async_load(kv_ring.index(stage), ptrs, mask=gl.broadcast(valid[None, :, None], ptrs)[0])


@gluon.jit
def _plane_columns(b, j, KV_FP8: gl.constexpr):
    """Latent column of position ``j`` of plane ``b`` (broadcast): FP8 planes hold byte ``b`` of every
    code word (``4 j + b``), BF16 ones the 128-column blocks (``128 b + j``)."""
    return (4 * j[None, :] + b[:, None]) if KV_FP8 else (128 * b[:, None] + j[None, :])


@gluon.jit
def _load_query_part(q_rows, head_ok, c0, part_smem, layout: gl.constexpr, dot_a: gl.constexpr, KV_FP8: gl.constexpr,
                     BLOCK_H: gl.constexpr, WIDTH: gl.constexpr):
    """Columns ``c0 .. c0 + WIDTH`` of every plane of the query block, as the ``[4, BLOCK_H, WIDTH]`` A
    operand (staged through ``part_smem``)."""
    b = gl.arange(0, 4, gl.SliceLayout(1, gl.SliceLayout(1, layout)))
    j = c0 + gl.arange(0, WIDTH, gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    ptrs = q_rows + _plane_columns(b, j, KV_FP8)[:, None, :]
    part_smem.store(gl.load(ptrs, mask=gl.broadcast(head_ok, ptrs)[0], other=0.0))
    cta_barrier()
    part = part_smem.load(dot_a)
    cta_barrier()
    return part


@gluon.jit
def sparse_mla_sm80_planes_kernel(
    q_ptr, qr_ptr, kv_ptr, rope_ptr, idx_ptr, ends_ptr, out_ptr, lse_ptr,
    num_heads, num_slots, topk, keys_per_split, qk_scale_log2,
    stride_qt, stride_qh, stride_qrt, stride_qrh, stride_kv, stride_rope, stride_it,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WARPS_M: gl.constexpr,
    KV_FP8: gl.constexpr, SPLIT_OUTPUT: gl.constexpr, SKIP_INVALID_TAIL: gl.constexpr,
):  # fmt: skip
    """Grid and arguments as :func:`.sparse_mla_sm80.sparse_mla_sm80_kernel` (the same launch, without
    its dequantization variants); ``num_warps`` is ``4 * WARPS_M``: a warp per plane and 16 heads."""
    nw: gl.constexpr = gl.num_warps()
    gl.static_assert(nw == 4 * WARPS_M, "one warp a plane and 16 heads")
    gl.static_assert(BLOCK_H == 16 * WARPS_M)
    gl.static_assert(BLOCK_H <= BLOCK_N, "the query is staged through a key tile's buffer")
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, WARPS_M, 1], instr_shape=[1, 16, 8])
    dot_a: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    dot_b: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    sum_l: gl.constexpr = gl.BlockedLayout([4, 1, 4], [1, 4, 8], [1, nw, 1], [2, 1, 0])
    s_l: gl.constexpr = gl.SliceLayout(0, sum_l)
    rows_l: gl.constexpr = gl.SliceLayout(1, s_l)
    keys_l: gl.constexpr = gl.SliceLayout(0, s_l)

    t, split, head0, start, end, idx_row = program_keys(idx_ptr, ends_ptr, topk, keys_per_split, stride_it, BLOCK_H,
                                                        SKIP_INVALID_TAIL)  # fmt: skip
    num_tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)
    rope_ptr += _ROPE_COL if KV_FP8 else 512

    plane_sl: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [2, 1, 0])
    kr_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, 64], gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))
    if KV_FP8:
        kv_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 4, 32], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
        scale_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 4], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        planes = gl.allocate_shared_memory(gl.bfloat16, [4, BLOCK_N, 128], plane_sl)
        staging = planes
    else:
        kv_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 4, BLOCK_N, 128], plane_sl)
        scale_ring = kv_ring
        staging = kv_ring.index(STAGES - 1)  # filled first by the loop's first issue, after the query is read

    # The per-tile exchange of partial scores (index 0) and probabilities (index 1): at 16 heads and FP8,
    # inside the ring stage whose code words the tile's dequantization has just consumed (refilled only
    # after the next iteration's first barrier), which keeps the CTA small enough for two an SM on the
    # A100 class; otherwise a buffer of its own.
    xchg_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    XCHG_IN_RING: gl.constexpr = KV_FP8 and 2 * 4 * BLOCK_H * BLOCK_N * 4 <= BLOCK_N * 512  # a stage's code bytes
    if not XCHG_IN_RING:
        xchg_buf = gl.allocate_shared_memory(gl.float32, [2, 4, BLOCK_H, BLOCK_N], xchg_l)
    alpha_xchg = gl.allocate_shared_memory(gl.float32, [BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [0]))

    # The query as registers: four column chunks of 32 per plane (FP8 plane b: columns 4j + b; BF16: 128b + j).
    q_l: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 8, 4], [1, nw, 1], [2, 1, 0])
    heads = head0 + gl.arange(0, BLOCK_H, gl.SliceLayout(0, gl.SliceLayout(2, q_l)))
    head_ok = (heads < num_heads)[None, :, None]
    q_rows = (q_ptr + t * stride_qt + heads.to(gl.int64) * stride_qh)[None, :, None]
    chunk_smem = staging.slice(0, BLOCK_H, dim=1).slice(0, 32, dim=2)
    q0 = _load_query_part(q_rows, head_ok, 0, chunk_smem, q_l, dot_a, KV_FP8, BLOCK_H, 32)
    q1 = _load_query_part(q_rows, head_ok, 32, chunk_smem, q_l, dot_a, KV_FP8, BLOCK_H, 32)
    q2 = _load_query_part(q_rows, head_ok, 64, chunk_smem, q_l, dot_a, KV_FP8, BLOCK_H, 32)
    q3 = _load_query_part(q_rows, head_ok, 96, chunk_smem, q_l, dot_a, KV_FP8, BLOCK_H, 32)
    # The rope part: its 64 columns in four parts of 16, part w in warp w.
    qr_rows = (qr_ptr + t * stride_qrt + heads.to(gl.int64) * stride_qrh)[None, :, None]
    w = gl.arange(0, 4, gl.SliceLayout(1, gl.SliceLayout(1, q_l)))
    c = gl.arange(0, 16, gl.SliceLayout(0, gl.SliceLayout(1, q_l)))
    qr_ptrs = qr_rows + (16 * w[:, None] + c[None, :])[:, None, :]
    rope_smem = staging.slice(0, BLOCK_H, dim=1).slice(0, 16, dim=2)
    rope_smem.store(gl.load(qr_ptrs, mask=gl.broadcast(head_ok, qr_ptrs)[0], other=0.0))
    cta_barrier()
    qr = rope_smem.load(dot_a)
    cta_barrier()

    for first in gl.static_range(STAGES - 1):
        if first < num_tiles:
            _issue_planes_tile(kv_ptr, rope_ptr, idx_row, start + first * BLOCK_N, end, num_slots, stride_kv, stride_rope,
                               first, kv_ring, scale_ring, kr_ring, KV_FP8, BLOCK_N)  # fmt: skip
        async_copy.commit_group()

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, rows_l)
    l_i = gl.zeros([BLOCK_H], gl.float32, rows_l)
    acc0 = gl.zeros([4, BLOCK_H, 32], gl.float32, mma)
    acc1 = gl.zeros([4, BLOCK_H, 32], gl.float32, mma)
    acc2 = gl.zeros([4, BLOCK_H, 32], gl.float32, mma)
    acc3 = gl.zeros([4, BLOCK_H, 32], gl.float32, mma)
    for i in range(num_tiles):
        stage = i % STAGES
        n0 = start + i * BLOCK_N
        async_copy.wait_group(STAGES - 2)
        cta_barrier()
        ahead = i + STAGES - 1
        if ahead < num_tiles:
            _issue_planes_tile(kv_ptr, rope_ptr, idx_row, start + ahead * BLOCK_N, end, num_slots, stride_kv, stride_rope,
                               ahead % STAGES, kv_ring, scale_ring, kr_ring, KV_FP8, BLOCK_N)  # fmt: skip
        async_copy.commit_group()
        if KV_FP8:
            _dequantize_planes(kv_ring.index(stage), scale_ring.index(stage), planes, BLOCK_N)
            cta_barrier()
            tile = planes
        else:
            tile = kv_ring.index(stage)
        kr = kr_ring.index(stage).reshape([BLOCK_N, 4, 16]).permute((1, 2, 0))
        s3 = mma_v2(qr, kr.load(dot_b), gl.zeros([4, BLOCK_H, BLOCK_N], gl.float32, mma))
        s3 = mma_v2(q0, tile.slice(0, 32, dim=2).permute((0, 2, 1)).load(dot_b), s3)
        s3 = mma_v2(q1, tile.slice(32, 32, dim=2).permute((0, 2, 1)).load(dot_b), s3)
        s3 = mma_v2(q2, tile.slice(64, 32, dim=2).permute((0, 2, 1)).load(dot_b), s3)
        s3 = mma_v2(q3, tile.slice(96, 32, dim=2).permute((0, 2, 1)).load(dot_b), s3)
        # The planes' partial scores summed, the softmax (rows within a warp), then p and alpha back to
        # every plane's warps, through shared memory.
        if XCHG_IN_RING:
            xchg = kv_ring.index(stage)._reinterpret(gl.float32, [2, 4, BLOCK_H, BLOCK_N], xchg_l)
        else:
            xchg = xchg_buf
        xchg.index(0).store(s3)
        cta_barrier()
        s = gl.sum(xchg.index(0).load(sum_l), axis=0)
        _, valid = _tile_slots(idx_row, n0, end, num_slots, keys_l, BLOCK_N)
        p, alpha, m_i, l_i = online_softmax_step(s, valid, m_i, l_i, qk_scale_log2)
        xchg.index(1).store(gl.broadcast(gl.expand_dims(p, 0), gl.zeros([4, BLOCK_H, BLOCK_N], gl.float32, sum_l))[0])
        alpha_xchg.store(alpha)
        cta_barrier()
        p3 = gl.convert_layout(xchg.index(1).load(mma).to(gl.bfloat16), dot_a)  # each warp's own copy
        alpha3 = gl.expand_dims(gl.expand_dims(alpha_xchg.load(gl.SliceLayout(1, gl.SliceLayout(0, mma))), 1), 0)
        acc0 = mma_v2(p3, tile.slice(0, 32, dim=2).load(dot_b), acc0 * alpha3)
        acc1 = mma_v2(p3, tile.slice(32, 32, dim=2).load(dot_b), acc1 * alpha3)
        acc2 = mma_v2(p3, tile.slice(64, 32, dim=2).load(dot_b), acc2 * alpha3)
        acc3 = mma_v2(p3, tile.slice(96, 32, dim=2).load(dot_b), acc3 * alpha3)
    async_copy.wait_group(0)

    out_heads = head0 + gl.arange(0, BLOCK_H, rows_l)
    store_lse(lse_ptr, t, split, out_heads, num_heads, m_i, l_i, stride_lt, stride_lh, stride_ls, SPLIT_OUTPUT)
    has_keys = l_i > 0.0
    cta_barrier()
    alpha_xchg.store(gl.where(has_keys, 1.0 / gl.where(has_keys, l_i, 1.0), 0.0))
    cta_barrier()
    inv_l = gl.expand_dims(gl.expand_dims(alpha_xchg.load(gl.SliceLayout(1, gl.SliceLayout(0, mma))), 1), 0)
    ob = gl.arange(0, 4, gl.SliceLayout(1, gl.SliceLayout(1, mma)))
    oh = head0 + gl.arange(0, BLOCK_H, gl.SliceLayout(0, gl.SliceLayout(2, mma)))
    oj = gl.arange(0, 32, gl.SliceLayout(0, gl.SliceLayout(1, mma)))
    out_rows = (out_ptr + t * stride_ot + split * stride_os + oh.to(gl.int64) * stride_oh)[None, :, None]
    out_ok = (oh < num_heads)[None, :, None]
    _store_plane_chunk(out_rows, acc0, inv_l, ob, oj, out_ok, KV_FP8)
    _store_plane_chunk(out_rows, acc1, inv_l, ob, oj + 32, out_ok, KV_FP8)
    _store_plane_chunk(out_rows, acc2, inv_l, ob, oj + 64, out_ok, KV_FP8)
    _store_plane_chunk(out_rows, acc3, inv_l, ob, oj + 96, out_ok, KV_FP8)


@gluon.jit
def _store_plane_chunk(out_rows, acc, inv_l, b, j, out_ok, KV_FP8: gl.constexpr):
    """``acc * inv_l`` (``[4, heads, width]``: planes ``b``, positions ``j``) to its latent columns."""
    ptrs = out_rows + _plane_columns(b, j, KV_FP8)[:, None, :]
    gl.store(ptrs, (acc * inv_l).to(out_rows.dtype.element_ty), mask=gl.broadcast(out_ok, ptrs)[0])
