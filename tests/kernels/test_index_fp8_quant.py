"""The indexer's fused FP8 quantization (``quantize_index_queries``, ``quantize_index_keys_to_cache``,
both in one launch: ``quantize_index_keys_and_queries``)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from utils import assert_fp8_codes_match

from sglang_sparse_mla.kernels import (
    IndexNorm,
    IndexRope,
    quantize_index_keys_and_queries,
    quantize_index_keys_to_cache,
    quantize_index_queries,
)
from sglang_sparse_mla.kernels.index_fp8_quant import _e4m3_codes
from sglang_sparse_mla.kernels.reference import index_fp8_quant_reference

PAGE = 64
ROW = 132


def index_rows(rng, device, *shape):
    """bf16 rows over many magnitudes (a row scale from 1e-7 to 1e3), including all-zero rows."""
    x = torch.randn(*shape, 128, generator=rng, device=device)
    magnitude = torch.exp(torch.empty(*shape, 1, device=device).uniform_(-16, 7, generator=rng))
    x = x * magnitude
    x.view(-1, 128)[::7] = 0.0
    return x.bfloat16()


def assert_scales_match(scales: torch.Tensor, ref: torch.Tensor, rotate: bool, scale_format: str) -> None:
    """Row scales equal to the reference's, bit for bit; with the rotation, but for a few rows whose
    bf16 maximum the kernel's fp32 scaling of the exact sum rounds to the neighbouring bf16 (the double
    rounding of the codes): their scale one bf16 step away (fp32 format) or one power of two (ue8m0)."""
    differ = scales != ref
    if not rotate:
        assert not differ.any(), f"{int(differ.sum())} scales differ"
        return
    assert differ.float().mean().item() < 2e-3, f"{differ.float().mean().item():.2e} of the scales differ"
    ratio = (scales[differ].double() / ref[differ].double()).log2().abs()
    assert (ratio <= (1.0 if scale_format == "ue8m0" else 2.0**-7)).all(), "a scale moved by more than one step"


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
@pytest.mark.parametrize("gate_layout", ["fp32", "bf16_fused_slice"])
def test_queries_match_reference(target, rng, rotate, scale_format, gate_layout):
    tokens, heads = target.pick(cpu=(9, 32), gpu=(333, 64))
    q = index_rows(rng, target.device, tokens, heads)
    if gate_layout == "fp32":
        gate = torch.randn(tokens, heads, generator=rng, device=target.device)
    else:  # the gate columns of SGLang's fused wk_weights_proj output
        gate = torch.randn(tokens, 128 + heads, generator=rng, device=target.device).bfloat16()[:, 128:]
    codes, scales, weights = quantize_index_queries(
        q, gate, heads**-0.5, 128**-0.5, rotate=rotate, scale_format=scale_format
    )
    ref_codes, ref_scales = index_fp8_quant_reference(q, rotate=rotate, scale_format=scale_format)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == q.shape
    assert_scales_match(scales, ref_scales, rotate, scale_format)
    # With the rotation, rare 1-code differences where the kernel's fp32 scaling of the exact sum lands
    # on another bf16 than the reference's single rounding (double rounding).
    assert_fp8_codes_match(codes, ref_codes, 1e-4 if rotate else 0.0)
    # fp32, multiplied in this order (SGLang's): bit-equal to torch doing the same.
    assert torch.equal(weights, gate.float() * heads**-0.5 * scales * 128**-0.5)
    if scale_format == "ue8m0":
        assert torch.equal(scales, torch.exp2(torch.round(torch.log2(scales))))


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_keys_written_at_their_slots_only(target, rng, rotate, loc_dtype, scale_format):
    tokens, pages = target.pick(cpu=(37, 3), gpu=(5000, 100))
    k = index_rows(rng, target.device, tokens)
    cache = torch.full((pages, PAGE, 1, ROW), 0xAB, dtype=torch.uint8, device=target.device)
    loc = torch.randperm(pages * PAGE, generator=rng, device=target.device)[:tokens].to(loc_dtype)
    quantize_index_keys_to_cache(k, loc, cache, rotate=rotate, scale_format=scale_format)

    ref_codes, ref_scales = index_fp8_quant_reference(k, rotate=rotate, scale_format=scale_format)
    flat = cache.view(pages, PAGE * ROW)
    page, offset = loc.long() // PAGE, loc.long() % PAGE
    key_bytes = flat[:, : PAGE * 128].view(pages, PAGE, 128)[page, offset]
    scale_bytes = flat[:, PAGE * 128 :].contiguous().view(torch.float32).view(pages, PAGE)[page, offset]
    assert_fp8_codes_match(key_bytes, ref_codes, 1e-4 if rotate else 0.0)
    assert_scales_match(scale_bytes, ref_scales, rotate, scale_format)
    untouched = torch.ones(pages, PAGE, dtype=torch.bool, device=target.device)
    untouched[page, offset] = False
    keys_view = flat[:, : PAGE * 128].view(pages, PAGE, 128)
    scales_view = flat[:, PAGE * 128 :].view(pages, PAGE, 4)
    assert (keys_view[untouched] == 0xAB).all() and (scales_view[untouched] == 0xAB).all()


def interleaved_rope(rng, device, tokens: int, dtype=torch.float32, max_position: int = 4096) -> IndexRope:
    """A rope cache ``[max_position, 64] = [cos | sin]`` of 32 angles per position and random positions."""
    inv_freq = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device, dtype)
    positions = torch.randint(0, max_position, (tokens,), generator=rng, device=device)
    return IndexRope(cache, positions)


@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_roped_queries_match_reference(target, rng, scale_format, cache_dtype):
    """SGLang's fused indexer's queries: rope in fp32 on the raw projection, quantized unrounded."""
    tokens, heads = target.pick(cpu=(11, 32), gpu=(257, 64))
    q = index_rows(rng, target.device, tokens, heads)
    gate = torch.randn(tokens, 128 + heads, generator=rng, device=target.device).bfloat16()[:, 128:]
    rope = interleaved_rope(rng, target.device, tokens, cache_dtype)
    codes, scales, weights = quantize_index_queries(
        q, gate, 0.125, 1.0, rotate=False, scale_format=scale_format, rope=rope
    )
    ref_codes, ref_scales = index_fp8_quant_reference(q, rotate=False, scale_format=scale_format, rope=rope)
    # fp32 rope (kernel: one rounded product, one fma) vs fp64 (reference): the row maximum may move by
    # up to two fp32 steps, the fp32 scale with it (2.04e-7 seen); a power-of-two scale rarely moves.
    torch.testing.assert_close(scales, ref_scales, rtol=3.6e-7 if scale_format == "fp32" else 0, atol=0)
    assert_fp8_codes_match(codes, ref_codes, 2e-3)
    # All-zero rows give signed zeros, bit for bit: -0 (code 0x80) where the rope's x * cos - y * sin is
    # -0 + -0 (cos < 0 < sin), as SGLang's kernel and the reference compute it. Triton 3.6's unary minus
    # (0 - x) made those +0: 8.3e-3 of the codes differed on the GPU.
    zero_rows = (q == 0).all(-1)
    assert torch.equal(codes.view(torch.uint8)[zero_rows], ref_codes.view(torch.uint8)[zero_rows])
    assert torch.equal(weights, gate.float() * 0.125 * scales)
    # At position 0 the rope is the identity: the same bits as quantizing the rows as they are.
    at_zero = IndexRope(rope.cos_sin_cache, torch.zeros_like(rope.positions))
    identity = quantize_index_queries(q, gate, 0.125, 1.0, rotate=False, scale_format=scale_format, rope=at_zero)
    plain = quantize_index_queries(q, gate, 0.125, 1.0, rotate=False, scale_format=scale_format)
    for a, b in zip(identity, plain, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    # Positions as a strided view (e.g. a column of a larger tensor) read the same.
    strided = IndexRope(rope.cos_sin_cache, torch.stack([rope.positions, rope.positions * 0], 1)[:, 0])
    again = quantize_index_queries(q, gate, 0.125, 1.0, rotate=False, scale_format=scale_format, rope=strided)
    assert torch.equal(again[0].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(again[2], weights)


@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_normed_roped_keys_match_reference(target, rng, scale_format):
    """SGLang's fused indexer's keys: LayerNorm and rope in fp32 on the raw projection (here the key
    columns of a fused projection, strided rows), one bf16 rounding, then quantized and stored."""
    tokens, pages = target.pick(cpu=(37, 3), gpu=(3000, 60))
    fused_out = torch.randn(tokens, 128 + 32, generator=rng, device=target.device) * 3 + 1
    k = fused_out.bfloat16()[:, :128]
    gen = torch.Generator().manual_seed(5)
    norm = IndexNorm(
        (1 + 0.3 * torch.randn(128, generator=gen)).to(target.device),
        (0.1 * torch.randn(128, generator=gen)).to(target.device),
        1e-6,
    )
    rope = interleaved_rope(rng, target.device, tokens)
    cache = torch.zeros(pages, PAGE, 1, ROW, dtype=torch.uint8, device=target.device)
    loc = torch.randperm(pages * PAGE, generator=rng, device=target.device)[:tokens]
    quantize_index_keys_to_cache(k, loc, cache, rotate=False, scale_format=scale_format, rope=rope, norm=norm)

    ref_codes, ref_scales = index_fp8_quant_reference(
        k, rotate=False, scale_format=scale_format, rope=rope, norm=norm, round_bf16=True
    )
    flat = cache.view(pages, PAGE * ROW)
    page, offset = loc // PAGE, loc % PAGE
    key_bytes = flat[:, : PAGE * 128].view(pages, PAGE, 128)[page, offset]
    scale_bytes = flat[:, PAGE * 128 :].contiguous().view(torch.float32).view(pages, PAGE)[page, offset]
    # A bf16 rounding of the row maximum may land on the neighbour: the scale then moves by one bf16 step.
    torch.testing.assert_close(scale_bytes, ref_scales, rtol=1e-2, atol=0)
    assert (scale_bytes == ref_scales).float().mean().item() > 0.95
    same_scale = scale_bytes == ref_scales
    assert_fp8_codes_match(key_bytes[same_scale], ref_codes[same_scale], 2e-3)


# SGLang's three indexer variants: unfused with the rotation (DeepSeek-V3.2 off CUDA's fused path), unfused
# without it (its fused CUDA/HIP writers' format), fused (LayerNorm + rope in the kernel; fp32 or bf16 rope cache).
PAIR_VARIANTS = [
    dict(rotate=True, key_format="fp32", query_format="ue8m0"),
    dict(rotate=False, key_format="fp32", query_format="fp32"),
    dict(rotate=False, key_format="fp32", query_format="fp32", rope=torch.float32, norm=True),
    dict(rotate=False, key_format="ue8m0", query_format="ue8m0", rope=torch.bfloat16, norm=False),
]


@pytest.mark.parametrize("variant", PAIR_VARIANTS, ids=["rotated", "plain", "fused", "rope-only"])
@pytest.mark.parametrize("padded", [0, 3], ids=["all-rows", "padded-keys"])
def test_keys_and_queries_in_one_launch_equal_the_two_calls(target, rng, variant, padded):
    """One launch for a layer's keys and queries writes the bits the two single calls write, with
    the queries those of the keys' first tokens (a data-parallel batch's padded key rows after them)."""
    tokens, heads, pages = target.pick(cpu=(5, 32, 2), gpu=(300, 64, 20))
    keys = tokens + padded
    dev = target.device
    fused_out = index_rows(rng, dev, keys, 2)  # strided key rows, as a column slice of a fused projection
    k = fused_out[:, 0]
    q = index_rows(rng, dev, tokens, heads)
    gate = torch.randn(tokens, 128 + heads, generator=rng, device=dev).bfloat16()[:, 128:]
    loc = torch.randperm(pages * PAGE, generator=rng, device=dev)[:keys]
    rope = norm = None
    if "rope" in variant:
        rope = interleaved_rope(rng, dev, keys, variant["rope"])
    if variant.get("norm"):
        norm = IndexNorm(1 + 0.3 * torch.rand(128, device=dev), 0.1 * torch.rand(128, device=dev), 1e-6)
    rotate, key_format, query_format = variant["rotate"], variant["key_format"], variant["query_format"]

    cache = torch.full((pages, PAGE, 1, ROW), 0xAB, dtype=torch.uint8, device=dev)
    outputs = quantize_index_keys_and_queries(
        k, loc, cache, q, gate, heads**-0.5, 0.5,
        rotate=rotate, key_format=key_format, query_format=query_format, rope=rope, norm=norm,
    )  # fmt: skip

    expected_cache = torch.full_like(cache, 0xAB)
    quantize_index_keys_to_cache(k, loc, expected_cache, rotate=rotate, scale_format=key_format, rope=rope, norm=norm)
    query_rope = rope and IndexRope(rope.cos_sin_cache, rope.positions[:tokens])
    expected = quantize_index_queries(
        q, gate, heads**-0.5, 0.5, rotate=rotate, scale_format=query_format, rope=query_rope
    )
    assert torch.equal(cache, expected_cache)
    assert (cache != 0xAB).any()
    for got, want in zip(outputs, expected, strict=True):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)  # fmt: skip
    # No queries (a layer whose top-k comes from another): the keys alone, the same bits.
    alone = torch.full_like(cache, 0xAB)
    codes, _, _ = quantize_index_keys_and_queries(
        k, loc, alone, q[:0], gate[:0], 1.0, 1.0,
        rotate=rotate, key_format=key_format, query_format=query_format, rope=rope, norm=norm,
    )  # fmt: skip
    assert codes.shape == (0, heads, 128) and torch.equal(alone, expected_cache)


@triton.jit
def _codes_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _e4m3_codes(tl.load(y_ptr + i, mask=i < n, other=0.0)), mask=i < n)


def test_e4m3_codes_round_to_nearest_even(target):
    """Every e4m3 value, every midpoint between neighbours (ties go to the even code) and the fp32
    values one ulp either side of it, both signs, subnormals and zero: torch's conversion to the bit."""
    positive = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (positive[:-1].double() + positive[1:].double()) / 2
    below, above = mid.float().nextafter(torch.tensor(0.0)), mid.float().nextafter(torch.tensor(1e9))
    around = torch.cat([below, mid.float(), above])
    y = torch.cat([positive, around, torch.tensor([1e-12, 2.0**-10, 2.0**-9 * 0.75, 447.9999])])
    y = torch.cat([y, -y]).to(target.device)
    out = torch.empty(y.shape[0], dtype=torch.uint8, device=target.device)
    _codes_kernel[(triton.cdiv(y.shape[0], 256),)](y, out, y.shape[0], BLOCK=256)
    assert torch.equal(out, y.to(torch.float8_e4m3fn).view(torch.uint8))


