"""One DSA layer's attention chain, stage by stage, against the float64 references.

What the ``triton_sparse_mla`` backend runs for one layer of a model, on this
package's kernels and the backend's cache helpers, with random inputs whose
shapes come from a model config (query heads, index heads, ``index_topk``,
softmax scale) and requests laid out on shuffled 64-token pages:

1. index keys of every token Hadamard-rotated, quantized to FP8 (UE8M0
   scales) and stored in the index-K pages by one kernel
   (``quantize_index_keys_to_cache``, as the backend's
   :func:`sglang_sparse_mla.backend.dispatch.quantize_index_keys`); queries
   likewise, with their score weights (``quantize_index_queries``);
2. prefill of every prompt: ragged indexer logits over the request's gathered
   keys (``fp8_mqa_logits``), top-k per token (``topk_indices``), logical
   positions mapped to KV slots (``topk_to_kv_slots``, and the mapping fused
   into the top-k kernel), sparse MLA prefill over those slots;
3. one decode step per request: paged indexer logits read straight from the
   pages (``fp8_paged_mqa_logits``), top-k with fused slot mapping, sparse
   MLA decode;

sparse MLA runs over a BF16 cache and a 656-byte FP8 cache. Each stage is
compared with :mod:`sglang_sparse_mla.kernels.reference` (the top-k
selection also with the float64 logits it should rank), giving one
:class:`Check` per metric.

Triton must already be in interpreter mode (``TRITON_INTERPRET=1`` before
Triton is imported) when this runs on a CPU tensor device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backend import dispatch
from ..backend.spec import PAGE_SIZE
from ..kernels import (
    dequantize_kv_fp8,
    fp8_mqa_logits,
    fp8_paged_mqa_logits,
    sparse_mla_decode,
    sparse_mla_prefill,
    topk_indices,
    topk_to_kv_slots,
)
from ..kernels.index_format import INDEX_ROW_BYTES
from ..kernels.kv_cache_layout import D_QK, FP8_ROW_BYTES
from ..kernels.reference import (
    index_fp8_quant_reference,
    mqa_logits_reference,
    paged_mqa_logits_reference,
    sparse_mla_reference,
    topk_indices_reference,
    topk_to_kv_slots_reference,
)

# Limits per device kind. Index logits: fp32 sums of exact FP8 products (Hopper's
# FP8 MMA accumulates in reduced precision within an instruction). Attention:
# bf16 output and probabilities; lse in natural log.
LIMITS = {
    "cpu": dict(logits=1e-5, out=1.5e-2, lse=2e-3, fp8_kv=0.08, index_fp8=1e-4),
    "cuda": dict(logits=2e-3, out=1.5e-2, lse=2e-3, fp8_kv=0.08, index_fp8=1e-4),
}


@dataclass(frozen=True)
class ChainShapes:
    """What the chain takes from a model config, and the requests it runs."""

    heads: int
    index_heads: int
    index_dim: int
    topk: int
    sm_scale: float
    prompts: tuple[int, ...]

    @classmethod
    def from_config(cls, config: dict, prompts: tuple[int, ...], topk: int | None = None) -> ChainShapes:
        """Shapes of a Hugging Face config dict (``index_topk`` unless ``topk`` overrides it)."""
        return cls(
            heads=config["num_attention_heads"],
            index_heads=config["index_n_heads"],
            index_dim=config["index_head_dim"],
            topk=topk or config["index_topk"],
            sm_scale=(config["qk_nope_head_dim"] + config["qk_rope_head_dim"]) ** -0.5,
            prompts=tuple(prompts),
        )


@dataclass(frozen=True)
class Check:
    """One compared metric of one stage: passed when ``value <= limit`` (NaN fails)."""

    stage: str
    metric: str
    value: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.value <= self.limit


@dataclass
class ChainReport:
    """The checks, and how many query tokens saw more positions than the top-k keeps."""

    checks: list[Check]
    sparse_rows: int
    rows: int

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


class PagedRequests:
    """Requests of ``lengths`` tokens on shuffled pages, as SGLang lays them out.

    Page 0 is never handed out (SGLang's padding slots). ``req_to_token[r, p]``
    is the slot of position ``p`` of request ``r``; ``block_table[r, j]`` the
    physical page of its logical page ``j``.
    """

    def __init__(self, lengths: tuple[int, ...], gen: torch.Generator, device: torch.device):
        pages = [math.ceil(n / PAGE_SIZE) for n in lengths]
        self.num_pages = sum(pages) + 1
        order = (torch.randperm(self.num_pages - 1, generator=gen) + 1).tolist()
        self.block_table = torch.zeros(len(lengths), max(pages), dtype=torch.int32)
        for r, count in enumerate(pages):
            self.block_table[r, :count] = torch.tensor(order[:count], dtype=torch.int32)
            order = order[count:]
        offsets = torch.arange(PAGE_SIZE, dtype=torch.int32)
        self.req_to_token = (self.block_table[:, :, None] * PAGE_SIZE + offsets).reshape(len(lengths), -1)
        self.block_table = self.block_table.to(device)
        self.req_to_token = self.req_to_token.to(device)
        self.lengths = lengths
        self.pool_indices = torch.arange(len(lengths), dtype=torch.int32, device=device)

    @property
    def num_slots(self) -> int:
        return self.num_pages * PAGE_SIZE

    def slots(self, r: int, start: int, end: int) -> torch.Tensor:
        return self.req_to_token[r, start:end].long()


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` (2-norms) over the entries finite in ``ref``; ``inf`` where ``-inf`` entries differ."""
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite) or not (out[~finite] == ref[~finite]).all():
        return math.inf
    denom = ref[finite].norm().item()
    diff = (out[finite] - ref[finite]).norm().item()
    return diff / denom if denom > 0 else diff


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    return x.sort(dim=1).values


