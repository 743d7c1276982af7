"""Kernel dispatch helpers: cache writes in SGLang's layouts, index-K pages, FP8 rows."""

from __future__ import annotations

import pytest
import torch
from utils import assert_fp8_codes_match

from sglang_sparse_mla.backend import dispatch
from sglang_sparse_mla.kernels import IndexNorm, IndexRope, quantize_kv_fp8
from sglang_sparse_mla.kernels.index_format import hadamard_signs
from sglang_sparse_mla.kernels.reference import index_fp8_quant_reference

PAGE, ROW = 64, 132


def test_store_kv_bf16_and_fp8_rows(target):
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 576, generator=gen).bfloat16().to(target.device)
    loc = torch.tensor([3, 64, 65, 9, 130], device=target.device)
    untouched = torch.tensor([0, 4, 66], device=target.device)

    bf16 = torch.zeros(200, 1, 576, dtype=torch.bfloat16, device=target.device)
    dispatch.store_kv(bf16, loc, rows.view(5, 1, 576))
    assert torch.equal(bf16[loc, 0], rows)
    assert bf16[untouched].abs().sum() == 0

    # SGLang's FP8 DSA pool stores uint8 rows and hands out float8 views of them.
    fp8 = torch.zeros(200, 1, 656, dtype=torch.uint8, device=target.device)
    dispatch.store_kv(fp8.view(torch.float8_e4m3fn), loc, rows)
    assert torch.equal(fp8[loc, 0], quantize_kv_fp8(rows))
    assert fp8[untouched].sum() == 0


def _unit_gate_queries(x: torch.Tensor, *, rotate: bool, scale_format: str):
    """``(codes, scales)`` of rows ``x [N, 128]`` by the fused query kernel (unit gate and factors, so
    its weights are the scales)."""
    ones = torch.ones(x.shape[0], 1, device=x.device)
    codes, scales = dispatch.quantize_index_queries(
        x.view(-1, 1, 128), ones, 1.0, 1.0, rotate=rotate, scale_format=scale_format
    )
    return codes.view(-1, 128), scales.view(-1)


def test_index_k_page_layout_and_roundtrip(target):
    gen = torch.Generator().manual_seed(2)
    buf = torch.zeros(4, PAGE * ROW, dtype=torch.uint8, device=target.device)
    key = torch.randn(3, 128, generator=gen).bfloat16().to(target.device)
    codes, scale = index_fp8_quant_reference(key, rotate=False, scale_format="fp32")
    loc = torch.tensor([1, 64 + 63, 3 * 64], device=target.device)
    dispatch.quantize_index_keys(buf, loc, key, rotate=False, scale_format="fp32")

    for i, slot in enumerate(loc.tolist()):
        page, off = divmod(slot, PAGE)
        assert torch.equal(buf[page, off * 128 : off * 128 + 128], codes[i].view(torch.uint8))
        got_scale = buf[page, PAGE * 128 + off * 4 : PAGE * 128 + off * 4 + 4].view(torch.float32)
        assert got_scale.item() == scale[i].item()
    k_fp8, k_scale = dispatch.gather_index_k(buf, loc)
    assert torch.equal(k_fp8.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(k_scale, scale)


def test_index_k_layout_matches_sglang_writer(target):
    """Our writer and SGLang's Triton index-K store kernel put the same codes and scales at the same
    bytes."""
    pytest.importorskip("sglang.srt")
    from sglang.kernels.ops.kvcache.dsa_index_k_cache import _set_k_and_s_triton

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 128, generator=gen).bfloat16().to(target.device)
    codes, scale = index_fp8_quant_reference(x, rotate=False, scale_format="fp32")
    loc = torch.tensor([0, 5, 63, 64, 150, 255], device=target.device)
    ours = torch.zeros(4, PAGE * ROW, dtype=torch.uint8, device=target.device)
    theirs = torch.zeros_like(ours)
    dispatch.quantize_index_keys(ours, loc, x, rotate=False, scale_format="fp32")
    _set_k_and_s_triton(buf=theirs, loc=loc, index_k=codes, index_k_scale=scale.view(-1, 1), page_size=PAGE)
    assert torch.equal(ours, theirs)


def _sglang_magnitude_rows(rows: int, seed: int, device) -> torch.Tensor:
    magnitudes = torch.logspace(-6, 2, rows)[:, None]
    return (torch.randn(rows, 128, generator=torch.Generator().manual_seed(seed)) * magnitudes).bfloat16().to(device)


