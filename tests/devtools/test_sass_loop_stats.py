"""The SASS hot-loop counter (devtools/sass_loop_stats.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from devtools.sass_loop_stats import loop_stats

ROOT = Path(__file__).resolve().parent.parent.parent

# A prologue, a 5-instruction loop (0x0020 .. 0x0060) with a barrier and an MMA, a short inner
# loop inside it, and an epilogue with a forward branch.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x0080 ;
        /*0020*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/               @P1 BRA 0x0040 ;
        /*0060*/                   BRA 0x0020 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x0080;
"""


def test_the_widest_backward_branch_is_the_loop():
    stats = loop_stats(SASS)
    assert (stats["instructions"], stats["barriers"], stats["mma"]) == (5, 1, 1)
    assert dict(stats["top"])["BRA"] == 2


def test_no_loop_counts_nothing():
    assert loop_stats(SASS.replace("BRA 0x0020", "EXIT").replace("BRA 0x0040", "EXIT"))["instructions"] == 0


def _loop_stats_of(*args: str) -> list[tuple[int, ...]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "devtools" / "sass_loop_stats.py"), *args],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    pattern = r"(\d+) registers, (\d+) B shared; loop: (\d+) instructions, (\d+) barriers, (\d+) MMAs"
    return [tuple(map(int, m)) for m in re.findall(pattern, result.stdout)]


def test_a_compiled_kernel_has_a_loop():
    """The forced-path BF16 kernel at 16 heads, compiled for sm80 as CI compiles it."""
    [(registers, shared, loop, _, mmas)] = _loop_stats_of(r"sm80-bf16-.*block_h=16, block_n=32,.*gluon_sm80=False.*-split$")
    assert 0 < registers <= 255 and shared > 0 and loop > 100 and mmas > 0


def test_sweep_candidates_compile():
    """A Gluon sweep candidate that nothing dispatches yet (one warp a plane, FP8, 16 heads) still
    compiles, and fits two CTAs in an A100's shared memory."""
    [(registers, shared, loop, barriers, mmas)] = _loop_stats_of("--candidates", "sm80-fp8-candidate-.* h16 n32 w4 st2 planes$")
    assert registers <= 255 and 2 * (shared + 1024) <= 164 * 1024 and loop > 100 and barriers <= 6 and mmas > 0
