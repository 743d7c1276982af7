"""What the ragged and paged lightning-indexer (MQA logits) kernels share.

Both compute, for query token ``t`` and key ``n``::

    logits[t, n] = k_scale[n] * sum_h weights[t, h] * relu(q[t, h] . k[n])

with FP8 (e4m3) ``q`` and ``k``, 128-dim heads and fp32 accumulation.

The score tile puts keys on the MMA M dimension and ``tokens x heads`` on N:
``dot(K[BLOCK_N, 128], Q[tokens * heads, 128]^T)`` gives ``[BLOCK_N, tokens *
heads]`` fp32, whose reshape to ``[BLOCK_N, tokens, heads]`` is free (the MMA
accumulator layout is linear), so ReLU, the head weights and the reduction
over heads run in the accumulator's registers, mostly inside each thread.
The query block is the loop-invariant B operand (staged in shared memory once
per program); key tiles stream through the software pipeline into the A
operand.

Tensor-core precision per architecture:

* SM89+ (Ada, Hopper, Blackwell): native ``float8e4nv`` dots, fp32 accumulate.
* SM80/86: no FP8 in Triton; codes are rebuilt as fp16 ``value / 256``
  (:func:`.fp8_convert.fp8_e4m3_to_f16`, exact) and multiplied with fp16
  dots; the ``256 * 256`` the two operands leave out is folded into the
  per-key scale (``relu`` commutes with a positive factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .checks import check_dim, check_dtype, check_last_dim_contiguous, check_ndim
from .device_info import SMEM_SMALL, DeviceInfo, smem_class
from .fp8_convert import EMULATED_FP8_FACTOR, fp8_e4m3_to_f16
from .index_format import INDEX_HEAD_DIM

SUPPORTED_INDEX_HEADS = (32, 64)
# Widest MMA N (tokens x heads) a configuration may ask for.
MAX_MMA_N = 256


@dataclass(frozen=True)
class MQALogitsConfig:
    """Tile configuration of an MQA-logits kernel.

    ``block_n`` keys per tile (MMA M), up to ``tokens`` query tokens per
    program (MMA N is ``tokens * heads``, at most :data:`MAX_MMA_N`),
    ``num_warps`` and ``num_stages`` (software-pipeline depth of the key
    tiles) as in any Triton launch.
    """

    block_n: int
    tokens: int
    num_warps: int
    num_stages: int

    def tokens_for(self, num_heads: int, wanted: int | None = None) -> int:
        """Tokens per program for ``num_heads`` heads (a power of two).

        ``wanted`` (the paged kernel's ``next_n``) caps it at the tokens there
        are, rounded up to a power of two.
        """
        tokens = max(1, min(self.tokens, MAX_MMA_N // num_heads))
        if wanted is not None:
            tokens = min(tokens, triton.next_power_of_2(max(wanted, 1)))
        return tokens


class MQALogitsConfigTable:
    """One kernel's configurations per GPU class.

    Keyed by ``(shared-memory class, native FP8)`` (the classes of
    :mod:`.sparse_mla_configs`); a class without an entry of its own uses the
    small class's. ``sweep`` lists extra candidates a benchmark may time.
    ``tcgen05`` replaces a key's ``(default, sweep candidates)`` on SM100 / SM110,
    whose MMAs Triton lowers differently (configs that fit SM90 spill there).
    """

    def __init__(
        self,
        defaults: dict[tuple[int, bool], MQALogitsConfig],
        sweep: dict[tuple[int, bool], tuple[MQALogitsConfig, ...]],
        tcgen05: dict[tuple[int, bool], tuple[MQALogitsConfig, tuple[MQALogitsConfig, ...]]] | None = None,
    ):
        self._defaults = defaults
        self._sweep = sweep
        self._tcgen05 = tcgen05 or {}

    def _entry(self, info: DeviceInfo) -> tuple[MQALogitsConfig, tuple[MQALogitsConfig, ...]]:
        key = (smem_class(info.max_shared_memory), info.native_fp8)
        key = key if key in self._defaults else (SMEM_SMALL, info.native_fp8)
        if info.tcgen05 and key in self._tcgen05:
            return self._tcgen05[key]
        return self._defaults[key], self._sweep.get(key, ())

    def select(self, info: DeviceInfo) -> MQALogitsConfig:
        """The configuration used on ``info``'s GPU."""
        return self._entry(info)[0]

    def candidates(self, info: DeviceInfo) -> list[MQALogitsConfig]:
        """The default then the sweep candidates on ``info``'s GPU: every
        configuration the kernel may run with there (what the compile tests check)."""
        default, sweep = self._entry(info)
        return list(dict.fromkeys((default, *sweep)))


def scale_factor(info: DeviceInfo) -> float:
    """What the emulated FP8 path leaves out of every ``q . k`` (1 when native)."""
    return 1.0 if info.native_fp8 else EMULATED_FP8_FACTOR * EMULATED_FP8_FACTOR


def fp8_kernel_view(t: torch.Tensor, info: DeviceInfo) -> torch.Tensor:
    """FP8 data as the kernels read it: float8_e4m3fn where the GPU has FP8,
    raw uint8 codes otherwise (Triton rejects FP8 types before SM89)."""
    return t.view(torch.float8_e4m3fn if info.native_fp8 else torch.uint8)


def check_index_heads(name: str, num_heads: int) -> None:
    if num_heads not in SUPPORTED_INDEX_HEADS:
        raise ValueError(
            f"{name} has {num_heads} index heads; supported: {SUPPORTED_INDEX_HEADS}"
        )


def check_fp8_query(name: str, q: torch.Tensor, ndim: int, layout: str) -> None:
    """``q`` is float8_e4m3fn ``layout`` whose last two dims (heads, 128) are dense."""
    check_dtype(name, q, torch.float8_e4m3fn)
    check_ndim(name, q, ndim, layout)
    check_dim(name, q, -1, INDEX_HEAD_DIM, "index head dim")
    check_index_heads(name, q.shape[-2])
    check_last_dim_contiguous(name, q)
    if q.numel() > 0 and q.stride(-2) != INDEX_HEAD_DIM:
        raise ValueError(
            f"{name} must be contiguous over (heads, {INDEX_HEAD_DIM}), got strides {q.stride()}"
        )


def check_weights(weights: torch.Tensor, rows: int, num_heads: int) -> None:
    """``weights`` is float32 ``[rows, num_heads]`` with unit column stride."""
    check_dtype("weights", weights, torch.float32)
    check_ndim("weights", weights, 2, "[rows, heads]")
    check_dim("weights", weights, 0, rows, "query rows")
    check_dim("weights", weights, 1, num_heads, "index heads")
    check_last_dim_contiguous("weights", weights)


def check_config(config: MQALogitsConfig) -> None:
    for name in ("block_n", "tokens"):
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"config.{name} must be a power of two, got {value}")
    if config.block_n < 16:
        raise ValueError(f"config.block_n must be at least 16, got {config.block_n}")


