"""CUDA-graph metadata on CPU: SGLang's capture/replay protocol, checked against eager.

The decode graph runner calls ``init_cuda_graph_state(max_bs, max_tokens)``
once, then per captured size ``init_forward_metadata_out_graph(fb,
in_capture=True)`` before capture and ``init_forward_metadata_in_graph(fb)``
inside it, on its own static input buffers. A replay refreshes those buffers
(padding the batch to a captured size), calls ``out_graph`` with a view and
re-runs what the graph recorded. Here the recorded part is re-run by calling
``in_graph`` again on the capture-time batch, which reads the same buffers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt")

from utils import relative_error  # noqa: E402
from dsa_world import HEADS, DSAWorld, TinyDSALayer, make_indexer, sglang_config  # noqa: E402,F401
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402

MAX_BS = 4


class DecodeGraphRunner:
    """The runner's static inputs and the capture / replay calls it makes on the backend."""

    def __init__(self, world: DSAWorld, tokens_per_req: int, mode: ForwardMode):
        self.world, self.n, self.mode = world, tokens_per_req, mode
        self.req_pool_indices = world.tensor([0] * MAX_BS)
        self.seq_lens = world.tensor([1] * MAX_BS, torch.int32)
        self.out_cache_loc = world.tensor([0] * (MAX_BS * tokens_per_req))
        self.positions = world.tensor([0] * (MAX_BS * tokens_per_req))
        world.backend.init_cuda_graph_state(MAX_BS, MAX_BS * tokens_per_req)
        self.captured = {}

    def batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=self.mode,
            batch_size=bs,
            input_ids=self.world.tensor([0] * (bs * self.n)),
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[: bs * self.n],
            seq_lens_sum=int(self.seq_lens[:bs].sum()),
            positions=self.positions[: bs * self.n],
        )

    def capture(self, bs: int) -> None:
        fb = self.batch(bs)
        self.world.backend.init_forward_metadata_out_graph(fb, in_capture=True)
        self.world.backend.init_forward_metadata_in_graph(fb)
        md = self.world.backend.forward_metadata
        self.captured[bs] = (fb, [t.data_ptr() for t in (md.block_table, md.token_kv_len, md.kv_total)])

    def replay(self, live: ForwardBatch) -> ForwardBatch:
        """Load a live batch into the buffers, padded to the smallest captured size."""
        raw = live.batch_size
        bs = min(b for b in self.captured if b >= raw)
        self.req_pool_indices.zero_()
        self.seq_lens.fill_(self.world.backend.get_cuda_graph_seq_len_fill_value())
        self.out_cache_loc.zero_()
        self.positions.zero_()
        self.req_pool_indices[:raw] = live.req_pool_indices
        self.seq_lens[:raw] = live.seq_lens
        self.out_cache_loc[: raw * self.n] = live.out_cache_loc
        self.positions[: raw * self.n] = live.positions
        view = SimpleNamespace(
            batch_size=bs,
            forward_mode=self.mode,
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=None,
        )
        self.world.backend.init_forward_metadata_out_graph(view)
        fb, pointers = self.captured[bs]
        self.world.backend.init_forward_metadata_in_graph(fb)  # what graph.replay() re-runs
        md = self.world.backend.forward_metadata
        assert [t.data_ptr() for t in (md.block_table, md.token_kv_len, md.kv_total)] == pointers
        return fb


