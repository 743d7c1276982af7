"""Pure-torch pieces of a tiny DSA layer (no SGLang), shared by the backend tests and
``benchmarks/profile_decode_layer.py``.

:class:`StubIndexer` carries the attributes of SGLang's ``Indexer`` module
that :mod:`sglang_sparse_mla.backend.indexer` reads, so the indexer pipeline
can run where SGLang is not installed (e.g. on a GPU machine); the SGLang
tests use the real module. :func:`check_topk_row` is the fp64 top-k check
both use.
"""

from __future__ import annotations

import torch

from ..backend.dispatch import gather_index_k
from ..backend.indexer import index_inputs, sglang_rotates, sglang_scale_formats
from ..kernels import IndexRope, quantize_index_keys_to_cache, quantize_index_queries
from ..kernels.index_format import INDEX_ROW_BYTES


class NeoxRope(torch.nn.Module):
    """Rotary embedding stand-in (SGLang's CPU build needs vLLM): neox rotation in torch."""

    def __init__(self, dim: int = 64, base: float = 10000.0, device=None):
        super().__init__()
        # Built on the model's device: a host-to-device copy in forward cannot be graph-captured.
        self.inv_freq = (base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)).to(device)

    def forward(self, positions, q, k):
        angle = positions.double()[:, None] * self.inv_freq.to(positions.device)
        cos, sin = angle.cos(), angle.sin()

        def rotate(x, c, s):
            x1, x2 = x.double().chunk(2, dim=-1)
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)

        return rotate(q, cos[:, None], sin[:, None]), rotate(k, cos, sin)


class InterleavedRope(torch.nn.Module):
    """GLM-5's rotary embedding stand-in: interleaved pairs ``(2i, 2i + 1)`` turned by angle ``i``,
    with SGLang's ``cos_sin_cache`` ``[max_position, 64] = [cos | sin]`` in fp32 (what its fused
    indexer kernels, and ours, read). The module rounds its output to the input's dtype."""

    def __init__(self, dim: int = 64, base: float = 10000.0, max_position: int = 4096, device=None):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq
        self.cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(device)

    def forward(self, positions, q, k):
        angles = self.cos_sin_cache[positions.long()].double()
        pairs = angles.shape[1] // 2
        cos, sin = angles[:, :pairs], angles[:, pairs:]

        def rotate(x, c, s):
            even, odd = x.double()[..., 0::2], x.double()[..., 1::2]
            return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).to(x.dtype)

        return rotate(q, cos[:, None], sin[:, None]), rotate(k, cos, sin)


class _Linear(torch.nn.Linear):
    """SGLang's linear layers return ``(output, bias)``."""

    def forward(self, x):
        return super().forward(x), None


class Fp32LayerNorm(torch.nn.LayerNorm):
    """SGLang's indexer ``LayerNorm``: fp32 parameters, normalizes in fp32, returns the input's dtype.

    Like the FlashInfer kernel it runs on CUDA, it requires only the last
    dimension to be contiguous and reads row ``t`` at ``t * hidden`` elements
    from the start: the row stride of a view is ignored.
    """

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    def forward(self, x):
        if x.dim() != 2 or x.stride(-1) != 1:
            raise ValueError(f"LayerNorm input must be 2-D with a contiguous last dimension, got strides {x.stride()}")
        rows = x.as_strided(x.shape, (x.shape[1], 1))
        return super().forward(rows.float()).to(x.dtype)


class StubIndexer(torch.nn.Module):
    """What the backend's indexer forward reads of SGLang's ``Indexer`` module."""

    def __init__(self, hidden: int, q_lora_rank: int, n_heads: int, device, seed: int = 0, fused: bool = False):
        """``fused``: like SGLang's CUDA ``Indexer`` of GLM-5 (``use_dsa_indexer_fusion``): ``wk`` and
        ``weights_proj`` also as one ``wk_weights_proj`` layer, interleaved rope, no Hadamard rotation."""
        super().__init__()
        self.n_heads, self.head_dim, self.rope_head_dim = n_heads, 128, 64
        self.softmax_scale = self.head_dim**-0.5
        self.scale_fmt = "ue8m0"
        self.wq_b = _Linear(q_lora_rank, n_heads * 128, bias=False)
        self.wk = _Linear(hidden, 128, bias=False)
        self.weights_proj = _Linear(hidden, n_heads, bias=False)
        self.k_norm = Fp32LayerNorm(128, eps=1e-6)
        self.rotary_emb = InterleavedRope(device=device) if fused else NeoxRope()
        gen = torch.Generator().manual_seed(seed)
        for linear in (self.wq_b, self.wk, self.weights_proj):
            linear.weight.data = torch.randn(linear.weight.shape, generator=gen) * linear.weight.shape[1] ** -0.5
        self.use_dsa_indexer_fusion = fused
        if fused:
            self.wk_weights_proj = _Linear(hidden, 128 + n_heads, bias=False)
            self.wk_weights_proj.weight.data = torch.cat([self.wk.weight.data, self.weights_proj.weight.data])
        self.to(device, torch.bfloat16)
        self.k_norm.float()


def index_scores(indexer, x: torch.Tensor, q_lora: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp64 index scores ``[len(rows), L]`` of query positions ``rows`` over a request's ``L`` keys.

    Computed from the same FP8 codes and scales the kernels read (the check is
    of the kernels and plumbing, not of FP8 rounding).
    """
    inputs = index_inputs(indexer, x, q_lora, torch.arange(x.shape[0], device=x.device))
    rotate = sglang_rotates(indexer)
    query_format, key_format = sglang_scale_formats(indexer)
    rope = inputs.rope and IndexRope(inputs.rope.cos_sin_cache, inputs.rope.positions[rows])
    q_fp8, q_scale, _ = quantize_index_queries(
        inputs.query[rows], inputs.gate[rows], 1.0, 1.0, rotate=rotate, scale_format=query_format, rope=rope
    )
    pages = torch.zeros(-(-x.shape[0] // 64), 64, 1, INDEX_ROW_BYTES, dtype=torch.uint8, device=x.device)
    slots = torch.arange(x.shape[0], device=x.device)
    quantize_index_keys_to_cache(
        inputs.key, slots, pages, rotate=rotate, scale_format=key_format, rope=inputs.rope, norm=inputs.norm
    )
    k_fp8, k_scale = gather_index_k(pages.view(pages.shape[0], -1), slots)
    dots = torch.einsum("thd,nd->thn", q_fp8.double(), k_fp8.double()).relu()
    weights = inputs.gate[rows].double() * (indexer.n_heads**-0.5 * indexer.softmax_scale) * q_scale.double()
    return ((dots * weights[..., None]).sum(1) * k_scale.double()).cpu()


def check_topk_row(row: list[int], position_of: dict[int, int], scores: torch.Tensor, pos: int, k: int) -> list[int]:
    """Assert a row of slots is the top-k of ``scores[: pos + 1]``; return its positions.

    ``-1`` pads the tail, slots are the request's own, distinct and causal.
    """
    chosen = [position_of[s] for s in row if s >= 0]
    assert row[len(chosen) :] == [-1] * (len(row) - len(chosen)), "-1 padding after the slots"
    assert len(set(chosen)) == len(chosen) == min(k, pos + 1)
    assert max(chosen) <= pos, "a token may only see its own prefix"
    visible = scores[: pos + 1]
    rest = torch.ones(pos + 1, dtype=torch.bool)
    rest[chosen] = False
    if rest.any():
        assert visible[chosen].min() >= visible[rest].max() - 1e-2 * visible.abs().max()
    return sorted(chosen)
