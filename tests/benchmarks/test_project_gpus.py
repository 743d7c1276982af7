"""The projection of forced-path kernel times to GPUs we cannot borrow (benchmarks/project_gpus.py)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import project_gpus  # noqa: E402

GATHER, COPY, MMA_V2, BF16 = 2000.0, 3000.0, 500.0, 800.0
DEVICE = "NVIDIA H100 80GB HBM3"


def _sparse_mla_run(tmp_path, rows, forced=True):
    path = tmp_path / "mla.json"
    ceilings = {"copy_gbs": COPY, "bf16_tflops": BF16, "mma_v2_tflops": MMA_V2,
                "gather_gbs": {"1152": GATHER, "656": GATHER / 2}}  # fmt: skip
    path.write_text(json.dumps({"device": DEVICE, "forced_sm80": forced, "ceilings": ceilings, "rows": rows}))
    return path


def _row(phase, tokens, us, gbs, tflops, kv="bf16", impl="ours"):
    return dict(phase=phase, tokens=tokens, heads=16, kv=kv, impl=impl, us=us, gbs=gbs, tflops=tflops)


def test_a_kernel_keeps_its_share_of_the_roofline(tmp_path, monkeypatch):
    bandwidth, tensor = project_gpus.DATASHEETS[DEVICE]
    # Half the bandwidth and the tensor rate of the measured GPU; a memory-bound decode at 50% of the
    # gather ceiling and a prefill at 25% of mma_v2.
    monkeypatch.setattr(project_gpus, "TARGETS", {"half": (bandwidth / 2, tensor * MMA_V2 / BF16 / 2, "test")})
    rows = [
        _row("decode", 32, us=100.0, gbs=GATHER / 2, tflops=1.0),
        _row("prefill", 4096, us=1000.0, gbs=10 * GATHER, tflops=MMA_V2 / 4),
        _row("decode", 1, us=10.0, gbs=GATHER / 2, tflops=1.0),  # latency-bound: not projected
        _row("decode", 32, us=50.0, gbs=GATHER, tflops=1.0, impl="ours[h16 n32 w4 st2 s=None]"),  # a sweep row
    ]
    projected = project_gpus.sparse_mla_rows(_sparse_mla_run(tmp_path, rows))
    assert [r["kernel"] for r in projected] == ["sparse MLA decode bf16 H=16 T=32", "sparse MLA prefill bf16 H=16 T=4096"]
    decode, prefill = projected
    assert decode["efficiency"] == pytest.approx(0.5) and decode["half"] == pytest.approx(200.0)
    # The prefill's logical bytes (10x the gather ceiling) must not bind it: FLOPs alone.
    assert prefill["efficiency"] == pytest.approx(0.25) and prefill["half"] == pytest.approx(2000.0)


def test_runs_off_the_forced_path_or_on_unknown_gpus_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a forced SM80 run"):
        project_gpus.sparse_mla_rows(_sparse_mla_run(tmp_path, [], forced=False))
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"device": "NVIDIA B200", "forced_sm80": True, "ceilings": {}, "rows": []}))
    with pytest.raises(SystemExit, match="no datasheet figures"):
        project_gpus.sparse_mla_rows(path)