def test_index_keys_match_sglang_cuda_writer(target):
    """Keys quantized and stored as SGLang's CUDA index-K writer (``fused_store_index_k_cache``, every
    CUDA indexer's) stores them: the same pages, to the bit."""
    if not target.gpu:
        pytest.skip("SGLang's index-K writer is a CUDA kernel")
    pytest.importorskip("sglang.srt")
    from sglang.kernels.ops.kvcache.dsa_fused_store_index_cache import fused_store_index_k_cache

    x = _sglang_magnitude_rows(4096, 8, target.device)
    loc = torch.randperm(80 * PAGE, generator=torch.Generator().manual_seed(9))[: x.shape[0]].to(target.device)
    ours = torch.zeros(80, PAGE * ROW, dtype=torch.uint8, device=target.device)
    theirs = torch.zeros_like(ours)
    dispatch.quantize_index_keys(ours, loc, x, rotate=False, scale_format="fp32")
    fused_store_index_k_cache(x, theirs, loc, PAGE)
    assert torch.equal(ours, theirs)


def _glm5_rope(tokens: int, device) -> IndexRope:
    """An interleaved rope cache as GLM-5's indexer has (fp32 ``[cos | sin]``) and spread positions."""
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    rope = RotaryEmbedding(64, 64, 4096, 1000000, False, torch.bfloat16).to(device)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(12)).to(device)
    return IndexRope(rope.cos_sin_cache.float().contiguous(), positions)


def test_fused_indexer_queries_match_sglang_cuda_kernel(target):
    """The fused indexer's queries and weights as SGLang's ``fused_q_indexer_rope_first_quant`` makes
    them: rope in fp32 on the raw projection, fp32 scales, one fp32 weight factor."""
    if not target.gpu:
        pytest.skip("SGLang's fused query kernel is CUDA-only")
    pytest.importorskip("sglang.srt")
    from sglang.kernels.ops.attention.dsa.indexer_q import fused_q_indexer_rope_first_quant

    tokens, heads, softmax_scale = 512, 32, 128**-0.5
    q = _sglang_magnitude_rows(tokens * heads, 10, target.device).view(tokens, heads, 128)
    gate = torch.randn(tokens, 128 + heads, generator=torch.Generator().manual_seed(11)).bfloat16()
    gate = gate.to(target.device)[:, 128:]  # the gate columns of the fused wk_weights_proj output
    rope = _glm5_rope(tokens, target.device)
    theirs_q, theirs_w = fused_q_indexer_rope_first_quant(
        q, gate, softmax_scale * heads**-0.5, rope.cos_sin_cache, rope.positions
    )
    ours_q, ours_w = dispatch.quantize_index_queries(
        q, gate, softmax_scale * heads**-0.5, 1.0, rotate=False, scale_format="fp32", rope=rope
    )
    assert_fp8_codes_match(ours_q, theirs_q, 1e-4)  # fp32 multiply-adds contracted differently
    assert (ours_w == theirs_w.view(tokens, heads)).float().mean().item() > 0.999


def test_fused_indexer_keys_match_sglang_cuda_kernel(target):
    """The fused indexer's keys as SGLang's ``fused_k_indexer_norm_rope_store`` writes them: LayerNorm
    and rope in fp32 on the raw (strided) projection, one bf16 rounding, fp32 scales, same pages."""
    if not target.gpu:
        pytest.skip("SGLang's fused key kernel is CUDA-only")
    pytest.importorskip("sglang.srt")
    from sglang.kernels.ops.attention.dsa.indexer_k import fused_k_indexer_norm_rope_store

    tokens, gen = 4096, torch.Generator().manual_seed(13)
    projection = (torch.randn(tokens, 128 + 32, generator=gen) * 2 + 0.5).bfloat16().to(target.device)
    key = projection[:, :128]
    weight = (1 + 0.2 * torch.randn(128, generator=gen)).to(target.device)
    bias = (0.1 * torch.randn(128, generator=gen)).to(target.device)
    rope = _glm5_rope(tokens, target.device)
    loc = torch.randperm(80 * PAGE, generator=gen)[:tokens].to(target.device)
    ours = torch.zeros(80, PAGE * ROW, dtype=torch.uint8, device=target.device)
    theirs = torch.zeros_like(ours)
    norm = IndexNorm(weight, bias, 1e-6)
    dispatch.quantize_index_keys(ours, loc, key, rotate=False, scale_format="fp32", rope=rope, norm=norm)
    fused_k_indexer_norm_rope_store(key, theirs, loc, weight, bias, 1e-6, rope.cos_sin_cache, rope.positions, PAGE)
    ours_k, ours_s = dispatch.gather_index_k(ours, loc)
    theirs_k, theirs_s = dispatch.gather_index_k(theirs, loc)
    same = ours_s == theirs_s  # a LayerNorm summed in another order may round a row's maximum apart
    assert same.float().mean().item() > 0.99
    assert_fp8_codes_match(ours_k[same], theirs_k[same], 1e-4)


