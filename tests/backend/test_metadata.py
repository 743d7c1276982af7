"""Indexer metadata (pure torch): eager layouts and the CUDA-graph static buffers."""

from __future__ import annotations

import pytest
import torch

from sglang_sparse_mla.backend.metadata import (
    GraphBuffers,
    RaggedChunk,
    block_table_rows,
    build_paged,
    build_ragged,
    fill_paged,
    plan_ragged_chunks,
    token_rows,
)

PAGE = 64


def make_req_to_token(lengths: list[int], max_context: int = 320, seed: int = 0) -> torch.Tensor:
    """A ``req_to_token`` table whose requests own shuffled 64-slot pages."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.zeros(len(lengths) + 1, max_context, dtype=torch.int32)
    pages = (torch.randperm(200, generator=gen) + 1).tolist()
    for r, n in enumerate(lengths):
        for pos in range(n):
            if pos % PAGE == 0:
                page = pages.pop()
            table[r, pos] = page * PAGE + pos % PAGE
    return table


def expected_lengths(kv_total: list[int], counts: list[int]) -> list[int]:
    return [kv - n + i + 1 for kv, n in zip(kv_total, counts, strict=True) for i in range(n)]


def test_token_rows_uniform_and_ragged():
    kv_total = torch.tensor([5, 70, 1], dtype=torch.int32)
    to_req, lengths = token_rows(kv_total, 2, 6)
    assert to_req.tolist() == [0, 0, 1, 1, 2, 2]
    assert lengths.tolist() == expected_lengths([5, 70, 1], [2, 2, 2])
    counts = torch.tensor([3, 1, 1])
    to_req, lengths = token_rows(kv_total, counts, 5)
    assert to_req.tolist() == [0, 0, 0, 1, 2]
    assert lengths.tolist() == expected_lengths([5, 70, 1], [3, 1, 1])
    assert lengths.dtype == torch.int32 and to_req.dtype == torch.int64


def test_build_paged_block_table():
    lengths = [130, 7, 64]
    table = make_req_to_token(lengths)
    rpi = torch.tensor([2, 0, 1])
    kv_total = torch.tensor([lengths[2], lengths[0], lengths[1]], dtype=torch.int32)
    md = build_paged(table, rpi, kv_total, 1, max_kv_total=130)
    assert md.is_paged and md.tokens_per_req == 1 and md.host_max_kv_len == 130
    assert md.block_table.shape == (3, 3) and md.logits_width == 192
    for b, r in enumerate(rpi.tolist()):
        for j in range(-(-int(kv_total[b]) // PAGE)):
            assert md.block_table[b, j] == table[r, j * PAGE] // PAGE
    assert md.token_kv_len.tolist() == kv_total.tolist()


def test_build_ragged_slots_and_windows():
    lengths = [100, 3]
    table = make_req_to_token(lengths)
    rpi = torch.tensor([0, 1])
    extend = [30, 3]
    md = build_ragged(table, rpi, torch.tensor(lengths), torch.tensor(extend), lengths, extend, 10**6)
    assert not md.is_paged and md.chunks == (RaggedChunk(0, 33, 0, 103),)
    assert md.kv_slots.tolist() == table[0, :100].tolist() + table[1, :3].tolist()
    assert md.token_to_req.tolist() == [0] * 30 + [1] * 3
    assert md.token_kv_start.tolist() == [0] * 30 + [100] * 3
    assert md.token_kv_len.tolist() == expected_lengths(lengths, extend)
    assert md.host_max_kv_len == 100


def test_ragged_chunks_bound_logits_and_keep_keys_local():
    extend, kv = [4, 0, 6, 2, 50], [10, 3, 20, 2, 60]
    chunks = plan_ragged_chunks(extend, kv, max_elements=200)
    assert all(c.elements <= 200 for c in chunks)
    # every row is covered once, in order, against a key range holding its request's keys
    rows = [r for c in chunks for r in range(c.row_start, c.row_end)]
    assert rows == list(range(sum(extend)))
    key_start = [sum(kv[:i]) for i in range(len(kv))]
    owner = [i for i, n in enumerate(extend) for _ in range(n)]
    for c in chunks:
        for r in range(c.row_start, c.row_end):
            assert c.key_start <= key_start[owner[r]] and key_start[owner[r]] + kv[owner[r]] <= c.key_end
    assert chunks[0] == RaggedChunk(0, 4, 0, 10)  # request 2 does not fit with request 0
    assert [c.key_end - c.key_start for c in chunks[-2:]] == [60, 60]  # the long request is split by rows
    assert plan_ragged_chunks(extend, kv, max_elements=10**6) == (RaggedChunk(0, 62, 0, 95),)


@pytest.mark.parametrize("tokens_per_req", [1, 3], ids=["decode", "mtp"])
def test_graph_buffers_replay_equals_eager(tokens_per_req):
    """Capture at the max batch, replay smaller (padded) batches through the same buffers."""
    lengths = [130, 7, 64, 200]
    table = make_req_to_token(lengths, max_context=320)
    width = -(-table.shape[1] // PAGE)
    bufs = GraphBuffers(max_bs=4, max_tokens=4 * tokens_per_req, width=width, device="cpu")
    # The runner's static inputs, captured once.
    rpi_buf = torch.zeros(4, dtype=torch.int64)
    kv_buf = torch.ones(4, dtype=torch.int32)
    captured = bufs.view(4, tokens_per_req)
    fill_paged(captured, table, rpi_buf, kv_buf)
    pointers = [t.data_ptr() for t in (captured.block_table, captured.token_kv_len, captured.kv_total)]

    for raw in ([3, 1], [0, 2, 1], [3, 2, 1, 0]):
        rpi_buf.zero_()
        kv_buf.fill_(1)
        rpi_buf[: len(raw)] = torch.tensor(raw)
        kv_buf[: len(raw)] = torch.tensor([lengths[r] for r in raw]) + tokens_per_req
        replay = bufs.view(4, tokens_per_req)
        fill_paged(replay, table, rpi_buf, kv_buf)  # what the recorded graph re-runs
        assert [t.data_ptr() for t in (replay.block_table, replay.token_kv_len, replay.kv_total)] == pointers

        eager = build_paged(table, torch.tensor(raw), kv_buf[: len(raw)].clone(), tokens_per_req, int(kv_buf.max()))
        rows, cols = len(raw), eager.block_table.shape[1]
        assert torch.equal(replay.block_table[:rows, :cols], eager.block_table)
        assert torch.equal(replay.token_kv_len[: rows * tokens_per_req], eager.token_kv_len)
        assert torch.equal(replay.kv_total[:rows], eager.kv_total)
        assert torch.equal(replay.req_pool_indices[:rows], eager.req_pool_indices)
        assert torch.equal(replay.block_table, block_table_rows(table, rpi_buf, width))


def test_graph_buffers_reject_oversized_batch():
    bufs = GraphBuffers(max_bs=2, max_tokens=2, width=4, device="cpu")
    with pytest.raises(ValueError, match="exceeds the captured maximum"):
        bufs.view(3, 1)
