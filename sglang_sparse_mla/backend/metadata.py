"""Per-batch metadata of the DSA indexer, built eagerly or into CUDA-graph buffers.

Every query token ``t`` of a forward belongs to one request ``r`` and may see
the first ``L(t)`` logical positions of that request (causal, itself
included)::

    L(t) = kv_total[r] - n[r] + i + 1

where ``kv_total[r]`` is the request's KV length once this forward has written
its tokens, ``n[r]`` its number of query tokens in this forward and ``i`` the
token's index among them. Decode is ``n = 1``, MTP target verify and draft
extend are ``n = num_draft_tokens``, and an extend after a radix-cache hit or a
previous prefill chunk has ``kv_total - n`` cached prefix positions.

The indexer picks top-k *logical* positions ``< L(t)`` and maps them to
physical KV slots through ``req_to_token``: the slots of a shared prefix are
the radix tree's own, read in place and never copied, and a slot the request
does not own cannot be named.

Two layouts feed the two index-logit kernels:

* paged, every request with the same ``n`` (decode, MTP): the requests' block
  tables (``block_table[r, j]`` = physical page of logical page ``j``) and
  ``kv_total``, as the paged MQA-logits kernel reads SGLang's index-K pages;
* ragged (extend, mixed): the physical slots of every request's positions
  ``0 .. kv_total - 1`` concatenated (``kv_slots``, to gather the cached index
  keys), each token's window ``[kv_start, kv_start + L)`` in them, and a plan
  of :class:`RaggedChunk` s that scores consecutive rows against only their
  requests' keys, so the logits stay within a memory budget and a batch of
  many requests does not cost ``tokens x all keys``.

Pure torch. Graph metadata are views of static buffers (:class:`GraphBuffers`)
that :func:`fill_paged` rewrites with recordable, fixed-shape ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import PAGE_SIZE


@dataclass(frozen=True)
class RaggedChunk:
    """Query rows ``[row_start, row_end)`` scored against keys ``[key_start, key_end)``."""

    row_start: int
    row_end: int
    key_start: int
    key_end: int

    @property
    def elements(self) -> int:
        return (self.row_end - self.row_start) * (self.key_end - self.key_start)


@dataclass(frozen=True)
class SparseMLAMetadata:
    """What the indexer of every layer reads for one forward batch.

    Common: ``req_pool_indices`` ``[B]`` int64 rows of ``req_to_token``;
    ``token_kv_len`` ``[T]`` int32 ``L(t)``; ``host_max_kv_len`` the exact
    ``max L(t)`` when the host knows it (eager batches), ``None`` under CUDA
    graphs, whose work must not depend on it.

    Paged (``tokens_per_req >= 1``): ``kv_total`` ``[B]`` int32,
    ``block_table`` ``[B, W]`` int32; logits are ``W * 64`` wide.

    Ragged (``tokens_per_req == 0``): ``token_to_req`` ``[T]`` int64,
    ``token_kv_start`` ``[T]`` int32, ``kv_slots`` ``[N]`` int64, ``chunks``.
    """

    req_pool_indices: torch.Tensor
    token_kv_len: torch.Tensor
    host_max_kv_len: int | None = None
    tokens_per_req: int = 0
    kv_total: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    token_to_req: torch.Tensor | None = None
    token_kv_start: torch.Tensor | None = None
    kv_slots: torch.Tensor | None = None
    chunks: tuple[RaggedChunk, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.token_kv_len.shape[0]

    @property
    def is_paged(self) -> bool:
        return self.tokens_per_req > 0

    @property
    def logits_width(self) -> int:
        """Columns of the paged index logits: the block table's context span."""
        return self.block_table.shape[1] * PAGE_SIZE


