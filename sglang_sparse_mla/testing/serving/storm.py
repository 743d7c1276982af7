"""The overload and fault soak ("storm"): a server under every kind of request it meets at once.

:func:`run_storm` sends, from ``concurrency`` client threads for ``seconds``, a seeded mix of

* ``shared``: prompts of a few shared-prefix groups (radix-cache hits) with unique tails;
* ``unrelated``: prompts sharing nothing, short to long;
* ``limit``: prompts that with their new tokens fill the context exactly;
* ``abort``: streamed requests aborted mid-stream through ``/abort_request``;
* ``disconnect``: streamed requests whose client hangs up mid-stream (SGLang aborts them);
* ``malformed``: bodies that are not JSON, negative ``max_new_tokens``, no input (token ids
  outside the vocabulary are not sent: SGLang 0.5.23 does not check them, with any backend, and
  they index past the embedding table);
* ``overlong``: prompts longer than the context;

against a server started with a KV pool far smaller than the load (``--max-total-tokens``),
so the radix cache evicts and the scheduler retracts decoding requests, and a small prefill
chunk. Every request ends one way: ``completed`` (200, finished by length or stop),
``aborted`` (finish reason ``abort``), ``disconnected`` (hung up by the client), ``refused``
(a 4xx, or SGLang's 503 under overload, with its normal error body) or ``failed`` (anything
else: a 5xx, a broken connection, a timeout, a 200 without tokens).

Before and after the storm a control set is decoded one request at a time with the cache
flushed; with ``--enable-deterministic-inference`` the two must be bit-identical. After it
the server must drain (a cache flush succeeds), answer ``/health_generate``, hold no KV
tokens (``sglang:num_used_tokens``, with ``--enable-metrics``) and have logged no leak,
double free or traceback (SGLang checks its pools whenever it idles; with
``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1`` a leak stops the server).
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .client import flush_cache, generate, open_post, post_json, stream_events
from .workload import bit_identical, token_prompts

KIND_WEIGHTS = {
    "shared": 30, "unrelated": 25, "limit": 4, "abort": 12, "disconnect": 8, "malformed": 11, "overlong": 10,
}  # fmt: skip
# Kinds that must be refused with a 4xx: anything else is a failure.
MUST_REFUSE = ("malformed", "overlong")
OUTCOMES = ("completed", "aborted", "disconnected", "refused", "failed")
# Server-log lines that fail the storm whatever the clients saw.
LOG_PROBLEMS = re.compile(r"memory leak detected|double free|use-after-free|Traceback \(most recent call last\)")
# Control prompts' new tokens, and the per-request client timeout: a request still unanswered
# after it is stuck (the whole storm must fit one 600 s device call with the server's start).
CONTROL_TOKENS = 48
REQUEST_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class StormPlan:
    """What a storm sends: ``context_len`` is the model's, ``index_topk`` sizes the control prompts
    past it."""

    context_len: int
    index_topk: int
    concurrency: int = 192
    seconds: float = 180.0
    seed: int = 0
    groups: int = 8
    prefix_tokens: int = 1024

    def control_lengths(self) -> list[int]:
        """One dense control prompt, two well past ``index_topk`` (within the context)."""
        longest = self.context_len - CONTROL_TOKENS - 1
        return [min(200, longest), min(4 * self.index_topk, longest), min(8 * self.index_topk, longest)]


@dataclass
class StormRequest:
    kind: str
    body: bytes
    stream: bool = False
    rid: str | None = None
    abort_after: int = 0  # streamed events read before the abort or the hang-up


@dataclass
class Outcome:
    kind: str
    outcome: str
    non_finite: int = 0
    detail: str = ""


@dataclass
class _Tally:
    by_kind: dict = field(default_factory=dict)
    non_finite: int = 0
    examples: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, result: Outcome) -> None:
        with self.lock:
            counts = self.by_kind.setdefault(result.kind, Counter(sent=0))
            counts["sent"] += 1
            counts[result.outcome] += 1
            self.non_finite += result.non_finite
            bad = result.outcome == "failed" or (result.kind in MUST_REFUSE and result.outcome != "refused")
            if (bad or result.non_finite) and len(self.examples) < 8:
                self.examples.append(f"{result.kind}: {result.outcome}: {result.detail}"[:300])


def make_request(rng: random.Random, plan: StormPlan, index: int, prefixes: list[list[int]]) -> StormRequest:
    """Request ``index`` of the storm, drawn from ``rng``."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]

    def ids(n: int) -> list[int]:
        return token_prompts([n], seed=rng.getrandbits(32))[0]

    def body(input_ids, max_new: int, **extra) -> bytes:
        sampling = {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True}
        return json.dumps({"input_ids": input_ids, "sampling_params": sampling, **extra}).encode()

    logprobs = {"return_logprob": True, "top_logprobs_num": 0}
    if kind == "shared":
        prompt = rng.choice(prefixes) + ids(rng.randint(16, 256))
        return StormRequest(kind, body(prompt, rng.randint(16, 256), **logprobs))
    if kind == "unrelated":
        return StormRequest(kind, body(ids(rng.randint(16, 2048)), rng.randint(16, 512), **logprobs))
    if kind == "limit":
        new = rng.randint(8, 32)
        return StormRequest(kind, body(ids(plan.context_len - new), new, **logprobs))
    if kind in ("abort", "disconnect"):
        rid = f"storm-{plan.seed}-{index}"
        payload = body(ids(rng.randint(16, 1024)), 1024, stream=True, rid=rid)
        return StormRequest(kind, payload, stream=True, rid=rid, abort_after=rng.randint(1, 8))
    if kind == "overlong":
        return StormRequest(kind, body(ids(plan.context_len + rng.randint(1, 512)), 8))
    variant = rng.randrange(3)  # malformed
    if variant == 0:
        return StormRequest(kind, b'{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": ')
    if variant == 1:
        return StormRequest(kind, body(ids(16), -5))
    return StormRequest(kind, json.dumps({"sampling_params": {"max_new_tokens": 8}}).encode())


