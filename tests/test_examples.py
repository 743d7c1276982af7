"""``examples/``: each runs as a user would run it (tiny sizes under the interpreter), and the example's
softmax scale is the one SGLang gives the backend for DeepSeek-V3.2."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DECODE_EXAMPLE = EXAMPLES / "sparse_mla_decode.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_sparse_mla_decode_example_runs(target, kv_dtype):
    sizes = target.pick(cpu=["--heads", "16", "--topk", "32", "--batch", "2", "--context", "100"], gpu=[])
    env = dict(os.environ)
    if not target.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run of a GPU machine's forced-CPU suite
    result = subprocess.run(
        [sys.executable, str(DECODE_EXAMPLE), *sizes, "--kv-dtype", kv_dtype],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "PASS" and "vs float64 reference" in lines[-2]
    assert "sm_scale 0.1352" in result.stdout


def test_sparse_mla_decode_example_scale_is_sglangs():
    """The example's ``sm_scale`` formula against SGLang's own (what ``layer.scaling`` holds)."""
    example = _load(DECODE_EXAMPLE)
    plain = example.softmax_scale(128, 64, None)
    assert plain == pytest.approx(192**-0.5)
    assert example.softmax_scale(128, 64, {"rope_type": "default"}) == plain
    released = example.softmax_scale(example.QK_NOPE_HEAD_DIM, example.QK_ROPE_HEAD_DIM, example.ROPE_SCALING)
    assert released == pytest.approx(0.13523, abs=1e-5)
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("SGLang is not installed")
    from sglang.srt.configs.model_config import compute_mla_mscale_scaling

    assert released == pytest.approx(compute_mla_mscale_scaling(dict(example.ROPE_SCALING), plain), rel=1e-12)
    tiny = {"type": "yarn", "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # the tiny model's
    assert example.softmax_scale(128, 64, tiny) == pytest.approx(compute_mla_mscale_scaling(tiny, plain), rel=1e-12)
