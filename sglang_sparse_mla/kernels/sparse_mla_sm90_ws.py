"""Sparse MLA over a BF16 cache on Hopper (SM90), warp-specialized, in Gluon.

The kernel :func:`.sparse_mla.sparse_mla_forward` launches on SM90 GPUs for
a BF16 cache and more than 32 heads (see :mod:`.sparse_mla_configs`); same
grid, arguments and results as the Triton BF16 kernel there. It exists
because Triton's own pipeline runs the row gathers, both products and the
softmax one after the other in the same warps (Nsight Compute: latency-bound;
docs/performance.md, "Measurements behind the dispatch rules"), and Triton's
automatic Hopper warp specialization applies to TMA loads only, which cannot
gather rows on SM90.

One CTA owns a token, 64 heads and a contiguous range of the token's top-k
list, in three partitions of one warpgroup each:

* the loader gathers each 64-row tile of latent rows with ``cp.async`` into a
  two-stage ring of NVMMA-swizzled buffers (``[64, 512]`` latent and
  ``[64, 64]`` rope: shared buffers must have power-of-two shapes) and
  signals the stage's "ready" barrier;
* the softmax warpgroup (the default partition) runs ``QK^T`` at N = 64 as
  two chained wgmmas (latent, then rope), the online softmax in registers,
  writes P (bf16, 8 KB) and the rescale factors to shared memory for the
  other warpgroup ("p_full"), and runs ``PV`` for output columns 0-255;
* the values warpgroup rescales and runs ``PV`` for columns 256-511 with
  that P, then frees it ("p_empty").

Each compute warpgroup releases the stage through its "empty" barrier (two
arrivals). One warpgroup computing the whole ``QK^T`` reads the 64 x 576
query from shared memory once per tile, not twice (the first version split
N between the warpgroups and was slower), and its ``QK^T`` of the next
tile overlaps the other's ``PV``. Invalid entries (negative, out of range,
past the split or the row's valid tail) are zero-filled rows masked to
``-inf``. Results: a normalized fp32 partial with its log2-sum-exp per
split, merged by :func:`.sparse_mla._merge_splits_kernel`, or the final
output.

Gluon has no interpreter: CPU CI compiles this kernel for sm_90 (shared
memory, spills); it runs in the GPU tests only.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .sparse_mla_gluon_common import cta_barrier, online_softmax_step, program_keys, store_lse

# The loader partition: its warps and their register budget (the softmax warpgroup takes the rest).
LOADER_WARPS = 4
LOADER_REGS = 56
# The warpgroup that runs PV for the high 256 output columns.
VALUES_REGS = 192


@gluon.jit
def _gather_tiles(kv_ptr, idx_row, start, end, num_slots, stride_kv, kv_smem, kr_smem, ready, empty,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """Loader partition: tile ``i`` of rows ``idx_row[start:end]`` into stage ``i % STAGES``;
    invalid entries (negative, out of range, past ``end``) are zero-filled rows."""
    nw: gl.constexpr = gl.num_warps()
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [nw, 1], [1, 0])
    rows = gl.arange(0, BLOCK_N, gl.SliceLayout(1, layout))
    cols = gl.arange(0, 128, gl.SliceLayout(0, layout))
    rope_cols = gl.arange(0, 64, gl.SliceLayout(0, layout))
    i = 0
    for n0 in range(start, end, BLOCK_N):
        stage = i % STAGES
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
        offs = n0 + rows
        slot = gl.load(idx_row + offs, mask=offs < end, other=-1)
        valid = (slot >= 0) & (slot < num_slots)
        base = kv_ptr + gl.where(valid, slot, 0).to(gl.int64) * stride_kv
        latent = kv_smem.index(stage)
        for c in gl.static_range(4):  # 128 columns at a time: fewer live pointers
            ptrs = base[:, None] + (c * 128 + cols)[None, :]
            mask = gl.broadcast(valid[:, None], ptrs)[0]
            async_copy.async_copy_global_to_shared(latent.slice(c * 128, 128, dim=1), ptrs, mask=mask)
        rope_ptrs = base[:, None] + (512 + rope_cols)[None, :]
        rope_mask = gl.broadcast(valid[:, None], rope_ptrs)[0]
        async_copy.async_copy_global_to_shared(kr_smem.index(stage), rope_ptrs, mask=rope_mask)
        async_copy.mbarrier_arrive(ready.index(stage), increment_count=False)
        i += 1


@gluon.jit
def _scores_and_softmax(q_smem, qr_smem, kv_smem, kr_smem, p_smem, scale_smem, ready, empty, p_full, p_empty, done,
                        idx_row, start, end, num_slots, qk_scale_log2,
                        BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """Default partition (one warpgroup): per tile, ``QK^T`` at N = ``BLOCK_N``, the online
    softmax, P (bf16) and the rescale factor handed to the other warpgroup through shared
    memory, and ``PV`` for output columns 0-255. Returns ``(acc [BLOCK_H, 256] unnormalized,
    m_i, l_i)`` (log2 domain); ``1 / l_i`` goes to the other warpgroup last."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    acc = gl.zeros([BLOCK_H, 256], gl.float32, o_layout)
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_H], gl.float32, row_layout)
    keys = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    i = 0
    for n0 in range(start, end, BLOCK_N):
        stage = i % STAGES
        offs = n0 + keys
        slot = gl.load(idx_row + offs, mask=offs < end, other=-1)
        valid = (slot >= 0) & (slot < num_slots)
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        fence_async_shared()  # cp.async wrote through the generic proxy; wgmma reads through the async one
        latent = kv_smem.index(stage)
        rope = kr_smem.index(stage)
        s = warpgroup_mma(q_smem, latent.permute((1, 0)), gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout),
                          is_async=True)  # fmt: skip
        s = warpgroup_mma(qr_smem, rope.permute((1, 0)), s, is_async=True)
        s, _, _, _, _ = warpgroup_mma_wait(0, deps=[s, q_smem, qr_smem, latent, rope])
        p, alpha, m_i, l_i = online_softmax_step(s, valid, m_i, l_i, qk_scale_log2)
        mbarrier.wait(p_empty, (i & 1) ^ 1)  # the other warpgroup is done with the previous P
        p_smem.store(p.to(gl.bfloat16))
        scale_smem.store(alpha)
        fence_async_shared()  # P is read by wgmma (async proxy)
        cta_barrier()  # every thread's part of P and alpha before the hand-over
        mbarrier.arrive(p_full, count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(p_smem, latent.slice(0, 256, dim=1), acc, is_async=True)
        acc, _, _ = warpgroup_mma_wait(0, deps=[acc, p_smem, latent])
        mbarrier.arrive(empty.index(stage), count=1)
        i += 1
    has_keys = l_i > 0.0
    mbarrier.wait(p_empty, (i & 1) ^ 1)  # the last rescale factor has been read
    scale_smem.store(gl.where(has_keys, 1.0 / gl.where(has_keys, l_i, 1.0), 0.0))
    cta_barrier()
    mbarrier.arrive(done, count=1)
    return acc, m_i, l_i


@gluon.jit
def _values_high(kv_smem, p_smem, scale_smem, ready, empty, p_full, p_empty, done, start, end,
                 out_ptr, t, split, head0, num_heads, stride_ot, stride_oh, stride_os,
                 BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """Worker partition (one warpgroup): ``PV`` for output columns 256-511 with the P and
    rescale factors the softmax warpgroup hands over; stores its half of the output."""
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    scale_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    acc = gl.zeros([BLOCK_H, 256], gl.float32, o_layout)
    i = 0
    for _n0 in range(start, end, BLOCK_N):
        stage = i % STAGES
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)  # the gathered rows are visible here too
        mbarrier.wait(p_full, i & 1)
        fence_async_shared()
        alpha = scale_smem.load(scale_layout)
        latent = kv_smem.index(stage)
        acc = acc * alpha[:, None]
        acc = warpgroup_mma(p_smem, latent.slice(256, 256, dim=1), acc, is_async=True)
        acc, _, _ = warpgroup_mma_wait(0, deps=[acc, p_smem, latent])
        cta_barrier()  # every thread has read alpha and its wgmma has read P
        mbarrier.arrive(p_empty, count=1)
        mbarrier.arrive(empty.index(stage), count=1)
        i += 1
    mbarrier.wait(done, 0)
    inv_l = scale_smem.load(scale_layout)
    out_heads = head0 + gl.arange(0, BLOCK_H, scale_layout)
    out_cols = 256 + gl.arange(0, 256, gl.SliceLayout(0, o_layout))
    out_rows = out_ptr + t * stride_ot + split * stride_os + out_heads.to(gl.int64)[:, None] * stride_oh
    out_ptrs = out_rows + out_cols[None, :]
    out_mask = gl.broadcast((out_heads < num_heads)[:, None], out_ptrs)[0]
    gl.store(out_ptrs, (acc * inv_l[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)


@gluon.jit
def sparse_mla_sm90_ws_kernel(
    q_ptr, qr_ptr, kv_ptr, idx_ptr, ends_ptr, out_ptr, lse_ptr,
    num_heads, num_slots, topk, keys_per_split, qk_scale_log2,
    stride_qt, stride_qh, stride_qrt, stride_qrh, stride_kv, stride_it,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    SPLIT_OUTPUT: gl.constexpr, SKIP_INVALID_TAIL: gl.constexpr,
    LOADER_WARPS: gl.constexpr, LOADER_REGS: gl.constexpr, VALUES_REGS: gl.constexpr,
):  # fmt: skip
    """Grid ``(tokens, head blocks, splits)``, ``num_warps=4`` (the softmax warpgroup); the
    arguments of :func:`.sparse_mla._sparse_mla_bf16_kernel` (``ends_ptr``: each row's valid
    end, read with ``SKIP_INVALID_TAIL``), plus the ring depth, the loader's warps and
    registers and the values warpgroup's registers."""
    t, split, head0, start, end, idx_row = program_keys(idx_ptr, ends_ptr, topk, keys_per_split, stride_it, BLOCK_H,
                                                        SKIP_INVALID_TAIL)  # fmt: skip

    latent_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, 512], gl.bfloat16)
    rope_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, 64], gl.bfloat16)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, 512], latent_layout)
    qr_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, 64], rope_layout)
    kv_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, 512], latent_layout)
    kr_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, 64], rope_layout)
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], gl.bfloat16)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, BLOCK_N], p_layout)
    scale_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    handoff = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
    p_full, p_empty, done = handoff.index(0), handoff.index(1), handoff.index(2)
    for j in gl.static_range(STAGES):
        mbarrier.init(ready.index(j), count=LOADER_WARPS * 32)  # every loader thread arrives
        mbarrier.init(empty.index(j), count=2)  # both compute warpgroups arrive once
    for j in gl.static_range(3):
        mbarrier.init(handoff.index(j), count=1)

    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
    heads = head0 + gl.arange(0, BLOCK_H, gl.SliceLayout(1, q_layout))
    head_ok = (heads < num_heads)[:, None]
    d_latent = gl.arange(0, 512, gl.SliceLayout(0, q_layout))
    d_rope = gl.arange(0, 64, gl.SliceLayout(0, q_layout))
    q_rows = q_ptr + t * stride_qt + heads.to(gl.int64)[:, None] * stride_qh
    q_smem.store(gl.load(q_rows + d_latent[None, :], mask=gl.broadcast(head_ok, q_rows)[0], other=0.0))
    qr_rows = qr_ptr + t * stride_qrt + heads.to(gl.int64)[:, None] * stride_qrh
    qr_smem.store(gl.load(qr_rows + d_rope[None, :], mask=gl.broadcast(head_ok, qr_rows)[0], other=0.0))
    fence_async_shared()  # each thread's Q stores, before wgmma reads them through the async proxy
    cta_barrier()  # every warp's Q rows (and the barrier inits) before either partition starts

    acc, m_i, l_i = gl.warp_specialize(
        [
            (_scores_and_softmax, (q_smem, qr_smem, kv_smem, kr_smem, p_smem, scale_smem, ready, empty, p_full,
                                   p_empty, done, idx_row, start, end, num_slots, qk_scale_log2,
                                   BLOCK_H, BLOCK_N, STAGES)),
            (_values_high, (kv_smem, p_smem, scale_smem, ready, empty, p_full, p_empty, done, start, end,
                            out_ptr, t, split, head0, num_heads, stride_ot, stride_oh, stride_os,
                            BLOCK_H, BLOCK_N, STAGES)),
            (_gather_tiles, (kv_ptr, idx_row, start, end, num_slots, stride_kv, kv_smem, kr_smem, ready, empty,
                             BLOCK_N, STAGES)),
        ],
        [4, LOADER_WARPS],
        [VALUES_REGS, LOADER_REGS],
    )  # fmt: skip
    for j in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(j))
        mbarrier.invalidate(empty.index(j))
    for j in gl.static_range(3):
        mbarrier.invalidate(handoff.index(j))

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    lse_heads = head0 + gl.arange(0, BLOCK_H, rows_s)
    store_lse(lse_ptr, t, split, lse_heads, num_heads, m_i, l_i, stride_lt, stride_lh, stride_ls, SPLIT_OUTPUT)
    has_keys = l_i > 0.0
    inv_l = gl.where(has_keys, 1.0 / gl.where(has_keys, l_i, 1.0), 0.0)
    out = acc * gl.convert_layout(inv_l, gl.SliceLayout(1, o_layout))[:, None]
    out_heads = head0 + gl.arange(0, BLOCK_H, gl.SliceLayout(1, o_layout))
    out_cols = gl.arange(0, 256, gl.SliceLayout(0, o_layout))
    out_rows = out_ptr + t * stride_ot + split * stride_os + out_heads.to(gl.int64)[:, None] * stride_oh
    out_ptrs = out_rows + out_cols[None, :]
    out_mask = gl.broadcast((out_heads < num_heads)[:, None], out_ptrs)[0]
    gl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