def _finished(kind: str, meta: dict, logprobs: list) -> Outcome:
    reason = (meta.get("finish_reason") or {}).get("type")
    if reason == "abort":
        return Outcome(kind, "aborted")
    if reason not in ("length", "stop") or not meta.get("completion_tokens"):
        return Outcome(kind, "failed", detail=f"finish reason {reason!r}, {meta.get('completion_tokens')} tokens")
    non_finite = sum(1 for entry in logprobs if entry[0] is None or not math.isfinite(entry[0]))
    return Outcome(kind, "completed", non_finite=non_finite)


def _streamed(url: str, request: StormRequest) -> Outcome:
    meta = {}
    with open_post(f"{url}/generate", request.body, REQUEST_TIMEOUT_S) as response:
        for events, event in enumerate(stream_events(response), 1):
            meta = event.get("meta_info", meta)
            if events == request.abort_after:
                if request.kind == "disconnect":
                    return Outcome(request.kind, "disconnected")  # the with block hangs up
                post_json(f"{url}/abort_request", {"rid": request.rid}, timeout=60)
    return _finished(request.kind, meta, [])


def send(url: str, request: StormRequest) -> Outcome:
    """One storm request, classified (see the module docstring)."""
    try:
        if request.stream:
            return _streamed(url, request)
        with open_post(f"{url}/generate", request.body, REQUEST_TIMEOUT_S) as response:
            item = json.loads(response.read())
        meta = item.get("meta_info", {})
        return _finished(request.kind, meta, meta.get("output_token_logprobs") or [])
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:200]
        refused = 400 <= err.code < 500 or err.code == 503
        return Outcome(request.kind, "refused" if refused else "failed", detail=f"HTTP {err.code}: {detail}")
    except Exception as err:  # a broken connection or a timeout is a failure, whatever its type
        return Outcome(request.kind, "failed", detail=f"{type(err).__name__}: {err}")


