"""Where one DSA layer's decode step spends its GPU time on this package's path.

    python benchmarks/profile_decode_layer.py [--batch 1,32] [--context 8192] [--out FILE.json]

One layer of the backend's decode path at DeepSeek-V3.2's attention shape
(128 query heads, 64 index heads, index_topk 2048, q_lora_rank 1536, hidden
7168), each of ``batch`` requests ``context`` tokens deep: the indexer
(:class:`~sglang_sparse_mla.backend.indexer.SparseIndexer` over
:class:`~sglang_sparse_mla.testing.dsa_layer.StubIndexer`, a stand-in for
SGLang's ``Indexer`` weights, norm and rope: projections, rotation, FP8
quantization, index-K store, paged logits, top-k and slot mapping), the
latent KV write and sparse MLA decode. Prints the step's time
inside a CUDA graph (median replay, as SGLang replays decode steps), also with
the index keys and queries quantized in two launches instead of one, and the kernels of an eager step from the PyTorch profiler, grouped
by name: how many launches a step makes and the GPU time each takes. Needs a
CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

from sglang_sparse_mla.backend import dispatch
from sglang_sparse_mla.backend.indexer import SparseIndexer
from sglang_sparse_mla.backend.metadata import build_paged
from sglang_sparse_mla.kernels import IndexRope
from sglang_sparse_mla.kernels.index_format import INDEX_ROW_BYTES
from sglang_sparse_mla.testing.dsa_layer import StubIndexer

PAGE = 64
HEADS, INDEX_HEADS, TOPK, Q_LORA, HIDDEN = 128, 64, 2048, 1536, 7168


def decode_step(batch: int, context: int, device: torch.device):
    """A closure running one decode step of ``batch`` requests, and its graph-capturable metadata."""
    gen = torch.Generator(device=device).manual_seed(0)
    pages_per_req = -(-(context + 1) // PAGE)
    pages = batch * pages_per_req + 1
    order = torch.randperm(pages - 1, generator=torch.Generator().manual_seed(0)).to(device) + 1
    page_of = order[: batch * pages_per_req].view(batch, pages_per_req)
    req_to_token = (page_of[:, :, None] * PAGE + torch.arange(PAGE, device=device)).view(batch, -1)
    req_to_token = req_to_token[:, : context + 1].to(torch.int32).contiguous()
    kv = torch.randn(pages * PAGE, 1, 576, generator=gen, device=device).bfloat16()
    index = torch.zeros(pages, PAGE * INDEX_ROW_BYTES, dtype=torch.uint8, device=device)
    cached = req_to_token[:, :context].reshape(-1)
    keys = torch.randn(cached.shape[0], 128, generator=gen, device=device).bfloat16()
    dispatch.quantize_index_keys(index, cached, keys, rotate=False, scale_format="fp32")

    rpi = torch.arange(batch, device=device)
    kv_total = torch.full((batch,), context + 1, dtype=torch.int32, device=device)
    metadata = dataclasses.replace(
        build_paged(req_to_token, rpi, kv_total, 1, context + 1), host_max_kv_len=None
    )  # as under CUDA graphs: no host-side lengths
    indexer = StubIndexer(HIDDEN, Q_LORA, INDEX_HEADS, device)
    indexer.rotary_emb.inv_freq = indexer.rotary_emb.inv_freq.to(device)  # no host copy in the graph
    sparse_indexer = SparseIndexer(TOPK, req_to_token)
    x = torch.randn(batch, HIDDEN, generator=gen, device=device).bfloat16()
    q_lora = torch.randn(batch, Q_LORA, generator=gen, device=device).bfloat16()
    q = torch.randn(batch, HEADS, 576, generator=gen, device=device).bfloat16()
    latent = torch.randn(batch, 576, generator=gen, device=device).bfloat16()
    positions = torch.full((batch,), context, dtype=torch.int64, device=device)
    loc = req_to_token[:, context].to(torch.int64)

    def step():
        slots = sparse_indexer(indexer, x, q_lora, positions, loc, index, metadata)
        dispatch.store_kv(kv, loc, latent)
        return dispatch.sparse_attention(q, kv, slots, 192**-0.5, decode=True)

    return step


def _two_launches(index_buffer, loc, key, query, gate, head_scale, softmax_scale, *, rotate, key_format, query_format,
                  rope=None, norm=None):  # fmt: skip
    dispatch.quantize_index_keys(index_buffer, loc, key, rotate=rotate, scale_format=key_format, rope=rope, norm=norm)
    query_rope = rope and IndexRope(rope.cos_sin_cache, rope.positions[: query.shape[0]])
    return dispatch.quantize_index_queries(
        query, gate, head_scale, softmax_scale, rotate=rotate, scale_format=query_format, rope=query_rope
    )


@contextlib.contextmanager
def separate_index_quantization():
    """The index keys and queries quantized in a launch each (as before they shared one; same
    bytes), for a before/after comparison in one run."""
    saved = dispatch.quantize_index_keys_and_queries
    dispatch.quantize_index_keys_and_queries = _two_launches
    try:
        yield
    finally:
        dispatch.quantize_index_keys_and_queries = saved


def graph_time_us(step, replays: int = 200) -> float:
    """Median time of one step replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(20):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def kernel_table(step, steps: int = 10) -> list[dict]:
    """GPU kernels of ``steps`` eager steps, by name: launches and microseconds per step."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0:
            continue
        rows.append({"kernel": event.key, "launches": event.count / steps, "us": device_us / steps})
    return sorted(rows, key=lambda r: -r["us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_decode_layer.py needs a CUDA GPU")
    device = torch.device("cuda")
    results = {"gpu": torch.cuda.get_device_name(), "context": args.context, "torch": torch.__version__, "runs": []}
    summary = []
    for batch in (int(b) for b in args.batch.split(",")):
        step = decode_step(batch, args.context, device)
        with separate_index_quantization():
            two_us = graph_time_us(decode_step(batch, args.context, device))
        graph_us = graph_time_us(step)
        table = kernel_table(step)
        launches = sum(r["launches"] for r in table)
        busy = sum(r["us"] for r in table)
        results["runs"].append(
            {"batch": batch, "graph_us": graph_us, "graph_us_two_quantization_launches": two_us, "kernels": table}
        )
        summary.append((batch, graph_us, two_us, launches))
        print(f"\nbatch {batch}, context {args.context}: one layer's decode step {graph_us:.1f} us in a CUDA graph")
        print(f"({two_us:.1f} us with the index keys and queries quantized in two launches);")
        print(f"eager: {launches:.0f} kernel launches, {busy:.1f} us of kernel time")
        print(f"{'launches':>8} {'us':>8}  kernel")
        for r in table:
            print(f"{r['launches']:8.1f} {r['us']:8.1f}  {r['kernel'][:110]}")
    print(f"\n{'batch':>5} {'step us':>8} {'two quantization launches us':>29} {'launches':>8}")
    for batch, graph_us, two_us, launches in summary:
        print(f"{batch:5d} {graph_us:8.1f} {two_us:29.1f} {launches:8.0f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
