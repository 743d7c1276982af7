"""How far our GLM-5 indexer's top-k sets are from SGLang's fused CUDA indexer's, on CPU.

    PYTHONPATH=. python benchmarks/glm5_indexer_parity.py [TOKENS]

Layer 0 of the tiny GLM-5 model (``sglang_sparse_mla.testing.tiny_model``, seed 0)
over TOKENS random tokens (default 1000): the indexer's top-256 positions of
every token that sees more than 256, scored from FP8 codes and scales three
ways, then compared with the first:

* ``sglang_fused``: a torch model of SGLang 0.5.23's fused CUDA kernels
  (``fused_k_indexer_norm_rope_store``: LayerNorm and interleaved rope in
  fp32, one bf16 rounding, fp32 scales; ``fused_q_indexer_rope_first_quant``:
  rope in fp32, no rounding, fp32 scales, weight ``gate * (softmax_scale *
  H**-0.5) * q_scale``);
* ``ours``: this package's quantization kernels as the backend calls them for
  a fused indexer (through Triton's interpreter here);
* ``ours_before``: what the backend did until 2026-11-26 (module LayerNorm
  and rope, each rounded to bf16; power-of-two scales).

The scores themselves are float64 sums of the FP8 products, so the numbers
measure the quantized inputs only. SGLang's kernels need CUDA; the GPU test
``tests/backend/test_dispatch.py`` compares with them directly.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from sglang_sparse_mla.backend.dispatch import gather_index_k  # noqa: E402
from sglang_sparse_mla.kernels import (  # noqa: E402
    IndexNorm,
    IndexRope,
    quantize_index_keys_to_cache,
    quantize_index_queries,
)
from sglang_sparse_mla.testing.tiny_model import random_weights, tiny_config  # noqa: E402

HEADS, DIM, ROPE, TOPK = 32, 128, 64, 256
BF16 = torch.bfloat16


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(BF16)


def layer0_inputs(tokens: int):
    """Raw indexer projections of layer 0: ``q [T, H, 128]``, ``key [T, 128]``, ``gate [T, H]`` (bf16)."""
    config = tiny_config("glm-5")
    weights = random_weights(config, 0)
    torch.manual_seed(0)
    x = rms_norm(weights["model.embed_tokens.weight"][torch.randint(2, 1000, (tokens,))])
    prefix = "model.layers.0.self_attn."
    q_lora = rms_norm((x.float() @ weights[prefix + "q_a_proj.weight"].float().t()).to(BF16))
    q = (q_lora.float() @ weights[prefix + "indexer.wq_b.weight"].float().t()).to(BF16).view(tokens, HEADS, DIM)
    fused = torch.cat([weights[prefix + "indexer.wk.weight"], weights[prefix + "indexer.weights_proj.weight"]])
    projection = (x.float() @ fused.float().t()).to(BF16)
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    return q, projection[:, :DIM], projection[:, DIM:], theta


def rope_cache(tokens: int, theta: float) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, ROPE, 2, dtype=torch.float32) / ROPE))
    angles = torch.arange(tokens).float()[:, None] * inv_freq[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def interleaved_rope(v: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """fp32 rope of ``v [T, ..., 64]`` (pairs ``(2i, 2i + 1)``), computed as the CUDA kernels do."""
    pairs = ROPE // 2
    shape = (v.shape[0],) + (1,) * (v.dim() - 2) + (pairs,)
    cos, sin = cache[:, :pairs].reshape(shape), cache[:, pairs:].reshape(shape)
    even, odd = v.float()[..., 0::2], v.float()[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def quantize(v: torch.Tensor, power_of_two: bool):
    amax = v.abs().amax(-1).clamp_min(1e-4)
    scale = amax / 448.0
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return (v * (1.0 / scale)[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).float(), scale


def layer_norm(v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(v.float(), (DIM,), eps=1e-6)


def scores(q_codes, weights, k_codes, k_scales) -> torch.Tensor:
    dots = torch.einsum("thd,nd->thn", q_codes.double(), k_codes.double()).relu()
    return (dots * weights.double()[..., None]).sum(1) * k_scales.double()[None]


def sglang_fused(q, key, gate, cache, weight_factor):
    normed = layer_norm(key)
    k = torch.cat([interleaved_rope(normed[:, :ROPE], cache), normed[:, ROPE:]], -1).to(BF16).float()
    k_codes, k_scales = quantize(k, False)
    q_codes, q_scales = quantize(torch.cat([interleaved_rope(q[..., :ROPE], cache), q[..., ROPE:].float()], -1), False)
    return scores(q_codes, gate.float() * weight_factor * q_scales, k_codes, k_scales)


def ours_before(q, key, gate, cache):
    normed = layer_norm(key).to(BF16)
    k = torch.cat([interleaved_rope(normed[:, :ROPE], cache).to(BF16), normed[:, ROPE:]], -1).float()
    k_codes, k_scales = quantize(k, True)
    roped = interleaved_rope(q[..., :ROPE], cache).to(BF16)
    q_codes, q_scales = quantize(torch.cat([roped, q[..., ROPE:]], -1).float(), True)
    return scores(q_codes, ((gate.float() * HEADS**-0.5) * q_scales) * DIM**-0.5, k_codes, k_scales)


def ours(q, key, gate, cache, weight_factor):
    tokens = key.shape[0]
    rope = IndexRope(cache, torch.arange(tokens))
    pages = torch.zeros(-(-tokens // 64), 64, 1, 132, dtype=torch.uint8)
    norm = IndexNorm(torch.ones(DIM), torch.zeros(DIM), 1e-6)
    quantize_index_keys_to_cache(
        key, torch.arange(tokens), pages, rotate=False, scale_format="fp32", rope=rope, norm=norm
    )
    k_codes, k_scales = gather_index_k(pages.view(pages.shape[0], -1), torch.arange(tokens))
    q_codes, _, weights = quantize_index_queries(
        q, gate, weight_factor, 1.0, rotate=False, scale_format="fp32", rope=rope
    )
    return scores(q_codes.float(), weights, k_codes.float(), k_scales)


def topk_sets(s: torch.Tensor) -> list[set[int]]:
    return [set(torch.topk(s[t, : t + 1], TOPK).indices.tolist()) for t in range(TOPK, s.shape[0])]


if __name__ == "__main__":
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    q, key, gate, theta = layer0_inputs(tokens)
    cache = rope_cache(tokens, theta)
    factor = DIM**-0.5 * HEADS**-0.5
    reference = topk_sets(sglang_fused(q, key, gate, cache, factor))
    for name, s in (("ours", ours(q, key, gate, cache, factor)), ("ours_before", ours_before(q, key, gate, cache))):
        differ = [len(a - b) for a, b in zip(reference, topk_sets(s), strict=True)]
        print(
            f"{name:<12} vs sglang_fused: {sum(differ) / len(differ):.3f} of {TOPK} positions differ per row, "
            f"{sum(d > 0 for d in differ) / len(differ):.1%} of {len(differ)} rows"
        )
