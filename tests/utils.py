"""Assertions and measures the tests share (import them from here, not from conftest)."""

from __future__ import annotations

import torch


def assert_fp8_codes_match(codes: torch.Tensor, ref: torch.Tensor, share: float = 0.0) -> None:
    """FP8 codes equal to ``ref`` bit for bit, or (``share > 0``) but for fewer than ``share`` of them,
    each a neighbouring code (arithmetic that rounds differently just before the FP8 rounding)."""
    a, b = codes.view(torch.uint8).reshape(-1).int(), ref.view(torch.uint8).reshape(-1).int()
    differ = a != b
    if share == 0.0:
        assert not differ.any(), f"{int(differ.sum())} codes differ"
        return
    assert differ.float().mean().item() < share, f"{differ.float().mean().item():.2e} of the codes differ"
    assert ((a - b).abs()[differ] == 1).all(), "only neighbouring codes may differ"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out = out.double()
    ref = ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff
