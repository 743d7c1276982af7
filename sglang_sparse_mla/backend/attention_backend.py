"""``triton_sparse_mla``: SGLang attention backend for DeepSeek Sparse Attention models.

A direct :class:`AttentionBackend` rather than a subclass of SGLang's
``DeepseekSparseAttnBackend``: that class builds FlashMLA/DeepGEMM scheduling
metadata, sgl-kernel top-k plans and dense-MHA fallbacks in its constructor
and in every ``init_forward_metadata``, none of which this backend needs, so
overriding only its kernel dispatch would still run (and require) them.

The DSA model reaches this backend twice per layer:

* its ``Indexer`` module, routed here by :mod:`sglang_sparse_mla.scheduler_hooks`,
  calls :meth:`run_indexer`, which returns the layer's top-k *physical* KV slots;
* its absorbed MLA attention (``RadixAttention`` -> :meth:`forward_extend` /
  :meth:`forward_decode`) passes those slots back as ``topk_indices``; the
  backend writes the new latent rows and runs the sparse MLA kernel.

Metadata building lives in :mod:`.metadata`, kernel calls in :mod:`.dispatch`.
"""

from __future__ import annotations

import torch
from sglang.srt.configs.model_config import get_dsa_index_kpool, get_dsa_index_topk, is_deepseek_dsa
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.runtime_context import get_exec, get_parallel, get_spec

from . import dispatch, spec
from .indexer import SparseIndexer
from .metadata import GraphBuffers, SparseMLAMetadata, build_paged, build_ragged, fill_paged, pages_for


