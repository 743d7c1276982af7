"""One model layer's device timeline, from a profiler trace of many identical layers.

A decode step runs the same kernels layer after layer. :func:`layer_timeline`
cuts a trace's device work into periods that each start at a launch of an
anchor kernel (e.g. the attention kernel), keeps the periods whose kernel
sequence is the most common one (first and last layers, step boundaries and
stray work differ) and reports, for each kernel of that sequence, the median
start (relative to the anchor), duration and stream. Where kernels of two
streams overlap, or where the work of one stream waits for another, it shows
up as starts that do not follow the previous kernel's end.

    python -m sglang_sparse_mla.testing.serving.layer_timeline TRACE.json.gz --anchor _sparse_mla_bf16_kernel
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .decode_profile import device_events, read_trace


@dataclass(frozen=True)
class TimelineEntry:
    """A kernel of the typical layer: median start after the anchor's start, median duration (us)."""

    name: str
    stream: str
    start_us: float
    duration_us: float


@dataclass(frozen=True)
class LayerTimeline:
    """``layers`` periods of ``period_us`` (median anchor-to-anchor) with the typical sequence ``entries``,
    out of ``periods`` in the trace."""

    period_us: float
    layers: int
    periods: int
    entries: list[TimelineEntry]


def layer_timeline(trace: dict, anchor: str) -> LayerTimeline:
    """The typical layer of ``trace``: periods start at each kernel named ``anchor`` or, where no
    kernel has exactly that name, at each one whose name contains it (``_topk_kernel`` would also
    match TensorRT-LLM's ``deepseek_v3_topk_kernel``, the MoE router's)."""
    events = device_events(trace)
    exact = any(e["name"] == anchor for e in events)
    starts = [i for i, e in enumerate(events) if (e["name"] == anchor if exact else anchor in e["name"])]
    if len(starts) < 2:
        raise ValueError(f"{len(starts)} launches of a kernel named like {anchor!r}: need two or more")
    periods = [events[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    lengths = [float(events[b]["ts"]) - float(events[a]["ts"]) for a, b in zip(starts, starts[1:], strict=False)]
    signature = lambda period: tuple(e["name"] for e in period)  # noqa: E731
    typical, _ = Counter(map(signature, periods)).most_common(1)[0]
    kept = [k for k, p in enumerate(periods) if signature(p) == typical]
    entries = []
    for j, name in enumerate(typical):
        column = [periods[k][j] for k in kept]
        offsets = [float(e["ts"]) - float(periods[k][0]["ts"]) for e, k in zip(column, kept, strict=True)]
        durations = [float(e.get("dur", 0.0)) for e in column]
        stream = str((column[0].get("args") or {}).get("stream", "?"))
        entries.append(TimelineEntry(name, stream, statistics.median(offsets), statistics.median(durations)))
    period_us = statistics.median(lengths[k] for k in kept)
    return LayerTimeline(period_us, len(kept), len(periods), entries)


def per_layer_anchor(kernels: list[dict], layers: int) -> str | None:
    """The name of the longest kernel of a :func:`~.decode_profile.kernel_table` that runs once
    a layer (``calls_per_step == layers``), or None."""
    for kernel in kernels:  # longest first
        if round(kernel["calls_per_step"]) == layers:
            return kernel["name"]
    return None


def format_timeline(timeline: LayerTimeline, width: int = 90) -> str:
    lines = [
        f"typical layer: {timeline.period_us:.1f} us anchor to anchor "
        f"({timeline.layers} of {timeline.periods} periods have its kernel sequence)",
        f"{'start':>8} {'dur':>7} {'stream':>6}  kernel",
    ]
    for e in timeline.entries:
        lines.append(f"{e.start_us:8.1f} {e.duration_us:7.1f} {e.stream:>6}  {e.name[:width]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="Chrome trace (.json or .json.gz) of SGLang's torch profiler")
    parser.add_argument("--anchor", required=True, help="a substring of the name of the kernel that starts each layer")
    args = parser.parse_args(argv)
    print(format_timeline(layer_timeline(read_trace(args.trace), args.anchor)))


if __name__ == "__main__":
    main()
