"""The serving helpers that need no server: response parsing, greedy comparison, staging parts."""

from __future__ import annotations

import contextlib
import math
import random
import zipfile
from pathlib import Path

import pytest

from sglang_sparse_mla.testing.serving import e2e
from sglang_sparse_mla.testing.serving.client import Completion
from sglang_sparse_mla.testing.serving.workload import (
    bit_identical,
    compare_greedy,
    first_logprob_difference,
    logprob_difference,
    shared_prefix_prompts,
    token_prompts,
)


def response(ids, logprobs, top2, input_logprobs=None, cached=0):
    """A ``/generate`` item as SGLang 0.5.23 returns it (``[logprob, token_id, text]`` entries)."""
    meta = {
        "prompt_tokens": 10,
        "cached_tokens": cached,
        "output_token_logprobs": [[lp, i, None] for lp, i in zip(logprobs, ids, strict=True)],
        "output_top_logprobs": [[[a, 7, None], [b, 8, None]] for a, b in top2],
    }
    if input_logprobs is not None:
        meta["input_token_logprobs"] = [[None, 0, None]] + [[lp, 1, None] for lp in input_logprobs]
    return {"text": "x", "output_ids": ids, "meta_info": meta}


def test_completion_from_response():
    c = Completion.from_response(response([5, 6], [-0.5, -1.0], [(-0.5, -2.0), (-1.0, -1.05)], [-3.0, -4.0], 64))
    assert c.output_ids == [5, 6] and c.logprobs == [-0.5, -1.0] and c.cached_tokens == 64
    assert c.top2_margin == pytest.approx([1.5, 0.05]) and c.input_logprobs == [-3.0, -4.0] and c.finite
    assert c.spec_verify_ct == 0  # no speculative decoding: SGLang sends none
    assert not Completion.from_response(response([5], [float("nan")], [(-1.0, -2.0)])).finite
    assert not Completion.from_response(response([], [], [])).finite
    assert Completion(**c.to_json()) == c


def test_greedy_comparison_tolerates_near_ties_only():
    a = Completion.from_response(response([1, 2, 3], [-1, -1, -1], [(-1, -2), (-1, -1.02), (-1, -3)]))
    same = compare_greedy(a, a)
    assert same.identical and same.agrees() and same.describe() == "identical (3 tokens)"
    tie = compare_greedy(
        a, Completion.from_response(response([1, 9, 3], [-1, -1, -1], [(-1, -2), (-1, -1.5), (-1, -3)]))
    )
    assert tie.first_difference == 1 and tie.margin == pytest.approx(0.02) and tie.agrees()
    assert not tie.agrees(tie_margin=0.01) and tie.describe().startswith("near-tie at token 1")
    real = compare_greedy(a, Completion.from_response(response([9, 2, 3], [-1, -1, -1], [(-1, -2)] * 3)))
    assert not real.agrees() and real.describe().startswith("DIVERGED at token 0")


def test_logprob_difference_and_prompts():
    assert logprob_difference([-1.0, -2.0], [-1.5, -2.0, -9.0]) == {"n": 2, "max_abs": 0.5, "mean_abs": 0.25}
    assert math.isnan(logprob_difference([float("nan")], [0.0])["max_abs"])
    a = Completion.from_response(response([1, 2, 3], [-1.0, -2.0, -3.0], [(-1, -2)] * 3))
    b = Completion.from_response(response([1, 2, 3], [-1.0, -2.5, -9.0], [(-1, -2)] * 3))
    assert first_logprob_difference(a, a) is None and first_logprob_difference(a, b) == (1, 0.5)
    assert bit_identical(a, a) and not bit_identical(a, b)
    prompts = shared_prefix_prompts(3)
    prefix = prompts[0][: prompts[0].index("Question")]
    assert all(p.startswith(prefix) for p in prompts) and len(set(prompts)) == 3
    assert token_prompts([4, 2], seed=1) == token_prompts([4, 2], seed=1) != token_prompts([4, 2], seed=2)