def _control(url: str, prompts: list[list[int]]):
    completions = []
    for prompt in prompts:
        flush_cache(url)
        completions += generate(url, [prompt], CONTROL_TOKENS)
    return completions


def _drain(url: str, timeout_s: float = 180.0) -> float | None:
    """Seconds until a cache flush succeeds (no request left running), ``None`` if it never does."""
    try:
        return flush_cache(url, timeout_s, interval_s=1.0)
    except (RuntimeError, urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _metric(url: str, name: str) -> float | None:
    """A gauge summed over its label sets from ``/metrics`` (``None`` without ``--enable-metrics``)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    return sum(values) if values else None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health_generate", timeout=120) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def run_storm(url: str, plan: StormPlan, server_log: Path | None = None) -> dict:
    """The storm against the server at ``url``, with the checks of the module docstring."""
    rng = random.Random(plan.seed)
    control_prompts = token_prompts(plan.control_lengths(), seed=plan.seed + 50)
    before = _control(url, control_prompts)
    log_start = server_log.stat().st_size if server_log is not None and server_log.exists() else 0
    prefixes = token_prompts([plan.prefix_tokens] * plan.groups, seed=plan.seed + 60)
    seeds = [rng.getrandbits(64) for _ in range(plan.concurrency)]  # each client's requests, in order
    tally, start = _Tally(), time.monotonic()
    deadline = start + plan.seconds

    def client(worker: int) -> None:
        local, index = random.Random(seeds[worker]), worker
        while time.monotonic() < deadline:
            tally.add(send(url, make_request(local, plan, index, prefixes)))
            index += plan.concurrency

    with ThreadPoolExecutor(plan.concurrency) as pool:
        list(pool.map(client, range(plan.concurrency)))
    storm_s = time.monotonic() - start

    drain_s = _drain(url)
    healthy = drain_s is not None and _healthy(url)
    kv_used = _metric(url, "sglang:num_used_tokens") if healthy else None
    after = _control(url, control_prompts) if healthy else []
    problems = []
    if server_log is not None and server_log.exists():
        with server_log.open(errors="replace") as log:
            log.seek(log_start)
            problems = [line.strip()[:300] for line in log if LOG_PROBLEMS.search(line)][:8]
    totals = Counter()
    for counts in tally.by_kind.values():
        totals.update({k: v for k, v in counts.items() if k != "sent"})
    identical = sum(bit_identical(a, b) for a, b in zip(before, after, strict=False))
    return {
        "sent": sum(totals.values()),
        "seconds": storm_s,
        "concurrency": plan.concurrency,
        **{outcome: totals[outcome] for outcome in OUTCOMES},
        "by_kind": {kind: dict(counts) for kind, counts in sorted(tally.by_kind.items())},
        "must_refuse_accepted": sum(
            tally.by_kind.get(kind, Counter())["sent"] - tally.by_kind.get(kind, Counter())["refused"]
            for kind in MUST_REFUSE
        ),
        "non_finite": tally.non_finite,
        "examples": tally.examples,
        "drain_s": drain_s,
        "healthy_after": healthy,
        "kv_tokens_used_after": kv_used,
        "log_problems": problems,
        "control": {
            "identical": identical,
            "of": len(control_prompts),
            "finite": all(c.finite for c in before + after),
        },
    }


def storm_ok(result: dict) -> bool:
    """The storm's targets: nothing failed, every malformed or over-long request refused, every
    logprob finite, the server drained, healthy, holding no KV token and quiet in its log, and
    the control set bit-identical before and after."""
    control = result["control"]
    return (
        result["failed"] == 0
        and result["must_refuse_accepted"] == 0
        and result["non_finite"] == 0
        and result["healthy_after"]
        and result["kv_tokens_used_after"] in (0, None)
        and not result["log_problems"]
        and control["finite"]
        and control["identical"] == control["of"]
    )
