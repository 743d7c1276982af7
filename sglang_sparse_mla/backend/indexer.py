"""The DSA indexer's forward on this package's kernels.

It runs SGLang's own ``Indexer`` module (its weights, norm and rotary
embedding, so checkpoints load unchanged) and replaces every kernel of the
stock path — DeepGEMM's MQA logits, the sgl-kernel/TileLang top-k, the CUDA
fused quantize-and-store — with torch and the Triton kernels of
:mod:`sglang_sparse_mla.kernels`:

1. project ``q = wq_b(q_lora)``, ``k = wk(x)`` and the per-head gate; where
   SGLang's path applies the key LayerNorm and the rope with its modules
   (DeepSeek-V3.2), apply them the same way here; where it applies them
   inside its fused CUDA kernels (GLM-5: :func:`sglang_fuses_norm_and_rope`),
   leave them to step 2, which computes them as those kernels do (fp32, one
   rounding);
2. in one kernel each (:mod:`sglang_sparse_mla.kernels.index_fp8_quant`),
   apply the Hadamard rotation where SGLang's own writer does (to queries
   and keys alike, which leaves ``q . k`` unchanged and spreads outliers
   before FP8; SGLang's fused CUDA and HIP writers skip it, and the index-K
   pages must hold what SGLang would write), quantize per 128 values with
   the scale format of SGLang's CUDA path (:func:`sglang_scale_formats`:
   fp32 scales for keys, UE8M0 for DeepSeek-V3.2's queries, fp32 for the
   fused indexer's), and store the new tokens' index keys in
   SGLang's index-K pages (a prefix's keys are already there: reused, never
   recomputed) or turn the gates into the queries' score weights;
3. score every visible position: paged logits straight from the index-K
   pages for uniform batches (decode, MTP), ragged logits over the gathered
   keys for extends, in chunks of rows against only their own requests' keys
   (bounded memory, no ``tokens x all keys`` blow-up for many requests);
4. keep the top-k logical positions of each token's window and map them to
   physical KV slots through ``req_to_token`` (one fused kernel). When no
   token sees more than ``index_topk`` positions the logits are skipped.

The result, ``[T, index_topk]`` int32 slots with ``-1`` padding, is what the
model hands to the attention backend (and, for IndexShare layers, to the next
layers unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import IndexNorm, IndexRope
from . import dispatch
from .metadata import SparseMLAMetadata


def _hidden(x) -> torch.Tensor:
    """The bf16 hidden states, also from SGLang's quantized ``(x, scale[, bf16])`` tuples."""
    if not isinstance(x, tuple):
        return x
    if len(x) >= 3:
        return x[2]
    x_q, x_s = x[0], x[1]
    groups = x_s.shape[-1]
    xf = x_q.float().view(x_q.shape[0], groups, -1) * x_s.float().unsqueeze(-1)
    return xf.view(x_q.shape).to(torch.bfloat16)


def sglang_rotates(indexer) -> bool:
    """Whether SGLang's own path for this ``Indexer`` applies the Hadamard rotation before FP8.

    Its fused index-K writers (CUDA ``use_dsa_indexer_fusion``, HIP aiter) skip
    it, and so do its fallbacks then. Following the module keeps the index-K
    pages interchangeable with SGLang's (hierarchical cache, disaggregated
    prefill on another backend) and the FP8 rounding of the scores the same.
    """
    fused = getattr(indexer, "use_dsa_indexer_fusion", False) or getattr(indexer, "use_aiter_fused_fp8_writer", False)
    return not fused


