"""Compile Triton kernels for a named GPU target without a GPU.

``triton.compile`` lowers a kernel for any CUDA compute capability on a CPU
machine; ``cuobjdump`` (shipped with Triton) then reports the registers and
the stack frame ptxas gave it, and its SASS shows whether the kernel touches
local memory at all (``STL``/``LDL``: register spills, or arrays LLVM put on
the stack). The tests use this to prove that every configuration a launcher
can pick fits each supported architecture: within its shared memory, with no
local-memory instruction. A stack frame alone is not a spill: Triton 3.6
declares an unused one-byte local depot in some kernels (8 bytes of frame,
never read or written).

The test session runs Triton in interpreter mode, where ``@triton.jit``
returns functions that cannot be compiled, so compilation happens in worker
processes started without ``TRITON_INTERPRET``: :func:`compile_many` sends
them the jobs (kernel named by module and attribute) and collects reports.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# Opt-in shared memory per block, bytes, of every arch the package supports: A100/A800, RTX 30 /
# A10, RTX 40 / L40, H100/H200, B200, Thor, RTX 50, DGX Spark (GB10).
SHARED_MEMORY_LIMIT = {
    80: 163 * 1024,
    86: 99 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
    100: 227 * 1024,
    110: 227 * 1024,
    120: 99 * 1024,
    121: 99 * 1024,
}


@functools.lru_cache(maxsize=None)
def toolchain_accepts(capability: int) -> bool:
    """Whether this Triton's ptxas can target ``sm_<capability>`` (Triton 3.6's has no sm_110,
    for one): the archs its ``--help`` lists for ``--gpu-name``."""
    from triton.backends.nvidia.compiler import get_ptxas

    listing = subprocess.run([get_ptxas(capability).path, "--help"], capture_output=True, text=True).stdout
    return f"sm_{capability}" in re.findall(r"sm_\d+", listing)


def compile_targets() -> dict[int, int]:
    """``SHARED_MEMORY_LIMIT`` restricted to the archs this Triton can compile for."""
    return {cap: limit for cap, limit in SHARED_MEMORY_LIMIT.items() if toolchain_accepts(cap)}


@dataclass(frozen=True)
class CompileJob:
    """``kernel`` is ``"package.module:function"``; ``signature`` maps every
    non-constexpr argument to a Triton type string ("*bf16", "i32", ...);
    ``aligned`` names the arguments a real launch specializes as 16-divisible
    (aligned base pointers, strides)."""

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    capability: int
    num_warps: int
    num_stages: int
    aligned: tuple[str, ...] = ()
    maxnreg: int | None = None  # the launch's register cap per thread, if it sets one


@dataclass(frozen=True)
class CompileReport:
    shared_bytes: int
    registers: int
    local_accesses: int  # STL/LDL instructions in the SASS: spills or stack arrays
    stack_bytes: int = 0
    error: str | None = None


def _compile(fn, signature, constexprs, capability, num_warps, num_stages, aligned=(), maxnreg=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature) | {k: "constexpr" for k in constexprs}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource
    if type(fn).__name__ == "GluonJITFunction":  # Gluon kernels (only Tritons with Gluon make them)
        from triton.experimental.gluon._runtime import GluonASTSource as source
    return triton.compile(
        source(fn, sig, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages} | ({"maxnreg": maxnreg} if maxnreg else {}),
    )


def _cuobjdump(cubin: bytes, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    import triton.backends.nvidia as nvidia_backend

    cuobjdump = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, *args, f.name], capture_output=True, text=True, check=check)


def job_sass(job: CompileJob) -> tuple[str, int, int]:
    """``(SASS text, registers, shared bytes)`` of a job, compiled in this process (not in
    interpreter mode)."""
    import importlib

    module, name = job.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    kernel = _compile(fn, job.signature, job.constexprs, job.capability, job.num_warps, job.num_stages, job.aligned,
                      job.maxnreg)  # fmt: skip
    usage = _cuobjdump(kernel.asm["cubin"], "--dump-resource-usage").stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    return _cuobjdump(kernel.asm["cubin"], "--dump-sass").stdout, registers, kernel.metadata.shared


def compile_for_target(
    fn, signature, constexprs, capability, num_warps, num_stages, aligned=(), maxnreg=None
) -> CompileReport:
    """Compile a ``@triton.jit`` or ``@gluon.jit`` kernel (not interpreted) for ``sm_<capability>``."""
    kernel = _compile(fn, signature, constexprs, capability, num_warps, num_stages, aligned, maxnreg)
    cubin = kernel.asm["cubin"]
    usage = _cuobjdump(cubin, "--dump-resource-usage").stdout
    fields = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    stack = fields.get("STACK", 0) + fields.get("LOCAL", 0)
    # Without a frame there is no local memory to touch; the SASS (up to a second a kernel) only when there is.
    sass = _cuobjdump(cubin, "--dump-sass", check=False) if stack else None
    if sass is None:
        local_accesses = 0
    elif sass.returncode == 0:
        local_accesses = len(re.findall(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\s", sass.stdout))
    else:  # an older cuobjdump that cannot disassemble this arch (Triton 3.6's, sm_121): any frame counts
        local_accesses = stack
    return CompileReport(kernel.metadata.shared, fields.get("REG", 0), local_accesses, stack)


def _compile_one(job: dict) -> dict:
    import importlib

    module, name = job["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        report = compile_for_target(
            fn, job["signature"], job["constexprs"], job["capability"], job["num_warps"], job["num_stages"], job["aligned"],
            job["maxnreg"],
        )
    except Exception as err:  # reported per job; the test shows the message
        report = CompileReport(0, 0, 0, error=f"{type(err).__name__}: {err}")
    return asdict(report)


def _worker_main() -> None:
    jobs = json.load(sys.stdin)
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        json.dump(list(pool.map(_compile_one, jobs)), sys.stdout)


def compile_many(jobs: list[CompileJob]) -> list[CompileReport]:
    """Compile every job (in parallel, outside interpreter mode) and report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        input=json.dumps([asdict(j) for j in jobs]),
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compile worker failed:\n{proc.stderr[-4000:]}")
    return [CompileReport(**r) for r in json.loads(proc.stdout)]


if __name__ == "__main__":
    _worker_main()