def test_fp8_rows_scales(target):
    x = torch.tensor([[0.5, -3.0] + [0.0] * 126, [1e-9] * 128]).bfloat16().to(target.device)
    codes, scale = _unit_gate_queries(x, rotate=False, scale_format="fp32")
    assert scale[0].item() == pytest.approx(3.0 / 448)
    assert (codes.float() * scale[:, None] - x.float()).abs().max() < 0.1
    _, p2 = _unit_gate_queries(x, rotate=False, scale_format="ue8m0")
    assert torch.equal(p2, torch.exp2(torch.round(torch.log2(p2))))
    assert (p2 >= scale).all() and (p2 < 2 * scale).all()


def test_ue8m0_queries_match_sglang_act_quant(target):
    """The unfused indexer's query codes and scales as SGLang's ``act_quant(.., "ue8m0")`` makes them
    (scales to the bit)."""
    pytest.importorskip("sglang.srt")
    from sglang.kernels.ops.quantization.act_quant_triton import act_quant

    x = _sglang_magnitude_rows(512, 7, target.device)
    codes, scale = act_quant(x, 128, "ue8m0")
    ours_codes, ours_scale = _unit_gate_queries(x, rotate=False, scale_format="ue8m0")
    assert torch.equal(ours_scale, scale.view(-1))
    if target.gpu:  # the interpreter rounds act_quant's in-kernel float8 conversion differently from a GPU
        assert torch.equal(ours_codes.view(torch.uint8), codes.view(torch.uint8))


def test_hadamard_rotation_is_orthonormal():
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 128, generator=gen, dtype=torch.float64)
    h = hadamard_signs(128, torch.float64, torch.device("cpu")) * 128**-0.5
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    rq, rk = q @ h, k @ h
    assert torch.allclose((rq * rk).sum(-1), (q * k).sum(-1), atol=1e-10)


def test_hadamard_rotation_matches_sglang_kernel(target):
    """The fused quantization rotates as the CUDA kernel SGLang's ``Indexer`` rotates with: the same
    FP8 codes as SGLang's rotation then ``act_quant`` (but for fp32 summation-order ties)."""
    if not target.gpu:
        pytest.skip("SGLang's Hadamard kernel is CUDA-only")
    pytest.importorskip("sglang.srt")
    from sglang.kernels.ops.quantization.act_quant_triton import act_quant
    from sglang.kernels.ops.quantization.hadamard import hadamard_transform

    x = torch.randn(4096 * 64, 128, generator=torch.Generator().manual_seed(6)).bfloat16().to(target.device)
    theirs, _ = act_quant(hadamard_transform(x, scale=128**-0.5), 128, "ue8m0")
    fused, _ = _unit_gate_queries(x, rotate=True, scale_format="ue8m0")
    assert (fused.view(torch.uint8) != theirs.view(torch.uint8)).float().mean().item() < 1e-4


def test_fp8_row_layout_matches_sglang_quantizer(target):
    """SGLang's FP8 DSA KV quantizer lays rows out as ours: same scales, same rope bytes.

    (Its e4m3 codes are not compared: Triton's CPU interpreter rounds its
    in-kernel float8 conversion differently from a GPU.)
    """
    pytest.importorskip("sglang.srt")
    from sglang.kernels.ops.quantization.dsa_quant_k_cache import quantize_k_cache_separate

    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(4, 576, generator=gen).bfloat16().to(target.device)
    nope, rope = quantize_k_cache_separate(rows[:, :512], rows[:, 512:])
    theirs = torch.cat([nope.view(4, -1), rope.view(4, -1)], 1)
    ours = quantize_kv_fp8(rows)
    assert theirs.shape == ours.shape == (4, 656)
    assert torch.equal(theirs[:, 512:], ours[:, 512:])
