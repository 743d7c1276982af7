"""The Gluon sparse MLA kernel with Ampere-class instructions (FP8 caches on every GPU from
SM80 on): when the dispatcher picks it, and its results against the float64 reference and the
Triton kernels, on the native and the forced SM80 path. Gluon has no interpreter: the CPU suite
checks the dispatch and the refusals here and compiles the kernel for every arch in
``test_sparse_mla_compile.py``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from utils import relative_error
from test_sparse_mla import (
    SM_SCALE,
    assert_matches_reference,
    end_rows_in_padding,
    make_inputs,
    make_q,
    poisoned_outputs,
)

from sglang_sparse_mla.kernels import quantize_kv_fp8
from sglang_sparse_mla.kernels.device_info import (
    GLUON_SM80_ENV,
    SMEM_LARGE,
    SMEM_MEDIUM,
    SMEM_SMALL,
    DeviceInfo,
    device_info,
)
from sglang_sparse_mla.kernels.sparse_mla import sparse_mla_decode, sparse_mla_forward, sparse_mla_prefill
from sglang_sparse_mla.kernels.sparse_mla_configs import (
    TCGEN05_BF16_64,
    SparseMLAConfig,
    select_config,
    triton_config,
)

GLUON_16 = SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True)
GLUON_32 = SparseMLAConfig(32, 32, 8, 2, gluon_sm80=True)
WORD, PLANES = dict(word_dequant=True), dict(plane_warps=True)
AHEAD = dict(WORD, dequant_ahead=True)
PLANES_16 = SparseMLAConfig(16, 32, 4, 2, gluon_sm80=True, plane_warps=True)
PLANES_32 = SparseMLAConfig(32, 32, 8, 2, gluon_sm80=True, plane_warps=True)


def _gluon_gpu() -> bool:
    return torch.cuda.is_available() and device_info(torch.device("cuda")).gluon_sm80


on_gluon_gpu = pytest.mark.skipif(not _gluon_gpu(), reason="needs a GPU and Gluon (the kernel has no interpreter)")


@pytest.mark.parametrize("capability, smem", [((8, 0), SMEM_MEDIUM), ((8, 6), SMEM_SMALL), ((9, 0), SMEM_LARGE),
                                              ((10, 0), SMEM_LARGE), ((12, 0), SMEM_SMALL)])  # fmt: skip
@pytest.mark.parametrize("heads", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("tokens", [None, 1, 37])
def test_fp8_caches_take_it_wherever_gluon_runs(capability, smem, heads, tokens):
    info = DeviceInfo(capability, smem, 132, warp_specialized=capability == (9, 0), gluon_sm80=True)
    cfg = select_config(heads, True, info, tokens)
    assert cfg.gluon_sm80 and cfg.block_h == (16 if heads <= 16 or smem == SMEM_SMALL else 32)
    assert cfg.block_n == (64 if cfg.block_h == 32 and smem == SMEM_LARGE else 32)

    assert cfg == select_config(heads, True, info)  # the batch never changes an FP8 launch's kernel
    # BF16 caches keep their kernels but at most 16 heads on SM90.
    assert select_config(heads, False, info, tokens).gluon_sm80 is (heads <= 16 and capability == (9, 0))
    without = DeviceInfo(capability, smem, 132, warp_specialized=capability == (9, 0))
    assert select_config(heads, True, without, tokens) == triton_config(heads, True, without)


def test_tcgen05_gpus_take_the_tile_that_fits_them():
    """SM100 / SM110: the 64-head BF16 Triton tile of SM90 (288 KB there) is replaced."""
    blackwell = DeviceInfo((10, 0), SMEM_LARGE, 148)
    assert select_config(128, False, blackwell) == TCGEN05_BF16_64 == triton_config(64, False, blackwell)
    assert select_config(128, False, DeviceInfo((9, 0), SMEM_LARGE, 132)) != TCGEN05_BF16_64


def misaligned_copy(kv: torch.Tensor) -> torch.Tensor:
    """``kv`` (uint8 FP8 rows) copied to an address 4 bytes past a 16-byte boundary."""
    out = torch.zeros(kv.numel() + 16, dtype=torch.uint8, device=kv.device)[4 : 4 + kv.numel()].view(kv.shape)
    return out.copy_(kv)


def test_forcing_it_where_it_cannot_run_is_an_error(target, rng):
    kv, q, idx = make_inputs(target, rng, 2, 16, 64, 300, "fp8")
    if device_info(target.device).gluon_sm80:
        with pytest.raises(ValueError, match="16-byte boundaries \\(here: False\\)"):
            sparse_mla_forward(q, misaligned_copy(kv), idx, SM_SCALE, config=GLUON_16)
    else:
        with pytest.raises(ValueError, match="Gluon SM80-class kernel.*usable here: False"):
            sparse_mla_forward(q, kv, idx, SM_SCALE, config=GLUON_16)


@on_gluon_gpu
def test_the_environment_switch_keeps_fp8_on_triton(monkeypatch):
    monkeypatch.setenv(GLUON_SM80_ENV, "0")
    info = device_info(torch.device("cuda"))
    assert not info.gluon_sm80
    assert not select_config(16, True, info).gluon_sm80


@on_gluon_gpu
@pytest.mark.parametrize("heads", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("num_kv_splits", [None, 1, 3])
@pytest.mark.parametrize("tokens", [1, 37])
def test_fp8_matches_reference_and_triton(target, rng, arch_path, heads, num_kv_splits, tokens):
    kv, q, idx = make_inputs(target, rng, tokens, heads, 2048, 1 << 20, "fp8")
    info = device_info(target.device)
    assert select_config(heads, True, info).gluon_sm80
    out, lse = poisoned_outputs(tokens, heads, target.device)
    sparse_mla_decode(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits, out=out, lse=lse)
    assert_matches_reference(out, lse, q, kv, idx)
    triton_out, _ = sparse_mla_forward(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits,
                                       config=triton_config(heads, True, info))  # fmt: skip
    assert relative_error(out, triton_out) < 1e-2


@on_gluon_gpu
@pytest.mark.parametrize(
    "config",
    [GLUON_16, GLUON_32, replace(GLUON_16, **WORD), PLANES_16, PLANES_32],
    ids=["h16", "h32", "h16-words", "h16-planes", "h32-planes"],
)
@pytest.mark.parametrize("heads", [8, 16, 48])
def test_bf16_variant_matches_reference(target, rng, arch_path, config, heads):
    tokens = 37
    kv, q, idx = make_inputs(target, rng, tokens, heads, 2048, 1 << 20, "bf16")
    out, lse = poisoned_outputs(tokens, heads, target.device)
    sparse_mla_forward(q, kv, idx, SM_SCALE, config=config, out=out, lse=lse)
    assert_matches_reference(out, lse, q, kv, idx)


@on_gluon_gpu
@pytest.mark.parametrize(
    "config, variant",
    [((16, 16, 4, 2), {}), ((16, 32, 4, 2), {}), ((16, 32, 4, 2), WORD), ((16, 32, 8, 2), WORD),
     ((16, 32, 4, 3), AHEAD), ((16, 16, 4, 3), AHEAD), ((16, 32, 8, 3), AHEAD), ((16, 32, 4, 2), PLANES),
     ((16, 32, 4, 3), PLANES), ((32, 32, 8, 2), PLANES)],
    ids=["n16s2", "n32s2", "n32s2-words", "n32w8-words", "n32s3-ahead", "n16s3-ahead", "n32w8s3-ahead", "n32s2-planes",
         "n32s3-planes", "h32-planes"],
)  # fmt: skip
@pytest.mark.parametrize("heads", [8, 16])
@pytest.mark.parametrize("num_kv_splits", [1, 5, 32])
def test_fp8_key_tiles_match_reference(target, rng, arch_path, config, variant, heads, num_kv_splits):
    """The FP8 tiles a sweep picks from, whichever the dispatch takes: 16 and 32 keys a tile, 4 and 8
    warps, codes rebuilt one or a word at a time, each tile dequantized just before its products or
    one iteration ahead, one warp a plane; -1 entries, short rows and splits ending mid-tile (and
    rows of fewer tiles than the ring) included."""
    tokens = 37
    kv, q, idx = make_inputs(target, rng, tokens, heads, 2048, 1 << 20, "fp8")
    idx[::3, 1000:] = -1  # rows whose valid entries end mid-split
    idx[1::5, 7::11] = -1
    out, lse = poisoned_outputs(tokens, heads, target.device)
    cfg = SparseMLAConfig(*config, gluon_sm80=True, **variant)
    sparse_mla_forward(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits, config=cfg, out=out, lse=lse)
    assert_matches_reference(out, lse, q, kv, idx)


@on_gluon_gpu
def test_fp8_rows_at_the_limits(target, rng, arch_path):
    """Rows whose codes reach the e4m3 limit (every group's largest value is 448 x its scale),
    all-zero rows (scale 0), tiny and large scales, groups of one large value among tiny ones
    (subnormal and zero codes); slots -1, out of range and duplicated."""
    num_slots, tokens, heads, topk = 4096, 9, 16, 512
    kv = torch.randn(num_slots, 576, generator=rng, device=target.device)
    kv[0:64] = 0.0
    kv[64:128, :512] *= 1e-30
    kv[128:192, :512] *= 8.0
    kv[192:256, :512] *= 1e-3
    kv[192:256, ::128] = 50.0
    cache = quantize_kv_fp8(kv.bfloat16())
    q = make_q(target, rng, tokens, heads)
    idx = torch.randint(0, 256, (tokens, topk), generator=rng, device=target.device, dtype=torch.int32)
    idx[:, ::7] = -1
    idx[:, 3] = num_slots + 5
    idx[:, 4] = idx[:, 5]
    idx[1] = torch.arange(topk, device=target.device) % 64  # zero rows only
    idx[2, 100:] = -1
    out, lse = poisoned_outputs(tokens, heads, target.device)
    sparse_mla_decode(q, cache, idx, SM_SCALE, out=out, lse=lse)
    assert_matches_reference(out, lse, q, cache, idx)


@on_gluon_gpu
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_skipping_the_invalid_tail_changes_no_bit(target, rng, num_kv_splits):
    tokens, heads, topk = 300, 32, 2048
    kv, q, idx = make_inputs(target, rng, tokens, heads, topk, 1 << 16, "fp8")
    end_rows_in_padding(idx, rng, [0, 1, 31, 32, 33, 63, 64, 1023, 1024, topk - 1, topk])
    whole = sparse_mla_forward(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits)
    skipped = sparse_mla_forward(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits, skip_invalid_tail=True)
    assert torch.equal(skipped[0], whole[0]) and torch.equal(skipped[1], whole[1])
    assert_matches_reference(*skipped, q, kv, idx)


@on_gluon_gpu
def test_batch_invariant_and_split_query(target, rng):
    tokens, heads = 40, 128
    kv, q, idx = make_inputs(target, rng, tokens, heads, 2048, 1 << 18, "fp8")
    batch_out, batch_lse = sparse_mla_decode(q, kv, idx, SM_SCALE, batch_invariant=True)
    assert_matches_reference(batch_out, batch_lse, q, kv, idx)
    prefill_out, prefill_lse = sparse_mla_prefill(q, kv, idx, SM_SCALE, batch_invariant=True)
    assert torch.equal(prefill_out, batch_out) and torch.equal(prefill_lse, batch_lse)
    for t in (0, tokens - 1):
        one_out, one_lse = sparse_mla_decode(q[t : t + 1], kv, idx[t : t + 1], SM_SCALE, batch_invariant=True)
        assert torch.equal(one_out[0], batch_out[t]) and torch.equal(one_lse[0], batch_lse[t])
    nope, rope = q[..., :512].contiguous(), q[..., 512:].contiguous()
    apart, apart_lse = sparse_mla_decode(nope, kv, idx, SM_SCALE, batch_invariant=True, q_rope=rope)
    assert torch.equal(apart, batch_out) and torch.equal(apart_lse, batch_lse)


@on_gluon_gpu
def test_misaligned_rows_fall_back_to_triton(target, rng):
    kv, q, idx = make_inputs(target, rng, 3, 16, 256, 2048, "fp8")
    out, lse = sparse_mla_decode(q, misaligned_copy(kv), idx, SM_SCALE)
    assert_matches_reference(out, lse, q, kv, idx)


def test_word_rebuild_gives_every_e4m3_code_its_value():
    """The word-at-a-time FP8 rebuild (``word_dequant``: ``_rebuild_pair``'s masks, shifts and fp16
    reinterpretation, emulated here with the module's own constants, since Gluon has no interpreter):
    every code at every byte position of a word becomes ``value / 256`` exactly, as fp16, beside any
    other code; the two NaN codes (0x7F, 0xFF), which quantization never writes, become +-480."""
    import sglang_sparse_mla.kernels.sparse_mla_sm80 as sm80

    signs, magnitudes = sm80._F16_SIGNS.value, sm80._F16_MAGNITUDES.value
    codes = torch.arange(256, dtype=torch.int32)
    a, b = codes.repeat_interleave(256), codes.repeat(256)  # every pair of codes
    expected = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    expected[[0x7F, 0xFF]] = torch.tensor([480.0, -480.0])

    def halves(pairs):  # _f16_pair_to_f32: the low and high fp16 of each int32
        low = pairs.to(torch.int16).view(torch.float16).float()
        return low, (pairs >> 16).to(torch.int16).view(torch.float16).float()

    for shift_a, shift_b in ((0, 16), (8, 24)):  # bytes 0 and 2 (HALF 0), bytes 1 and 3 (HALF 1)
        words = (a << shift_a) | (b << shift_b)  # the other two bytes stay zero...
        noise = (codes.flip(0).repeat(256) << (shift_a ^ 8)) | (codes.repeat(256) << (shift_b ^ 8))
        words = words | noise  # ...or hold any codes: the masks must ignore them
        if shift_a == 0:
            pairs = ((words << 8) & signs) | ((words << 7) & magnitudes)
        else:
            pairs = (words & signs) | ((words >> 1) & magnitudes)
        low, high = halves(pairs)
        assert torch.equal(low * 256, expected[a.long()]) and torch.equal(high * 256, expected[b.long()])