def test_empty_and_row_independence(target, rng):
    q = index_rows(rng, target.device, 0, 32)
    codes, scales, weights = quantize_index_queries(
        q, torch.empty(0, 32, device=target.device), 1.0, 1.0, rotate=True, scale_format="ue8m0"
    )
    assert codes.shape == (0, 32, 128) and scales.shape == weights.shape == (0, 32)
    quantize_index_keys_to_cache(
        q.view(0, 128), torch.empty(0, dtype=torch.int64, device=target.device),
        torch.zeros(1, PAGE, 1, ROW, dtype=torch.uint8, device=target.device), rotate=True, scale_format="fp32",
    )  # fmt: skip
    # A token's codes do not depend on the tokens quantized with it.
    q = index_rows(rng, target.device, 40, 32)
    gate = torch.randn(40, 32, generator=rng, device=target.device)
    batch = quantize_index_queries(q, gate, 0.5, 0.25, rotate=True, scale_format="fp32")
    alone = quantize_index_queries(q[17:18], gate[17:18], 0.5, 0.25, rotate=True, scale_format="fp32")
    for b, a in zip(batch, alone, strict=True):
        assert torch.equal(b[17:18].view(torch.uint8), a.view(torch.uint8))


def test_bad_inputs_are_refused(target):
    dev = target.device
    q = torch.zeros(4, 32, 128, dtype=torch.bfloat16, device=dev)
    gate = torch.zeros(4, 32, device=dev)
    cache = torch.zeros(2, PAGE, 1, ROW, dtype=torch.uint8, device=dev)
    loc = torch.zeros(4, dtype=torch.int64, device=dev)
    quant = dict(rotate=False, scale_format="fp32")
    with pytest.raises(ValueError, match="q must be torch.bfloat16"):
        quantize_index_queries(q.float(), gate, 1.0, 1.0, **quant)
    with pytest.raises(ValueError, match="index head dim"):
        quantize_index_queries(q[..., :64], gate, 1.0, 1.0, **quant)
    with pytest.raises(ValueError, match="gate must be"):
        quantize_index_queries(q, gate[:, :16], 1.0, 1.0, **quant)
    with pytest.raises(ValueError, match="gate must be contiguous"):
        quantize_index_queries(q, torch.zeros(32, 4, device=dev).T, 1.0, 1.0, **quant)
    with pytest.raises(ValueError, match="one slot per key"):
        quantize_index_keys_to_cache(q[:, 0], loc[:3], cache, **quant)
    with pytest.raises(ValueError, match="loc must be"):
        quantize_index_keys_to_cache(q[:, 0], loc.float(), cache, **quant)
    with pytest.raises(ValueError, match="kv_cache must be"):
        quantize_index_keys_to_cache(q[:, 0], loc, cache.view(2, PAGE, ROW), **quant)
    with pytest.raises(ValueError, match="kv_cache must be a contiguous"):
        quantize_index_keys_to_cache(q[:, 0], loc, cache[:, :, :, :128], **quant)
    with pytest.raises(ValueError, match="scale_format must be one of"):
        quantize_index_queries(q, gate, 1.0, 1.0, rotate=False, scale_format="e8m0")
    rope = IndexRope(torch.zeros(16, 64, device=dev), torch.zeros(4, dtype=torch.int64, device=dev))
    norm = IndexNorm(torch.ones(128, device=dev), torch.zeros(128, device=dev), 1e-6)
    with pytest.raises(ValueError, match="rope and rotate exclude each other"):
        quantize_index_queries(q, gate, 1.0, 1.0, rotate=True, scale_format="fp32", rope=rope)
    with pytest.raises(ValueError, match="norm is applied only together with rope"):
        quantize_index_keys_to_cache(q[:, 0], loc, cache, norm=norm, **quant)
    with pytest.raises(ValueError, match="cos and sin of 32 angles"):
        quantize_index_queries(
            q, gate, 1.0, 1.0, rope=IndexRope(torch.zeros(16, 128, device=dev), rope.positions), **quant
        )
    with pytest.raises(ValueError, match="one position per token"):
        quantize_index_queries(q, gate, 1.0, 1.0, rope=IndexRope(rope.cos_sin_cache, rope.positions[:3]), **quant)
    with pytest.raises(ValueError, match="norm.weight must be torch.float32"):
        bad = IndexNorm(norm.weight.bfloat16(), norm.bias, 1e-6)
        quantize_index_keys_to_cache(q[:, 0], loc, cache, rope=rope, norm=bad, **quant)
    with pytest.raises(ValueError, match="4 queries > 3 keys"):
        quantize_index_keys_and_queries(
            q[:3, 0], loc[:3], cache, q, gate, 1.0, 1.0, rotate=False, key_format="fp32", query_format="fp32"
        )
    with pytest.raises(ValueError, match="scale_format must be one of"):
        quantize_index_keys_and_queries(
            q[:, 0], loc, cache, q, gate, 1.0, 1.0, rotate=False, key_format="e8m0", query_format="fp32"
        )