@triton.jit
def load_fp8_operand(ptrs, mask, FP8_NATIVE: tl.constexpr):
    """FP8 values ready for ``tl.dot``: float8e4nv as stored (native; ``ptrs``
    points at float8e4nv) or fp16 ``value / 256`` (``ptrs`` points at uint8)."""
    if FP8_NATIVE:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return fp8_e4m3_to_f16(tl.load(ptrs, mask=mask, other=0), False)


@triton.jit
def load_query_block(
    q_ptr,
    first_token,
    num_tokens,
    stride_token,
    TOKENS: tl.constexpr,
    HEADS: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
):
    """``[TOKENS * HEADS, 128]`` query rows (token-major) of tokens
    ``first_token ..``; rows of tokens ``>= num_tokens`` are zero.

    ``q_ptr`` points at token 0, whose ``HEADS x 128`` values are dense.
    """
    rows = tl.arange(0, TOKENS * HEADS)
    token = first_token + rows // HEADS
    d = tl.arange(0, 128)
    ptrs = q_ptr + token[:, None].to(tl.int64) * stride_token + ((rows % HEADS) * 128)[:, None] + d[None, :]
    return load_fp8_operand(ptrs, (token < num_tokens)[:, None], FP8_NATIVE)


@triton.jit
def load_head_weights(w_ptr, first_row, num_rows, stride_row, TOKENS: tl.constexpr, HEADS: tl.constexpr):
    """``[TOKENS, HEADS]`` fp32 head weights of rows ``first_row ..`` (0 past ``num_rows``)."""
    rows = first_row + tl.arange(0, TOKENS)
    heads = tl.arange(0, HEADS)
    ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_row + heads[None, :]
    return tl.load(ptrs, mask=(rows < num_rows)[:, None], other=0.0)


@triton.jit
def weighted_relu_scores(k_tile, q_block, w_block, key_scale, TOKENS: tl.constexpr, HEADS: tl.constexpr):
    """``[BLOCK_N, TOKENS]`` fp32: ``key_scale[n] * sum_h w[t, h] * relu(k[n] . q[t, h])``.

    ``k_tile`` ``[BLOCK_N, 128]`` and ``q_block`` ``[TOKENS * HEADS, 128]``
    (token-major rows) are FP8 or emulated fp16 operands; ``w_block`` is
    ``[TOKENS, HEADS]`` fp32; ``key_scale`` ``[BLOCK_N]`` fp32 includes the
    emulation factor.
    """
    s = tl.dot(k_tile, tl.trans(q_block))
    s = tl.reshape(tl.maximum(s, 0.0), (k_tile.shape[0], TOKENS, HEADS))
    return tl.sum(s * w_block[None, :, :], axis=2) * key_scale[:, None]


@triton.jit
def fill_neg_inf(out_ptr, rows, row_ok, stride_row, start, end, BLOCK: tl.constexpr):
    """Write ``-inf`` to columns ``[start, end)`` of the given output rows.

    ``rows`` / ``row_ok`` are ``[R]`` row indices and their store mask.
    """
    neg_inf = tl.full((rows.shape[0], BLOCK), float("-inf"), tl.float32)
    row_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_row
    for c0 in range(start, end, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        tl.store(row_ptrs + cols[None, :], neg_inf, mask=row_ok[:, None] & (cols < end)[None, :])
