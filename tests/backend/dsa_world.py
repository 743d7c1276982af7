"""A tiny DSA serving world built from SGLang's real objects, on CPU.

Real: ``ReqToTokenPool``, ``DSATokenToKVPool`` (latent KV + index-K pages),
``ForwardBatch``/``ForwardMode``, ``RadixAttention``, SGLang's DSA ``Indexer``
module, the forward context, a published server config
(``override_server_args``) and a transformers ``DeepseekV3Config``. Stubbed:
the model runner and its ``ModelConfig``, ``SimpleNamespace`` objects carrying
only what the backend reads (``model_config`` with ``hf_config`` and the MLA
dims, ``page_size``, ``token_to_kv_pool``, ``req_to_token_pool``, ``device``,
``kv_cache_dtype``), because a real ``ModelRunner`` needs a GPU, distributed
groups and weights; and the indexer's rotary embedding (``NeoxRope`` of
:mod:`sglang_sparse_mla.testing.dsa_layer`), whose CPU build needs vLLM.

Requests own 64-token pages; a radix-cache hit is modelled as SGLang does it,
by pointing the new request's ``req_to_token`` row at the donor's slots for
the shared full pages. Every request keeps its logical latent rows (the
"truth") so references never read the pool the backend wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import DSATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
from transformers import DeepseekV3Config

from sglang_sparse_mla.backend.attention_backend import TritonSparseMLABackend
from sglang_sparse_mla.backend.dispatch import store_kv
from sglang_sparse_mla.kernels.kv_cache_layout import D_QK, FP8_ROW_BYTES, quantize_kv_fp8
from sglang_sparse_mla.kernels.reference import sparse_mla_reference
from sglang_sparse_mla.backend import install_model_hooks
from sglang_sparse_mla.testing.dsa_layer import InterleavedRope, NeoxRope, check_topk_row, index_scores

PAGE = 64
# Shapes of the tiny DSA layer: query heads, hidden size, q_lora rank, index_topk.
HEADS, HIDDEN, Q_LORA, TOPK = 8, 64, 32, 16


@pytest.fixture
def sglang_config(request, target):
    """Publish a server config selecting our backend (SGLang's own test hook), then restore.

    Its ``device`` is the test target's (CPU under the interpreter), which the
    world's tensors follow; ``request.param`` (indirect parametrization) may
    override fields.
    """
    from sglang.srt.runtime_context import get_context

    fields = dict(attention_backend="triton_sparse_mla", page_size=64, kv_cache_dtype="bfloat16")
    fields["device"] = target.device.type
    fields.update(getattr(request, "param", None) or {})
    override = get_context().override_server_args(**fields)
    yield override.install()
    override.restore()


def make_indexer(
    monkeypatch,
    *,
    hidden: int = HIDDEN,
    q_lora_rank: int = Q_LORA,
    index_topk: int = TOPK,
    seed: int = 0,
    is_neox_style: bool = True,
):
    """SGLang's own DSA ``Indexer`` module (rope stubbed: :class:`NeoxRope`, or
    :class:`InterleavedRope` for ``is_neox_style=False``), random weights.

    ``is_neox_style=False`` (GLM-5's interleaved rope) makes it the fused module on CUDA
    (``use_dsa_indexer_fusion``: one ``wk_weights_proj`` layer instead of ``wk`` and ``weights_proj``).
    """
    import sglang.srt.layers.attention.dsa.dsa_indexer as dsa_indexer

    def stub_rope(*args, is_neox_style=True, device=None, **kwargs):
        return NeoxRope(device=device) if is_neox_style else InterleavedRope(device=device)

    monkeypatch.setattr(dsa_indexer, "get_rope_wrapper", stub_rope)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        indexer = dsa_indexer.Indexer(
            hidden_size=hidden,
            index_n_heads=32,
            index_head_dim=128,
            rope_head_dim=64,
            index_topk=index_topk,
            q_lora_rank=q_lora_rank,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            layer_id=0,
            scale_fmt="ue8m0",
            is_neox_style=is_neox_style,
        )
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(seed)
    for name in ("wq_b", "wk", "weights_proj", "wk_weights_proj"):
        if hasattr(indexer, name):
            weight = getattr(indexer, name).weight
            weight.data = (torch.randn(weight.shape, generator=gen) * weight.shape[1] ** -0.5).to(weight.dtype)
    return indexer.to(published_device())


def published_device() -> torch.device:
    """The ``--device`` of the published server config (see :func:`sglang_config`)."""
    from sglang.srt.runtime_context import get_device

    return torch.device(get_device().device)


@dataclass
class Request:
    """One request: its ``req_to_token`` row, its slots and its logical latent rows."""

    pool_index: int
    slots: list[int] = field(default_factory=list)
    rows: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return len(self.slots)


class DSAWorld:
    """Pools, a stub runner and the backend; builds batches and runs attention like the model."""

    def __init__(
        self,
        *,
        num_heads: int = 8,
        index_topk: int = 16,
        fp8: bool = False,
        num_layers: int = 1,
        start_layer: int = 0,
        max_reqs: int = 8,
        max_context: int = 512,
        num_pages: int = 48,
        architecture: str = "DeepseekV32ForCausalLM",
        attn_tp_size: int = 1,
        skip_topk_layers: list[bool] | None = None,
        seed: int = 0,
    ):
        """``num_heads`` are this rank's query heads, the model's ``num_heads * attn_tp_size``
        (publish the matching ``--tp-size`` through :func:`sglang_config`). The rank holds
        ``num_layers`` layers with ids from ``start_layer`` on (a pipeline-parallel rank's
        ``[start_layer, end_layer)``: the pool keeps only those and takes global layer ids)."""
        self.device = published_device()
        self.gen = torch.Generator().manual_seed(seed)
        self.num_heads = num_heads
        self.index_topk = index_topk
        self.fp8 = fp8
        self.pool = DSATokenToKVPool(
            size=num_pages * PAGE,
            page_size=PAGE,
            kv_lora_rank=512,
            dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16,
            qk_rope_head_dim=64,
            layer_num=num_layers,
            device=self.device,
            start_layer=start_layer,
            end_layer=start_layer + num_layers,
            index_head_dim=128,
            enable_memory_saver=False,
            kv_cache_dim=FP8_ROW_BYTES if fp8 else D_QK,
            skip_topk_layers=skip_topk_layers,
        )
        self.req_to_token_pool = ReqToTokenPool(
            size=max_reqs, max_context_len=max_context, device=self.device, enable_memory_saver=False
        )
        hf_config = DeepseekV3Config(
            architectures=[architecture],
            num_attention_heads=num_heads * attn_tp_size,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            index_topk=index_topk,
            index_head_dim=128,
            index_n_heads=32,
        )
        self.runner = SimpleNamespace(
            model_config=SimpleNamespace(
                hf_config=hf_config,
                hf_text_config=hf_config,
                linear_attn_registry_result=None,
                kv_lora_rank=512,
                qk_rope_head_dim=64,
                num_attention_heads=num_heads * attn_tp_size,
                context_len=max_context,
            ),
            page_size=PAGE,
            token_to_kv_pool=self.pool,
            req_to_token_pool=self.req_to_token_pool,
            device=self.device.type,
            kv_cache_dtype=self.pool.dtype,
        )
        self.backend = TritonSparseMLABackend(self.runner)
        self.scaling = 192**-0.5
        self.layers = [
            RadixAttention(num_heads, D_QK, self.scaling, num_kv_heads=1, layer_id=i, v_head_dim=512)
            for i in range(start_layer, start_layer + num_layers)
        ]
        self._next_page = 1  # page 0 holds SGLang's dummy slots of padded tokens
        self._next_req = 0

    # --- requests ---------------------------------------------------------

    def random(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device, torch.bfloat16)

    def tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _new_page(self) -> int:
        page = self._next_page
        self._next_page += 1
        if page * PAGE >= self.pool.size + PAGE:
            raise RuntimeError("the test world ran out of KV pages")
        return page

    def new_request(self, shared_prefix: Request | None = None, prefix_len: int = 0) -> Request:
        """A request; with ``shared_prefix``, its first ``prefix_len`` (full pages) are the donor's."""
        req = Request(self._next_req, rows=self.random(0, D_QK))
        self._next_req += 1
        if shared_prefix is not None:
            assert prefix_len % PAGE == 0 and prefix_len <= shared_prefix.length
            req.slots = list(shared_prefix.slots[:prefix_len])
            req.rows = shared_prefix.rows[:prefix_len].clone()
            self._write_row_map(req)
        return req

    def _grow(self, req: Request, new_rows: torch.Tensor) -> list[int]:
        """Append rows to a request, opening a fresh page at every 64-token boundary."""
        start = req.length
        for pos in range(start, start + new_rows.shape[0]):
            page = self._new_page() if pos % PAGE == 0 else req.slots[-1] // PAGE
            req.slots.append(page * PAGE + pos % PAGE)
        req.rows = torch.cat([req.rows, new_rows])
        self._write_row_map(req)
        return req.slots[start:]

    def _write_row_map(self, req: Request) -> None:
        self.req_to_token_pool.req_to_token[req.pool_index, : req.length] = self.tensor(req.slots, torch.int32)

    def cache(self, req: Request, rows: torch.Tensor) -> None:
        """Give a request cached context, as an earlier forward would have left it."""
        loc = self.tensor(self._grow(req, rows))
        for layer in self.layers:
            store_kv(self.pool.get_key_buffer(layer.layer_id), loc, rows)

    def kv_bytes(self, slots: list[int], layer: int = 0) -> torch.Tensor:
        """The raw cache bytes of some slots of the rank's ``layer``-th layer (to check what a forward
        left untouched)."""
        buffer = self.pool.get_key_buffer(self.layers[layer].layer_id)
        return buffer.view(buffer.shape[0], -1).view(torch.uint8)[self.tensor(slots)].clone()

    # --- batches ----------------------------------------------------------

    def extend_batch(self, reqs: list[Request], new_rows: list[torch.Tensor]) -> ForwardBatch:
        """An EXTEND batch appending ``new_rows[i]`` to request ``i`` (prefix = what it holds)."""
        prefix = [r.length for r in reqs]
        locs = [self._grow(r, rows) for r, rows in zip(reqs, new_rows, strict=True)]
        ext = [rows.shape[0] for rows in new_rows]
        return self._batch(ForwardMode.EXTEND, reqs, locs, prefix, ext)

    def decode_batch(self, reqs: list[Request], new_rows: list[torch.Tensor]) -> ForwardBatch:
        locs = [self._grow(r, rows) for r, rows in zip(reqs, new_rows, strict=True)]
        return self._batch(ForwardMode.DECODE, reqs, locs, None, None)

    def verify_batch(self, reqs: list[Request], new_rows: list[torch.Tensor]) -> ForwardBatch:
        """An MTP TARGET_VERIFY batch of the same number of draft tokens per request, counted as
        SGLang counts it: ``seq_lens`` without the draft tokens."""
        fb = self.decode_batch(reqs, new_rows)
        n = new_rows[0].shape[0]
        fb.forward_mode = ForwardMode.TARGET_VERIFY
        fb.seq_lens, fb.seq_lens_cpu = fb.seq_lens - n, fb.seq_lens_cpu - n
        return fb

    def _batch(self, mode, reqs, locs, prefix, ext) -> ForwardBatch:
        seq_lens = [r.length for r in reqs]
        positions = [pos for r, loc in zip(reqs, locs, strict=True) for pos in range(r.length - len(loc), r.length)]
        fb = ForwardBatch(
            forward_mode=mode,
            batch_size=len(reqs),
            input_ids=self.tensor([0] * len(positions)),
            req_pool_indices=self.tensor([r.pool_index for r in reqs]),
            seq_lens=self.tensor(seq_lens, torch.int32),
            out_cache_loc=self.tensor([s for loc in locs for s in loc]),
            seq_lens_sum=sum(seq_lens),
            seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32),
            positions=self.tensor(positions),
        )
        if ext is not None:
            fb.extend_prefix_lens = self.tensor(prefix, torch.int32)
            fb.extend_prefix_lens_cpu = list(prefix)
            fb.extend_seq_lens = self.tensor(ext, torch.int32)
            fb.extend_seq_lens_cpu = list(ext)
            fb.extend_num_tokens = sum(ext)
            fb.extend_start_loc = self.tensor([sum(ext[:i]) for i in range(len(ext))], torch.int32)
        return fb

    # --- top-k and attention ----------------------------------------------

    def reference_positions(self, reqs: list[Request], counts: list[int]) -> list[torch.Tensor]:
        """Per query token, the logical positions a deterministic "indexer" keeps.

        The score of a position depends only on (request content, position),
        so a prefix-hit request and its no-cache twin select alike.
        """
        out = []
        for r, n in zip(reqs, counts, strict=True):
            for i in range(n):
                visible = r.length - n + i + 1
                key = r.rows[:visible, :8].double().sum(-1).cpu()
                score = torch.sin(key * 7.3 + torch.arange(visible).double() * 0.01 * visible)
                keep = min(self.index_topk, visible)
                out.append(torch.topk(score, keep).indices.sort().values)
        return out

    @staticmethod
    def counts(fb: ForwardBatch) -> list[int]:
        """Query tokens of each request of a batch."""
        if fb.forward_mode.is_decode():
            return [1] * fb.batch_size
        return list(fb.extend_seq_lens_cpu)

    def slots_of(self, reqs: list[Request], counts: list[int], positions: list[torch.Tensor]) -> torch.Tensor:
        """``[T, topk]`` int32 physical slots of logical positions (the model's ``topk_indices``)."""
        out = torch.full((len(positions), self.index_topk), -1, dtype=torch.int32)
        t = 0
        for r, n in zip(reqs, counts, strict=True):
            slots = torch.tensor(r.slots, dtype=torch.int32)
            for _ in range(n):
                out[t, : positions[t].numel()] = slots[positions[t]]
                t += 1
        return out.to(self.device)

    def attend(
        self, fb: ForwardBatch, q: torch.Tensor, k_rows: torch.Tensor, topk_slots: torch.Tensor, layer: int = 0,
        split: bool = False,
    ):  # fmt: skip
        """The model's call: ``RadixAttention(q, k, v, topk_indices=...)`` through the forward context.

        ``split``: as SGLang's absorbed MLA calls a backend it lists among its absorb-core ones,
        the rope parts apart and strided like its tensors: ``q_nope`` the transposed per-head
        product, ``q_rope`` and ``k_rope`` slices of wider rows. ``layer``: which of the rank's
        layers (0 is its first, id ``start_layer``).
        """
        k_nope = k_rows[:, :512].reshape(-1, 1, 512)
        with forward_context(ForwardContext(attn_backend=self.backend)):
            if split:
                q_nope = q[..., :512].transpose(0, 1).contiguous().transpose(0, 1)
                q_rope, k_rope = q[..., 512:], k_rows[:, 512:].unsqueeze(1)
                out = self.layers[layer](
                    q_nope, k_nope, k_nope, fb, q_rope=q_rope, k_rope=k_rope, topk_indices=topk_slots
                )
            else:
                out = self.layers[layer](
                    q.reshape(q.shape[0], self.num_heads * D_QK), k_rows.view(-1, 1, D_QK), k_nope, fb,
                    topk_indices=topk_slots,
                )
        return out.view(q.shape[0], self.num_heads, 512)

    def reference(self, reqs: list[Request], counts: list[int], q: torch.Tensor, positions: list[torch.Tensor]):
        """fp64 sparse MLA over each token's own request rows at its logical positions."""
        logical = torch.cat([r.rows for r in reqs])
        cache = quantize_kv_fp8(logical) if self.fp8 else logical
        offsets = [sum(r.length for r in reqs[:i]) for i in range(len(reqs))]
        idx = torch.full((len(positions), self.index_topk), -1, dtype=torch.int32)
        t = 0
        for off, n in zip(offsets, counts, strict=True):
            for _ in range(n):
                idx[t, : positions[t].numel()] = (positions[t] + off).to(torch.int32)
                t += 1
        out, _ = sparse_mla_reference(q, cache, idx.to(self.device), self.scaling)
        return out


