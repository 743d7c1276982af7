"""Input validation shared by the kernel launchers.

Every check raises ``ValueError`` with the argument's name, what was expected
and what was given, so that a wrong call fails loudly instead of returning a
silently wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .device_info import is_interpreter


def check_dtype(name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must be {allowed}, got {t.dtype}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")


def check_dim(name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    if t.shape[dim] != size:
        raise ValueError(
            f"{name}.shape[{dim}] ({what}) must be {size}, got shape {tuple(t.shape)}"
        )


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension, got strides {t.stride()}"
        )


def check_same_device(tensors: Sequence[tuple[str, torch.Tensor]]) -> torch.device:
    """All tensors on one device, and on a CUDA device unless interpreting."""
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )
    if first.device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"{first_name} is on {first.device}: the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    return first.device
