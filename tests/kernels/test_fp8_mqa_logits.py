"""Ragged-prefill indexer logits (``fp8_mqa_logits``) against the float64 reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from indexer_inputs import assert_logits_match, extreme_fp8, random_fp8, random_scales, random_weights

from sglang_sparse_mla.kernels import fp8_mqa_logits
from sglang_sparse_mla.kernels.device_info import device_info
from sglang_sparse_mla.kernels.mqa_logits_common import MQALogitsConfig
from sglang_sparse_mla.kernels.reference import mqa_logits_reference

ragged = importlib.import_module("sglang_sparse_mla.kernels.fp8_mqa_logits")


def tolerance(target) -> float:
    # fp32 products of exact FP8 values; on Hopper the FP8 MMA accumulates in
    # reduced precision within each instruction.
    return target.pick(cpu=1e-5, gpu=2e-3)


def make_inputs(target, rng, tokens, keys, heads=64, extreme=False):
    dev = target.device
    make = extreme_fp8 if extreme else random_fp8
    q = make(rng, (tokens, heads, 128), dev)
    k = make(rng, (keys, 128), dev)
    return q, k, random_scales(rng, keys, dev), random_weights(rng, tokens, heads, dev)


def causal_windows(target, rng, tokens, keys):
    """SGLang-style ragged windows: consecutive requests, each token seeing its
    request's keys up to its own position; plus an empty and a full window."""
    dev = target.device
    ks = torch.empty(tokens, dtype=torch.int32, device=dev)
    ke = torch.empty(tokens, dtype=torch.int32, device=dev)
    t, k0 = 0, 0
    while t < tokens:
        n_q = min(tokens - t, int(torch.randint(1, 9, (1,), generator=rng, device=dev)))
        prefix = int(torch.randint(0, max(1, keys // 4), (1,), generator=rng, device=dev))
        ks[t : t + n_q] = k0
        ke[t : t + n_q] = k0 + prefix + torch.arange(1, n_q + 1, device=dev, dtype=torch.int32)
        t += n_q
        k0 = min(k0 + prefix + n_q, keys - 1)
    ke.clamp_(max=keys)
    ks[0], ke[0] = 0, keys
    if tokens > 2:
        ks[2], ke[2] = 5, 5
    return ks, ke


def random_windows(target, rng, tokens, keys):
    dev = target.device
    a = torch.randint(-3, keys + 3, (tokens,), generator=rng, device=dev, dtype=torch.int32)
    b = torch.randint(-3, keys + 3, (tokens,), generator=rng, device=dev, dtype=torch.int32)
    return torch.minimum(a, b), torch.maximum(a, b)


@pytest.mark.parametrize("windows", ["causal", "random"])
@pytest.mark.parametrize("heads", [32, 64])
def test_matches_reference(target, rng, arch_path, windows, heads):
    tokens, keys = target.pick(cpu=(13, 300), gpu=(700, 9000))
    q, k, k_scale, w = make_inputs(target, rng, tokens, keys, heads)
    ks, ke = (causal_windows if windows == "causal" else random_windows)(target, rng, tokens, keys)
    out = fp8_mqa_logits(q, k, k_scale, w, ks, ke)
    assert_logits_match(out, mqa_logits_reference(q, k, k_scale, w, ks, ke), tolerance(target))


def test_extreme_fp8_values(target, rng, arch_path):
    tokens, keys = target.pick(cpu=(6, 150), gpu=(64, 2048))
    q, k, k_scale, w = make_inputs(target, rng, tokens, keys, extreme=True)
    ks, ke = random_windows(target, rng, tokens, keys)
    out = fp8_mqa_logits(q, k, k_scale, w, ks, ke)
    assert_logits_match(out, mqa_logits_reference(q, k, k_scale, w, ks, ke), tolerance(target))


def test_row_chunks_into_poisoned_strided_out(target, rng):
    """Chunked use through ``out=``: a NaN-filled buffer with a padded row
    stride, strided keys, every entry overwritten."""
    tokens, keys = target.pick(cpu=(9, 200), gpu=(300, 5000))
    q, k_dense, k_scale, w = make_inputs(target, rng, tokens, keys)
    k = torch.empty(keys, 256, dtype=torch.float8_e4m3fn, device=target.device)[:, :128]
    k.copy_(k_dense)
    ks, ke = causal_windows(target, rng, tokens, keys)
    ref = mqa_logits_reference(q, k_dense, k_scale, w, ks, ke)
    rows = 4
    buf = torch.full((rows, keys + 12), float("nan"), device=target.device)[:, :keys]
    for r0 in range(0, tokens, rows):
        r1 = min(r0 + rows, tokens)
        buf.fill_(float("nan"))
        got = fp8_mqa_logits(q[r0:r1], k, k_scale, w[r0:r1], ks[r0:r1], ke[r0:r1], out=buf[: r1 - r0])
        assert got.data_ptr() == buf.data_ptr()
        assert_logits_match(got, ref[r0:r1], tolerance(target))


def test_every_config(target, rng, arch_path):
    tokens, keys = target.pick(cpu=(7, 260), gpu=(200, 4000))
    q, k, k_scale, w = make_inputs(target, rng, tokens, keys)
    ks, ke = random_windows(target, rng, tokens, keys)
    ref = mqa_logits_reference(q, k, k_scale, w, ks, ke)
    info = device_info(target.device)
    configs = ragged.CONFIGS.candidates(info)
    configs.append(MQALogitsConfig(block_n=16, tokens=1, num_warps=1, num_stages=1))
    for cfg in configs:
        assert_logits_match(fp8_mqa_logits(q, k, k_scale, w, ks, ke, config=cfg), ref, tolerance(target))


def test_column_splits_with_few_tokens(target, rng):
    """Few token blocks: the column range is split across programs."""
    tokens, keys = target.pick(cpu=(2, 1100), gpu=(3, 70000))
    q, k, k_scale, w = make_inputs(target, rng, tokens, keys)
    ks = torch.tensor([0, 3, 500][:tokens], dtype=torch.int32, device=target.device)
    ke = torch.tensor([keys, 1000, keys - 1][:tokens], dtype=torch.int32, device=target.device)
    out = fp8_mqa_logits(q, k, k_scale, w, ks, ke, config=MQALogitsConfig(16, 2, 1, 1) if not target.gpu else None)
    assert_logits_match(out, mqa_logits_reference(q, k, k_scale, w, ks, ke), tolerance(target))


@pytest.mark.parametrize("tokens,keys", [(0, 10), (3, 0), (0, 0)])
def test_empty(target, tokens, keys):
    dev = target.device
    q = torch.zeros(tokens, 64, 128, device=dev).to(torch.float8_e4m3fn)
    k = torch.zeros(keys, 128, device=dev).to(torch.float8_e4m3fn)
    ks = torch.zeros(tokens, dtype=torch.int32, device=dev)
    out = fp8_mqa_logits(q, k, torch.ones(keys, device=dev), torch.ones(tokens, 64, device=dev), ks, ks)
    assert out.shape == (tokens, keys) and out.dtype == torch.float32


def test_validation(target):
    dev = target.device
    f8 = torch.float8_e4m3fn
    q = torch.zeros(4, 64, 128, device=dev).to(f8)
    k = torch.zeros(10, 128, device=dev).to(f8)
    sc = torch.ones(10, device=dev)
    w = torch.ones(4, 64, device=dev)
    ks = torch.zeros(4, dtype=torch.int32, device=dev)

    def call(**kw):
        args = dict(q=q, k=k, k_scale=sc, weights=w, ks=ks, ke=ks)
        args.update(kw)
        fp8_mqa_logits(**args)

    bad = {
        "q must be": dict(q=q.to(torch.bfloat16)),
        "index head dim": dict(q=torch.zeros(4, 64, 64, device=dev).to(f8)),
        "index heads": dict(q=torch.zeros(4, 48, 128, device=dev).to(f8)),
        "k must be": dict(k=k.float()),
        r"k_scale.shape\[0\]": dict(k_scale=torch.ones(9, device=dev)),
        r"weights.shape\[0\]": dict(weights=torch.ones(3, 64, device=dev)),
        r"weights.shape\[1\]": dict(weights=torch.ones(4, 32, device=dev)),
        "ks must be": dict(ks=ks.long()),
        r"ke.shape\[0\]": dict(ke=ks[:3]),
        "out must be": dict(out=torch.empty(4, 10, dtype=torch.float16, device=dev)),
        r"out.shape\[1\]": dict(out=torch.empty(4, 11, device=dev)),
        "contiguous": dict(q=torch.zeros(4, 128, 64, device=dev).to(f8).transpose(1, 2)),
    }
    for message, kw in bad.items():
        with pytest.raises(ValueError, match=message):
            call(**kw)
    with pytest.raises(ValueError, match="power of two"):
        call(config=MQALogitsConfig(block_n=48, tokens=2, num_warps=4, num_stages=2))


def test_rows_are_batch_invariant(target, rng, arch_path):
    """A token's logits alone equal, bit for bit, its row inside a larger batch."""
    tokens, keys = target.pick(cpu=9, gpu=300), target.pick(cpu=300, gpu=8192)
    q, k, k_scale, w = make_inputs(target, rng, tokens, keys)
    ks, ke = causal_windows(target, rng, tokens, keys)
    batch = fp8_mqa_logits(q, k, k_scale, w, ks, ke)
    for t in (0, tokens // 2, tokens - 1):
        one = fp8_mqa_logits(q[t : t + 1], k, k_scale, w[t : t + 1], ks[t : t + 1], ke[t : t + 1])
        assert torch.equal(one[0], batch[t])
