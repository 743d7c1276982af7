"""Tile configurations of the sparse MLA kernel and how one is chosen.

A configuration must fit the shared memory of the GPU it runs on: about
227 KiB per block on SM90/SM100/SM110, 163 KiB on SM80/SM87 (A100, A800,
Orin), 99 KiB on SM86/SM89/SM120/SM121 (RTX 30/40/50, L40, DGX Spark).
``tests/kernels/test_sparse_mla_compile.py`` compiles every configuration this
module can return for each of those targets and checks the fit and the
absence of register spills.
"""

from __future__ import annotations

from dataclasses import dataclass

from .device_info import SMEM_LARGE, SMEM_MEDIUM, SMEM_SMALL, DeviceInfo, smem_class
from .kv_cache_layout import D_LATENT, D_QK, FP8_ROW_BYTES


@dataclass(frozen=True)
class SparseMLAConfig:
    """``block_h`` heads and ``block_n`` top-k entries per program iteration;
    ``warp_specialized``: the Gluon SM90 kernel (:mod:`.sparse_mla_sm90_ws`),
    whose ``num_warps`` compute warps come with a loader partition and whose
    ``num_stages`` is its ring of gathered tiles; ``gluon_sm80``: the Gluon
    kernel with Ampere-class instructions (:mod:`.sparse_mla_sm80`), whose
    ``num_stages`` is its ``cp.async`` ring."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialized: bool = False
    gluon_sm80: bool = False
    word_dequant: bool = False  # Gluon SM80: codes rebuilt a word at a time, QK over four accumulators
    dequant_ahead: bool = False  # Gluon SM80, FP8 (with word_dequant): dequantize tile i + 1 while computing tile i
    plane_warps: bool = False  # Gluon SM80: one warp a latent plane (:mod:`.sparse_mla_sm80_planes`)

    @property
    def warps_m(self) -> int:
        """Warps of the Gluon SM80 kernel that split the head block (16 heads each)."""
        return max(1, min(self.block_h // 16, self.num_warps))


# (smem class, kv_fp8, head bucket) -> config, from H100 sweeps
# (benchmarks/results). Head buckets: <=16, <=32, more. A 64-head block turns
# the BF16 products into Hopper wgmma; FP8 rows are dequantized in registers,
# which caps their head block at 32 (64 spills or runs slower).
_CONFIGS: dict[tuple[int, bool, int], SparseMLAConfig] = {
    (SMEM_LARGE, False, 16): SparseMLAConfig(16, 32, 4, 2),
    (SMEM_LARGE, False, 32): SparseMLAConfig(32, 64, 8, 2),
    (SMEM_LARGE, False, 64): SparseMLAConfig(64, 64, 8, 3),
    (SMEM_LARGE, True, 16): SparseMLAConfig(16, 32, 4, 2),
    (SMEM_LARGE, True, 32): SparseMLAConfig(32, 64, 8, 2),
    (SMEM_LARGE, True, 64): SparseMLAConfig(32, 64, 8, 2),
    (SMEM_MEDIUM, False, 16): SparseMLAConfig(16, 32, 4, 2),
    (SMEM_MEDIUM, False, 32): SparseMLAConfig(32, 64, 8, 2),
    (SMEM_MEDIUM, False, 64): SparseMLAConfig(64, 32, 8, 2),
    (SMEM_MEDIUM, True, 16): SparseMLAConfig(16, 32, 4, 2),
    (SMEM_MEDIUM, True, 32): SparseMLAConfig(32, 64, 8, 2),
    (SMEM_MEDIUM, True, 64): SparseMLAConfig(32, 64, 8, 2),
    (SMEM_SMALL, False, 16): SparseMLAConfig(16, 32, 4, 2),
    (SMEM_SMALL, False, 32): SparseMLAConfig(32, 32, 8, 2),
    (SMEM_SMALL, False, 64): SparseMLAConfig(32, 32, 8, 2),
    (SMEM_SMALL, True, 16): SparseMLAConfig(16, 32, 4, 2),
    (SMEM_SMALL, True, 32): SparseMLAConfig(32, 32, 8, 2),
    (SMEM_SMALL, True, 64): SparseMLAConfig(32, 32, 8, 2),
}


def head_bucket(num_heads: int) -> int:
    return 16 if num_heads <= 16 else 32 if num_heads <= 32 else 64


# BF16 launches of at most this many (token, 64-head block) programs before the
# split (decode batches of 1-2 tokens at 128 heads) run 16-head blocks instead:
# 8x the programs, each reading the same rows from L2, are faster there; from 4
# tokens on the 64-head block is as fast or faster. Where the warp-specialized
# kernel runs, FEW_PROGRAMS_WARP_SPECIALIZED below. The measurements behind this
# and the rules below: docs/performance.md, "Measurements behind the dispatch rules".
FEW_PROGRAMS = 4
_FEW_PROGRAMS_CONFIGS = {
    SMEM_LARGE: SparseMLAConfig(16, 64, 4, 2),
    SMEM_MEDIUM: _CONFIGS[SMEM_MEDIUM, False, 16],
    SMEM_SMALL: _CONFIGS[SMEM_SMALL, False, 16],
}


# SM90, BF16 cache, more than 32 heads: the warp-specialized Gluon kernel (a
# 4-warp loader gathers 64-row tiles into a two-stage ring; one warpgroup runs
# QK and the softmax, both run PV; num_warps is the softmax warpgroup's): faster
# than the 64-head Triton config from 8 tokens on and in prefill. Launches of at
# most FEW_PROGRAMS_WARP_SPECIALIZED programs (1 token at 128 heads, 1-2 at 64)
# stay on 16-head Triton blocks, which are faster there; from 4 programs the
# warp-specialized kernel is faster.
WARP_SPECIALIZED_SM90 = SparseMLAConfig(64, 64, 4, 2, warp_specialized=True)
FEW_PROGRAMS_WARP_SPECIALIZED = 2

# FP8 caches wherever Gluon runs (SM80 and up): the Gluon kernel that dequantizes each
# gathered tile once into shared memory (:mod:`.sparse_mla_sm80`). 16-head blocks of
# 32 keys fit every class (94 KB); 32-head blocks of 32 keys (8 warps, 114 KB) the
# larger two, of 64 keys (190 KB) the largest. Its accumulators cap the head block at
# 32: 64-head blocks spill on every target. By the sweep of the candidates (native
# and forced SM80 path): 32 keys and a two-stage ring at 16 heads (a deeper ring or
# 64 keys lose in prefill), 64-key tiles at 128 heads where they fit. The medium class
# (A100, and the forced SM80 path) holds one 94 KB CTA of 32 keys an SM; 16-key tiles
# (56-77 KB) let two reside but were 1.1-1.2x slower on the forced path (H200, 2026-12-07).
_GLUON_FP8_CONFIGS: dict[tuple[int, int], SparseMLAConfig] = {
    (SMEM_LARGE, 16): SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True),
    (SMEM_LARGE, 32): SparseMLAConfig(32, 64, 8, 2, gluon_sm80=True),
    (SMEM_LARGE, 64): SparseMLAConfig(32, 64, 8, 2, gluon_sm80=True),
    (SMEM_MEDIUM, 16): SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True),
    (SMEM_MEDIUM, 32): SparseMLAConfig(32, 32, 8, 2, gluon_sm80=True),
    (SMEM_MEDIUM, 64): SparseMLAConfig(32, 32, 8, 2, gluon_sm80=True),
    (SMEM_SMALL, 16): SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True),
    (SMEM_SMALL, 32): SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True),
    (SMEM_SMALL, 64): SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True),
}


# BF16 caches, at most 16 heads (DeepSeek-V3.2 and GLM-5 at TP 8), on SM90: the same Gluon
# kernel without dequantization, faster than the Triton kernel there in the same
# sweep (decode 32 and 128 tokens, 4096-token prefill). Elsewhere the Triton kernel is
# kept: on the smaller classes one CTA of it fits an SM (slower on the forced SM80 path at
# 128 tokens), and SM100+ has not been measured.
GLUON_BF16_FEW_HEADS = SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True)


# SM100 / SM110, BF16 cache, more than 32 heads: the SM90 table's 64-key, three-stage tile
# needs 288 KB of shared memory and spills there (Triton 3.8 lowers its MMAs to tcgen05);
# 32-key tiles in two stages fit (181 KB, no spills). Compiled only: no such GPU has run it.
TCGEN05_BF16_64 = SparseMLAConfig(64, 32, 8, 2)


def triton_config(num_heads: int, kv_fp8: bool, info: DeviceInfo) -> SparseMLAConfig:
    """The Triton kernel's configuration, for launches that cannot take a Gluon kernel."""
    smem, bucket = smem_class(info.max_shared_memory), head_bucket(num_heads)
    if info.tcgen05 and not kv_fp8 and bucket == 64 and smem == SMEM_LARGE:
        return TCGEN05_BF16_64
    return _CONFIGS[smem, kv_fp8, bucket]