def test_stage_parts_round_trip(tmp_path):
    """pack (recompress, split, manifest) -> receive over two calls -> assemble: the same wheels."""
    from devtools.gpu_machine import stage_parts

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    contents = {}
    for i in range(3):
        name = f"pkg{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheels / name, "w") as z:
            z.writestr(f"pkg{i}/__init__.py", "x = 1\n" * 5000)
            z.writestr(f"pkg{i}/data.bin", random.Random(i).randbytes(700_000))  # incompressible
        with zipfile.ZipFile(wheels / name) as z:
            contents[name] = {n: z.read(n) for n in z.namelist()}
    stage = tmp_path / "stage"
    stage.mkdir()
    stage_parts.pack("core", wheels, stage, part_mib=1, jobs=1)
    parts = sorted((stage / "parts").iterdir())
    assert len(parts) >= 2 and all(p.stat().st_size <= 1 << 20 for p in parts)

    store = tmp_path / "store"
    for index, (call, still_missing) in enumerate(((parts[:1], len(parts) - 1), (parts[1:], 0))):
        carried = tmp_path / f"call{index}"  # what one GPU call carries: the manifest and some parts
        (carried / "parts").mkdir(parents=True)
        (carried / "MANIFEST.tsv").write_bytes((stage / "MANIFEST.tsv").read_bytes())
        for part in call:
            (carried / "parts" / part.name).write_bytes(part.read_bytes())
        stage_parts.receive(carried, store)
        assert len(stage_parts.missing_parts(carried, store)["core"]) == still_missing
    unpacked = stage_parts.assemble(stage, store, "core")
    for name, members in contents.items():
        with zipfile.ZipFile(unpacked / name) as z:
            assert {n: z.read(n) for n in z.namelist()} == members
            assert all(info.compress_type == zipfile.ZIP_LZMA for info in z.infolist())

    (store / parts[0].name).write_bytes(b"corrupt")
    (stage / "parts" / parts[0].name).write_bytes(b"corrupt")
    with pytest.raises(SystemExit, match="SHA-256"):
        stage_parts.receive(stage, store)