def sglang_scale_formats(indexer) -> tuple[str, str]:
    """``(queries, keys)``: the FP8 scale formats of SGLang's own CUDA path for this ``Indexer``
    (see :mod:`sglang_sparse_mla.kernels.index_fp8_quant`).

    Its CUDA index-K writers (``fused_store_index_k_cache``, and with
    ``use_dsa_indexer_fusion`` ``fused_k_indexer_norm_rope_store``) and the
    fused indexer's query kernel use plain fp32 scales whatever the module's
    ``scale_fmt``; the unfused indexer quantizes its queries with ``act_quant``
    and ``scale_fmt`` (``"ue8m0"`` for the DSA models; without it, the fp32
    format here). Matching them keeps the index-K pages interchangeable with
    SGLang's and the top-k sets the same.
    """
    if getattr(indexer, "use_dsa_indexer_fusion", False):
        return "fp32", "fp32"
    return ("ue8m0" if getattr(indexer, "scale_fmt", None) == "ue8m0" else "fp32"), "fp32"


def query_weight_factors(indexer) -> tuple[float, float]:
    """``(head_scale, softmax_scale)`` such that the query kernel's ``((gate * head_scale) * q_scale) *
    softmax_scale`` multiplies in SGLang's order: the fused indexer's kernel applies one fp32 factor
    ``softmax_scale * n_heads ** -0.5`` before the scale, the unfused path ``n_heads ** -0.5`` before
    and ``softmax_scale`` after it."""
    if getattr(indexer, "use_dsa_indexer_fusion", False):
        return indexer.softmax_scale * indexer.n_heads**-0.5, 1.0
    return indexer.n_heads**-0.5, indexer.softmax_scale


def _gate(indexer, x: torch.Tensor) -> torch.Tensor:
    """The per-head gate ``[T, Hi]`` of an unfused ``Indexer`` as SGLang computes it: on CUDA the
    bf16 product kept in fp32 (no bf16 rounding, so near-tied index scores order as in SGLang's
    paths), elsewhere the layer's own output."""
    weight = indexer.weights_proj.weight
    if x.is_cuda and x.dtype == weight.dtype == torch.bfloat16:
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return indexer.weights_proj(x)[0]


def _raw_projections(indexer, x, q_lora: torch.Tensor):
    """``(q [T, Hi, 128], k [T, 128], gate [T, Hi])`` straight from the projections (the fused
    layer's key and gate are column slices of its output)."""
    x = _hidden(x)
    n_heads, head_dim = indexer.n_heads, indexer.head_dim
    query = indexer.wq_b(q_lora)[0].view(-1, n_heads, head_dim)
    if getattr(indexer, "use_dsa_indexer_fusion", False):
        key, gate = indexer.wk_weights_proj(x)[0].split([head_dim, n_heads], dim=-1)
    else:
        key, gate = indexer.wk(x)[0], _gate(indexer, x)
    return query, key, gate


def _write_rope(dst: torch.Tensor, roped: torch.Tensor) -> None:
    """Put the rotary embedding's result into the rope columns ``dst``. SGLang's CUDA rope
    rotates those columns in place (its result is a view of them: nothing to do); its torch
    path returns new tensors."""
    if roped.data_ptr() != dst.data_ptr():
        dst.copy_(roped.reshape(dst.shape))


def project(indexer, x, q_lora: torch.Tensor, positions: torch.Tensor):
    """``(q [T, Hi, 128], k [T, 128], gate [T, Hi])`` of the indexer, normalized and roped by its
    modules (the rope columns rotated in place, as SGLang's indexer does); the Hadamard rotation
    (where :func:`sglang_rotates`) is left to the FP8 quantization kernels."""
    query, key, gate = _raw_projections(indexer, x, q_lora)
    rope_dim = indexer.rope_head_dim
    # SGLang's CUDA LayerNorm (FlashInfer) ignores a view's row stride: give it dense rows.
    key = indexer.k_norm(key.contiguous()).to(query.dtype)
    q_rope, k_rope = indexer.rotary_emb(positions, query[..., :rope_dim], key[..., :rope_dim])
    _write_rope(query[..., :rope_dim], q_rope)
    _write_rope(key[..., :rope_dim], k_rope)
    return query, key, gate


