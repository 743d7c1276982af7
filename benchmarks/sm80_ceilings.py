"""Ceilings of the SM80-class path (what A100 / RTX / DGX Spark run, forced on newer GPUs by
``SGLANG_SPARSE_MLA_FORCE_SM80=1``), measured on the GPU the benchmarks run on.

* ``mma_v2_tflops``: bf16 ``mma.sync`` (Gluon ``mma_v2``, fp32 accumulate) fed by ``ldmatrix``
  from shared memory, with no global traffic: the tensor-core peak of the instructions the
  forced path uses, which on Hopper is well below the ``wgmma`` peak a cuBLAS matmul reaches.
* ``gather_gbs(row_bytes)``: reading whole cache rows at random slots of a 2^20-row cache, as
  the sparse MLA kernels do (1152-byte BF16 rows, 656-byte FP8 rows), 16-byte loads; only one
  word per 32 rows is written back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from timing import rotation_count, time_launches

CACHE_ROWS = 1 << 20
TOPK = 2048
GATHER_TOKENS = 64


@triton.jit
def _gather_rows_kernel(cache_ptr, idx_ptr, out_ptr, ROW_WORDS: tl.constexpr, BLOCK_W: tl.constexpr,
                        BLOCK_R: tl.constexpr):  # fmt: skip
    """Rows ``idx[32 p .. 32 p + 32]`` of an int32 cache (``ROW_WORDS`` words a row, a multiple
    of 4) read whole; their XOR to ``out[p]``, so that no load is dead."""
    pid = tl.program_id(0)
    slot = tl.load(idx_ptr + pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    rows = tl.multiple_of(slot * ROW_WORDS, 4)
    words = tl.load(cache_ptr + rows[:, None] + cols[None, :], mask=cols[None, :] < ROW_WORDS, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(tl.xor_sum(words, axis=1), axis=0))


def gather_gbs(row_bytes: int, gen: torch.Generator) -> float:
    """Bytes of cache rows read per second (/1e9) when gathering ``TOPK`` random rows for each of
    ``GATHER_TOKENS`` tokens from a ``CACHE_ROWS``-row cache of ``row_bytes``-byte rows."""
    words = row_bytes // 4
    cache = torch.randint(-(2**31), 2**31 - 1, (CACHE_ROWS, words), dtype=torch.int32, device="cuda", generator=gen)
    rows = GATHER_TOKENS * TOPK
    sets = rotation_count(rows * row_bytes)
    idxs = [torch.randint(0, CACHE_ROWS, (rows,), dtype=torch.int32, device="cuda", generator=gen) for _ in range(sets)]
    out = torch.empty(rows // 32, dtype=torch.int32, device="cuda")
    block_w = triton.next_power_of_2(words)
    calls = [
        lambda idx=idx: _gather_rows_kernel[(rows // 32,)](cache, idx, out, words, block_w, 32, num_warps=4)
        for idx in idxs
    ]
    timing = time_launches(calls)
    del cache
    torch.cuda.empty_cache()
    return rows * row_bytes / (timing.ms * 1e-3) / 1e9


def mma_v2_tflops() -> float | None:
    """bf16 ``mma_v2`` throughput (TFLOP/s) from shared-memory operands; None where this
    Triton has no Gluon Ampere ops."""
    from sglang_sparse_mla.kernels.device_info import gluon_ampere_available

    if not gluon_ampere_available():
        return None
    from mma_v2_loop import BK, BM, BN, mma_v2_loop_kernel

    iters = 512
    programs = 8 * torch.cuda.get_device_properties(0).multi_processor_count
    a = torch.randn(2, BM, BK, device="cuda").bfloat16()
    b = torch.randn(2, BK, BN, device="cuda").bfloat16()
    out = torch.empty(programs, BM, BN, device="cuda")
    timing = time_launches([lambda: mma_v2_loop_kernel[(programs,)](a, b, out, iters, BM, BN, BK, num_warps=4)])
    return programs * iters * 2 * BM * BN * BK / (timing.ms * 1e-3) / 1e12
