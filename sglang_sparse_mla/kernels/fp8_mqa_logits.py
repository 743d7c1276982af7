"""Lightning-indexer logits for ragged prefill (DeepGEMM ``fp8_mqa_logits``).

For query token ``t`` with key window ``[ks[t], ke[t])`` of one flat key
array (all requests' index keys concatenated)::

    logits[t, n] = k_scale[n] * sum_h weights[t, h] * relu(q[t, h] . k[n])   ks[t] <= n < ke[t]
    logits[t, n] = -inf                                                       elsewhere

A program owns a block of ``tokens`` consecutive query tokens and one column
split. It streams only the key tiles that meet the union of its tokens'
windows (tokens of one request share ``ks`` and have nearly equal ``ke``) and
writes ``-inf`` over the rest of its columns without loading anything. Token
blocks are launched last-first: in causal prefill the late tokens have the
longest windows, so the longest programs start first. See
:mod:`.mqa_logits_common` for the score tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_dim, check_dtype, check_last_dim_contiguous, check_ndim, check_same_device
from .device_info import SMEM_LARGE, SMEM_MEDIUM, SMEM_SMALL, device_info
from .index_format import INDEX_HEAD_DIM
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

# (smem class, native fp8) -> configuration. Large: SM90/SM100 (wgmma, 227 KiB);
# medium: SM80 (163 KiB); small: SM86/89/120 (99 KiB). On SM90 a 4-warp program
# with a 64 x 256 (keys x 4 tokens * 64 heads) tile lets two programs per SM
# overlap one's MMA with the other's ReLU/weight/reduction epilogue.
_DEFAULTS: dict[tuple[int, bool], MQALogitsConfig] = {
    (SMEM_LARGE, True): MQALogitsConfig(block_n=64, tokens=4, num_warps=4, num_stages=4),
    (SMEM_MEDIUM, False): MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=3),
    (SMEM_SMALL, True): MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=3),
    (SMEM_SMALL, False): MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=2),
}
# Extra candidates a benchmark sweep times beside the default.
_SWEEP: dict[tuple[int, bool], tuple[MQALogitsConfig, ...]] = {
    (SMEM_LARGE, True): (
        MQALogitsConfig(block_n=128, tokens=4, num_warps=8, num_stages=3),
        MQALogitsConfig(block_n=128, tokens=2, num_warps=8, num_stages=4),
        MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=4),
        MQALogitsConfig(block_n=64, tokens=4, num_warps=4, num_stages=6),
    ),
    (SMEM_MEDIUM, False): (MQALogitsConfig(block_n=128, tokens=2, num_warps=8, num_stages=3),),
    (SMEM_SMALL, True): (MQALogitsConfig(block_n=128, tokens=2, num_warps=8, num_stages=2),),
    (SMEM_SMALL, False): (MQALogitsConfig(block_n=128, tokens=2, num_warps=8, num_stages=2),),
}
# SM100 / SM110: the large class's 4-warp tile of 4 tokens spills there (255 registers under
# Triton 3.8); the same tile on 8 warps does not. Compiled only: no such GPU has run them.
_TCGEN05 = {
    (SMEM_LARGE, True): (
        MQALogitsConfig(block_n=64, tokens=4, num_warps=8, num_stages=4),
        (MQALogitsConfig(block_n=64, tokens=2, num_warps=4, num_stages=4), MQALogitsConfig(block_n=128, tokens=2, num_warps=8, num_stages=3)),
    ),
}
CONFIGS = MQALogitsConfigTable(_DEFAULTS, _SWEEP, _TCGEN05)
# Keep at least this many key tiles per column split.
_MIN_TILES_PER_SPLIT = 8
_FILL_BLOCK = 256


@triton.jit
def _fp8_mqa_logits_kernel(
    q_ptr,
    k_ptr,
    k_scale_ptr,
    w_ptr,
    ks_ptr,
    ke_ptr,
    out_ptr,
    num_tokens,
    num_keys,
    cols_per_split,
    stride_qt,
    stride_kn,
    stride_wt,
    stride_ot,
    score_factor,
    HEADS: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FILL_BLOCK: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
):
    token_block = tl.num_programs(0) - 1 - tl.program_id(0)
    col_lo = tl.program_id(1) * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, num_keys)

    first_token = token_block * TOKENS
    tokens = first_token + tl.arange(0, TOKENS)
    token_ok = tokens < num_tokens
    ks = tl.maximum(tl.load(ks_ptr + tokens, mask=token_ok, other=0), 0)
    ke = tl.minimum(tl.load(ke_ptr + tokens, mask=token_ok, other=0), num_keys)
    has_keys = token_ok & (ks < ke)
    lo = tl.maximum(tl.min(tl.where(has_keys, ks, num_keys), 0), col_lo)
    hi = tl.minimum(tl.max(tl.where(has_keys, ke, 0), 0), col_hi)
    # Key tiles [tile_lo, tile_hi) cover [lo, hi); col_lo is tile-aligned.
    tile_lo = tl.where(lo < hi, lo // BLOCK_N * BLOCK_N, col_lo)
    tile_hi = tl.where(lo < hi, tl.minimum(tl.cdiv(hi, BLOCK_N) * BLOCK_N, col_hi), col_lo)

    q = load_query_block(q_ptr, first_token, num_tokens, stride_qt, TOKENS, HEADS, FP8_NATIVE)
    w = load_head_weights(w_ptr, first_token, num_tokens, stride_wt, TOKENS, HEADS)
    d = tl.arange(0, 128)
    out_rows = out_ptr + tokens[None, :].to(tl.int64) * stride_ot
    for n0 in range(tile_lo, tile_hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < tile_hi
        k = load_fp8_operand(k_ptr + keys[:, None].to(tl.int64) * stride_kn + d[None, :], key_ok[:, None], FP8_NATIVE)
        key_scale = tl.load(k_scale_ptr + keys, mask=key_ok, other=0.0) * score_factor
        s = weighted_relu_scores(k, q, w, key_scale, TOKENS, HEADS)
        valid = (keys[:, None] >= ks[None, :]) & (keys[:, None] < ke[None, :])
        tl.store(
            out_rows + keys[:, None],
            tl.where(valid, s, float("-inf")),
            mask=key_ok[:, None] & token_ok[None, :],
        )
    fill_neg_inf(out_ptr, tokens, token_ok, stride_ot, col_lo, tile_lo, FILL_BLOCK)
    fill_neg_inf(out_ptr, tokens, token_ok, stride_ot, tile_hi, col_hi, FILL_BLOCK)


def _validate(q, k, k_scale, weights, ks, ke, out):
    check_fp8_query("q", q, 3, f"[tokens, heads, {INDEX_HEAD_DIM}]")
    num_tokens, num_heads, _ = q.shape
    check_dtype("k", k, torch.float8_e4m3fn)
    check_ndim("k", k, 2, f"[keys, {INDEX_HEAD_DIM}]")
    check_dim("k", k, 1, INDEX_HEAD_DIM, "index head dim")
    check_last_dim_contiguous("k", k)
    num_keys = k.shape[0]
    check_dtype("k_scale", k_scale, torch.float32)
    check_ndim("k_scale", k_scale, 1, "[keys]")
    check_dim("k_scale", k_scale, 0, num_keys, "keys")
    check_last_dim_contiguous("k_scale", k_scale)
    check_weights(weights, num_tokens, num_heads)
    for name, t in (("ks", ks), ("ke", ke)):
        check_dtype(name, t, torch.int32)
        check_ndim(name, t, 1, "[tokens]")
        check_dim(name, t, 0, num_tokens, "query tokens")
        check_last_dim_contiguous(name, t)
    tensors = [("q", q), ("k", k), ("k_scale", k_scale), ("weights", weights), ("ks", ks), ("ke", ke)]
    if out is not None:
        check_dtype("out", out, torch.float32)
        check_ndim("out", out, 2, "[tokens, keys]")
        check_dim("out", out, 0, num_tokens, "query tokens")
        check_dim("out", out, 1, num_keys, "keys")
        check_last_dim_contiguous("out", out)
        tensors.append(("out", out))
    return check_same_device(tensors)


def fp8_mqa_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: MQALogitsConfig | None = None,
) -> torch.Tensor:
    """Indexer logits of ragged prefill tokens over a flat key array.

    Args:
        q: ``[T, H, 128]`` float8_e4m3fn index queries, ``H`` in
            :data:`.mqa_logits_common.SUPPORTED_INDEX_HEADS` (64 for
            DeepSeek V3.2); each token's ``H x 128`` values dense.
        k: ``[N, 128]`` float8_e4m3fn index keys (rows may be strided).
        k_scale: ``[N]`` float32 per-key dequantization scales.
        weights: ``[T, H]`` float32 per-head weights (softmax scale and head
            scaling already folded in, as SGLang passes them).
        ks, ke: ``[T]`` int32, token ``t`` scores keys ``ks[t] <= n < ke[t]``
            (clamped to ``[0, N]``; an empty window gives a row of ``-inf``).
        out: optional ``[T, N]`` float32 destination (a view with a padded row
            stride is fine); every entry is overwritten.
        config: tile configuration override (benchmarks and tests).

    Returns:
        ``[T, N]`` float32 (``out`` when given): the weighted ReLU scores in
        each token's window, ``-inf`` elsewhere.

    Memory: the result is ``4 * T * N`` bytes. For long prefill, bound it by
    processing rows in chunks into one reused buffer, e.g.::

        buf = torch.empty(max_rows, N, dtype=torch.float32, device=q.device)
        for r0 in range(0, T, max_rows):
            r1 = min(r0 + max_rows, T)
            logits = fp8_mqa_logits(q[r0:r1], k, k_scale, weights[r0:r1],
                                    ks[r0:r1], ke[r0:r1], out=buf[: r1 - r0])
            ...  # consume (e.g. top-k) before the next chunk

    Key tiles entirely outside a token block's windows are neither loaded nor
    multiplied; only their ``-inf`` is written.
    """
    device = _validate(q, k, k_scale, weights, ks, ke, out)
    num_tokens, num_heads, _ = q.shape
    num_keys = k.shape[0]
    if out is None:
        out = torch.empty(num_tokens, num_keys, dtype=torch.float32, device=device)
    if num_tokens == 0 or num_keys == 0:
        return out

    info = device_info(device)
    cfg = config or CONFIGS.select(info)
    check_config(cfg)
    tokens = cfg.tokens_for(num_heads)
    token_blocks = triton.cdiv(num_tokens, tokens)
    key_tiles = triton.cdiv(num_keys, cfg.block_n)
    # Split columns only when the token blocks alone leave SMs idle.
    splits = max(1, min(triton.cdiv(2 * info.num_sms, token_blocks), key_tiles // _MIN_TILES_PER_SPLIT))
    cols_per_split = triton.cdiv(key_tiles, splits) * cfg.block_n
    splits = triton.cdiv(num_keys, cols_per_split)

    _fp8_mqa_logits_kernel[(token_blocks, splits)](
        fp8_kernel_view(q, info),
        fp8_kernel_view(k, info),
        k_scale,
        weights,
        ks,
        ke,
        out,
        num_tokens,
        num_keys,
        cols_per_split,
        q.stride(0),
        k.stride(0),
        weights.stride(0),
        out.stride(0),
        scale_factor(info),
        HEADS=num_heads,
        TOKENS=tokens,
        BLOCK_N=cfg.block_n,
        FILL_BLOCK=_FILL_BLOCK,
        FP8_NATIVE=info.native_fp8,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