@pytest.mark.parametrize("sglang_config", [{"speculative_num_draft_tokens": 2}], indirect=True)
@pytest.mark.parametrize("mode", ["decode", "target_verify"])
def test_replay_smaller_batches_equals_eager(sglang_config, monkeypatch, mode):
    world = DSAWorld(num_heads=HEADS)
    layer = TinyDSALayer(world, make_indexer(monkeypatch))
    n = 1 if mode == "decode" else 2
    forward_mode = ForwardMode.DECODE if mode == "decode" else ForwardMode.TARGET_VERIFY
    reqs = [world.new_request() for _ in range(MAX_BS)]
    for req, length in zip(reqs, (70, 20, 130, 5), strict=True):
        x, q_lora = layer.tokens(req, length)
        rows = world.random(length, 576)
        fb = world.extend_batch([req], [rows])
        world.backend.init_forward_metadata(fb)
        layer.forward(fb, x, q_lora, world.random(length, HEADS, 576), rows)

    runner = DecodeGraphRunner(world, n, forward_mode)
    for bs in (MAX_BS, 2):
        runner.capture(bs)

    for live_reqs in (reqs[:3], reqs[1:3], reqs):
        inputs = [layer.tokens(r, n) for r in live_reqs]
        x = torch.cat([i[0] for i in inputs])
        q_lora = torch.cat([i[1] for i in inputs])
        rows = [world.random(n, 576) for _ in live_reqs]
        q = world.random(len(live_reqs) * n, HEADS, 576)
        live = world.decode_batch(live_reqs, rows)
        live.forward_mode = forward_mode
        if mode == "target_verify":
            live.seq_lens, live.seq_lens_cpu = live.seq_lens - n, live.seq_lens_cpu - n

        world.backend.init_forward_metadata(live)
        eager_md = world.backend.forward_metadata
        eager_slots, eager_out = layer.forward(live, x, q_lora, q, torch.cat(rows))

        graph_fb = runner.replay(live)
        graph_md = world.backend.forward_metadata
        rows_live, cols = live.batch_size, eager_md.block_table.shape[1]
        assert torch.equal(graph_md.block_table[:rows_live, :cols], eager_md.block_table)
        assert torch.equal(graph_md.kv_total[:rows_live], eager_md.kv_total)
        assert torch.equal(graph_md.token_kv_len[: rows_live * n], eager_md.token_kv_len)

        pad = graph_fb.batch_size * n - x.shape[0]
        x, q_lora, q, k_rows = (torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for t in (x, q_lora, q, torch.cat(rows)))
        graph_slots, graph_out = layer.forward(graph_fb, x, q_lora, q, k_rows)
        assert torch.equal(graph_slots[: rows_live * n], eager_slots)
        assert relative_error(graph_out[: rows_live * n], eager_out) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph")
def test_captured_decode_with_q_b_proj_beside_the_indexer(sglang_config, monkeypatch):
    """SGLang's captured decode layer: its alternate stream forked before the indexer, a GEMM
    queued there after it (q_b_proj), both joined. The indexer makes that stream wait for its
    quantized queries; the graph must capture and replay to the eager slots and product."""
    import sglang.srt.model_executor.runner as runner

    world = DSAWorld(num_heads=HEADS)
    layer = TinyDSALayer(world, make_indexer(monkeypatch))
    reqs = [world.new_request() for _ in range(2)]
    for req, length in zip(reqs, (70, 130), strict=True):
        x, q_lora = layer.tokens(req, length)
        rows = world.random(length, 576)
        fb = world.extend_batch([req], [rows])
        world.backend.init_forward_metadata(fb)
        layer.forward(fb, x, q_lora, world.random(length, HEADS, 576), rows)
    inputs = [layer.tokens(r, 1) for r in reqs]
    x, q_lora = torch.cat([i[0] for i in inputs]), torch.cat([i[1] for i in inputs])
    fb = world.decode_batch(reqs, [world.random(1, 576) for _ in reqs])
    world.backend.init_forward_metadata(fb)
    eager_slots = layer.select(fb, x, q_lora)  # also compiles every kernel before the capture
    weight = world.random(q_lora.shape[1], 4096)

    alt = torch.cuda.Stream()
    layer.indexer.alt_stream = alt
    monkeypatch.setattr(runner, "get_is_capture_mode", lambda: True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        current = torch.cuda.current_stream()
        alt.wait_stream(current)
        slots = layer.select(fb, x, q_lora)
        with torch.cuda.stream(alt):
            q_b = q_lora @ weight
        current.wait_stream(alt)
    slots.fill_(-7)
    q_b.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(slots, eager_slots)
    assert torch.equal(q_b, q_lora @ weight)
