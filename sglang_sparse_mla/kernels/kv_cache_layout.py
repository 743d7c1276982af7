"""The MLA KV-cache layouts the sparse attention kernels read.

DSA models cache one 576-wide latent row per token: the 512 compressed
``kv_lora`` values (which double as V) followed by the 64 rope values of K.

* BF16 layout: ``[num_slots, 576]`` bfloat16.
* FP8 layout (FlashMLA's, 656 bytes per slot, stored as uint8):
  bytes 0-511 the 512 latent values as float8_e4m3fn, bytes 512-527 four
  float32 scales (one per 128 latent values, ``scale = amax / 448``), bytes
  528-655 the 64 rope values as bfloat16 (not quantized).

Paged caches ``[num_pages, page_size, 1, D]`` and SGLang's ``[num_slots, 1, D]``
buffers are accepted as views of the same slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_dtype, check_last_dim_contiguous, check_ndim

D_LATENT = 512
D_ROPE = 64
D_QK = D_LATENT + D_ROPE
FP8_GROUP = 128
FP8_NUM_GROUPS = D_LATENT // FP8_GROUP
FP8_SCALE_OFFSET = D_LATENT  # byte offset of the four float32 scales
FP8_ROPE_OFFSET = D_LATENT + 4 * FP8_NUM_GROUPS  # byte offset of the bf16 rope
FP8_ROW_BYTES = FP8_ROPE_OFFSET + 2 * D_ROPE  # 656
FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class SlotRows:
    """A KV cache seen as one row per slot, with typed views for the kernels.

    ``latent`` is ``[num_slots, 576]`` bf16 (BF16 layout) or ``[num_slots, 656]``
    uint8 (FP8 layout). For FP8, ``words`` (int32, 164 per row: 128 words of
    four e4m3 codes, then the four float32 scales' bits) and ``rope`` (bf16,
    328 per row) view the same bytes, with row strides in their own units.
    Kernels read FP8 rows as 32-bit words: Triton software-pipelines those
    loads through shared memory, which it does not do for byte loads.
    """

    latent: torch.Tensor
    words: torch.Tensor | None
    rope: torch.Tensor | None

    @property
    def is_fp8(self) -> bool:
        return self.words is not None

    @property
    def num_slots(self) -> int:
        return self.latent.shape[0]


def _flatten_slots(name: str, kv: torch.Tensor) -> torch.Tensor:
    if kv.dim() == 4:
        if kv.shape[2] != 1:
            raise ValueError(
                f"{name} as a paged cache must be [num_pages, page_size, 1, D], "
                f"got shape {tuple(kv.shape)}"
            )
        kv = kv[:, :, 0, :]
        try:
            return kv.view(-1, kv.shape[-1])
        except RuntimeError as err:
            raise ValueError(
                f"{name} pages must be laid out so that slots form one strided "
                f"row array, got strides {kv.stride()}"
            ) from err
    if kv.dim() == 3:
        if kv.shape[1] != 1:
            raise ValueError(
                f"{name} must be [num_slots, D], [num_slots, 1, D] or "
                f"[num_pages, page_size, 1, D], got shape {tuple(kv.shape)}"
            )
        return kv[:, 0, :]
    check_ndim(
        name, kv, 2, "[num_slots, D], [num_slots, 1, D] or [num_pages, page_size, 1, D]"
    )
    return kv


def as_slot_rows(kv_cache: torch.Tensor, name: str = "kv_cache") -> SlotRows:
    """Validate ``kv_cache`` and return its per-slot row views."""
    check_dtype(name, kv_cache, torch.bfloat16, torch.uint8, torch.float8_e4m3fn)
    rows = _flatten_slots(name, kv_cache)
    check_last_dim_contiguous(name, rows)
    if rows.dtype == torch.bfloat16:
        if rows.shape[-1] != D_QK:
            raise ValueError(
                f"{name} in the BF16 layout must have {D_QK} values per slot "
                f"(latent {D_LATENT} + rope {D_ROPE}), got {rows.shape[-1]}"
            )
        return SlotRows(rows, None, None)
    rows = rows.view(torch.uint8)
    if rows.shape[-1] != FP8_ROW_BYTES:
        raise ValueError(
            f"{name} in the FP8 layout must have {FP8_ROW_BYTES} bytes per slot, "
            f"got {rows.shape[-1]}"
        )
    if rows.shape[0] > 1 and rows.stride(0) % 4 != 0:
        raise ValueError(f"{name} row stride must be a multiple of 4 bytes, got {rows.stride(0)}")
    if rows.storage_offset() % 4 != 0:
        raise ValueError(f"{name} must start at a 4-byte aligned offset")
    return SlotRows(rows, rows.view(torch.int32), rows.view(torch.bfloat16))


def quantize_kv_fp8(kv_bf16: torch.Tensor) -> torch.Tensor:
    """Quantize BF16 latent rows into the 656-byte FP8 layout.

    Args:
        kv_bf16: ``[N, 576]`` bfloat16 (latent 512 ‖ rope 64), any device.

    Returns:
        ``[N, 656]`` uint8 on the same device: per 128 latent values one float32
        scale ``amax / 448`` and the values divided by it as float8_e4m3fn
        (round to nearest); the rope values are copied as bf16. A group whose
        values are all zero gets scale 0 and zero codes.
    """
    check_dtype("kv_bf16", kv_bf16, torch.bfloat16)
    check_ndim("kv_bf16", kv_bf16, 2, f"[N, {D_QK}]")
    if kv_bf16.shape[1] != D_QK:
        raise ValueError(f"kv_bf16 must be [N, {D_QK}], got shape {tuple(kv_bf16.shape)}")
    n = kv_bf16.shape[0]
    latent = kv_bf16[:, :D_LATENT].float().view(n, FP8_NUM_GROUPS, FP8_GROUP)
    scale = latent.abs().amax(dim=-1) / FP8_E4M3_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (latent / safe[..., None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    out = torch.empty(n, FP8_ROW_BYTES, dtype=torch.uint8, device=kv_bf16.device)
    out[:, :FP8_SCALE_OFFSET] = codes.to(torch.float8_e4m3fn).view(torch.uint8).view(n, D_LATENT)
    out[:, FP8_SCALE_OFFSET:FP8_ROPE_OFFSET] = scale.contiguous().view(torch.uint8)
    out[:, FP8_ROPE_OFFSET:] = kv_bf16[:, D_LATENT:].contiguous().view(torch.uint8)
    return out


def dequantize_kv_fp8(kv_fp8: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_kv_fp8` in float32: ``[N, 656]`` uint8 -> ``[N, 576]``."""
    rows = as_slot_rows(kv_fp8, "kv_fp8")
    if not rows.is_fp8:
        raise ValueError("kv_fp8 must be in the 656-byte FP8 layout")
    raw = rows.latent
    n = raw.shape[0]
    codes = raw[:, :D_LATENT].contiguous().view(torch.float8_e4m3fn).float()
    scale = raw[:, FP8_SCALE_OFFSET:FP8_ROPE_OFFSET].contiguous().view(torch.float32)
    latent = (codes.view(n, FP8_NUM_GROUPS, FP8_GROUP) * scale[..., None]).view(n, D_LATENT)
    rope = raw[:, FP8_ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()
    return torch.cat([latent, rope], dim=1)
