"""Paged decode indexer logits (``fp8_paged_mqa_logits``) against the float64 reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from indexer_inputs import (
    assert_logits_match,
    extreme_fp8,
    paged_index_cache,
    random_fp8,
    random_scales,
    random_weights,
)

from sglang_sparse_mla.kernels import fp8_paged_mqa_logits
from sglang_sparse_mla.kernels.device_info import device_info
from sglang_sparse_mla.kernels.mqa_logits_common import MQALogitsConfig
from sglang_sparse_mla.kernels.reference import paged_mqa_logits_reference

paged = importlib.import_module("sglang_sparse_mla.kernels.fp8_paged_mqa_logits")


def tolerance(target) -> float:
    return target.pick(cpu=1e-5, gpu=2e-3)


def make_case(target, rng, batch, next_n, max_blocks, block_size=64, heads=64, extreme=False):
    """Queries, a cache with shuffled physical blocks (plus unused ones),
    random contexts (>= next_n) and the block table."""
    dev = target.device
    num_blocks = batch * max_blocks + 3
    make = extreme_fp8 if extreme else random_fp8
    keys = make(rng, (num_blocks * block_size, 128), dev)
    cache = paged_index_cache(keys, random_scales(rng, num_blocks * block_size, dev), block_size)
    perm = torch.randperm(num_blocks, generator=rng, device=dev)[: batch * max_blocks]
    block_table = perm.view(batch, max_blocks).to(torch.int32)
    context = torch.randint(next_n, max_blocks * block_size + 1, (batch,), generator=rng, device=dev)
    q = make(rng, (batch, next_n, heads, 128), dev)
    w = random_weights(rng, batch * next_n, heads, dev)
    return q, cache, w, context.to(torch.int32), block_table


def run_and_check(target, q, cache, w, context, block_table, max_len, config=None):
    out = fp8_paged_mqa_logits(q, cache, w, context, block_table, max_len, config=config)
    ref = paged_mqa_logits_reference(q, cache, w, context, block_table, max_len)
    assert_logits_match(out, ref, tolerance(target))


@pytest.mark.parametrize("next_n", [1, 2, 3])
def test_matches_reference(target, rng, arch_path, next_n):
    batch, max_blocks = target.pick(cpu=(3, 3), gpu=(24, 40))
    q, cache, w, context, table = make_case(target, rng, batch, next_n, max_blocks)
    context[0] = next_n  # shortest possible context
    run_and_check(target, q, cache, w, context, table, max_blocks * 64)


@pytest.mark.parametrize("block_size", [16, 128])
def test_block_sizes(target, rng, block_size):
    batch, max_blocks = target.pick(cpu=(2, 5), gpu=(16, 64))
    q, cache, w, context, table = make_case(target, rng, batch, 2, max_blocks, block_size=block_size)
    run_and_check(target, q, cache, w, context, table, max_blocks * block_size)


def test_output_width_and_heads(target, rng):
    """A result wider than the table (``-inf`` tail), a narrower one (clamped),
    32 heads, and a context that overruns the table."""
    batch, max_blocks = target.pick(cpu=(3, 2), gpu=(8, 32))
    q, cache, w, context, table = make_case(target, rng, batch, 1, max_blocks, heads=32)
    context[1] = max_blocks * 64 + 50
    run_and_check(target, q, cache, w, context, table, max_blocks * 64 + 70)
    run_and_check(target, q, cache, w, context, table, max_blocks * 64 - 30)


def test_extreme_fp8_values(target, rng, arch_path):
    batch, max_blocks = target.pick(cpu=(2, 2), gpu=(8, 16))
    q, cache, w, context, table = make_case(target, rng, batch, 2, max_blocks, extreme=True)
    run_and_check(target, q, cache, w, context, table, max_blocks * 64)


def test_every_config(target, rng, arch_path):
    batch, max_blocks = target.pick(cpu=(2, 3), gpu=(16, 24))
    q, cache, w, context, table = make_case(target, rng, batch, 2, max_blocks)
    info = device_info(target.device)
    configs = paged.CONFIGS.candidates(info)
    configs.append(MQALogitsConfig(block_n=32, tokens=1, num_warps=1, num_stages=1))  # token groups
    for cfg in configs:
        run_and_check(target, q, cache, w, context, table, max_blocks * 64, cfg)


def test_long_context_splits(target, rng):
    """One request with a long context: the columns are split across programs."""
    max_blocks = target.pick(cpu=40, gpu=2048)
    q, cache, w, context, table = make_case(target, rng, 1, 1, max_blocks)
    context[0] = max_blocks * 64 - 17
    run_and_check(target, q, cache, w, context, table, max_blocks * 64)


@pytest.mark.parametrize("next_n", [1, 3])
@pytest.mark.parametrize("clean", [True, False])
def test_graph_width_short_contexts(target, rng, arch_path, next_n, clean):
    """A CUDA-graph batch: the block table and the result span the longest
    context allowed, the contexts are far shorter and uneven. Each request's
    own context is shared among its programs; with ``clean_logits=False``
    every row is still exact up to its own limit."""
    batch, max_blocks, short = target.pick(cpu=(3, 24, 150), gpu=(32, 2560, 8448))
    q, cache, w, context, table = make_case(target, rng, batch, next_n, max_blocks)
    context = torch.randint(next_n, short + 1, (batch,), generator=rng, device=target.device, dtype=torch.int32)
    context[0] = short
    max_len = max_blocks * 64
    out = fp8_paged_mqa_logits(q, cache, w, context, table, max_len, clean_logits=clean)
    ref = paged_mqa_logits_reference(q, cache, w, context, table, max_len)
    if clean:
        assert_logits_match(out, ref, tolerance(target))
        return
    limit = (context.repeat_interleave(next_n) - next_n + 1 + torch.arange(next_n, device=target.device).repeat(batch))
    inside = torch.arange(max_len, device=target.device)[None, :] < limit[:, None]
    assert torch.isfinite(ref[inside]).all() and not torch.isfinite(ref[~inside]).any()
    assert_logits_match(torch.where(inside, out, float("-inf")), ref, tolerance(target))


@pytest.mark.parametrize("batch,max_len", [(0, 128), (2, 0)])
def test_empty(target, batch, max_len):
    dev = target.device
    q = torch.zeros(batch, 1, 64, 128, device=dev).to(torch.float8_e4m3fn)
    cache = torch.zeros(4, 64, 1, 132, dtype=torch.uint8, device=dev)
    out = fp8_paged_mqa_logits(
        q,
        cache,
        torch.ones(batch, 64, device=dev),
        torch.ones(batch, dtype=torch.int32, device=dev),
        torch.zeros(batch, 2, dtype=torch.int32, device=dev),
        max_len,
    )
    assert out.shape == (batch, max_len) and out.dtype == torch.float32


def test_validation(target):
    dev = target.device
    f8 = torch.float8_e4m3fn
    q = torch.zeros(2, 2, 64, 128, device=dev).to(f8)
    cache = torch.zeros(4, 64, 1, 132, dtype=torch.uint8, device=dev)
    w = torch.ones(4, 64, device=dev)
    ctx = torch.ones(2, dtype=torch.int32, device=dev)
    table = torch.zeros(2, 2, dtype=torch.int32, device=dev)

    def call(**kw):
        args = dict(q=q, kv_cache=cache, weights=w, context_lens=ctx, block_table=table, max_context_len=128)
        args.update(kw)
        fp8_paged_mqa_logits(**args)

    bad = {
        "q must be": dict(q=torch.zeros(2, 64, 128, device=dev).to(f8)),
        "index heads": dict(q=torch.zeros(2, 2, 16, 128, device=dev).to(f8)),
        "kv_cache must be": dict(kv_cache=cache.view(f8)),
        r"kv_cache.shape\[3\]": dict(kv_cache=torch.zeros(4, 64, 1, 136, dtype=torch.uint8, device=dev)),
        "block_size must be a power of two": dict(kv_cache=torch.zeros(4, 48, 1, 132, dtype=torch.uint8, device=dev)),
        r"weights.shape\[0\]": dict(weights=torch.ones(2, 64, device=dev)),
        r"context_lens.shape\[0\]": dict(context_lens=ctx[:1]),
        "context_lens must be": dict(context_lens=ctx.long()),
        r"block_table.shape\[0\]": dict(block_table=table[:1]),
        "block_table must be contiguous": dict(block_table=torch.zeros(2, 2, dtype=torch.int32, device=dev).t()),
        "max_context_len": dict(max_context_len=-1),
    }
    for message, kw in bad.items():
        with pytest.raises(ValueError, match=message):
            call(**kw)


def test_rows_are_batch_invariant(target, rng, arch_path):
    """A request's logits alone equal, bit for bit, its rows inside a larger batch."""
    batch, max_blocks = target.pick(cpu=5, gpu=64), target.pick(cpu=4, gpu=64)
    q, cache, w, context, block_table = make_case(target, rng, batch, 2, max_blocks)
    max_len = max_blocks * 64
    together = fp8_paged_mqa_logits(q, cache, w, context, block_table, max_len)
    for b in (0, batch - 1):
        rows = slice(2 * b, 2 * b + 2)
        alone = fp8_paged_mqa_logits(q[b : b + 1], cache, w[rows], context[b : b + 1], block_table[b : b + 1], max_len)
        assert torch.equal(alone, together[rows])
