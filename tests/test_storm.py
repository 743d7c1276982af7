"""The overload and fault soak's client side against a stub of SGLang's HTTP server (no GPU)."""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from collections import Counter

import pytest

from sglang_sparse_mla.testing.serving import e2e, storm
from sglang_sparse_mla.testing.serving.storm import KIND_WEIGHTS, StormPlan, make_request, run_storm, storm_ok

CONTEXT, VOCAB = 4096, 1024


class StubSGLang(http.server.BaseHTTPRequestHandler):
    """``/generate`` (batched, streamed), ``/abort_request``, ``/flush_cache``, ``/health_generate`` and
    ``/metrics`` as SGLang 0.5.23 answers them, its input validation included (it checks lengths, not
    token ids against the vocabulary). ``faults`` (on the
    server) break it the ways the storm must notice."""

    def log_message(self, *args):
        pass

    def _reply(self, code: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/metrics":
            used = 64 if "leak" in self.server.faults else 0
            text = f'sglang:num_used_tokens{{model_name="tiny"}} {used}.0\n'.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
        else:
            self._reply(200, {})

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/flush_cache":
            return self._reply(200, {})
        if self.path == "/abort_request":  # SGLang answers with an empty body
            self.server.aborted.add(json.loads(body)["rid"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        try:
            request = json.loads(body)
        except json.JSONDecodeError:
            return self._reply(400, {"error": {"message": "invalid JSON"}})
        error = self._invalid(request)
        if error:
            return self._reply(400, {"error": {"message": error}})
        if request.get("stream"):
            return self._stream(request)
        prompts = request["input_ids"]
        items = [self._item(p, request) for p in (prompts if isinstance(prompts[0], list) else [prompts])]
        self._reply(200, items if isinstance(prompts[0], list) else items[0])

    @staticmethod
    def _invalid(request) -> str | None:
        ids, new = request.get("input_ids"), request.get("sampling_params", {}).get("max_new_tokens", 16)
        if not ids:
            return "input_ids or text is required"
        if new < 0:
            return "max_new_tokens must be at least 0"
        for prompt in ids if isinstance(ids[0], list) else [ids]:
            if len(prompt) >= CONTEXT or len(prompt) + new > CONTEXT:
                return "longer than the model's context length"
        return None

    def _item(self, prompt, request) -> dict:
        new = request["sampling_params"]["max_new_tokens"]
        ids = [(sum(prompt) * 31 + i) % VOCAB for i in range(new)]
        if "drift" in self.server.faults and self.server.storm_done.is_set():
            ids[-1] = (ids[-1] + 1) % VOCAB
        nan = "nan" in self.server.faults and len(prompt) % 7 == 0
        logprobs = [[float("nan") if nan else -0.5, t, None] for t in ids]
        if "crash" in self.server.faults and len(prompt) % 5 == 1:  # no control prompt
            raise ConnectionResetError  # the handler dies: the client sees a broken connection
        meta = {"finish_reason": {"type": "length"}, "completion_tokens": new, "output_token_logprobs": logprobs}
        return {"text": "x", "output_ids": ids, "meta_info": meta}

    def _stream(self, request) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        new = request["sampling_params"]["max_new_tokens"]
        for n in range(1, new + 1):
            reason = None
            if request.get("rid") in self.server.aborted:
                reason = {"type": "abort"}
            elif n == new:
                reason = {"type": "length"}
            event = {"text": "x", "meta_info": {"completion_tokens": n, "finish_reason": reason}}
            try:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the client hung up
            if reason:
                break
            time.sleep(0.002)
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubSGLang)
    server.daemon_threads = True
    server.faults, server.aborted, server.storm_done = set(), set(), threading.Event()
    server.handle_error = lambda request, address: None  # a "crash" fault's handler dies quietly
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def plan(**changes) -> StormPlan:
    return StormPlan(CONTEXT, index_topk=256, **{"concurrency": 8, "seconds": 1.0, **changes})


def test_request_mix_covers_every_kind_and_stays_in_bounds():
    rng, p = random.Random(0), plan()
    prefixes = [[5] * p.prefix_tokens]
    requests = [make_request(rng, p, i, prefixes) for i in range(2000)]
    kinds = Counter(r.kind for r in requests)
    assert set(kinds) == set(KIND_WEIGHTS) and kinds["shared"] > kinds["limit"]
    for r in requests:
        if r.kind in ("shared", "unrelated", "limit"):
            body = json.loads(r.body)
            total = len(body["input_ids"]) + body["sampling_params"]["max_new_tokens"]
            assert total <= CONTEXT and (total == CONTEXT) == (r.kind == "limit")
        if r.kind == "overlong":
            assert len(json.loads(r.body)["input_ids"]) > CONTEXT
        assert r.stream == (r.kind in ("abort", "disconnect")) and (r.rid is not None) == r.stream
    assert len({r.rid for r in requests if r.rid}) == sum(1 for r in requests if r.rid)
    assert p.control_lengths() == [200, 1024, 2048]


def test_a_clean_server_passes(stub, tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO startup\n")
    result = run_storm(f"http://127.0.0.1:{stub.server_port}", plan(), log)
    assert storm_ok(result), result
    assert result["sent"] == sum(result[o] for o in ("completed", "aborted", "disconnected", "refused", "failed"))
    assert result["completed"] and result["aborted"] and result["disconnected"] and result["refused"]
    assert result["failed"] == result["must_refuse_accepted"] == result["non_finite"] == 0
    assert result["by_kind"]["malformed"]["refused"] == result["by_kind"]["malformed"]["sent"]
    assert result["control"] == {"identical": 3, "of": 3, "finite": True} and result["kv_tokens_used_after"] == 0


@pytest.mark.parametrize(
    "fault,broken",
    [
        ("nan", lambda r: r["non_finite"] > 0),
        ("crash", lambda r: r["failed"] > 0 and r["examples"]),
        ("leak", lambda r: r["kv_tokens_used_after"] == 64),
        ("drift", lambda r: r["control"]["identical"] < r["control"]["of"]),
        ("log", lambda r: r["log_problems"] == ["ERROR pool memory leak detected! available_size=10"]),
    ],
)
def test_each_fault_fails_the_storm(stub, tmp_path, monkeypatch, fault, broken):
    stub.faults.add(fault)
    log = tmp_path / "server.log"
    log.write_text("Traceback (most recent call last): before the storm, not counted\n")
    drain = storm._drain

    def drain_then(url, timeout_s=180.0):  # what happens while the server idles after the storm
        stub.storm_done.set()
        if fault == "log":
            with log.open("a") as f:
                f.write("ERROR pool memory leak detected! available_size=10\n")
        return drain(url, timeout_s)

    monkeypatch.setattr(storm, "_drain", drain_then)
    result = run_storm(f"http://127.0.0.1:{stub.server_port}", plan(), log)
    assert broken(result) and not storm_ok(result)


def test_storm_configurations_and_summary():
    configs = e2e.make_configs(2048)
    storms = {name: c for name, c in configs.items() if name.endswith("-storm")}
    assert set(storms) == {"ours-storm", "ours-fp8-storm", "ours-sm80-storm"}
    for name, config in storms.items():
        assert config.work == ("storm",) and "--enable-deterministic-inference" in config.args
        assert config.args[config.args.index("--max-total-tokens") + 1] == "65536"
        assert config.env["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"] == "1"
    assert storms["ours-sm80-storm"].env["SGLANG_SPARSE_MLA_FORCE_SM80"] == "1"
    result = {"sent": 10, "completed": 6, "aborted": 1, "disconnected": 1, "refused": 2, "failed": 0,
              "must_refuse_accepted": 0, "non_finite": 0, "healthy_after": True, "kv_tokens_used_after": 0,
              "log_problems": [], "control": {"identical": 3, "of": 3, "finite": True}, "by_kind": {}}  # fmt: skip
    summary = e2e.summarize({"ours-storm": {"storm": result}}, 0.1, 2.0, 2048)
    assert summary["storm_ours-storm"]["ok"] and "by_kind" not in summary["storm_ours-storm"]
    result["failed"] = 1
    assert not e2e.summarize({"ours-storm": {"storm": result}}, 0.1, 2.0, 2048)["storm_ours-storm"]["ok"]
    broken = e2e.summarize({"ours-storm": {"storm": {"error": "URLError: refused"}}}, 0.1, 2.0, 2048)
    assert broken == {"steps_failed_ours-storm": {"ok": False, "storm": "URLError: refused"}}