def pages_for(kv_len: int) -> int:
    return -(-kv_len // PAGE_SIZE)


def token_rows(
    kv_total: torch.Tensor,
    tokens_per_req: int | torch.Tensor,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_to_req [T] int64, token_kv_len [T] int32)``.

    ``tokens_per_req`` is an int when every request has the same number of
    query tokens (decode, MTP; fixed shapes, CUDA-graph safe) or a ``[B]``
    tensor (extend).
    """
    device = kv_total.device
    token = torch.arange(num_tokens, dtype=torch.int64, device=device)
    if isinstance(tokens_per_req, int):
        token_to_req = torch.div(token, tokens_per_req, rounding_mode="floor")
        index = token - token_to_req * tokens_per_req
        per_token_n = tokens_per_req
    else:
        counts = tokens_per_req.to(torch.int64)
        token_to_req = torch.repeat_interleave(
            torch.arange(counts.shape[0], dtype=torch.int64, device=device),
            counts,
            output_size=num_tokens,
        )
        index = token - (torch.cumsum(counts, 0) - counts).index_select(0, token_to_req)
        per_token_n = counts.index_select(0, token_to_req)
    kv_len = kv_total.to(torch.int64).index_select(0, token_to_req) - per_token_n + index + 1
    return token_to_req, kv_len.to(torch.int32)


def block_table_rows(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` int32: physical page of each logical page of the requests."""
    first_slots = req_to_token[:, ::PAGE_SIZE].index_select(0, req_pool_indices)[:, :width]
    return torch.div(first_slots, PAGE_SIZE, rounding_mode="floor").to(torch.int32)


def build_paged(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    kv_total: torch.Tensor,
    tokens_per_req: int,
    max_kv_total: int,
) -> SparseMLAMetadata:
    """Eager paged metadata; ``max_kv_total`` (host) sizes the block table."""
    req_pool_indices = req_pool_indices.to(torch.int64)
    _, token_kv_len = token_rows(kv_total, tokens_per_req, req_pool_indices.shape[0] * tokens_per_req)
    return SparseMLAMetadata(
        req_pool_indices=req_pool_indices,
        token_kv_len=token_kv_len,
        host_max_kv_len=max_kv_total,
        tokens_per_req=tokens_per_req,
        kv_total=kv_total.to(torch.int32),
        block_table=block_table_rows(req_to_token, req_pool_indices, pages_for(max_kv_total)),
    )


def plan_ragged_chunks(extend_lens: list[int], kv_lens: list[int], max_elements: int) -> tuple[RaggedChunk, ...]:
    """Group consecutive requests (or split a long one by rows) so each chunk's
    ``rows x keys`` logits fit ``max_elements``; a chunk's keys are its requests'."""
    chunks: list[RaggedChunk] = []
    group: RaggedChunk | None = None
    row = key = 0
    for n, kv in zip(extend_lens, kv_lens, strict=True):
        request = RaggedChunk(row, row + n, key, key + kv)
        row, key = request.row_end, request.key_end
        if n == 0:
            continue
        merged = request if group is None else RaggedChunk(group.row_start, row, group.key_start, key)
        if merged.elements <= max_elements:
            group = merged
            continue
        if group is not None:
            chunks.append(group)
        group = None
        if request.elements <= max_elements:
            group = request
            continue
        rows_per_chunk = max(1, max_elements // max(kv, 1))
        for r0 in range(request.row_start, request.row_end, rows_per_chunk):
            chunks.append(RaggedChunk(r0, min(r0 + rows_per_chunk, request.row_end), request.key_start, key))
    if group is not None:
        chunks.append(group)
    return tuple(chunks)


def build_ragged(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    kv_total: torch.Tensor,
    extend_lens: torch.Tensor,
    kv_total_cpu: list[int],
    extend_lens_cpu: list[int],
    max_logits_elements: int,
) -> SparseMLAMetadata:
    """Eager ragged metadata of an extend (prefill chunk, prefix hit, mixed batch)."""
    req_pool_indices = req_pool_indices.to(torch.int64)
    kv_lens = kv_total.to(torch.int64)
    num_keys = sum(kv_total_cpu)
    token_to_req, token_kv_len = token_rows(kv_total, extend_lens, sum(extend_lens_cpu))
    kv_starts = torch.cumsum(kv_lens, 0) - kv_lens
    key_req = torch.repeat_interleave(req_pool_indices, kv_lens, output_size=num_keys)
    key_pos = torch.arange(num_keys, dtype=torch.int64, device=kv_lens.device) - torch.repeat_interleave(
        kv_starts, kv_lens, output_size=num_keys
    )
    return SparseMLAMetadata(
        req_pool_indices=req_pool_indices,
        token_kv_len=token_kv_len,
        host_max_kv_len=max(kv_total_cpu, default=0),
        token_to_req=token_to_req,
        token_kv_start=kv_starts.index_select(0, token_to_req).to(torch.int32),
        kv_slots=req_to_token[key_req, key_pos].to(torch.int64),
        chunks=plan_ragged_chunks(extend_lens_cpu, kv_total_cpu, max_logits_elements),
    )


class GraphBuffers:
    """Static metadata buffers for CUDA-graph capture of uniform batches.

    Sized once for the largest captured batch; a batch of ``bs`` requests with
    ``n`` tokens each uses the leading ``bs`` / ``bs * n`` rows, so one set of
    buffers serves every captured size. The block table spans the whole
    context (``width = ceil(context_len / 64)`` pages), which keeps its shape,
    and so the logits width, independent of the batch.
    """

    def __init__(self, max_bs: int, max_tokens: int, width: int, device: torch.device | str):
        self.req_pool_indices = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.kv_total = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(max_bs, width, dtype=torch.int32, device=device)
        self.token_kv_len = torch.zeros(max_tokens, dtype=torch.int32, device=device)

    @property
    def max_bs(self) -> int:
        return self.req_pool_indices.shape[0]

    @property
    def max_tokens(self) -> int:
        return self.token_kv_len.shape[0]

    def view(self, bs: int, tokens_per_req: int) -> SparseMLAMetadata:
        """Metadata whose tensors are the leading rows of the static buffers."""
        num_tokens = bs * tokens_per_req
        if bs > self.max_bs or num_tokens > self.max_tokens:
            raise ValueError(
                f"a CUDA-graph batch of {bs} requests / {num_tokens} tokens exceeds the "
                f"captured maximum of {self.max_bs} / {self.max_tokens}"
            )
        return SparseMLAMetadata(
            req_pool_indices=self.req_pool_indices[:bs],
            token_kv_len=self.token_kv_len[:num_tokens],
            tokens_per_req=tokens_per_req,
            kv_total=self.kv_total[:bs],
            block_table=self.block_table[:bs],
        )


def fill_paged(
    metadata: SparseMLAMetadata,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    kv_total: torch.Tensor,
) -> None:
    """Rewrite graph metadata in place from the runner's static batch tensors.

    Fixed shapes and no host synchronisation: safe to record in a CUDA graph,
    where it re-runs on every replay and reads the runner's refreshed inputs.
    """
    metadata.req_pool_indices.copy_(req_pool_indices)
    metadata.kv_total.copy_(kv_total)
    _, token_kv_len = token_rows(kv_total, metadata.tokens_per_req, metadata.num_tokens)
    metadata.token_kv_len.copy_(token_kv_len)
    metadata.block_table.copy_(block_table_rows(req_to_token, metadata.req_pool_indices, metadata.block_table.shape[1]))
