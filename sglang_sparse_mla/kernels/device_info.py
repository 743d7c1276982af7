"""What the kernels need to know about the GPU they run on.

Every launcher asks here, never ``torch.cuda`` directly, so that the Triton
interpreter (``TRITON_INTERPRET=1``, CPU tensors) and the forced SM80 code path
(``SGLANG_SPARSE_MLA_FORCE_SM80=1``, which lets an SM90 machine run the Ampere
kernels) are handled in one place. ``SGLANG_SPARSE_MLA_WARP_SPECIALIZED=0``
keeps SM90 GPUs on the Triton kernels (the Gluon warp-specialized ones are
used by default there); ``SGLANG_SPARSE_MLA_GLUON_SM80=0`` keeps FP8 caches
on the Triton kernel (the Gluon one with Ampere-class instructions is used by
default on every GPU).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# Shared-memory classes, by the opt-in limit per block (bytes): every kernel's configuration
# table is keyed by them.
SMEM_LARGE = 227 * 1024  # SM90, SM100, SM110
SMEM_MEDIUM = 163 * 1024  # SM80, SM87
SMEM_SMALL = 99 * 1024  # SM86, SM89, SM120, SM121

FORCE_SM80_ENV = "SGLANG_SPARSE_MLA_FORCE_SM80"
WARP_SPECIALIZED_ENV = "SGLANG_SPARSE_MLA_WARP_SPECIALIZED"
GLUON_SM80_ENV = "SGLANG_SPARSE_MLA_GLUON_SM80"


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def force_sm80() -> bool:
    """True when the SM80 code paths are forced on a newer GPU (for testing)."""
    return os.environ.get(FORCE_SM80_ENV, "0") not in ("", "0")


def warp_specialized_allowed() -> bool:
    """False when ``SGLANG_SPARSE_MLA_WARP_SPECIALIZED=0`` keeps SM90 on the Triton kernels."""
    return os.environ.get(WARP_SPECIALIZED_ENV, "1") not in ("", "0")


def gluon_sm80_allowed() -> bool:
    """False when ``SGLANG_SPARSE_MLA_GLUON_SM80=0`` keeps FP8 caches on the Triton kernel."""
    return os.environ.get(GLUON_SM80_ENV, "1") not in ("", "0")


@functools.lru_cache(maxsize=None)
def gluon_ampere_available() -> bool:
    """Whether this Triton has Gluon with the Ampere ops (``cp.async``, ``mma_v2``) of :mod:`.sparse_mla_sm80`."""
    try:
        from triton.experimental.gluon import language as gl  # noqa: F401
        from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2  # noqa: F401
    except ImportError:
        return False
    return hasattr(async_copy, "async_copy_global_to_shared") and hasattr(async_copy, "wait_group")


@functools.lru_cache(maxsize=None)
def gluon_hopper_available() -> bool:
    """Whether this Triton has Gluon with the Hopper ops the warp-specialized kernels use (3.6+)."""
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import async_copy  # noqa: F401
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma  # noqa: F401
    except ImportError:
        return False
    return hasattr(gl, "warp_specialize")


@dataclass(frozen=True)
class DeviceInfo:
    """The properties that pick a kernel configuration.

    ``capability`` is ``(major, minor)``; ``max_shared_memory`` is the opt-in
    shared memory per block in bytes; ``num_sms`` the multiprocessor count;
    ``warp_specialized``: the Gluon warp-specialized SM90 kernels run here
    (an SM90 GPU, not the forced SM80 path nor the interpreter, a Triton with
    Gluon's Hopper ops, not disabled by ``SGLANG_SPARSE_MLA_WARP_SPECIALIZED=0``);
    ``gluon_sm80``: the Gluon kernel with Ampere-class instructions runs here
    (a GPU, the forced SM80 path included, not the interpreter, a Triton with
    Gluon's Ampere ops, not disabled by ``SGLANG_SPARSE_MLA_GLUON_SM80=0``).
    """

    capability: tuple[int, int]
    max_shared_memory: int
    num_sms: int
    warp_specialized: bool = False
    gluon_sm80: bool = False

    @property
    def tcgen05(self) -> bool:
        """SM100 / SM110 (B200, Thor): Triton lowers their MMAs to tcgen05, with other register
        and shared-memory needs than SM90's wgmma for the same tile."""
        return self.capability[0] in (10, 11)

    @property
    def native_fp8(self) -> bool:
        """FP8 (e4m3) conversions and tensor-core dots exist from SM89 on."""
        return self.capability >= (8, 9)


def smem_class(max_shared_memory: int) -> int:
    """The largest shared-memory class a GPU offering ``max_shared_memory`` bytes per block fits."""
    for limit in (SMEM_LARGE, SMEM_MEDIUM, SMEM_SMALL):
        if max_shared_memory >= limit:
            return limit
    raise RuntimeError(
        f"the GPU offers {max_shared_memory} bytes of shared memory per block; "
        f"sparse MLA needs at least {SMEM_SMALL}"
    )


# The interpreter runs every configuration; it reports an SM90-class device so
# that launchers take their most general path.
_INTERPRETER_DEVICE = DeviceInfo(capability=(9, 0), max_shared_memory=SMEM_LARGE, num_sms=8)
# Ampere A100/A800: 164 KiB of shared memory per SM, 163 KiB opt-in per block.
_SM80_DEVICE_SMEM = SMEM_MEDIUM


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int, forced_sm80: bool, ws_allowed: bool, gluon_sm80: bool) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 49152)
    if forced_sm80:
        capability = (8, 0)
        smem = min(smem, _SM80_DEVICE_SMEM)
    ws = capability == (9, 0) and ws_allowed and gluon_hopper_available()
    sm80 = capability >= (8, 0) and gluon_sm80 and gluon_ampere_available()
    return DeviceInfo(capability, smem, props.multi_processor_count, ws, sm80)


_INTERPRETER_SM80_DEVICE = DeviceInfo(capability=(8, 0), max_shared_memory=_SM80_DEVICE_SMEM, num_sms=8)


def device_info(device: torch.device) -> DeviceInfo:
    """Properties of ``device`` as the kernels should see them."""
    if is_interpreter() or device.type != "cuda":
        return _INTERPRETER_SM80_DEVICE if force_sm80() else _INTERPRETER_DEVICE
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_device_info(index, force_sm80(), warp_specialized_allowed(), gluon_sm80_allowed())