def select_config(
    num_heads: int, kv_fp8: bool, info: DeviceInfo, num_tokens: int | None = None
) -> SparseMLAConfig:
    """The tile configuration for ``num_heads`` query heads.

    ``num_tokens`` (``None``: any) lets a BF16 launch too small to fill the GPU
    with 64-head blocks take 16-head ones; leave it ``None`` where a token's
    rounding must not depend on its batch (16- and 64-head blocks accumulate
    in different orders, and so do the Triton and warp-specialized kernels).
    """
    smem = smem_class(info.max_shared_memory)
    bucket = head_bucket(num_heads)
    if kv_fp8 and info.gluon_sm80:
        return _GLUON_FP8_CONFIGS[smem, bucket]
    if not kv_fp8 and bucket == 16 and info.capability == (9, 0) and info.gluon_sm80:
        return GLUON_BF16_FEW_HEADS
    if not kv_fp8 and bucket == 64 and num_tokens is not None:
        few = FEW_PROGRAMS_WARP_SPECIALIZED if info.warp_specialized else FEW_PROGRAMS
        if num_tokens * -(-num_heads // 64) <= few:
            return _FEW_PROGRAMS_CONFIGS[smem]
    if not kv_fp8 and bucket == 64 and info.warp_specialized:
        return WARP_SPECIALIZED_SM90
    return triton_config(num_heads, kv_fp8, info)


def all_configs(info: DeviceInfo) -> list[tuple[bool, SparseMLAConfig]]:
    """Every ``(kv_fp8, config)`` pair :func:`select_config` can return on a device."""
    found = {}
    for num_heads in (16, 32, 64):
        for fp8 in (False, True):
            for num_tokens in (None, 1):
                found[(fp8, select_config(num_heads, fp8, info, num_tokens))] = None
            found[(fp8, triton_config(num_heads, fp8, info))] = None
    return list(found)


# Batch-invariant mode: a fixed number of top-k entries per split, so the split of
# a token's top-k list (and with it the rounding of its result) depends on the
# top-k width alone, never on the batch around the token.
BATCH_INVARIANT_KEYS_PER_SPLIT = 512


def batch_invariant_num_kv_splits(topk: int) -> int:
    """Splits of a ``topk``-wide list in batch-invariant mode: one per 512 entries."""
    return max(1, -(-topk // BATCH_INVARIANT_KEYS_PER_SPLIT))


# What a CTA reserves beside its own shared memory, and the Gluon SM80 kernel's scratch
# (layout conversions, reductions) beside its buffers, in bytes.
_CTA_RESERVED_SMEM = 1024
_GLUON_SM80_SCRATCH_PER_HEAD = 64


def gluon_sm80_programs_per_sm(config: SparseMLAConfig, kv_fp8: bool, info: DeviceInfo) -> int:
    """CTAs of the Gluon SM80 kernels one SM holds, by shared memory: the query ``[block_h, 576]``
    (none with ``plane_warps``: it lives in registers); FP8, the ``cp.async`` ring of rope rows and
    code words and scales (656 bytes a row) and the dequantized ``[block_n, 512]`` bf16 tile (two
    with ``dequant_ahead``); BF16, the ring of whole rows (1152 bytes); with ``plane_warps``, the
    score and probability exchange (inside the FP8 ring at 16 heads). An SM offers the per-block
    opt-in limit plus one reserved KB."""
    if kv_fp8:
        planes = 2 if config.dequant_ahead else 1
        smem = config.num_stages * config.block_n * FP8_ROW_BYTES + planes * config.block_n * D_LATENT * 2
    else:
        smem = config.num_stages * config.block_n * D_QK * 2
    if config.plane_warps:
        exchange_in_ring = kv_fp8 and config.block_h <= 16
        smem += 0 if exchange_in_ring else 2 * 4 * config.block_h * config.block_n * 4
    else:
        smem += config.block_h * D_QK * 2
    smem += config.block_h * _GLUON_SM80_SCRATCH_PER_HEAD + _CTA_RESERVED_SMEM
    return max(1, (info.max_shared_memory + _CTA_RESERVED_SMEM) // smem)


def choose_num_kv_splits(programs: int, topk: int, config: SparseMLAConfig, kv_fp8: bool, info: DeviceInfo) -> int:
    """Split the top-k list so that the grid fills the GPU.

    Memory-bound 16-head blocks want at least two resident programs per SM;
    larger head blocks (one or two per SM by shared memory) one wave, no more;
    the Gluon SM80 kernel exactly the wave its shared memory lets reside.
    Each split keeps at least two ``block_n`` tiles so that its fp32 partial,
    written and merged, stays small next to the KV bytes it reads.
    """
    max_splits = max(1, topk // (2 * config.block_n))
    if config.gluon_sm80:  # one full wave of the CTAs its shared memory lets reside
        resident = gluon_sm80_programs_per_sm(config, kv_fp8, info) * info.num_sms
        return max(1, min(resident // max(programs, 1), max_splits))
    if config.block_h <= 16:
        splits = -(-2 * info.num_sms // programs)
    else:
        splits = round(info.num_sms / programs)
    return max(1, min(splits, max_splits))