class TritonSparseMLABackend(AttentionBackend):
    """Sparse MLA attention and DSA indexer on this package's Triton kernels."""

    # Graph replays read only the runner's device buffers; eager batches fall
    # back to one device-to-host read of the longest sequence when the
    # scheduler sent no host mirror.
    needs_cpu_seq_lens = False
    # Never the dense MHA path of SGLang's ``dsa`` backend for short prefills: every
    # batch runs sparse MLA over the indexer's top-k. SGLang's DSA attention dispatch
    # (``handle_attention_dsa``) and its DSA attention test kit read this flag.
    use_mha = False

    def __init__(self, model_runner, speculative_step_id: int | None = None):
        super().__init__()
        hf_config = model_runner.model_config.hf_config
        device = torch.device(model_runner.device)
        if device.type == "cuda":  # SGLang has made the rank's GPU current
            index = device.index if device.index is not None else torch.cuda.current_device()
            spec.check_gpu(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))
        spec.check_hf_config(hf_config, is_dsa=is_deepseek_dsa(hf_config), index_kpool=get_dsa_index_kpool(hf_config))
        spec.check_page_size(model_runner.page_size)
        pool = model_runner.token_to_kv_pool
        spec.check_kv_cache_row(pool.kv_cache_dim, is_fp8=pool.dtype != torch.bfloat16)
        self.num_q_heads = spec.per_rank_heads(
            model_runner.model_config.num_attention_heads, get_parallel().attn_tp_size
        )

        # SGLang reads the pools off the active backend (forward_context).
        self.token_to_kv_pool = pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.kv_cache_dtype = model_runner.kv_cache_dtype
        self.index_topk = get_dsa_index_topk(hf_config)
        # --enable-deterministic-inference: sparse MLA results independent of the batch
        # (the indexer's logits and top-k already are).
        self.batch_invariant = bool(get_exec().deterministic.enable_deterministic_inference)
        # Step i of MTP multi-step draft decoding decodes position seq_len + i.
        self.speculative_step_id = speculative_step_id
        self.indexer = SparseIndexer(self.index_topk, self.req_to_token)
        self.graph_buffers: GraphBuffers | None = None
        # True while forward_metadata views the graph buffers.
        self._graph_batch = False
        self.forward_metadata: SparseMLAMetadata | None = None

    # --- metadata ---------------------------------------------------------

    @property
    def num_draft_tokens(self) -> int:
        """MTP tokens per request, read per batch: adaptive speculation captures several widths."""
        return get_spec().speculative_num_draft_tokens or 0

    def _tokens_per_req(self, forward_mode) -> int | None:
        """Query tokens per request of a uniform (graph-capturable) mode, else None."""
        if forward_mode.is_decode():
            return 1
        if forward_mode.is_target_verify() or forward_mode.is_draft_extend_v2():
            return self.num_draft_tokens
        return None

    def _draft_tokens_after(self, forward_mode) -> int:
        """Tokens on top of ``seq_lens`` (SGLang's speculative batches count without drafts)."""
        if forward_mode.is_target_verify():
            return self.num_draft_tokens
        if forward_mode.is_decode() and self.speculative_step_id is not None:
            return self.speculative_step_id + 1
        return 0

    def _kv_total(self, forward_batch) -> torch.Tensor:
        extra = self._draft_tokens_after(forward_batch.forward_mode)
        return forward_batch.seq_lens + extra if extra else forward_batch.seq_lens

    def init_forward_metadata(self, forward_batch) -> None:
        """Eager metadata of one batch (shared by every layer of the forward)."""
        self._graph_batch = False
        self.forward_metadata = self._build_eager(forward_batch)

    def _build_eager(self, fb) -> SparseMLAMetadata | None:
        mode = fb.forward_mode
        if mode.is_idle() or fb.batch_size == 0:
            return None
        kv_total = self._kv_total(fb)
        tokens_per_req = self._tokens_per_req(mode)
        if mode.is_draft_extend_v2() and set(fb.extend_seq_lens_cpu or [tokens_per_req]) != {tokens_per_req}:
            tokens_per_req = None  # an uneven draft extend is scored like an extend
        if tokens_per_req is not None:
            seq_lens = fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens
            max_kv_total = int(seq_lens.max()) + self._draft_tokens_after(mode)
            return build_paged(self.req_to_token, fb.req_pool_indices, kv_total, tokens_per_req, max_kv_total)
        if mode.is_dllm_extend() or mode.is_split_prefill() or not (mode.is_extend() or mode.is_draft_extend_v2()):
            raise NotImplementedError(f"{spec.BACKEND_NAME} does not serve forward mode {mode.name}")
        seq_lens_cpu = fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()
        return build_ragged(
            self.req_to_token,
            fb.req_pool_indices,
            kv_total,
            fb.extend_seq_lens,
            seq_lens_cpu.tolist(),
            list(fb.extend_seq_lens_cpu),
            dispatch.RAGGED_LOGITS_BUDGET_BYTES // 4,
        )

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Static buffers for graphs of up to ``max_bs`` requests / ``max_num_tokens`` tokens."""
        width = pages_for(self.req_to_token.shape[1])
        self.graph_buffers = GraphBuffers(max_bs, max_num_tokens, width, self.req_to_token.device)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Point ``forward_metadata`` at the static buffers (capture and replay).

        The buffers are filled by :meth:`init_forward_metadata_in_graph`, which
        is recorded in the graph and so re-runs on every replay.
        """
        tokens_per_req = self._tokens_per_req(forward_batch.forward_mode)
        if self.graph_buffers is None or tokens_per_req is None:
            self.init_forward_metadata(forward_batch)
            return
        self._graph_batch = True
        self.forward_metadata = self.graph_buffers.view(forward_batch.batch_size, tokens_per_req)

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        if self._graph_batch:
            fill_paged(
                self.forward_metadata, self.req_to_token, forward_batch.req_pool_indices, self._kv_total(forward_batch)
            )

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs) -> None:
        """Nothing to refresh: verify metadata does not depend on the draft tree mask."""

    # --- indexer ----------------------------------------------------------

    def run_indexer(
        self,
        indexer,
        x,
        q_lora: torch.Tensor,
        positions: torch.Tensor,
        forward_batch,
        layer_id: int,
        return_indices: bool = True,
    ) -> torch.Tensor | None:
        """Top-k physical KV slots ``[T, index_topk]`` int32 of a layer's indexer."""
        metadata = None if forward_batch.forward_mode.is_idle() else self.forward_metadata
        return self.indexer(
            indexer,
            x,
            q_lora,
            positions,
            forward_batch.out_cache_loc,
            self.token_to_kv_pool.get_index_k_with_scale_buffer(layer_id),
            metadata,
            return_indices,
            side_stream=self._q_b_proj_stream(indexer, forward_batch),
        )

    @staticmethod
    def _q_b_proj_stream(indexer, forward_batch) -> torch.cuda.Stream | None:
        """The stream SGLang runs the layer's ``q_b_proj`` on beside the indexer, where it does.

        In captured decode graphs (``forward_mla``: "overlap q_b_proj and indexer during
        decode") SGLang forks its alternate stream before calling the indexer and queues
        ``q_b_proj`` there after it, joining both after. Nothing else orders that GEMM, so at
        replay it starts at the fork and holds the SMs while the indexer's small projections and
        quantization wait (measured: docs/performance.md, "Measurements behind the dispatch
        rules"). SGLang's own indexer queues its key path on that stream first, which holds
        the GEMM back until then; ours makes the stream wait for its quantized queries, so the
        GEMM runs beside the logits and top-k. The conditions are SGLang's for that branch (its DCP variant never runs
        with this backend, which refuses DCP).
        """
        from sglang.srt.model_executor.runner import get_is_capture_mode

        stream = getattr(indexer, "alt_stream", None)
        if stream is None or not get_is_capture_mode() or not forward_batch.forward_mode.is_decode_or_idle():
            return None
        return stream

    # --- attention --------------------------------------------------------

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self._forward(q, k, layer, forward_batch, save_kv_cache, decode=True, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self._forward(q, k, layer, forward_batch, save_kv_cache, decode=False, **kwargs)

    def _forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        layer,
        forward_batch,
        save_kv_cache: bool,
        *,
        decode: bool,
        topk_indices: torch.Tensor | None = None,
        q_rope: torch.Tensor | None = None,
        k_rope: torch.Tensor | None = None,
        **_,
    ) -> torch.Tensor:
        """Absorbed MLA over the indexer's slots. SGLang's absorbed-MLA path (ours is listed
        among its absorb-core backends, :mod:`.model_hooks`) passes the
        parts apart: ``q [T, H, 512]`` with ``q_rope [T, H, 64]`` and ``k [T, 1, 512]`` with
        ``k_rope [T, 1, 64]``, read in place; other callers pass ``q [T, H * 576]`` and
        ``k [T, 1, 576]`` whole."""
        if topk_indices is None:
            raise RuntimeError(
                f"{spec.BACKEND_NAME} attends to the DSA indexer's top-k slots, but layer "
                f"{layer.layer_id} passed none (is the model a DSA model?)"
            )
        num_heads = layer.tp_q_head_num
        if q_rope is None:
            q = q.reshape(-1, num_heads, layer.head_dim)
        else:
            q = q.view(-1, num_heads, layer.v_head_dim)
            q_rope = q_rope.view(q.shape[0], num_heads, layer.head_dim - layer.v_head_dim).to(torch.bfloat16)
        kv_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        if save_kv_cache and k is not None:
            dispatch.store_kv(kv_buffer, forward_batch.out_cache_loc, k, k_rope)
        out = dispatch.sparse_attention(
            q.to(torch.bfloat16),
            kv_buffer,
            topk_indices[: q.shape[0]],
            layer.scaling,
            decode=decode,
            batch_invariant=self.batch_invariant,
            q_rope=q_rope,
        )
        return out.to(q.dtype).view(-1, num_heads * layer.v_head_dim)
