"""GPU timing and ceilings shared by the benchmarks.

Kernels are timed inside a CUDA graph that launches them once per input set,
over several input sets whose bytes together exceed the L2 cache, so that
neither launch gaps nor cache hits flatter the numbers. Each graph replay is
timed with CUDA events after warm-up; the reported time is the median replay
divided by the number of launches in it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    ms: float  # median time per launch
    spread: float  # (p90 - p10) / median over the replays
    method: str  # "graph" or "events" (eager, when the callable can't be captured)


def _event_times(run: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _summary(times: list[float], launches: int, method: str) -> Timing:
    times = sorted(times)
    med = statistics.median(times)
    p10 = times[len(times) // 10]
    p90 = times[(9 * len(times)) // 10]
    return Timing(med / launches, (p90 - p10) / med if med > 0 else 0.0, method)


def time_launches(
    calls: Sequence[Callable[[], object]], repeats: int = 20, warmup: int = 3, graph: bool = True
) -> Timing:
    """Median time of one call, each call working on its own inputs.

    ``calls`` are run back to back inside one CUDA graph (or, with
    ``graph=False`` or if capture fails, eagerly between two events); the
    replay time is divided by ``len(calls)``.
    """
    for call in calls:
        call()
    torch.cuda.synchronize()

    def run_all():
        for call in calls:
            call()

    try:
        if not graph:
            raise RuntimeError("eager timing requested")
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run_all()
            with torch.cuda.graph(graph, stream=stream):
                run_all()
        torch.cuda.current_stream().wait_stream(stream)
        for _ in range(warmup):
            graph.replay()
        torch.cuda.synchronize()
        return _summary(_event_times(graph.replay, repeats), len(calls), "graph")
    except RuntimeError:
        torch.cuda.synchronize()
        for _ in range(warmup):
            run_all()
        return _summary(_event_times(run_all, repeats), len(calls), "events")


def rotation_count(bytes_per_call: int, l2_bytes: int | None = None, minimum: int = 2) -> int:
    """How many input sets make one graph replay stream at least 4x the L2."""
    if l2_bytes is None:
        l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    return max(minimum, -(-4 * l2_bytes // max(bytes_per_call, 1)))


@dataclass(frozen=True)
class Ceilings:
    copy_gbs: float  # device-to-device copy, bytes read + written per second / 1e9
    bf16_tflops: float  # 8192^3 bf16 matmul on random data
    # The SM80-class path's own (benchmarks/sm80_ceilings.py): bf16 mma_v2 from shared memory,
    # and the read rate of cache rows gathered at random slots, by row bytes.
    mma_v2_tflops: float | None = None
    gather_gbs: dict[int, float] | None = None


def measure_copy_gbs() -> float:
    """Device-to-device copy of 2 GiB of bf16: bytes read + written per second / 1e9."""
    n = 1 << 30
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    # Eager: captured in a CUDA graph, the copy becomes a memcpy node, which
    # measured slower than the eager copy on the H100.
    copy = time_launches([lambda: dst.copy_(src)], repeats=30, warmup=10, graph=False)
    del src, dst
    return 2 * n * 2 / (copy.ms * 1e-3) / 1e9


def measure_matmul_tflops(fp8: bool = False) -> tuple[float, str]:
    """TFLOP/s of an 8192^3 matmul on random data, and what was measured: bf16, or with
    ``fp8`` e4m3 through ``torch._scaled_mm`` (the bf16 matmul where that fails)."""
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    what = f"{size}^3 bf16 matmul"
    mm = None
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        try:
            mm = time_launches(
                [lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)],
                repeats=30, warmup=10,
            )  # fmt: skip
            what = f"{size}^3 FP8 torch._scaled_mm"
        except Exception as err:
            what += f" (FP8 _scaled_mm failed: {type(err).__name__})"
        del a8, b8
    if mm is None:
        mm = time_launches([lambda: a @ b], repeats=30, warmup=10)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / (mm.ms * 1e-3) / 1e12, what


def measure_ceilings() -> Ceilings:
    """Measure the two ceilings the benchmarks report against."""
    return Ceilings(copy_gbs=measure_copy_gbs(), bf16_tflops=measure_matmul_tflops()[0])
