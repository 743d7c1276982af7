"""Random inputs for the lightning-indexer tests (FP8 queries/keys, paged cache)."""

from __future__ import annotations

import torch

FP8_MAX = 448.0


def random_fp8(rng: torch.Generator, shape, device, amax: float = 4.0) -> torch.Tensor:
    """float8_e4m3fn values ~ N(0, amax/3), clamped to [-amax, amax]."""
    x = torch.randn(shape, generator=rng, device=device) * (amax / 3)
    return x.clamp_(-amax, amax).to(torch.float8_e4m3fn)


def extreme_fp8(rng: torch.Generator, shape, device) -> torch.Tensor:
    """float8_e4m3fn values at and near the format's limits (+-448, +-2**-9)."""
    choices = torch.tensor([448.0, -448.0, 416.0, -384.0, 2.0**-9, -(2.0**-9), 1.0], device=device)
    pick = torch.randint(0, len(choices), shape, generator=rng, device=device)
    return choices[pick].to(torch.float8_e4m3fn)


def random_scales(rng: torch.Generator, n: int, device) -> torch.Tensor:
    return torch.rand(n, generator=rng, device=device) * 0.02 + 1e-3


def random_weights(rng: torch.Generator, rows: int, heads: int, device) -> torch.Tensor:
    """Per-head weights of both signs (SGLang's are not constrained positive)."""
    return torch.randn(rows, heads, generator=rng, device=device) * heads**-0.5


def paged_index_cache(keys: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pack ``[num_blocks * block_size, 128]`` FP8 keys and their float32 scales
    into SGLang's ``[num_blocks, block_size, 1, 132]`` uint8 index-K layout:
    per block, all key bytes, then all scales."""
    num_rows, dim = keys.shape
    num_blocks = num_rows // block_size
    flat = torch.empty(num_blocks, block_size * (dim + 4), dtype=torch.uint8, device=keys.device)
    flat[:, : block_size * dim] = keys.view(torch.uint8).reshape(num_blocks, block_size * dim)
    flat[:, block_size * dim :] = scales.float().contiguous().view(torch.uint8).reshape(num_blocks, block_size * 4)
    return flat.view(num_blocks, block_size, 1, dim + 4)


def assert_logits_match(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """``-inf`` exactly where the reference has it; relative error of the rest."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.isnan(out).any()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    assert (out[~finite] == float("-inf")).all()
    if finite.any():
        diff = (out[finite].double() - ref[finite]).norm().item()
        norm = ref[finite].norm().item()
        assert diff <= tol * norm, f"relative error {diff / norm:.3e} > {tol}"
