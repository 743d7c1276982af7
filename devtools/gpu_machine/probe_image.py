"""On the GPU machine, before installing: can the image's CUDA libraries serve torch 2.14.1?

    python3 devtools/gpu_machine/probe_image.py

torch 2.14.1's ``libtorch_cuda.so`` and ``libtorch_nvshmem.so`` (staged in the
core tier) link the NCCL and nvshmem entry points below (the strong undefined
symbols ``nm -D`` lists in the wheel's libraries); the image's libraries were installed for torch 2.11. Prints
the image's versions of the packages the serving runtime replaces or relies
on, and which entry points its ``libnccl.so.2`` / ``libnvshmem_host.so.3``
lack: if any, carry the ``cudalibs`` tier of stage_runtime.sh as well (or
import torch with ``TORCH_USE_RTLD_GLOBAL=1``, which binds them lazily, and
hope nothing calls them). Exit status 1 when the tier is needed.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

NCCL = (
    "ncclAllGather ncclAllReduce ncclAlltoAll ncclBcast ncclBroadcast ncclCommAbort ncclCommCount "
    "ncclCommDeregister ncclCommDestroy ncclCommFinalize ncclCommGetAsyncError ncclCommGetUniqueId ncclCommGrow "
    "ncclCommInitAll ncclCommInitRank ncclCommInitRankConfig ncclCommInitRankScalable ncclCommMemStats "
    "ncclCommRegister ncclCommResume ncclCommRevoke ncclCommShrink ncclCommSplit ncclCommSuspend ncclCommUserRank "
    "ncclCommWindowDeregister ncclCommWindowRegister ncclDevCommCreate ncclDevCommDestroy ncclGather "
    "ncclGetErrorString ncclGetLastError ncclGetLsaMultimemDevicePointer ncclGetPeerDevicePointer ncclGetUniqueId "
    "ncclGetVersion ncclGroupEnd ncclGroupSimulateEnd ncclGroupStart ncclMemAlloc ncclMemFree ncclPutSignal "
    "ncclRecv ncclRedOpCreatePreMulSum ncclRedOpDestroy ncclReduce ncclReduceScatter ncclSend ncclSignal "
    "ncclWaitSignal ncclWinGetUserPtr"
).split()
NVSHMEM = (
    "nvshmem_free nvshmem_info_get_version nvshmem_malloc nvshmem_ptr nvshmem_team_n_pes "
    "nvshmem_team_split_strided nvshmemid_hostlib_finalize nvshmemid_hostlib_init_attr nvshmemid_init_status "
    "nvshmemx_alltoallmem_on_stream nvshmemx_broadcastmem_on_stream nvshmemx_cumodule_init nvshmemx_get_uniqueid "
    "nvshmemx_getmem_on_stream nvshmemx_mc_ptr nvshmemx_putmem_on_stream nvshmemx_putmem_signal_on_stream "
    "nvshmemx_set_attr_uniqueid_args nvshmemx_signal_wait_until_on_stream"
).split()
PACKAGES = (
    "torch triton transformers tokenizers safetensors numpy setuptools nvidia-nccl-cu13 nvidia-nvshmem-cu13 "
    "nvidia-cudnn-cu13 nvidia-cusparselt-cu13 nvidia-cublas nvidia-cuda-runtime nvidia-cuda-nvrtc cuda-toolkit "
    "cuda-bindings"
).split()


def missing_symbols(library: str, symbols: list[str]) -> list[str] | None:
    """Entry points ``library`` (found under the image's site-packages) lacks; None if absent."""
    found = sorted(Path(sysconfig.get_paths()["purelib"]).glob(f"nvidia/*/lib/{library}"))
    if not found:
        return None
    lib = ctypes.CDLL(str(found[0]), mode=ctypes.RTLD_GLOBAL)
    return [s for s in symbols if not hasattr(lib, s)]


def main() -> int:
    for name in PACKAGES:
        try:
            print(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{name} (not installed)")
    for command in (
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
        ["nvcc", "--version"],
    ):
        if shutil.which(command[0]):
            subprocess.run(command, check=False)
    needed = False
    for library, symbols in (("libnccl.so.2", NCCL), ("libnvshmem_host.so.3", NVSHMEM)):
        missing = missing_symbols(library, symbols)
        print(f"{library}: {'absent' if missing is None else (', '.join(missing) or 'complete')}")
        needed |= missing is None or bool(missing)
    print("cudalibs tier:", "NEEDED" if needed else "not needed")
    return 1 if needed else 0


if __name__ == "__main__":
    sys.exit(main())
