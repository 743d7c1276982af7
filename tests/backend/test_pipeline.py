"""The backend's pure-torch path end to end, on the test target (no SGLang needed).

Metadata (:mod:`~sglang_sparse_mla.backend.metadata`) -> indexer
(:mod:`~sglang_sparse_mla.backend.indexer`, :class:`StubIndexer` weights) ->
KV write and sparse MLA (:mod:`~sglang_sparse_mla.backend.dispatch`), on plain
tensors laid out like SGLang's pools: latent KV ``[slots, 1, D]``, index-K
pages ``[pages, 64 * 132]`` and ``req_to_token``. On a GPU it runs at DSA
sizes (index_topk 2048, 64 index heads, 128 query heads, thousands of
positions); under the interpreter at tiny ones.
"""

from __future__ import annotations

import pytest
import torch
from utils import relative_error

from sglang_sparse_mla.backend import dispatch
from sglang_sparse_mla.backend.indexer import (
    SparseIndexer,
    index_inputs,
    project,
    query_weight_factors,
    sglang_fuses_norm_and_rope,
    sglang_rotates,
    sglang_scale_formats,
)
from sglang_sparse_mla.backend.metadata import build_paged, build_ragged
from sglang_sparse_mla.kernels import quantize_kv_fp8
from sglang_sparse_mla.kernels.index_format import hadamard_signs
from sglang_sparse_mla.kernels.reference import index_fp8_quant_reference, sparse_mla_reference
from sglang_sparse_mla.testing.dsa_layer import NeoxRope, StubIndexer, check_topk_row, index_scores

PAGE = 64
CPU = dict(topk=16, index_heads=32, heads=8, prompts=(90, 7), check_every=1)
GPU = dict(topk=2048, index_heads=64, heads=128, prompts=(3000, 300), check_every=97)


