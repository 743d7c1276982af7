"""The modules SGLang's serving path imports for a DSA model with our backend.

    python serving_imports.py                   import them all, report failures and versions
                                                (the GPU smoke test after install_runtime.sh)
    python serving_imports.py --distributions   the installed distributions they pull in
                                                (how stage_runtime.sh's package list was found)

Exit status 1 when a module fails to import (smoke test) or, on a GPU, when
``sgl_kernel`` cannot run an op.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
import traceback

MODULES = (
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.engine",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.managers.data_parallel_controller",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.model_loader.loader",
    "sglang.srt.models.deepseek_v2",
    "sglang.srt.models.glm4_moe",
    "sglang.srt.layers.attention.dsa_backend",
    "sglang.srt.layers.attention.dsa.dsa_indexer",
    "sglang.srt.layers.moe.fused_moe_triton",
    "sglang.srt.constrained.xgrammar_backend",
    "sglang.bench_serving",
    "deep_gemm",  # the DSA Indexer imports it on CUDA
    "sglang_sparse_mla.plugin",
    "sglang_sparse_mla.backend.attention_backend",
)
VERSIONS = ("torch", "triton", "sglang", "sglang-kernel", "flashinfer-python", "transformers", "sglang-sparse-mla")


def distributions() -> dict[str, list[str]]:
    """Distribution -> top-level modules of it that importing :data:`MODULES` loaded."""
    for name in MODULES:
        importlib.import_module(name)
    owners = importlib.metadata.packages_distributions()
    used: dict[str, set[str]] = {}
    for module in list(sys.modules):
        top = module.split(".")[0]
        for dist in owners.get(top, ()):
            used.setdefault(dist, set()).add(top)
    return {d: sorted(m) for d, m in sorted(used.items())}


def smoke_test() -> int:
    """Import every module (each failure reported), print versions, run one sgl_kernel op on a GPU."""
    failures = 0
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:
            failures += 1
            print(f"FAIL import {name}\n{traceback.format_exc(limit=-3)}")
    for dist in VERSIONS:
        try:
            print(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{dist} (not installed)")
    import torch

    if torch.cuda.is_available():
        try:
            import sgl_kernel

            x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
            w = torch.ones(256, device="cuda", dtype=torch.bfloat16)
            y = sgl_kernel.rmsnorm(x, w, 1e-6)
            ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
            assert torch.allclose(y.float(), ref, atol=2e-2), "sgl_kernel.rmsnorm is wrong"
            print(f"sgl_kernel ok on {torch.cuda.get_device_name()}")
        except Exception:
            failures += 1
            print(f"FAIL sgl_kernel\n{traceback.format_exc(limit=-3)}")
    print("serving imports:", "ok" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distributions", action="store_true")
    args = parser.parse_args()
    if args.distributions:
        print(json.dumps(distributions(), indent=1))
        return
    sys.exit(smoke_test())


if __name__ == "__main__":
    main()