def _mismatched_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rows whose entries differ as sets (top-k order is not part of the contract)."""
    return float((_sorted_rows(a) != _sorted_rows(b)).any(dim=1).sum().item())


def sample_rows(lengths: torch.Tensor, topk: int, budget: int) -> torch.Tensor:
    """At most ``budget`` rows, evenly spread, half of them (when there are so
    many) tokens that see more than ``topk`` positions."""
    sparse = lengths > topk
    picked = []
    for mask, share in ((sparse, budget // 2), (~sparse, budget - min(budget // 2, int(sparse.sum())))):
        rows = mask.nonzero().flatten()
        if rows.numel() > share:
            rows = rows[torch.linspace(0, rows.numel() - 1, share, device=rows.device).round().long()]
        picked.append(rows)
    return torch.cat(picked).sort().values


def _selection_violation(positions: torch.Tensor, ref_logits: torch.Tensor, lengths, starts) -> float:
    """How far a selection is from a top-k of the float64 logits.

    ``max(unselected) - min(selected)`` over each row's window, relative to the
    row's largest magnitude (0 for an exact top-k, ties included); ``inf`` when
    a row did not select ``min(k, window)`` distinct positions.
    """
    rows, k = positions.shape
    starts = starts.long()[:, None]
    valid = positions >= 0
    width = ref_logits.shape[1]
    cols = torch.where(valid, positions.long() + starts, width)  # -1 entries land in a spare column
    selected = torch.zeros(rows, width + 1, dtype=torch.bool, device=ref_logits.device)
    selected.scatter_(1, cols, True)
    selected = selected[:, :width]
    expected = torch.clamp(lengths.long(), max=k)
    if not torch.equal(selected.sum(1), expected) or not torch.equal(valid.sum(1), expected):
        return math.inf
    span = torch.arange(width, device=ref_logits.device)[None, :]
    window = (span >= starts) & (span < starts + lengths.long()[:, None])
    lowest_kept = torch.where(selected, ref_logits, math.inf).min(1).values
    highest_dropped = torch.where(window & ~selected, ref_logits, -math.inf).max(1).values
    scale = torch.where(window, ref_logits.abs(), 0).amax(1).clamp_min(1e-30)
    return float(((highest_dropped - lowest_kept).clamp_min(0) / scale).max().item())


class _Chain:
    """The inputs of one layer and the stages run over them (see the module docstring)."""

    def __init__(
        self,
        shapes: ChainShapes,
        seed: int,
        device: torch.device,
        attention_rows: int,
        progress: Callable[[str], None] | None = None,
    ):
        self.s, self.device, self.attention_rows = shapes, device, attention_rows
        self.progress = progress or (lambda line: None)
        self.limits = LIMITS["cuda" if device.type == "cuda" else "cpu"]
        self.gen = torch.Generator().manual_seed(seed)
        self.reqs = PagedRequests(tuple(n + 1 for n in shapes.prompts), self.gen, device)
        self.checks: list[Check] = []
        total = sum(self.reqs.lengths)
        key = self.randn(total, shapes.index_dim)
        self.index_pages = torch.zeros(
            self.reqs.num_pages, PAGE_SIZE * INDEX_ROW_BYTES, dtype=torch.uint8, device=device
        )
        self.all_slots = torch.cat([self.reqs.slots(r, 0, n) for r, n in enumerate(self.reqs.lengths)])
        self.progress("index keys: rotation, FP8 quantization and page store; KV rows")
        dispatch.quantize_index_keys(self.index_pages, self.all_slots, key, rotate=True, scale_format="fp32")
        self.k_fp8, self.k_scale = dispatch.gather_index_k(self.index_pages, self.all_slots)
        ref_codes, ref_scales = index_fp8_quant_reference(key, rotate=True, scale_format="fp32")
        off = (self.k_fp8.view(torch.uint8) != ref_codes.view(torch.uint8)).float().mean().item()
        off = max(off, float((self.k_scale != ref_scales).float().mean().item()))
        self.check(
            "index keys: rotation, FP8, page store (one kernel)", "share off the ref.", off, self.limits["index_fp8"]
        )
        self.latent = self.randn(total, D_QK)
        self.caches = {"BF16": torch.zeros(self.reqs.num_slots, 1, D_QK, dtype=torch.bfloat16, device=device)}
        self.caches["FP8"] = torch.zeros(self.reqs.num_slots, 1, FP8_ROW_BYTES, dtype=torch.uint8, device=device)
        for cache in self.caches.values():
            dispatch.store_kv(cache, self.all_slots, self.latent)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device, torch.bfloat16)

    def check(self, stage: str, metric: str, value: float, limit: float) -> None:
        self.checks.append(Check(stage, metric, value, limit))

    def index_queries(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8 index queries and their per-head weights, scale folded in, as the backend makes them."""
        s = self.s
        q = self.randn(rows, s.index_heads, s.index_dim)
        gate = self.randn(rows, s.index_heads).float()
        return dispatch.quantize_index_queries(
            q, gate, s.index_heads**-0.5, s.index_dim**-0.5, rotate=True, scale_format="ue8m0"
        )

    def fp8_cache(self) -> None:
        rows = self.caches["FP8"].view(-1, FP8_ROW_BYTES)[self.all_slots]
        err = _relative_error(dequantize_kv_fp8(rows), self.latent.float())
        self.check("KV cache store, FP8 656-byte rows", "rel. error vs bf16", err, self.limits["fp8_kv"])

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer and slot mapping of every prompt token; returns (slots, lengths)."""
        s, reqs = self.s, self.reqs
        prompts = s.prompts
        rows = sum(prompts)
        q_fp8, weights = self.index_queries(rows)
        # Keys of the prompts, gathered from the pages in request order (what the ragged path reads).
        key_slots = torch.cat([reqs.slots(r, 0, n) for r, n in enumerate(prompts)])
        k_fp8, k_scale = dispatch.gather_index_k(self.index_pages, key_slots)
        logical = torch.cat([torch.arange(n) + sum(reqs.lengths[:r]) for r, n in enumerate(prompts)]).to(self.device)
        starts = torch.cat([torch.full((n,), sum(prompts[:r]), dtype=torch.int32) for r, n in enumerate(prompts)])
        lengths = torch.cat([torch.arange(1, n + 1, dtype=torch.int32) for n in prompts])
        token_to_req = torch.cat([torch.full((n,), r, dtype=torch.int32) for r, n in enumerate(prompts)])
        starts, lengths, token_to_req = (t.to(self.device) for t in (starts, lengths, token_to_req))
        ends = starts + lengths

        self.progress("prefill: indexer logits (fp8_mqa_logits)")
        logits = fp8_mqa_logits(q_fp8, k_fp8, k_scale, weights, starts, ends)
        ref = mqa_logits_reference(q_fp8, self.k_fp8[logical], self.k_scale[logical], weights, starts, ends)
        self.check(
            "prefill indexer logits (fp8_mqa_logits)", "rel. error", _relative_error(logits, ref), self.limits["logits"]
        )

        self.progress("prefill: top-k and KV slots")
        positions = topk_indices(logits, lengths, s.topk, row_starts=starts)
        ref_positions = topk_indices_reference(logits, lengths, s.topk, row_starts=starts)
        self.check("prefill top-k (topk_indices)", "rows differing", _mismatched_rows(positions, ref_positions), 0)
        violation = _selection_violation(positions, ref, lengths, starts)
        self.check("prefill top-k vs float64 logits", "rank violation", violation, self.limits["logits"])

        mapping = dict(req_to_token=reqs.req_to_token, req_pool_indices=reqs.pool_indices, token_to_req=token_to_req)
        slots = topk_to_kv_slots(positions, **mapping)
        ref_slots = topk_to_kv_slots_reference(positions, reqs.req_to_token, reqs.pool_indices, token_to_req)
        self.check(
            "prefill slot transform (topk_to_kv_slots)", "entries differing", float((slots != ref_slots).sum()), 0
        )
        fused = topk_indices(logits, lengths, s.topk, row_starts=starts, **mapping)
        self.check("prefill top-k + fused slot mapping", "rows differing", _mismatched_rows(fused, ref_slots), 0)
        return fused, lengths

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer of one new token per request over the paged keys; returns (slots, lengths)."""
        s, reqs = self.s, self.reqs
        batch = len(s.prompts)
        q_fp8, weights = self.index_queries(batch)
        q_fp8 = q_fp8.view(batch, 1, s.index_heads, s.index_dim)
        lengths = torch.tensor(reqs.lengths, dtype=torch.int32, device=self.device)
        pages = self.index_pages.view(reqs.num_pages, PAGE_SIZE, 1, INDEX_ROW_BYTES)
        width = reqs.block_table.shape[1] * PAGE_SIZE
        args = (q_fp8, pages, weights, lengths, reqs.block_table, width)
        logits = fp8_paged_mqa_logits(*args)
        ref = paged_mqa_logits_reference(*args)
        self.check(
            "decode indexer logits (fp8_paged_mqa_logits)",
            "rel. error",
            _relative_error(logits, ref),
            self.limits["logits"],
        )

        slots = topk_indices(
            logits, lengths, s.topk, req_to_token=reqs.req_to_token, req_pool_indices=reqs.pool_indices
        )
        ref_positions = topk_indices_reference(logits, lengths, s.topk)
        ref_slots = topk_to_kv_slots_reference(ref_positions, reqs.req_to_token, reqs.pool_indices)
        self.check("decode top-k + fused slot mapping", "rows differing", _mismatched_rows(slots, ref_slots), 0)
        zero = torch.zeros_like(lengths)
        positions = topk_indices(logits, lengths, s.topk)
        violation = _selection_violation(positions, ref, lengths, zero)
        self.check("decode top-k vs float64 logits", "rank violation", violation, self.limits["logits"])
        return slots, lengths

    def attention(self, phase: str, slots: torch.Tensor, lengths: torch.Tensor) -> None:
        """Sparse MLA of random queries over the selected slots, on both caches.

        Prefill checks a sample of its rows (:func:`sample_rows`): the
        interpreter runs a program per token, and rows differ only in slots.
        """
        s = self.s
        if phase == "prefill":
            slots = slots[sample_rows(lengths, s.topk, self.attention_rows)]
        q = (2 * self.randn(slots.shape[0], s.heads, D_QK)).bfloat16()
        kernel, kernel_name = (
            (sparse_mla_prefill, "sparse_mla_prefill")
            if phase == "prefill"
            else (sparse_mla_decode, "sparse_mla_decode")
        )
        for name, cache in self.caches.items():
            out, lse = kernel(q, cache, slots, s.sm_scale)
            ref_out, ref_lse = sparse_mla_reference(q, cache, slots, s.sm_scale)
            stage = f"{phase} sparse MLA ({kernel_name}), {name} KV"
            self.check(stage, "out rel. error", _relative_error(out, ref_out), self.limits["out"])
            finite = torch.isfinite(ref_lse)
            lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
            if not torch.equal(torch.isfinite(lse), finite):
                lse_err = math.inf
            self.check(stage, "lse max abs. error", lse_err, self.limits["lse"])


def run_chain(
    config: dict,
    prompts: tuple[int, ...] = (300, 90),
    topk: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    attention_rows: int = 96,
    progress: Callable[[str], None] | None = None,
) -> ChainReport:
    """Run the chain for requests of ``prompts`` tokens (+1 decode token each) shaped by ``config``.

    ``topk`` overrides the config's ``index_topk``; ``attention_rows`` bounds
    the prefill rows whose sparse attention is checked; ``progress`` is called
    with a line naming each step before it runs (the interpreter takes a while).
    """
    shapes = ChainShapes.from_config(config, prompts, topk)
    chain = _Chain(shapes, seed, torch.device(device), attention_rows, progress)
    chain.fp8_cache()
    lengths = []
    for phase, indexer in (("prefill", chain.prefill), ("decode", chain.decode)):
        if phase == "decode":
            chain.progress("decode: indexer logits, top-k and KV slots")
        slots, phase_lengths = indexer()
        chain.progress(f"{phase}: sparse MLA over the BF16 and FP8 caches")
        chain.attention(phase, slots, phase_lengths)
        lengths.append(phase_lengths)
    visible = torch.cat(lengths)
    return ChainReport(chain.checks, sparse_rows=int((visible > shapes.topk).sum()), rows=visible.numel())