class Requests:
    """Requests on shuffled pages of plain cache tensors, with their logical rows kept."""

    def __init__(self, target, rng, prompts, fp8: bool):
        self.device, self.rng, self.fp8 = target.device, rng, fp8
        pages = sum(-(-(n + 1) // PAGE) for n in prompts) + 1
        self.kv = torch.zeros(pages * PAGE, 1, 656 if fp8 else 576, device=self.device)
        self.kv = self.kv.to(torch.uint8 if fp8 else torch.bfloat16)
        self.index = torch.zeros(pages, PAGE * 132, dtype=torch.uint8, device=self.device)
        self.req_to_token = torch.zeros(len(prompts), pages * PAGE, dtype=torch.int32, device=self.device)
        free = (torch.randperm(pages - 1, generator=torch.Generator().manual_seed(0)) + 1).tolist()
        self.slots = [[] for _ in prompts]
        for r, n in enumerate(prompts):
            for pos in range(n + 1):
                page = free.pop() if pos % PAGE == 0 else self.slots[r][-1] // PAGE
                self.slots[r].append(page * PAGE + pos % PAGE)
            self.req_to_token[r, : n + 1] = torch.tensor(self.slots[r], dtype=torch.int32)
        self.rows = [self.randn(n + 1, 576) for n in prompts]
        self.x = [self.randn(n + 1, 64) for n in prompts]
        self.q_lora = [self.randn(n + 1, 32) for n in prompts]

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.rng, device=self.device).bfloat16()

    def tensor(self, data, dtype=torch.int64):
        return torch.tensor(data, dtype=dtype, device=self.device)


def forward_layer(reqs: Requests, sizes, md, spans, q, indexer, batch_invariant: bool = False):
    """``(slots, out)``: indexer then KV write and sparse MLA for the query positions
    ``spans[r] = (first, last + 1)`` of each request, queries ``q [T, heads, 576]``."""
    cat = lambda parts: torch.cat([p[a:b] for p, (a, b) in zip(parts, spans, strict=True)])  # noqa: E731
    loc = reqs.tensor([s for slots, (a, b) in zip(reqs.slots, spans, strict=True) for s in slots[a:b]])
    positions = reqs.tensor([p for a, b in spans for p in range(a, b)])
    slots = SparseIndexer(sizes["topk"], reqs.req_to_token)(
        indexer, cat(reqs.x), cat(reqs.q_lora), positions, loc, reqs.index, md
    )
    dispatch.store_kv(reqs.kv, loc, cat(reqs.rows))
    out = dispatch.sparse_attention(q, reqs.kv, slots, 192**-0.5, decode=md.is_paged, batch_invariant=batch_invariant)
    return slots, out


def run_layer(reqs: Requests, sizes, md, spans, heads, fused: bool = False):
    """:func:`forward_layer` checked: top-k rows against fp64 scores, attention against the fp64 reference."""
    topk = sizes["topk"]
    q = reqs.randn(sum(b - a for a, b in spans), heads, 576)
    indexer = StubIndexer(64, 32, sizes["index_heads"], reqs.device, fused=fused)
    slots, out = forward_layer(reqs, sizes, md, spans, q, indexer)

    logical = torch.cat(reqs.rows)
    offsets = [sum(len(s) for s in reqs.slots[:r]) for r in range(len(spans))]
    ref_idx = torch.full_like(slots, -1)
    t = 0
    for r, (a, b) in enumerate(spans):
        position_of = {s: p for p, s in enumerate(reqs.slots[r])}
        checked = torch.arange(a, b, device=reqs.device)[:: sizes["check_every"]]
        scores = index_scores(indexer, reqs.x[r][:b], reqs.q_lora[r][:b], checked)
        for i, pos in enumerate(checked.tolist()):
            check_topk_row(slots[t + pos - a].tolist(), position_of, scores[i], pos, topk)
        for _ in range(a, b):
            chosen = [position_of[s] for s in slots[t].tolist() if s >= 0]
            ref_idx[t, : len(chosen)] = reqs.tensor(chosen, torch.int32) + offsets[r]
            t += 1
    ref, _ = sparse_mla_reference(q, quantize_kv_fp8(logical) if reqs.fp8 else logical, ref_idx, 192**-0.5)
    assert relative_error(out, ref) < 2e-2


@pytest.mark.parametrize(
    ("fp8", "fused"), [(False, False), (True, False), (False, True)], ids=["bf16", "fp8", "bf16-fused-indexer"]
)
def test_prefill_then_decode(target, rng, fp8, fused):
    sizes = target.pick(cpu=CPU, gpu=GPU)
    prompts = sizes["prompts"]
    reqs = Requests(target, rng, prompts, fp8)
    rpi = reqs.tensor(list(range(len(prompts))))

    kv_total = reqs.tensor(list(prompts), torch.int32)
    extend = build_ragged(reqs.req_to_token, rpi, kv_total, kv_total, list(prompts), list(prompts), 2**27)
    run_layer(reqs, sizes, extend, [(0, n) for n in prompts], sizes["heads"], fused)

    decode = build_paged(reqs.req_to_token, rpi, kv_total + 1, 1, max(prompts) + 1)
    run_layer(reqs, sizes, decode, [(n, n + 1) for n in prompts], sizes["heads"], fused)


@pytest.mark.parametrize(("index_heads", "fused"), [(64, False), (32, True)], ids=["deepseek-v3.2", "glm-5"])
def test_request_alone_or_batched_gives_the_same_bits(target, rng, index_heads, fused):
    """``--enable-deterministic-inference``: a request's top-k slots and attention output are the
    same bits alone and inside a batch (other requests beside it, other logits chunks), in prefill
    and in decode; for both index-head counts and both projections of the released models."""
    sizes = {**target.pick(cpu=CPU, gpu=GPU), "index_heads": index_heads}
    prompts = (*sizes["prompts"], sizes["prompts"][0] // 2)
    reqs = Requests(target, rng, prompts, fp8=False)
    queries = [reqs.randn(n + 1, sizes["heads"], 576) for n in prompts]
    kv_total = reqs.tensor(list(prompts), torch.int32)
    indexer = StubIndexer(64, 32, index_heads, reqs.device, fused=fused)

    def run(members, decode: bool, logits_budget: int):
        rpi, lens = reqs.tensor(members), [prompts[r] for r in members]
        if decode:
            md = build_paged(reqs.req_to_token, rpi, kv_total[rpi] + 1, 1, max(lens) + 1)
        else:
            md = build_ragged(reqs.req_to_token, rpi, kv_total[rpi], kv_total[rpi], lens, lens, logits_budget)
        spans = [((n, n + 1) if decode else (0, n)) if r in members else (0, 0) for r, n in enumerate(prompts)]
        q = torch.cat([queries[r][a:b] for r, (a, b) in enumerate(spans)])
        return md, *forward_layer(reqs, sizes, md, spans, q, indexer, batch_invariant=True)

    everyone = list(range(len(prompts)))
    for decode in (False, True):
        # The batch plans its logits in several chunks (a long prompt split by rows); alone, one.
        md, batch_slots, batch_out = run(everyone, decode, max(prompts) ** 2 // 3)
        assert decode or len(md.chunks) > 1
        first = 0
        for r in everyone:
            _, slots, out = run([r], decode, 2**27)
            rows = slice(first, first + slots.shape[0])
            assert torch.equal(slots, batch_slots[rows]), f"request {r}: top-k slots depend on the batch"
            assert torch.equal(out, batch_out[rows]), f"request {r}: attention output depends on the batch"
            first += slots.shape[0]
        assert first == batch_slots.shape[0]


def test_index_keys_as_sglang_writes_them(target):
    """SGLang's unfused ``Indexer`` (DeepSeek-V3.2) writes keys normalized and roped by its modules,
    Hadamard-rotated; its fused one (GLM-5 on CUDA) normalizes and ropes the raw projection inside
    its CUDA kernel (fp32, one bf16 rounding), unrotated; both with fp32 scales (its CUDA writers').
    The index-K pages follow the module, and the scores (``q . k``) are the same rotated or not.
    Queries take UE8M0 scales unfused (``act_quant``), fp32 scales and one weight factor fused."""
    n = 40
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(3)).bfloat16().to(target.device)
    q_lora = torch.randn(n, 32, generator=torch.Generator().manual_seed(4)).bfloat16().to(target.device)
    positions = torch.arange(n, device=target.device) * 97  # spread over the rope's angles
    plain, fused = (StubIndexer(64, 32, 8, target.device, fused=f) for f in (False, True))
    assert sglang_rotates(plain) and not sglang_rotates(fused)
    assert not sglang_fuses_norm_and_rope(plain) and sglang_fuses_norm_and_rope(fused)
    assert sglang_scale_formats(plain) == ("ue8m0", "fp32") and sglang_scale_formats(fused) == ("fp32", "fp32")
    assert query_weight_factors(plain) == (8**-0.5, 128**-0.5)
    assert query_weight_factors(fused) == (128**-0.5 * 8**-0.5, 1.0)
    q, k, gate_plain = project(plain, x, q_lora, positions)
    raw = index_inputs(fused, x, q_lora, positions)
    assert torch.equal(raw.query, plain.wq_b(q_lora)[0].view(n, 8, 128))  # the raw projections agree
    torch.testing.assert_close(raw.key.float(), plain.wk(x)[0].float(), rtol=1e-2, atol=1e-2)
    # On CUDA the unfused gate stays fp32, the fused layer's is bf16 (as in SGLang).
    torch.testing.assert_close(raw.gate.float(), gate_plain.float(), rtol=1e-2, atol=1e-2)

    req_to_token = torch.arange(PAGE, dtype=torch.int32, device=target.device).view(1, PAGE)
    kv_total = torch.tensor([n], dtype=torch.int32, device=target.device)
    md = build_ragged(req_to_token, torch.tensor([0], device=target.device), kv_total, kv_total, [n], [n], 2**27)
    loc = torch.arange(n, device=target.device)
    pages = {}
    for name, indexer in (("plain", plain), ("fused", fused)):
        pages[name] = torch.zeros(1, PAGE * 132, dtype=torch.uint8, device=target.device)
        SparseIndexer(16, req_to_token)(indexer, x, q_lora, positions, loc, pages[name], md, return_indices=False)
    k_fp8, k_scale = dispatch.gather_index_k(pages["plain"], loc)
    expected, expected_scale = index_fp8_quant_reference(k, rotate=True, scale_format="fp32")
    assert (k_fp8.view(torch.uint8) != expected.view(torch.uint8)).float().mean() < 1e-3
    assert torch.equal(k_scale, expected_scale)
    k_fp8, k_scale = dispatch.gather_index_k(pages["fused"], loc)
    expected, expected_scale = index_fp8_quant_reference(
        raw.key, rotate=False, scale_format="fp32", rope=raw.rope, norm=raw.norm, round_bf16=True
    )
    assert (k_fp8.view(torch.uint8) != expected.view(torch.uint8)).float().mean() < 1e-2
    torch.testing.assert_close(k_scale, expected_scale, rtol=1e-2, atol=0)
    # The rotation (bf16 out, as the kernel's) leaves the scores unchanged.
    rotation = hadamard_signs(128, torch.float64, target.device) * 128**-0.5
    q_r, k_r = ((t.double() @ rotation).bfloat16() for t in (q, k))
    scores = torch.einsum("thd,nd->thn", q.double(), k.double())
    rotated = torch.einsum("thd,nd->thn", q_r.double(), k_r.double())
    assert relative_error(rotated, scores) < 1e-2


class InPlaceNeoxRope(NeoxRope):
    """SGLang's CUDA rope: rotates the columns it is given in place and returns views of them."""

    def forward(self, positions, q, k):
        roped_q, roped_k = super().forward(positions, q, k)
        q.copy_(roped_q)
        k.copy_(roped_k)
        return q, k


@pytest.mark.parametrize("in_place", [False, True], ids=["torch-rope", "in-place-rope"])
def test_projection_ropes_only_the_rope_columns(target, in_place):
    """``project`` returns the queries and normalized keys with their first 64 columns turned by
    the indexer's rotary embedding and the rest as projected, whether the embedding returns new
    tensors (SGLang's torch path) or rotates in place (its CUDA kernel)."""
    n, heads = 12, 4
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(5)).bfloat16().to(target.device)
    q_lora = torch.randn(n, 32, generator=torch.Generator().manual_seed(6)).bfloat16().to(target.device)
    positions = torch.arange(n, device=target.device) * 31 + 1
    indexer = StubIndexer(64, 32, heads, target.device)
    if in_place:
        indexer.rotary_emb = InPlaceNeoxRope()
    query, key, _ = project(indexer, x, q_lora, positions)
    raw_q = indexer.wq_b(q_lora)[0].view(n, heads, 128)
    raw_k = indexer.k_norm(indexer.wk(x)[0].contiguous())
    roped_q, roped_k = NeoxRope()(positions, raw_q[..., :64], raw_k[..., :64])
    assert not torch.equal(roped_q, raw_q[..., :64])  # the rotation is not the identity here
    assert torch.equal(query[..., :64], roped_q) and torch.equal(query[..., 64:], raw_q[..., 64:])
    assert torch.equal(key[:, :64], roped_k) and torch.equal(key[:, 64:], raw_k[:, 64:])