@dataclass(frozen=True)
class IndexInputs:
    """One forward's index rows as the FP8 quantization kernels take them: ``query [T, Hi, 128]``,
    ``key [T, 128]`` (bf16) and ``gate [T, Hi]``; with ``rope`` (and ``norm``) the kernels normalize
    and rope the raw rows themselves, otherwise they are ready."""

    query: torch.Tensor
    key: torch.Tensor
    gate: torch.Tensor
    rope: IndexRope | None = None
    norm: IndexNorm | None = None


def sglang_fuses_norm_and_rope(indexer) -> bool:
    """Whether SGLang's CUDA path normalizes and ropes this ``Indexer``'s keys and queries inside its
    fused kernels (``use_dsa_indexer_fusion``: LayerNorm with bias, interleaved rope from an fp32
    ``cos_sin_cache``), computing in fp32 and rounding once, where the module's own LayerNorm and
    rope would round to bf16 after each."""
    return (
        getattr(indexer, "use_dsa_indexer_fusion", False)
        and getattr(indexer.k_norm, "bias", None) is not None
        and getattr(indexer.rotary_emb, "cos_sin_cache", None) is not None
    )


def index_inputs(indexer, x, q_lora: torch.Tensor, positions: torch.Tensor) -> IndexInputs:
    """The index rows of one forward, computed as SGLang's own path for ``indexer`` computes them:
    raw projections with the norm and rope left to the quantization kernels where
    :func:`sglang_fuses_norm_and_rope`, else :func:`project`."""
    if not sglang_fuses_norm_and_rope(indexer):
        return IndexInputs(*project(indexer, x, q_lora, positions))
    query, key, gate = _raw_projections(indexer, x, q_lora)
    k_norm = indexer.k_norm
    norm = IndexNorm(k_norm.weight.float(), k_norm.bias.float(), float(k_norm.variance_epsilon))
    rope = IndexRope(indexer.rotary_emb.cos_sin_cache, positions[: key.shape[0]])
    return IndexInputs(query, key, gate, rope, norm)


def _force_init_and_local(
    logits: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    num_init: int,
    num_local: int,
) -> None:
    """Always keep a window's first ``num_init`` and last ``num_local`` positions.

    ``index_init_tokens`` / ``index_local_tokens`` of some DSA configs; the
    window of row ``t`` is ``starts[t] .. starts[t] + lengths[t] - 1``.
    """
    if not (num_init or num_local):
        return
    last = logits.shape[1] - 1
    base = torch.zeros_like(lengths, dtype=torch.int64) if starts is None else starts.to(torch.int64)
    base = base.unsqueeze(1)
    if num_init:
        init = base + torch.arange(num_init, dtype=torch.int64, device=logits.device)
        logits.scatter_(1, init.clamp_max(last), float("inf"))
    if num_local:
        back = torch.arange(num_local, dtype=torch.int64, device=logits.device)
        local = torch.maximum(base + lengths.to(torch.int64).unsqueeze(1) - 1 - back, base).clamp_max(last)
        logits.scatter_(1, local, float("inf"))


