"""The compile harness the arch checks rely on (``target_compile``) sees spills."""

from __future__ import annotations

from target_compile import CompileJob, compile_many

from sglang_sparse_mla.kernels import topk

KERNEL = "sglang_sparse_mla.kernels.topk:_split_rows_kernel"
SIGNATURE = dict(
    logits_ptr="*fp32", lengths_ptr="*i32", row_starts_ptr="*i32", out_ptr="*i32", sync_ptr="*i32",
    seg_counts_ptr="*i32", req_to_token_ptr="*i32", req_pool_indices_ptr="*i32", token_to_req_ptr="*i32",
    row0="i32", num_cols="i32", k="i32", segments="i32", tokens_per_req="i32", slot_cols="i32", stride_lr="i32",
    stride_or="i32", stride_r2t="i32",
)  # fmt: skip
CONSTEXPRS = dict(FIRST_PHASE=0, LAST_PHASE=4, HAS_ROW_STARTS=True, MAP_SLOTS=True, HAS_TOKEN_TO_REQ=True, BLOCK=1024,
                  SEGMENT_BLOCK=topk._SEGMENT_BLOCK, SEGMENT_ALIGN=topk._SEGMENT_ALIGN)  # fmt: skip


def test_register_spills_are_reported_and_a_free_kernel_has_none():
    """The split-row top-k for sm80 under its launch's register cap, then capped far below what it
    needs (ptxas must spill): no local-memory instruction, then some."""
    jobs = [
        CompileJob(KERNEL, SIGNATURE, CONSTEXPRS, 80, topk._SPLIT_NUM_WARPS, 1, ("logits_ptr", "out_ptr"), maxnreg)
        for maxnreg in (topk.SPLIT_MAX_REGISTERS, 40)
    ]
    free, capped = compile_many(jobs)
    assert free.error is None and capped.error is None, (free, capped)
    assert free.local_accesses == 0, free
    assert capped.registers <= 40 and capped.local_accesses > 0 and capped.stack_bytes > 0, capped
