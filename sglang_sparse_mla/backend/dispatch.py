"""Kernel dispatch of the backend: every attention-path kernel call in one place.

Pure torch and this package's Triton kernels (no SGLang import, no DeepGEMM,
FlashMLA or TileLang). The caches are SGLang's own buffers, addressed in
their native layouts:

* latent KV: ``[slots, 1, 576]`` bf16 or ``[slots, 1, 656]`` FP8 rows
  (:mod:`sglang_sparse_mla.kernels.kv_cache_layout`), one row per token slot;
* index K: ``[pages, 64 * 132]`` uint8 per layer, each 64-slot page holding the
  64 fp8 keys (128 bytes each) followed by their 64 float32 scales.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.index_format import INDEX_HEAD_DIM, INDEX_ROW_BYTES, INDEX_SCALE_BYTES
from .spec import PAGE_SIZE

# Bytes of index logits materialised at once by a ragged extend; larger
# batches are scored in row chunks through one reused buffer.
RAGGED_LOGITS_BUDGET_BYTES = 512 * 1024 * 1024


# --- latent KV cache -------------------------------------------------------


def store_kv(
    kv_buffer: torch.Tensor, loc: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor | None = None
) -> None:
    """Write the new tokens' latent rows at slots ``loc``: ``k_nope [T, 1, 512]`` and ``k_rope
    [T, 1, 64]`` as SGLang's absorbed MLA holds them, or whole ``[T, 1, 576]`` rows with
    ``k_rope=None``, in the cache's BF16 or FP8 layout (:func:`kernels.store_latent_rows`)."""
    kernels.store_latent_rows(kv_buffer, loc, k_nope, k_rope)


def sparse_attention(
    q: torch.Tensor,
    kv_buffer: torch.Tensor,
    topk_slots: torch.Tensor,
    sm_scale: float,
    *,
    decode: bool,
    batch_invariant: bool = False,
    q_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[T, H, 512]`` bf16 attention of ``q [T, H, 576]`` (or ``q [T, H, 512]`` and ``q_rope
    [T, H, 64]``, read in place) over its top-k slots.

    ``batch_invariant``: each token's result independent of the batch (SGLang's
    ``--enable-deterministic-inference``).
    """
    rows = kv_buffer.view(kv_buffer.shape[0], -1)
    if rows.dtype not in (torch.bfloat16, torch.uint8):
        rows = rows.view(torch.uint8)
    fn = kernels.sparse_mla_decode if decode else kernels.sparse_mla_prefill
    out, _ = fn(q, rows, topk_slots, sm_scale, batch_invariant=batch_invariant, q_rope=q_rope)
    return out


# --- index keys ------------------------------------------------------------


def _index_k_cache(index_buffer: torch.Tensor) -> torch.Tensor:
    """A layer's index-K buffer as the kernels take it: ``[pages, 64, 1, 132]`` uint8."""
    return index_buffer.view(index_buffer.shape[0], PAGE_SIZE, 1, INDEX_ROW_BYTES)


def _index_pages(index_buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys [pages, 64, 128] uint8, scales [pages, 64, 4] uint8)`` views of a layer's index-K buffer."""
    pages = index_buffer.view(index_buffer.shape[0], PAGE_SIZE * INDEX_ROW_BYTES)
    key_bytes = PAGE_SIZE * INDEX_HEAD_DIM
    keys = pages[:, :key_bytes].view(pages.shape[0], PAGE_SIZE, INDEX_HEAD_DIM)
    scales = pages[:, key_bytes:].view(pages.shape[0], PAGE_SIZE, INDEX_SCALE_BYTES)
    return keys, scales


def quantize_index_keys(
    index_buffer: torch.Tensor,
    loc: torch.Tensor,
    key: torch.Tensor,
    *,
    rotate: bool,
    scale_format: str,
    rope: kernels.IndexRope | None = None,
    norm: kernels.IndexNorm | None = None,
) -> None:
    """Rotate (``rotate``: the Hadamard rotation, where SGLang's writer applies it) or normalize and
    rope (``norm``, ``rope``: SGLang's fused indexer), quantize to FP8 and store bf16 index keys
    ``[T, 128]`` at slots ``loc``, in one kernel
    (:func:`sglang_sparse_mla.kernels.quantize_index_keys_to_cache`)."""
    kv_cache = _index_k_cache(index_buffer)
    kernels.quantize_index_keys_to_cache(
        key, loc, kv_cache, rotate=rotate, scale_format=scale_format, rope=rope, norm=norm
    )