class TinyDSALayer:
    """A DSA attention layer's two calls into the backend, as the DeepSeek model makes them.

    ``Indexer.forward_cuda`` (hooked by ``install_model_hooks``) returns the
    top-k slots, which go to ``RadixAttention`` as ``topk_indices``. The
    token inputs of every request are kept for the fp64 index-score reference.
    """

    def __init__(self, world: DSAWorld, indexer, layer: int = 0):
        """``layer``: which of the world's layers this is (the indexer runs under its layer id)."""
        install_model_hooks()
        self.world, self.indexer, self.layer = world, indexer, layer
        self.x, self.q_lora = {}, {}

    def tokens(self, req, n: int):
        """Hidden states and q_lora of ``n`` new tokens of ``req`` (remembered)."""
        w = self.world
        x, q_lora = w.random(n, HIDDEN), w.random(n, Q_LORA)
        self.x[req.pool_index] = torch.cat([self.x.get(req.pool_index, x[:0]), x])
        self.q_lora[req.pool_index] = torch.cat([self.q_lora.get(req.pool_index, q_lora[:0]), q_lora])
        return x, q_lora

    def share_prefix(self, req, donor, prefix_len: int):
        """The token inputs behind a radix-cache hit on ``donor``'s first ``prefix_len`` tokens."""
        self.x[req.pool_index] = self.x[donor.pool_index][:prefix_len].clone()
        self.q_lora[req.pool_index] = self.q_lora[donor.pool_index][:prefix_len].clone()

    def select(self, fb, x, q_lora):
        """The indexer's call alone: top-k slots of the batch (new index keys stored)."""
        with forward_context(ForwardContext(attn_backend=self.world.backend)):
            layer_id = self.world.layers[self.layer].layer_id
            return self.indexer.forward_cuda(
                x=x, q_lora=q_lora, positions=fb.positions, forward_batch=fb, layer_id=layer_id
            )

    def forward(self, fb, x, q_lora, q, k_rows):
        slots = self.select(fb, x, q_lora)
        return slots, self.world.attend(fb, q, k_rows, slots, layer=self.layer)

    def check_topk(self, reqs, counts, slots) -> list[torch.Tensor]:
        """Assert each row is the top-k of the fp64 index scores; return its logical positions."""
        chosen_all, t = [], 0
        for req, n in zip(reqs, counts, strict=True):
            position_of = {s: p for p, s in enumerate(req.slots)}
            rows = torch.arange(req.length - n, req.length, device=self.world.device)
            scores = index_scores(self.indexer, self.x[req.pool_index], self.q_lora[req.pool_index], rows)
            for i in range(n):
                pos = req.length - n + i
                chosen = check_topk_row(slots[t].tolist(), position_of, scores[i], pos, self.world.index_topk)
                chosen_all.append(torch.tensor(chosen))
                t += 1
        return chosen_all
