"""One test suite for two machines.

On a machine with a CUDA GPU the kernels run natively at real shapes; anywhere
else they run through Triton's CPU interpreter at tiny shapes. The ``target``
fixture says which, and tests take their sizes from it (``target.pick(cpu=...,
gpu=...)``) instead of being written twice.

``TRITON_INTERPRET`` must be set before Triton decorates any kernel, so it is
decided here, at import time, before the package under test is imported.
``SGLANG_SPARSE_MLA_TEST_DEVICE=cpu`` forces the interpreter on a GPU machine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch

_FORCE_CPU = os.environ.get("SGLANG_SPARSE_MLA_TEST_DEVICE", "") == "cpu"
ON_GPU = torch.cuda.is_available() and not _FORCE_CPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))

if not ON_GPU:
    import interpreter_device_calls

    interpreter_device_calls.install()


@dataclass(frozen=True)
class Target:
    """Where the kernels under test run, and the sizes that suit it."""

    device: torch.device
    gpu: bool

    def pick(self, cpu, gpu):
        """``gpu`` on a real GPU, ``cpu`` under the interpreter."""
        return gpu if self.gpu else cpu


@pytest.fixture(scope="session")
def target() -> Target:
    return Target(torch.device("cuda") if ON_GPU else torch.device("cpu"), ON_GPU)


@pytest.fixture
def rng(target) -> torch.Generator:
    """A fresh generator per test on the target device; its seed is printed
    (pytest shows it with a failure) so that a failing draw can be replayed."""
    seed = int(os.environ.get("SGLANG_SPARSE_MLA_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed} (replay with SGLANG_SPARSE_MLA_TEST_SEED={seed})")
    return torch.Generator(device=target.device).manual_seed(seed)


@pytest.fixture(params=[False, True], ids=["native", "forced_sm80"])
def arch_path(request, monkeypatch) -> bool:
    """Run a test on the native code path and on the forced SM80 one."""
    if request.param:
        monkeypatch.setenv("SGLANG_SPARSE_MLA_FORCE_SM80", "1")
    else:
        monkeypatch.delenv("SGLANG_SPARSE_MLA_FORCE_SM80", raising=False)
    return request.param


@pytest.fixture
def resolve(monkeypatch):
    """``resolve(model_path, *flags, sm=90)`` -> the resolved view of SGLang's server arguments with the
    plugin loaded: SGLang's real parser and resolution pipeline, its start-up validation included, on
    ``--device cpu`` with a faked compute capability (the DSA passes ask CUDA for it) and the
    prefill CUDA-graph default SGLang picks on CUDA (breakable)."""
    import sglang.srt.model_executor.cuda_graph_config as cuda_graph_config
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    monkeypatch.setattr(cuda_graph_config, "default_prefill_backend", lambda: cuda_graph_config.Backend.BREAKABLE)

    def run(path: str, *flags: str, sm: int = 90):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (sm // 10, sm % 10))
        args = prepare_server_args(["--model-path", path, "--device", "cpu", "--skip-tokenizer-init", *flags])
        args.resolve_once()
        return resolved_view(args)

    return run