def quantize_index_queries(
    query: torch.Tensor,
    gate: torch.Tensor,
    head_scale: float,
    softmax_scale: float,
    *,
    rotate: bool,
    scale_format: str,
    rope: kernels.IndexRope | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_fp8 [T, H, 128], weights [T, H] float32)`` of bf16 index queries and per-head gates, in one
    kernel (:func:`sglang_sparse_mla.kernels.quantize_index_queries`): rotated or roped like the keys, the
    weights ``gate * head_scale * q_scale * softmax_scale`` multiplied in that order in fp32."""
    q_fp8, _, weights = kernels.quantize_index_queries(
        query, gate, head_scale, softmax_scale, rotate=rotate, scale_format=scale_format, rope=rope
    )
    return q_fp8, weights


def quantize_index_keys_and_queries(
    index_buffer: torch.Tensor,
    loc: torch.Tensor,
    key: torch.Tensor,
    query: torch.Tensor,
    gate: torch.Tensor,
    head_scale: float,
    softmax_scale: float,
    *,
    rotate: bool,
    key_format: str,
    query_format: str,
    rope: kernels.IndexRope | None = None,
    norm: kernels.IndexNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_index_keys` and :func:`quantize_index_queries` in one launch
    (:func:`sglang_sparse_mla.kernels.quantize_index_keys_and_queries`): the queries are those of the
    keys' first tokens, ``rope.positions`` one per key."""
    kv_cache = _index_k_cache(index_buffer)
    q_fp8, _, weights = kernels.quantize_index_keys_and_queries(
        key, loc, kv_cache, query, gate, head_scale, softmax_scale,
        rotate=rotate, key_format=key_format, query_format=query_format, rope=rope, norm=norm,
    )  # fmt: skip
    return q_fp8, weights


def gather_index_k(index_buffer: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_fp8 [N, 128], k_scale [N] float32)`` of slots ``[N]`` (cached keys, read not recomputed)."""
    keys, scales = _index_pages(index_buffer)
    page, offset = torch.div(slots, PAGE_SIZE, rounding_mode="floor"), slots % PAGE_SIZE
    k_fp8 = keys[page, offset].view(torch.float8_e4m3fn)
    k_scale = scales[page, offset].contiguous().view(torch.float32).reshape(-1)
    return k_fp8, k_scale


def paged_index_logits(
    q_fp8: torch.Tensor,
    index_buffer: torch.Tensor,
    weights: torch.Tensor,
    kv_total: torch.Tensor,
    block_table: torch.Tensor,
    tokens_per_req: int,
) -> torch.Tensor:
    """``[B * n, W * 64]`` index logits of ``n`` query tokens per request over its pages.

    Token ``j`` of request ``b`` scores positions ``< kv_total[b] - n + j + 1``; the columns
    past them are left unwritten (the top-k reads each row only up to its length).
    """
    num_reqs = block_table.shape[0]
    q = q_fp8.view(num_reqs, tokens_per_req, *q_fp8.shape[1:])
    kv_cache = _index_k_cache(index_buffer)
    return kernels.fp8_paged_mqa_logits(
        q, kv_cache, weights, kv_total, block_table, block_table.shape[1] * PAGE_SIZE, clean_logits=False
    )


def ragged_index_logits(
    q_fp8: torch.Tensor,
    k_fp8: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """``[T, N]`` logits of query rows over the keys ``ks <= n < ke`` of their request."""
    return kernels.fp8_mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke, out=out)


def topk_slots(
    logits: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    *,
    row_starts: torch.Tensor | None = None,
    token_to_req: torch.Tensor | None = None,
    tokens_per_req: int = 1,
) -> torch.Tensor:
    """``[T, k]`` int32 KV slots of the top-k logits of each row's window, ``-1`` padded.

    Positions are relative to ``row_starts`` (the request's first key) and are
    mapped to slots through ``req_to_token`` in the same kernel.
    """
    return kernels.topk_indices(
        logits,
        lengths,
        k,
        row_starts=row_starts,
        req_to_token=req_to_token,
        req_pool_indices=req_pool_indices,
        token_to_req=token_to_req,
        tokens_per_req=tokens_per_req,
    )


def prefix_slots(
    lengths: torch.Tensor,
    k: int,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    *,
    token_to_req: torch.Tensor | None = None,
    tokens_per_req: int = 1,
) -> torch.Tensor:
    """``[T, k]`` int32 slots of positions ``0 .. lengths - 1``: the whole top-k when ``lengths <= k``."""
    positions = torch.arange(k, dtype=torch.int32, device=lengths.device).expand(lengths.shape[0], k)
    positions = torch.where(positions < lengths.unsqueeze(1), positions, -1)
    return kernels.topk_to_kv_slots(
        positions, req_to_token, req_pool_indices, token_to_req=token_to_req, tokens_per_req=tokens_per_req
    )
