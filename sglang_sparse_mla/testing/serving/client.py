"""SGLang's native HTTP API, with the standard library only.

``/generate`` takes ``text`` or ``input_ids`` (one or a batch) and sampling
parameters; with ``return_logprob`` its ``meta_info`` carries
``output_token_logprobs`` (``[logprob, token_id, text]`` per generated
token), ``output_top_logprobs`` (the ``top_logprobs_num`` best per step) and,
from ``logprob_start_len`` on, ``input_token_logprobs``.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


def open_post(url: str, body: bytes, timeout: float):
    """The open response to ``POST url`` of a JSON ``body`` (raises ``HTTPError`` on an error status)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    return urllib.request.urlopen(request, timeout=timeout)


def post_json(url: str, payload: dict, timeout: float = 600.0) -> Any:
    """``payload`` posted as JSON; the JSON answer, ``None`` for an empty body (``/abort_request``'s)."""
    with open_post(url, json.dumps(payload).encode(), timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def stream_events(response) -> Iterator[dict]:
    """The JSON of each server-sent ``data:`` event of a streamed ``/generate`` response."""
    for raw in response:
        line = raw.decode().strip()
        if line.startswith("data:") and line != "data: [DONE]":
            yield json.loads(line[len("data:") :])


@dataclass
class Completion:
    """One request's answer: tokens, their log-probabilities and cache use."""

    text: str
    output_ids: list[int]
    logprobs: list[float]
    top2_margin: list[float] = field(default_factory=list)  # best minus second-best logprob per step
    input_logprobs: list[float] = field(default_factory=list)  # teacher-forced, first position dropped
    prompt_tokens: int = 0
    cached_tokens: int = 0
    spec_verify_ct: int = 0  # speculative decoding: target verify steps (tokens / accept length)

    @classmethod
    def from_response(cls, item: dict) -> Completion:
        meta = item.get("meta_info", {})
        tokens = meta.get("output_token_logprobs") or []
        margins = []
        for step in meta.get("output_top_logprobs") or []:
            best = sorted((entry[0] for entry in step if entry and entry[0] is not None), reverse=True)
            margins.append(best[0] - best[1] if len(best) > 1 else math.inf)
        inputs = [entry[0] for entry in meta.get("input_token_logprobs") or [] if entry and entry[0] is not None]
        output_ids = item.get("output_ids") or [entry[1] for entry in tokens]
        return cls(
            text=item.get("text", ""),
            output_ids=list(output_ids),
            logprobs=[float("nan") if entry[0] is None else entry[0] for entry in tokens],
            top2_margin=margins,
            input_logprobs=inputs,
            prompt_tokens=meta.get("prompt_tokens", 0),
            cached_tokens=meta.get("cached_tokens", 0),
            spec_verify_ct=meta.get("spec_verify_ct", 0),
        )

    @property
    def finite(self) -> bool:
        """Non-empty, and every returned log-probability is a finite number."""
        values = self.logprobs + self.input_logprobs
        return bool(self.output_ids) and all(math.isfinite(v) for v in values)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "text"} | {"text": self.text}


def generate(
    base_url: str,
    prompts: list[str] | list[list[int]],
    max_new_tokens: int,
    *,
    logprobs: bool = True,
    top_logprobs: int = 2,
    input_logprobs: bool = False,
    ignore_eos: bool = False,
    timeout: float = 900.0,
) -> list[Completion]:
    """Greedy completions of a batch of texts or token-id lists, sent as one ``/generate`` call.

    ``logprobs`` asks for the generated tokens' log-probabilities (and the
    ``top_logprobs`` best per step), ``input_logprobs`` also for every prompt
    position (teacher forcing).
    """
    key = "text" if isinstance(prompts[0], str) else "input_ids"
    payload = {
        key: prompts,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos},
        "return_logprob": logprobs or input_logprobs,
    }
    if logprobs and top_logprobs:
        payload["top_logprobs_num"] = top_logprobs
    if input_logprobs:
        payload["logprob_start_len"] = 0
    items = post_json(f"{base_url}/generate", payload, timeout)
    return [Completion.from_response(item) for item in (items if isinstance(items, list) else [items])]


@dataclass(frozen=True)
class StreamTiming:
    """Client-side timing of one streamed request."""

    ttft_s: float  # request sent -> first generated token received
    total_s: float  # request sent -> stream closed
    output_tokens: int

    @property
    def decode_tok_per_s(self) -> float:
        """Tokens after the first over the time after the first (inf when there is none)."""
        rest = self.total_s - self.ttft_s
        return (self.output_tokens - 1) / rest if self.output_tokens > 1 and rest > 0 else math.inf


def stream_generate(
    base_url: str,
    input_ids: list[int],
    max_new_tokens: int,
    *,
    ignore_eos: bool = True,
    timeout: float = 900.0,
    on_first_token: Callable[[], None] | None = None,
) -> StreamTiming:
    """One greedy request streamed from ``/generate`` (server-sent ``data:`` events), timed.

    Each event carries the cumulative ``meta_info.completion_tokens``; the
    first event with one or more is the first token, when ``on_first_token``
    (if given) is called.
    """
    payload = {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos},
        "stream": True,
    }
    start = time.perf_counter()
    first, tokens = None, 0
    with open_post(f"{base_url}/generate", json.dumps(payload).encode(), timeout) as response:
        for event in stream_events(response):
            tokens = event.get("meta_info", {}).get("completion_tokens", tokens)
            if first is None and tokens >= 1:
                first = time.perf_counter() - start
                if on_first_token is not None:
                    on_first_token()
    total = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{base_url}/generate streamed no token")
    return StreamTiming(first, total, tokens)


def flush_cache(base_url: str, timeout_s: float = 10.0, interval_s: float = 0.5) -> float:
    """Empty the radix cache, retried every ``interval_s`` while the server refuses (400: requests
    still running) for up to ``timeout_s``; the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{base_url}/flush_cache", method="POST"), timeout=60):
                return time.monotonic() - start
        except urllib.error.HTTPError as err:
            if err.code != 400:
                raise
        if time.monotonic() - start >= timeout_s:
            raise RuntimeError(f"{base_url}/flush_cache kept refusing: requests still running")
        time.sleep(interval_s)
