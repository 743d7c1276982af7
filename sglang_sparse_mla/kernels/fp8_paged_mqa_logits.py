"""Lightning-indexer logits for decode over the paged FP8 index-K cache
(what DeepGEMM's ``fp8_paged_mqa_logits`` computes).

Cache layout (SGLang's DSA index-K pool, one ``[num_blocks, block_size, 1,
D + 4]`` uint8 buffer): each physical block holds ``block_size * D`` bytes of
float8_e4m3fn keys (row-major, one ``D``-byte row per position) followed by
``block_size`` float32 scales; the rows are *not* interleaved with their
scales. Logical position ``p`` of request ``b`` lives in block
``block_table[b, p // block_size]``, row ``p % block_size``.

Query row ``b * next_n + j`` (token ``j`` of request ``b``; ``next_n > 1`` for
MTP verification) scores positions ``p < context_lens[b] - next_n + j + 1``::

    logits[b * next_n + j, p] = scale[p] * sum_h weights[b * next_n + j, h] * relu(q[b, j, h] . k[p])

and every other column up to ``max_context_len`` is ``-inf``.

A program owns one request, a group of its ``next_n`` tokens (all of them
unless ``next_n * heads`` exceeds the widest MMA) and one of ``splits``
equal shares of that request's *context* (its key tiles, then the ``-inf``
tail up to ``max_context_len``); each key is scored independently, so
splitting a context needs no merge. The number of splits is fixed by the
shapes (CUDA-graph safe) while the shares follow the context lengths on the
device: a CUDA-graph batch's block table spans the longest context the
server allows, and sizing the shares by that width would leave a short
request's keys to a few of its programs. Decode with one token per request
reads 132 bytes per key for ``2 * 64 * 128`` flops, so it is bound by memory
bandwidth, not the MMA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_dim, check_dtype, check_ndim, check_same_device
from .device_info import SMEM_LARGE, SMEM_MEDIUM, SMEM_SMALL, device_info
from .index_format import INDEX_HEAD_DIM, INDEX_ROW_BYTES
from .mqa_logits_common import (
    MQALogitsConfig,
    MQALogitsConfigTable,
    check_config,
    check_fp8_query,
    check_weights,
    fill_neg_inf,
    fp8_kernel_view,
    load_fp8_operand,
    load_head_weights,
    load_query_block,
    scale_factor,
    weighted_relu_scores,
)

# (smem class, native fp8) -> configuration; ``tokens`` caps the query tokens
# of one request handled per program. The block-table -> key-tile indirection
# splits the pipeline depth: key tiles are fetched (num_stages - 1) // 2 tiles
# ahead.
_DEFAULTS: dict[tuple[int, bool], MQALogitsConfig] = {
    (SMEM_LARGE, True): MQALogitsConfig(block_n=64, tokens=4, num_warps=4, num_stages=5),
    (SMEM_MEDIUM, False): MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=5),
    (SMEM_SMALL, True): MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=5),
    (SMEM_SMALL, False): MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=3),
}
# Extra candidates a benchmark sweep times beside the default.
_SWEEP: dict[tuple[int, bool], tuple[MQALogitsConfig, ...]] = {
    (SMEM_LARGE, True): (
        MQALogitsConfig(block_n=64, tokens=4, num_warps=4, num_stages=7),
        MQALogitsConfig(block_n=64, tokens=4, num_warps=4, num_stages=3),
        MQALogitsConfig(block_n=128, tokens=4, num_warps=8, num_stages=5),
        MQALogitsConfig(block_n=128, tokens=2, num_warps=4, num_stages=5),
    ),
    (SMEM_MEDIUM, False): (MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=7),),
    (SMEM_SMALL, True): (MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=7),),
    (SMEM_SMALL, False): (MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=5),),
}
# SM100 / SM110: the large class's 4-warp tile of 4 tokens spills there (255 registers under
# Triton 3.8); the same tile on 8 warps does not. Compiled only: no such GPU has run them.
_TCGEN05 = {
    (SMEM_LARGE, True): (
        MQALogitsConfig(block_n=64, tokens=4, num_warps=8, num_stages=5),
        (MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=5), MQALogitsConfig(block_n=128, tokens=2, num_warps=8, num_stages=3)),
    ),
}
CONFIGS = MQALogitsConfigTable(_DEFAULTS, _SWEEP, _TCGEN05)
# Programs aimed for per SM (decode is bound by memory latency and bandwidth:
# several resident programs keep enough key tiles in flight), and the fewest
# key tiles worth a column split.
_PROGRAMS_PER_SM = 8
_MIN_TILES_PER_SPLIT = 4
_FILL_BLOCK = 256


@triton.jit
def _key_scales(kv_scale_ptr, block_row, first, end, stride_block, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """float32 scales of positions ``first .. first + BLOCK_N`` (0 from ``end`` on).

    A block's scales follow its ``BLOCK_SIZE x 128`` key bytes; ``kv_scale_ptr``
    views the cache as float32.
    """
    pos = first + tl.arange(0, BLOCK_N)
    ok = pos < end
    block = tl.load(block_row + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    offsets = block * (stride_block // 4) + (BLOCK_SIZE * 128 // 4) + pos % BLOCK_SIZE
    return tl.load(kv_scale_ptr + offsets, mask=ok, other=0.0)


@triton.jit
def _fp8_paged_mqa_logits_kernel(
    q_ptr,
    kv_ptr,
    kv_scale_ptr,
    w_ptr,
    context_lens_ptr,
    block_table_ptr,
    out_ptr,
    next_n,
    max_positions,
    out_cols,
    splits,
    stride_qb,
    stride_qj,
    stride_block,
    stride_bt,
    stride_wr,
    stride_or,
    score_factor,
    HEADS: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FILL_BLOCK: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
    CLEAN: tl.constexpr,
):
    groups = tl.cdiv(next_n, TOKENS)
    b = tl.program_id(0) // groups
    first_j = (tl.program_id(0) % groups) * TOKENS
    split = tl.program_id(1)

    j = first_j + tl.arange(0, TOKENS)
    token_ok = j < next_n
    rows = b * next_n + j
    context = tl.load(context_lens_ptr + b)
    # Positions row j may see, clamped to the block table and the output width.
    limit = tl.minimum(tl.maximum(context - next_n + 1 + j, 0), max_positions)
    span = tl.max(tl.where(token_ok, limit, 0), 0)
    # This program's share of the group's key tiles, then of the -inf tail.
    tiles_per_split = tl.cdiv(tl.cdiv(span, BLOCK_N), splits)
    col_lo = tl.minimum(split * tiles_per_split * BLOCK_N, span)
    tile_hi = tl.minimum(col_lo + tiles_per_split * BLOCK_N, span)

    q = load_query_block(q_ptr + b.to(tl.int64) * stride_qb, first_j, next_n, stride_qj, TOKENS, HEADS, FP8_NATIVE)
    w = load_head_weights(w_ptr + b.to(tl.int64) * next_n * stride_wr, first_j, next_n, stride_wr, TOKENS, HEADS)
    d = tl.arange(0, 128)
    block_row = block_table_ptr + b.to(tl.int64) * stride_bt
    out_rows = out_ptr + rows[None, :].to(tl.int64) * stride_or
    # The scales are not a dot operand, so the software pipeliner leaves them
    # alone: fetch each tile's scales one iteration ahead by hand.
    next_scale = _key_scales(kv_scale_ptr, block_row, col_lo, tile_hi, stride_block, BLOCK_SIZE, BLOCK_N)
    for n0 in range(col_lo, tile_hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < tile_hi
        key_scale = next_scale
        next_scale = _key_scales(kv_scale_ptr, block_row, n0 + BLOCK_N, tile_hi, stride_block, BLOCK_SIZE, BLOCK_N)
        block = tl.load(block_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        k_rows = block * stride_block + (pos % BLOCK_SIZE) * 128
        k = load_fp8_operand(kv_ptr + k_rows[:, None] + d[None, :], pos_ok[:, None], FP8_NATIVE)
        s = weighted_relu_scores(k, q, w, key_scale * score_factor, TOKENS, HEADS)
        valid = pos[:, None] < limit[None, :]
        tl.store(
            out_rows + pos[:, None],
            tl.where(valid, s, float("-inf")),
            mask=pos_ok[:, None] & token_ok[None, :],
        )
    if CLEAN:
        tail_per_split = tl.cdiv(tl.cdiv(out_cols - span, splits), 16) * 16
        tail_lo = tl.minimum(span + split * tail_per_split, out_cols)
        tail_hi = tl.minimum(tail_lo + tail_per_split, out_cols)
        fill_neg_inf(out_ptr, rows, token_ok, stride_or, tail_lo, tail_hi, FILL_BLOCK)


def _validate(q, kv_cache, weights, context_lens, block_table, max_context_len):
    check_fp8_query("q", q, 4, f"[batch, next_n, heads, {INDEX_HEAD_DIM}]")
    batch, next_n, num_heads, _ = q.shape
    if next_n < 1:
        raise ValueError(f"q must have next_n >= 1 tokens per request, got shape {tuple(q.shape)}")
    check_dtype("kv_cache", kv_cache, torch.uint8)
    check_ndim("kv_cache", kv_cache, 4, f"[num_blocks, block_size, 1, {INDEX_ROW_BYTES}]")
    check_dim("kv_cache", kv_cache, 2, 1, "kv heads")
    check_dim("kv_cache", kv_cache, 3, INDEX_ROW_BYTES, "fp8 key bytes + float32 scale")
    block_size = kv_cache.shape[1]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"kv_cache block_size must be a power of two, got {block_size}")
    if kv_cache.numel() > 0:
        if kv_cache.stride(3) != 1 or kv_cache.stride(1) != INDEX_ROW_BYTES:
            raise ValueError(
                f"kv_cache blocks must be dense ({block_size} x {INDEX_ROW_BYTES} bytes), "
                f"got strides {kv_cache.stride()}"
            )
        if kv_cache.stride(0) % 4 or kv_cache.storage_offset() % 4:
            raise ValueError("kv_cache blocks must start at 4-byte aligned offsets (float32 scales)")
    check_weights(weights, batch * next_n, num_heads)
    check_dtype("context_lens", context_lens, torch.int32)
    check_ndim("context_lens", context_lens, 1, "[batch]")
    check_dim("context_lens", context_lens, 0, batch, "batch")
    if context_lens.numel() > 0 and context_lens.stride(0) != 1:
        raise ValueError(f"context_lens must be contiguous, got strides {context_lens.stride()}")
    check_dtype("block_table", block_table, torch.int32)
    check_ndim("block_table", block_table, 2, "[batch, max_blocks]")
    check_dim("block_table", block_table, 0, batch, "batch")
    if block_table.numel() > 0 and block_table.stride(1) != 1:
        raise ValueError(f"block_table must be contiguous in its last dimension, got strides {block_table.stride()}")
    if max_context_len < 0:
        raise ValueError(f"max_context_len must be >= 0, got {max_context_len}")
    return check_same_device(
        [("q", q), ("kv_cache", kv_cache), ("weights", weights), ("context_lens", context_lens), ("block_table", block_table)]
    )


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context_len: int,
    *,
    clean_logits: bool = True,
    config: MQALogitsConfig | None = None,
) -> torch.Tensor:
    """Indexer logits of decode / MTP-verify tokens over the paged FP8 index-K cache.

    Args:
        q: ``[B, next_n, H, 128]`` float8_e4m3fn index queries, ``H`` in
            :data:`.mqa_logits_common.SUPPORTED_INDEX_HEADS`.
        kv_cache: ``[num_blocks, block_size, 1, 132]`` uint8 in SGLang's DSA
            index-K layout (see module doc); ``block_size`` a power of two.
        weights: ``[B * next_n, H]`` float32 per-head weights.
        context_lens: ``[B]`` int32 tokens of each request *including* its
            ``next_n`` query tokens.
        block_table: ``[B, max_blocks]`` int32 physical block of each logical
            block; entries past a request's context are never read.
        max_context_len: width of the result (at least the largest context
            for a complete result).
        clean_logits: write ``-inf`` past each row's positions (DeepGEMM's
            flag of the same name). ``False`` skips most of that tail, for a
            consumer that reads each row only up to its length (the top-k): a
            CUDA-graph batch is as wide as the longest context allowed, and
            the tail is most of it.
        config: tile configuration override (benchmarks and tests).

    Returns:
        ``[B * next_n, max_context_len]`` float32: row ``b * next_n + j`` holds
        the scores of positions ``p < limit = context_lens[b] - next_n + j + 1``
        (clamped to ``max_blocks * block_size`` and ``max_context_len``) and
        ``-inf`` everywhere else; with ``clean_logits=False`` the columns at
        or past a row's ``limit`` are unspecified.
    """
    device = _validate(q, kv_cache, weights, context_lens, block_table, max_context_len)
    batch, next_n, num_heads, _ = q.shape
    out = torch.empty(batch * next_n, max_context_len, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out

    info = device_info(device)
    cfg = config or CONFIGS.select(info)
    check_config(cfg)
    tokens = cfg.tokens_for(num_heads, next_n)
    block_size = kv_cache.shape[1]
    max_positions = min(max_context_len, block_table.shape[1] * block_size)
    groups = triton.cdiv(next_n, tokens)
    key_tiles = max(1, triton.cdiv(max_positions, cfg.block_n))
    splits = max(1, min(triton.cdiv(_PROGRAMS_PER_SM * info.num_sms, batch * groups), key_tiles // _MIN_TILES_PER_SPLIT))

    values = fp8_kernel_view(kv_cache, info)
    _fp8_paged_mqa_logits_kernel[(batch * groups, splits)](
        fp8_kernel_view(q, info),
        values,
        kv_cache.view(torch.float32),
        weights,
        context_lens,
        block_table,
        out,
        next_n,
        max_positions,
        max_context_len,
        splits,
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        block_table.stride(0),
        weights.stride(0),
        out.stride(0),
        scale_factor(info),
        HEADS=num_heads,
        TOKENS=tokens,
        BLOCK_SIZE=block_size,
        BLOCK_N=cfg.block_n,
        FILL_BLOCK=_FILL_BLOCK,
        FP8_NATIVE=info.native_fp8,
        CLEAN=clean_logits,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