def test_e2e_summary_of_recorded_results():
    """The e2e comparisons over results as the GPU runs record them (no server needed)."""
    topk = 2  # teacher positions 0, 1 dense, 2, 3 sparse

    def completions(ids_list, shift=0.0, input_logprobs=(), sparse_shift=None):
        items = [response(ids, [-1.0 - shift] * len(ids), [(-1.0, -1.5)] * len(ids)) for ids in ids_list]
        out = [Completion.from_response(item).to_json() for item in items]
        for c in out:
            c["input_logprobs"] = [
                x + (shift if j < topk or sparse_shift is None else sparse_shift) for j, x in enumerate(input_logprobs)
            ]
        return {"completions": out}

    same = [[1, 2, 3], [4, 5]]
    teacher = (-2.0, -3.0, -2.5, -4.0)
    results = {
        "ours": {
            "radix": completions(same),
            "teacher": completions(same, input_logprobs=teacher),
            "greedy": completions(same),
            "soak": {"requests": 32, "tokens": 96000, "min_steps": e2e.SOAK_STEPS, "non_finite": 0, "seconds": 9.0},
            "throughput": {
                "levels": [
                    {
                        "concurrency": 1,
                        "output_tok_per_s": 812.25,
                        "ttft_p50_s": 0.0251,
                        "decode_tok_per_s_per_request_p50": 901.04,
                    }
                ]
            },
        },
        "ours-no-radix": {"one_by_one": completions([[1, 2, 3], [4, 6]])},
        "ours-fp8": {
            "profile": {
                "levels": [
                    {"batch": 32, "device_us_per_step": 410.04, "busy_us_per_step": 380.0, "span_us_per_step": 400.0,
                     "layer": {"anchor": "attn", "period_us": 98.76}},
                    {"batch": 1, "device_us_per_step": 210.0, "busy_us_per_step": 200.0, "span_us_per_step": 300.0,
                     "layer": None},
                ],
                "prefill": {"prompt_tokens": 8192, "steps": 1, "busy_us_per_step": 1234.5},
            }
        },
        "ours-det": {"radix": completions(same)},
        "ours-det-no-radix": {"one_by_one": completions(same)},
        # ours is 0.01 from dsa everywhere; fallback is 0.01 (dense) and 0.04 (sparse) from dsa.
        "dsa": {"teacher": completions(same, 0.01, teacher), "greedy": completions([[1, 2, 3], [9, 5]])},
        "fallback": {"teacher": completions(same, 0.0, teacher, sparse_shift=0.05)},
        "ours-tp2": {"error": "server exited with 1:\nRuntimeError: NCCL"},
    }
    summary = e2e.summarize(results, tie_margin=0.1, max_spread_ratio=2.0, index_topk=topk)
    # Default numerics are batch dependent: reported, not judged; deterministic mode must be exact.
    default_radix = summary["radix_vs_no_radix_ours"]
    assert default_radix["ok"] is None and not default_radix["agree_up_to_near_ties"]
    assert default_radix["matches"][1].startswith("DIVERGED at token 1")
    assert summary["radix_vs_no_radix_ours-det"]["ok"]
    results["ours-det-no-radix"] = {"one_by_one": completions(same, shift=1e-3)}  # same tokens, other logprobs
    assert not e2e.summarize(results, 0.1, 2.0, topk)["radix_vs_no_radix_ours-det"]["ok"]
    ours_dsa = summary["ours_vs_dsa"]
    assert ours_dsa["teacher"][0]["mean_abs"] == pytest.approx(0.01)
    assert ours_dsa["teacher_by_region"]["dense"] == {"n": 4, "mean_abs": pytest.approx(0.01)}
    assert ours_dsa["spread_ratio"] == {"dense": pytest.approx(1.0), "sparse": pytest.approx(0.25)}
    assert ours_dsa["greedy"][1].startswith("DIVERGED at token 0") and ours_dsa["ok"]
    assert summary["fallback_vs_dsa"]["teacher_by_region"]["sparse"]["mean_abs"] == pytest.approx(0.04)
    assert "ok" not in summary["fallback_vs_dsa"]  # the spread itself is reported
    assert summary["soak_ours"]["ok"] and summary["throughput_output_tok_per_s"] == {"ours": {"1": 812.2}}
    assert summary["ttft_p50_ms"] == {"ours": {"1": 25.1}}
    assert summary["decode_tok_per_s_per_request_p50"] == {"ours": {"1": 901.0}}
    assert "NCCL" in summary["not_run"]["ours-tp2"]
    assert summary["decode_step_busy_us"] == {"ours-fp8": {"32": 380.0, "1": 200.0}}
    assert summary["decode_step_device_us"] == {"ours-fp8": {"32": 410.0, "1": 210.0}}
    assert summary["decode_layer_us"] == {"ours-fp8": {"32": 98.8}}  # batch 1 had no once-a-layer kernel
    assert summary["prefill_busy_us"] == {"ours-fp8": {"8192": 1234.5}}

    # MTP: speculative greedy output against plain, exact in deterministic mode; accept lengths.
    results["ours-det"]["greedy"] = completions(same)
    results["ours-det-mtp"] = {"greedy": completions(same)}
    results["ours-mtp"] = {"greedy": completions([[1, 2, 3], [4, 9]])}
    results["dsa-mtp"] = {"greedy": completions([[1, 2, 3], [9, 5]])}
    for name, verify_steps in (("ours-det-mtp", (2, 1)), ("ours-mtp", (1, 1)), ("dsa-mtp", (1, 1))):
        for c, steps in zip(results[name]["greedy"]["completions"], verify_steps, strict=True):
            c["spec_verify_ct"] = steps
    summary = e2e.summarize(results, 0.1, 2.0, topk)
    assert summary["mtp_vs_plain_ours-det-mtp"]["ok"] and summary["mtp_vs_plain_ours-mtp"]["ok"] is None
    assert summary["mtp_vs_plain_ours-mtp"]["matches"][1].startswith("DIVERGED at token 1")
    assert summary["mtp_vs_plain_dsa-mtp"]["matches"] == ["identical (3 tokens)", "identical (2 tokens)"]
    assert summary["mtp_accept_length"] == {"ours-det-mtp": 1.667, "ours-mtp": 2.5, "dsa-mtp": 2.5}
    results["ours-det-mtp"]["greedy"]["completions"][0]["logprobs"][2] += 1e-6  # same tokens, other bits
    assert not e2e.summarize(results, 0.1, 2.0, topk)["mtp_vs_plain_ours-det-mtp"]["ok"]

    results["ours"]["teacher"] = completions(same, 0.0, teacher, sparse_shift=0.1)  # 0.09 sparse: 2.25x spread
    results["ours"]["soak"]["non_finite"] = 3
    results["ours-det-no-radix"] = {"one_by_one": completions([[1, 2, 3], [4, 6]])}
    summary = e2e.summarize(results, 0.1, 2.0, topk)
    assert summary["ours_vs_dsa"]["spread_ratio"]["sparse"] == pytest.approx(2.25) and not summary["ours_vs_dsa"]["ok"]
    assert not summary["soak_ours"]["ok"] and not summary["radix_vs_no_radix_ours-det"]["ok"]
    del results["fallback"]  # no spread measured: reported only
    assert "ok" not in e2e.summarize(results, 0.1, 2.0, topk)["ours_vs_dsa"]


