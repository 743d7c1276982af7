"""Where a served model's forward steps spend their GPU time, from SGLang's torch profiler.

:func:`profile_decode` fills the server's running batch with ``len(prompts)``
streamed requests, waits until every one has its first token (all prefill is
done, every step from then on is a decode step of that batch), asks the
server for a GPU-only profile of ``steps`` forward steps (``/start_profile``,
which stops by itself) and reads the Chrome trace it writes.
:func:`profile_prefill` profiles the forward step(s) of one prompt's prefill.
:func:`kernel_table` turns such a trace into per-step kernel times: the
kernels of CUDA-graph replays are recorded one by one, so a decode step's
attention, indexer, top-k and MoE kernels show up under their own names.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .client import stream_generate

# Chrome-trace categories of device work (torch profiler / Kineto).
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_events(trace: dict) -> list[dict]:
    """A Chrome trace's device work (kernels, copies, memsets), in start order."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]
    return sorted(events, key=lambda e: float(e["ts"]))


def _busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def kernel_table(trace: dict, steps: int, top: int = 30) -> dict:
    """Per-step device time of a Chrome trace's kernels, the ``top`` longest first.

    Returns ``{"steps", "device_us_per_step", "busy_us_per_step", "span_us_per_step",
    "stream_us_per_step", "kernels": [{"name", "calls_per_step", "us_per_step", "share"},
    ...]}``: ``device_us_per_step`` sums the device work (kernels that overlap count
    in full), ``busy_us_per_step`` is the time at least one ran, ``span_us_per_step``
    is first start to last end over ``steps`` (busy time plus the idle gaps),
    ``stream_us_per_step`` sums the work of each CUDA stream, ``share`` is of the
    device time.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    calls: dict[str, int] = defaultdict(int)
    micros: dict[str, float] = defaultdict(float)
    by_stream: dict[str, float] = defaultdict(float)
    intervals = []
    for event in device_events(trace):
        duration = float(event.get("dur", 0.0))
        calls[event["name"]] += 1
        micros[event["name"]] += duration
        by_stream[str((event.get("args") or {}).get("stream", "?"))] += duration
        intervals.append((float(event["ts"]), float(event["ts"]) + duration))
    if not calls:
        raise ValueError("the trace holds no device work (was the GPU activity recorded?)")
    total = sum(micros.values())
    ordered = sorted(micros, key=micros.get, reverse=True)
    first, last = min(s for s, _ in intervals), max(e for _, e in intervals)
    return {
        "steps": steps,
        "device_us_per_step": total / steps,
        "busy_us_per_step": _busy_time(intervals) / steps,
        "span_us_per_step": (last - first) / steps,
        "stream_us_per_step": {stream: us / steps for stream, us in sorted(by_stream.items())},
        "kernels": [
            {
                "name": name,
                "calls_per_step": calls[name] / steps,
                "us_per_step": micros[name] / steps,
                "share": micros[name] / total,
            }
            for name in ordered[:top]
        ],
    }


def read_trace(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def _wait_for_trace(directory: Path, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        traces = sorted(directory.glob("*.trace.json*"))
        if traces:
            size = traces[0].stat().st_size
            time.sleep(1.0)  # still being written while it grows
            if size > 0 and traces[0].stat().st_size == size:
                return traces[0]
        time.sleep(0.5)
    raise TimeoutError(f"no profiler trace in {directory} after {timeout:.0f} s")


def _read_and_keep(directory: Path, timeout: float, keep_trace: Path | None) -> dict:
    """The trace the server writes into ``directory``, copied to ``keep_trace`` if given."""
    trace_path = _wait_for_trace(directory, timeout)
    if keep_trace is not None:
        keep_trace.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(trace_path, keep_trace)
    return read_trace(trace_path)


def _profile_request(directory: str, steps: int) -> dict:
    return {"output_dir": directory, "num_steps": steps, "activities": ["GPU"], "with_stack": False,
            "record_shapes": False}  # fmt: skip


def profile_decode(
    url: str,
    prompts: list[list[int]],
    decode_tokens: int,
    steps: int,
    timeout: float = 600.0,
    keep_trace: Path | None = None,
) -> dict:
    """Kernel table (:func:`kernel_table`) of ``steps`` decode steps of a batch of ``prompts``.

    ``decode_tokens`` per request must outlast the profile; the requests
    ignore EOS. ``keep_trace``: where to copy the server's (gzipped) trace.
    """
    started = threading.Semaphore(0)
    with tempfile.TemporaryDirectory(prefix="decode-profile-") as directory, ThreadPoolExecutor(len(prompts)) as pool:
        requests = [
            pool.submit(stream_generate, url, p, decode_tokens, on_first_token=started.release, timeout=timeout)
            for p in prompts
        ]
        deadline, waiting = time.monotonic() + timeout, len(prompts)
        while waiting:
            if started.acquire(timeout=1.0):
                waiting -= 1
                continue
            failed = [r.exception() for r in requests if r.done() and r.exception() is not None]
            if failed or time.monotonic() > deadline:
                first = f"{type(failed[0]).__name__}: {failed[0]}" if failed else "none, timed out"
                raise RuntimeError(f"{waiting} of {len(prompts)} requests have no first token; first failure: {first}")
        _start_profile(url, _profile_request(directory, steps))
        table = kernel_table(_read_and_keep(Path(directory), timeout, keep_trace), steps)
        for r in requests:
            r.result()
    return {"batch": len(prompts), **table}


def profile_prefill(
    url: str, prompt: list[int], steps: int = 1, timeout: float = 600.0, keep_trace: Path | None = None
) -> dict:
    """Kernel table of the first ``steps`` forward steps of one prompt sent to an idle server:
    its prefill (one step unless the server chunks the prompt).

    SGLang stops a profile at the first batch after the last profiled one, so the
    request decodes a few tokens past them (a decode step is ~1% of a long prefill).
    """
    with tempfile.TemporaryDirectory(prefix="prefill-profile-") as directory:
        _start_profile(url, _profile_request(directory, steps))
        stream_generate(url, prompt, steps + 3, timeout=timeout)
        table = kernel_table(_read_and_keep(Path(directory), timeout, keep_trace), steps)
    return {"prompt_tokens": len(prompt), **table}


def _start_profile(url: str, request: dict) -> None:
    """``POST /start_profile`` (it answers in plain text)."""
    body = json.dumps(request).encode()
    headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/start_profile", body, headers), timeout=60) as reply:
        reply.read()