class SparseIndexer:
    """Top-k KV slots of every query token of a forward, one model layer at a time."""

    def __init__(self, index_topk: int, req_to_token: torch.Tensor):
        self.index_topk = index_topk
        self.req_to_token = req_to_token

    def __call__(
        self,
        indexer,
        x,
        q_lora: torch.Tensor,
        positions: torch.Tensor,
        out_cache_loc: torch.Tensor,
        index_buffer: torch.Tensor,
        metadata: SparseMLAMetadata | None,
        return_indices: bool = True,
        side_stream: torch.cuda.Stream | None = None,
    ) -> torch.Tensor | None:
        """``side_stream``: a stream whose next work must not start before the index queries are
        quantized (waited on once they are, before the logits): the caller's way to keep a large
        GEMM queued there off the SMs the indexer's small kernels need, and beside its logits and
        top-k kernels instead."""
        num_tokens = q_lora.shape[0]
        if metadata is None or num_tokens == 0:
            if not return_indices:
                return None
            return torch.full((num_tokens, self.index_topk), -1, dtype=torch.int32, device=q_lora.device)

        rows_in = index_inputs(indexer, x, q_lora, positions)
        rotate = sglang_rotates(indexer)
        query_format, key_format = sglang_scale_formats(indexer)
        loc = out_cache_loc[:num_tokens]
        if not return_indices:
            dispatch.quantize_index_keys(
                index_buffer, loc, rows_in.key, rotate=rotate, scale_format=key_format, rope=rows_in.rope,
                norm=rows_in.norm,
            )  # fmt: skip
            return None

        # Keys (every token, a data-parallel batch's padded ones too) and the real rows' queries in one
        # launch; weights multiplied in SGLang's order (fp32 rounding of near-tied scores included).
        rows = metadata.num_tokens
        q_fp8, weights = dispatch.quantize_index_keys_and_queries(
            index_buffer, loc, rows_in.key, rows_in.query[:rows], rows_in.gate[:rows],
            *query_weight_factors(indexer), rotate=rotate, key_format=key_format, query_format=query_format,
            rope=rows_in.rope, norm=rows_in.norm,
        )  # fmt: skip
        if side_stream is not None:
            side_stream.wait_stream(torch.cuda.current_stream())
        slots = self._topk_slots(indexer, q_fp8, weights, index_buffer, metadata)
        if rows < num_tokens:  # padded rows of a data-parallel batch
            slots = torch.cat([slots, slots.new_full((num_tokens - rows, slots.shape[1]), -1)])
        return slots

    @staticmethod
    def _mapping(metadata: SparseMLAMetadata) -> dict:
        """How rows map to requests: ``n`` rows per request (paged) or one index per row."""
        if metadata.is_paged:
            return dict(tokens_per_req=metadata.tokens_per_req)
        return dict(token_to_req=metadata.token_to_req)

    def _topk_slots(self, indexer, q_fp8, weights, index_buffer, metadata: SparseMLAMetadata) -> torch.Tensor:
        k, lengths = self.index_topk, metadata.token_kv_len
        mapping = self._mapping(metadata)
        if metadata.host_max_kv_len is not None and metadata.host_max_kv_len <= k:
            return dispatch.prefix_slots(lengths, k, self.req_to_token, metadata.req_pool_indices, **mapping)
        num_init = getattr(indexer, "num_init_tokens", 0)
        num_local = getattr(indexer, "num_local_tokens", 0)

        if metadata.is_paged:
            logits = dispatch.paged_index_logits(
                q_fp8, index_buffer, weights, metadata.kv_total, metadata.block_table, metadata.tokens_per_req
            )
            _force_init_and_local(logits, lengths, None, num_init, num_local)
            return dispatch.topk_slots(logits, lengths, k, self.req_to_token, metadata.req_pool_indices, **mapping)

        k_fp8, k_scale = dispatch.gather_index_k(index_buffer, metadata.kv_slots)
        starts, ends = metadata.token_kv_start, metadata.token_kv_start + lengths
        buffer = torch.empty(max(c.elements for c in metadata.chunks), dtype=torch.float32, device=q_fp8.device)
        parts = []
        for c in metadata.chunks:
            rows, keys = slice(c.row_start, c.row_end), slice(c.key_start, c.key_end)
            row_starts = starts[rows] - c.key_start
            logits = dispatch.ragged_index_logits(
                q_fp8[rows],
                k_fp8[keys],
                k_scale[keys],
                weights[rows],
                row_starts,
                ends[rows] - c.key_start,
                buffer[: c.elements].view(c.row_end - c.row_start, c.key_end - c.key_start),
            )
            _force_init_and_local(logits, lengths[rows], row_starts, num_init, num_local)
            parts.append(
                dispatch.topk_slots(
                    logits,
                    lengths[rows],
                    k,
                    self.req_to_token,
                    metadata.req_pool_indices,
                    row_starts=row_starts,
                    token_to_req=metadata.token_to_req[rows],
                )
            )
        return torch.cat(parts)