def test_e2e_configs_and_workloads_follow_the_model_shape(tmp_path, monkeypatch, capsys):
    """SGLang's DSA paths keep sgl-kernel's top-k where the model allows it (index_topk 2048); one
    results folder holds one model."""
    from sglang_sparse_mla.testing.tiny_model import SHAPES, tiny_config

    native, small = e2e.make_configs(2048), e2e.make_configs(256)
    assert "--dsa-topk-backend" not in native["dsa"].args and native["dsa"].env == {}
    topk_flag = small["fallback"].args.index("--dsa-topk-backend")
    assert small["fallback"].args[topk_flag + 1] == "torch" and small["dsa"].env
    assert tuple(native) == e2e.CONFIG_NAMES and set(e2e.WORKLOADS) == set(SHAPES)
    # The forced SM80 path: our backend with the environment that selects it, BF16 and FP8 KV.
    forced = {name: c for name, c in native.items() if name.startswith("ours-sm80")}
    assert set(forced) == {
        "ours-sm80", "ours-sm80-fp8", "ours-sm80-det", "ours-sm80-det-no-radix",
        "ours-sm80-mtp", "ours-sm80-mtp-fp8", "ours-sm80-det-mtp", "ours-sm80-storm",
    }  # fmt: skip
    assert all(c.env.get("SGLANG_SPARSE_MLA_FORCE_SM80") == "1" and c.args[:2] == e2e.OURS for c in forced.values())
    assert forced["ours-sm80-fp8"].args[-2:] == ("--kv-cache-dtype", "fp8_e4m3")
    # MTP: SGLang's flags for DSA models on every path; each exact pair's plain side greedy-decodes too.
    mtp = {name: c for name, c in native.items() if "-mtp" in name}
    assert set(mtp) == {f"{p}-mtp{k}" for p in ("ours", "ours-sm80") for k in ("", "-fp8")} | {
        "ours-det-mtp", "ours-sm80-det-mtp", "dsa-mtp"
    }
    for name, config in mtp.items():
        start = config.args.index("--speculative-algorithm")
        assert config.args[start : start + len(e2e.MTP)] == e2e.MTP and "greedy" in config.work, name
        assert ("--kv-cache-dtype", "fp8_e4m3") == config.args[-2:] if "fp8" in name else "fp8_e4m3" not in config.args
    for with_mtp, plain, _ in e2e.MTP_PAIRS:
        assert native[with_mtp].env == native[plain].env and "greedy" in native[plain].work
        assert [a for a in native[with_mtp].args if a not in e2e.MTP] == list(native[plain].args)
    for shape, workload in e2e.WORKLOADS.items():
        config = tiny_config("deepseek-v3.2", shape)
        assert max(workload.teacher_lengths) > 2 * config["index_topk"]  # well into the sparse region
        assert workload.input_tokens + workload.output_tokens <= config["max_position_embeddings"]
    assert e2e.WORKLOADS["released"].requests(1) == 4 and e2e.WORKLOADS["small"].requests(32) == 128

    (tmp_path / "results.json").write_text('{"_meta": {"arch": "deepseek-v3.2", "gpu": "H200"}}')
    monkeypatch.setattr("sys.argv", ["run_e2e.py", "--out", str(tmp_path), "--configs", "ours", "--shape", "released"])
    with pytest.raises(SystemExit) as exit_info:
        e2e.main()
    assert exit_info.value.code == 2 and "another model" in capsys.readouterr().err
    assert not list(tmp_path.glob("model-*"))
    # Results of the released shape recorded without a layer count are of its 2 layers.
    (tmp_path / "results.json").write_text('{"_meta": {"arch": "deepseek-v3.2", "shape": "released", "seed": 0}}')
    argv = ["run_e2e.py", "--out", str(tmp_path), "--configs", "ours", "--shape", "released", "--layers", "3"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        e2e.main()
    assert exit_info.value.code == 2 and "'layers': 2" in capsys.readouterr().err


def test_throughput_warm_up_caches_none_of_the_timed_prompts():
    """A warm-up prompt left in the radix cache would make a timed request a cached-prefix
    extend whose kernels were never compiled: the warm-up's prompts are distinct."""
    workload = e2e.WORKLOADS["released-tp8"]
    for concurrency in e2e.CONCURRENCY:
        timed, warm_up = e2e.throughput_prompts(workload, concurrency)
        assert len(timed) == workload.requests(concurrency) and len(warm_up) == concurrency
        assert {len(p) for p in timed + warm_up} == {workload.input_tokens}
        assert not {tuple(p[:64]) for p in timed} & {tuple(p[:64]) for p in warm_up}
        assert timed == e2e.throughput_prompts(workload, concurrency)[0]  # the same prompts for every backend
    assert e2e.make_configs(2048)["fallback"].min_startup_s >= 600 > e2e.make_configs(2048)["ours"].min_startup_s
    # The fallback captures the batches its timed work decodes at, no others (each compiles kernels).
    fallback = e2e.make_configs(2048)["fallback"].args
    graphs = fallback[fallback.index("--cuda-graph-bs-decode") + 1 :]
    assert tuple(map(int, graphs)) == e2e.FALLBACK_GRAPH_BATCHES
    assert set(e2e.CONCURRENCY) | set(e2e.PROFILE_BATCHES) == set(e2e.FALLBACK_GRAPH_BATCHES)


def test_stream_generate_times_first_token(tmp_path):
    """TTFT and token count from a server-sent ``/generate`` stream (a local stub server)."""
    import http.server
    import threading
    import time

    from sglang_sparse_mla.testing.serving.client import stream_generate

    class Streamer(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for n in (1, 2, 3):
                time.sleep(0.05)
                self.wfile.write(f'data: {{"text": "x", "meta_info": {{"completion_tokens": {n}}}}}\n\n'.encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Streamer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    first_tokens = []
    try:
        timing = stream_generate(
            f"http://127.0.0.1:{server.server_port}", [1, 2, 3], 3, on_first_token=lambda: first_tokens.append(1)
        )
    finally:
        server.shutdown()
    assert timing.output_tokens == 3 and first_tokens == [1]
    assert 0.05 <= timing.ttft_s < timing.total_s and timing.total_s >= 0.15
    assert timing.decode_tok_per_s == pytest.approx(2 / (timing.total_s - timing.ttft_s))


def test_e2e_work_selects_steps_of_each_configuration(tmp_path, monkeypatch, capsys):
    """--work runs only the named steps of each configuration's own work; unknown steps are refused."""
    ran: dict[str, tuple[str, ...]] = {}

    def run_config(name, config, workload, model, out, startup_timeout):
        ran[name] = config.work
        return {}

    monkeypatch.setattr(e2e, "run_config", run_config)
    monkeypatch.setattr(e2e, "write_tiny_model", lambda *args: None)
    monkeypatch.setattr(e2e.torch.cuda, "get_device_name", lambda: "stub GPU")
    argv = ["run_e2e.py", "--out", str(tmp_path), "--configs", "ours,fallback", "--work", "teacher,throughput,soak"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        e2e.main()
    assert exit_info.value.code == 0
    assert ran == {"ours": ("teacher", "soak", "throughput"), "fallback": ("teacher", "throughput")}

    monkeypatch.setattr("sys.argv", [*argv[:-1], "teacher,warmup"])
    with pytest.raises(SystemExit) as exit_info:
        e2e.main()
    assert exit_info.value.code == 2 and "unknown work ['warmup']" in capsys.readouterr().err


def _trace(*events):
    """Chrome-trace events from ``(category, name, start, duration[, stream])``."""
    return {
        "traceEvents": [
            {"ph": "X", "cat": c, "name": n, "ts": t, "dur": d, "args": {"stream": rest[0] if rest else 7}}
            for c, n, t, d, *rest in events
        ]
    }


def test_kernel_table_sums_device_work_per_step():
    from sglang_sparse_mla.testing.serving.decode_profile import kernel_table

    trace = _trace(
        ("kernel", "attn", 0.0, 30.0),
        ("kernel", "topk", 30.0, 10.0),
        ("kernel", "gemm", 20.0, 15.0, 9),  # on another stream, overlapping attn and topk
        ("cpu_op", "aten::mm", 0.0, 500.0),  # host work: not device time
        ("kernel", "attn", 50.0, 30.0),
        ("gpu_memcpy", "Memcpy DtoD", 80.0, 5.0),
        ("kernel", "topk", 90.0, 10.0),
    )
    table = kernel_table(trace, steps=2, top=2)
    assert table["device_us_per_step"] == pytest.approx(50.0) and table["span_us_per_step"] == pytest.approx(50.0)
    # Busy: [0, 40] and [50, 100] less the idle [85, 90].
    assert table["busy_us_per_step"] == pytest.approx(42.5)
    assert table["stream_us_per_step"] == {"7": pytest.approx(42.5), "9": pytest.approx(7.5)}
    assert [k["name"] for k in table["kernels"]] == ["attn", "topk"]
    attn = table["kernels"][0]
    assert attn["calls_per_step"] == 1 and attn["us_per_step"] == 30 and attn["share"] == pytest.approx(60 / 100)
    with pytest.raises(ValueError, match="no device work"):
        kernel_table(_trace(("cpu_op", "aten::mm", 0.0, 1.0)), steps=1)
    with pytest.raises(ValueError, match="steps"):
        kernel_table(trace, steps=0)


@contextlib.contextmanager
def _profiling_stub_server(events: list):
    """A stand-in for SGLang's HTTP server: ``/start_profile`` writes a trace of
    ``num_steps`` 40 us steps into its ``output_dir``; ``/generate`` streams two
    tokens, the first after a delay of ``0.05 s * input_ids[0]``. ``events``
    records the order of profile starts and first tokens."""
    import gzip
    import http.server
    import json
    import threading
    import time

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()
            if self.path == "/start_profile":
                events.append("profile")
                trace = _trace(("kernel", "attn", 0.0, 40.0 * body["num_steps"]))
                with gzip.open(Path(body["output_dir"]) / "x-TP-0.trace.json.gz", "wt") as handle:
                    json.dump(trace, handle)
                self.wfile.write(b"Start profiling.\n")
                return
            time.sleep(0.05 * body["input_ids"][0])  # staggered prefill
            events.append("first")
            self.wfile.write(b'data: {"meta_info": {"completion_tokens": 1}}\n\n')
            self.wfile.flush()
            time.sleep(0.5)
            self.wfile.write(b'data: {"meta_info": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_profile_decode_starts_the_profile_once_every_request_decodes(tmp_path):
    """profile_decode against a stub server: ``/start_profile`` comes after every first token
    and the trace the server writes is read back (and kept where asked)."""
    from sglang_sparse_mla.testing.serving.decode_profile import profile_decode

    events = []
    keep = tmp_path / "traces" / "decode.trace.json.gz"
    with _profiling_stub_server(events) as url:
        result = profile_decode(url, [[1], [2], [3]], 2, steps=4, timeout=30, keep_trace=keep)
    assert events[:4] == ["first"] * 3 + ["profile"]
    assert result["batch"] == 3 and result["device_us_per_step"] == pytest.approx(40.0)
    assert keep.stat().st_size > 0


def test_profile_prefill_profiles_the_prompt_sent_after_the_start(tmp_path):
    from sglang_sparse_mla.testing.serving.decode_profile import profile_prefill

    events = []
    keep = tmp_path / "prefill.trace.json.gz"
    with _profiling_stub_server(events) as url:
        result = profile_prefill(url, [1, 5, 5], steps=2, timeout=30, keep_trace=keep)
    assert events == ["profile", "first"]
    assert result["prompt_tokens"] == 3 and result["busy_us_per_step"] == pytest.approx(40.0)
    assert keep.stat().st_size > 0


def test_profile_decode_fails_fast_when_a_request_fails():
    """A request that errors out ends the wait at once, with the failure in the message."""
    import http.server
    import threading

    from sglang_sparse_mla.testing.serving.decode_profile import profile_decode

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="2 of 2 requests have no first token; first failure: HTTPError"):
            profile_decode(f"http://127.0.0.1:{server.server_port}", [[1], [2]], 2, steps=4, timeout=300)
    finally:
        server.shutdown()


def test_layer_timeline_medians_of_the_typical_layer():
    """Periods start at the anchor; the most common kernel sequence wins, the odd period
    (an extra kernel) is left out; starts are relative to the anchor, medians over periods."""
    from sglang_sparse_mla.testing.serving.layer_timeline import format_timeline, layer_timeline, per_layer_anchor

    events = []
    for layer, t0 in enumerate((0.0, 100.0, 200.0, 300.0)):
        jitter = (0.0, 2.0, 4.0, 6.0)[layer]
        events += [("kernel", "attn", t0, 40.0), ("kernel", "gemm", t0 + 10.0 + jitter, 20.0, 9)]
        events.append(("kernel", "topk", t0 + 50.0, 10.0 + jitter))
        if layer == 2:
            events.append(("kernel", "stray", t0 + 70.0, 1.0))
    events.append(("kernel", "attn", 400.0, 40.0))
    timeline = layer_timeline(_trace(*events), anchor="attn")
    assert (timeline.layers, timeline.periods, timeline.period_us) == (3, 4, 100.0)
    assert [(e.name, e.stream) for e in timeline.entries] == [("attn", "7"), ("gemm", "9"), ("topk", "7")]
    assert [e.start_us for e in timeline.entries] == [0.0, 12.0, 50.0]
    assert [e.duration_us for e in timeline.entries] == [40.0, 20.0, 12.0]
    assert "3 of 4 periods" in format_timeline(timeline)
    table = [{"name": "moe", "calls_per_step": 8.0}, {"name": "attn", "calls_per_step": 4.0}]
    assert per_layer_anchor(table, layers=4) == "attn" and per_layer_anchor(table, layers=3) is None
    with pytest.raises(ValueError, match="need two or more"):
        layer_timeline(_trace(("kernel", "attn", 0.0, 1.0)), anchor="attn")


def test_layer_timeline_takes_the_exact_kernel_name_first():
    """A kernel's full name as anchor cuts only at that kernel, although another kernel's name
    contains it (ours ``_topk_kernel`` and the MoE router's ``deepseek_v3_topk_kernel``); a part of
    a name still matches every kernel that contains it."""
    from sglang_sparse_mla.testing.serving.layer_timeline import layer_timeline

    events = []
    for t0 in (0.0, 100.0, 200.0):
        events += [("kernel", "_topk_kernel", t0, 20.0), ("kernel", "deepseek_v3_topk_kernel", t0 + 50.0, 3.0)]
    assert layer_timeline(_trace(*events), anchor="_topk_kernel").period_us == 100.0
    assert layer_timeline(_trace(*events), anchor="topk").period_us == 50.0


def test_e2e_typical_layer_of_a_kept_trace(tmp_path):
    """The e2e run cuts a kept decode trace at its longest once-a-layer kernel (not the twice-a-layer one)."""
    import gzip
    import json

    from sglang_sparse_mla.testing.serving.decode_profile import kernel_table

    events = []
    for layer in range(4):  # one step of 4 layers: moe twice a layer (longer in total), attn once
        t0 = 100.0 * layer
        events += [("kernel", "attn", t0, 30.0), ("kernel", "moe", t0 + 40.0, 20.0), ("kernel", "moe", t0 + 70.0, 20.0)]
    trace = _trace(*events)
    path = tmp_path / "decode-b1.trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(trace, handle)
    kernels = kernel_table(trace, steps=1)["kernels"]
    assert kernels[0]["name"] == "moe"
    layer = e2e.typical_layer(path, kernels, layers=4)
    assert layer["anchor"] == "attn" and layer["period_us"] == 100.0 and layer["layers"] == 3
    assert e2e.typical_layer(path, kernels, layers=5) is None
