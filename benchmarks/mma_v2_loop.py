"""A Gluon kernel that only runs bf16 ``mma_v2`` on shared-memory operands: the tensor-core
ceiling of the SM80-class instructions (see :mod:`sm80_ceilings`). Imports Gluon."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from sglang_sparse_mla.kernels.sparse_mla_gluon_common import cta_barrier

BM, BN, BK = 128, 64, 64


@gluon.jit
def mma_v2_loop_kernel(a_ptr, b_ptr, out_ptr, iters, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    """``a`` ``[2, BM, BK]``, ``b`` ``[2, BK, BN]`` bf16 staged in shared memory once; then
    ``iters`` products ``acc += a[i % 2] @ b[i % 2]`` (operands reloaded by ``ldmatrix`` each
    time: the alternating buffer keeps the loads in the loop); ``acc`` to ``out[program]``."""
    nw: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[nw, 1], instr_shape=[16, 8])
    dot_a: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    dot_b: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    load_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [nw, 1], [1, 0])
    a_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BM, BK], gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16))
    b_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BK, BN], gl.NVMMASharedLayout.get_default_for([BK, BN], gl.bfloat16))
    rows_m = gl.arange(0, BM, gl.SliceLayout(1, load_l))
    rows_k = gl.arange(0, BK, gl.SliceLayout(1, load_l))
    cols_k = gl.arange(0, BK, gl.SliceLayout(0, load_l))
    cols_n = gl.arange(0, BN, gl.SliceLayout(0, load_l))
    for s in gl.static_range(2):
        a_smem.index(s).store(gl.load(a_ptr + s * BM * BK + rows_m[:, None] * BK + cols_k[None, :]))
        b_smem.index(s).store(gl.load(b_ptr + s * BK * BN + rows_k[:, None] * BN + cols_n[None, :]))
    cta_barrier()
    acc = gl.zeros([BM, BN], gl.float32, mma)
    for i in range(iters):
        acc = mma_v2(a_smem.index(i % 2).load(dot_a), b_smem.index(i % 2).load(dot_b), acc)
    out_rows = gl.arange(0, BM, gl.SliceLayout(1, mma))
    out_cols = gl.arange(0, BN, gl.SliceLayout(0, mma))
    gl.store(out_ptr + gl.program_id(0) * BM * BN + out_rows[:, None] * BN + out_cols[None, :], acc)
