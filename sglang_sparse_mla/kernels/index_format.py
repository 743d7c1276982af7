"""The DSA indexer's FP8 keys and queries as SGLang stores them: the index-K cache layout, the two
scale formats, and the parameters of what is applied to a row before it is quantized.

* Index K, SGLang's paged DSA layout: ``[pages, page_size, 1, INDEX_ROW_BYTES]`` uint8 per layer;
  a page holds ``page_size`` keys of ``INDEX_HEAD_DIM`` float8_e4m3fn code bytes, then their
  float32 scales (``INDEX_SCALE_BYTES`` each), keys and scales not interleaved.
* Queries: ``INDEX_HEAD_DIM`` FP8 codes a head, one float32 scale a head (folded into the
  head's score weight).
* Scale formats (``SCALE_FORMATS``; the arithmetic of each in :mod:`.index_fp8_quant`):
  ``"ue8m0"``, power-of-two scales, and ``"fp32"``.
* Before quantization: the Walsh-Hadamard rotation (:func:`hadamard_signs`), or the LayerNorm
  and rope of SGLang's fused indexer (:class:`IndexNorm`, :class:`IndexRope`).

Pure torch: the kernels, the float64 references (:mod:`.reference`) and the backend import it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

INDEX_HEAD_DIM = 128  # code bytes of one index key or query head
INDEX_SCALE_BYTES = 4  # one float32 scale per key
INDEX_ROW_BYTES = INDEX_HEAD_DIM + INDEX_SCALE_BYTES  # an index-K slot
SCALE_FORMATS = ("ue8m0", "fp32")
ROPE_DIM = 64  # the DSA indexers' rope width: the leading 64 of the 128 values


@functools.lru_cache(maxsize=8)
def hadamard_signs(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``dim x dim`` Walsh-Hadamard matrix of ``+-1`` (``dim`` a power of two; exact in every float
    dtype)."""
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class IndexRope:
    """The rope of SGLang's fused DSA indexer kernels, applied in fp32 inside the quantization:
    value pairs ``(2i, 2i + 1)`` of the leading :data:`ROPE_DIM` values of each row turn by angle
    ``i`` of the row's position, ``cos = cos_sin_cache[pos, i]``, ``sin = cos_sin_cache[pos, 32 + i]``
    (interleaved rope, rope part first).

    ``cos_sin_cache``: ``[max_position, 64]`` float32/bf16 (the indexer's ``rotary_emb.cos_sin_cache``),
    last dimension contiguous; ``positions``: ``[T]`` int32/int64, one per token, in range.
    """

    cos_sin_cache: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True)
class IndexNorm:
    """LayerNorm of each key row before the rope, in fp32: ``(x - mean) * rsqrt(var + eps) * weight
    + bias`` (biased variance); ``weight``, ``bias``: ``[128]`` float32."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
