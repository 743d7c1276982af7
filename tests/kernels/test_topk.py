"""Top-k selection (``topk_indices``) and the KV-slot mapping (``topk_to_kv_slots``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sglang_sparse_mla.kernels import topk_indices, topk_to_kv_slots
from sglang_sparse_mla.kernels.reference import topk_indices_reference, topk_to_kv_slots_reference
from sglang_sparse_mla.kernels.device_info import device_info
from sglang_sparse_mla.kernels.topk import TopKConfig, default_config, split_grid, sweep_configs, use_split_rows

# Small chunk / candidate sizes make tiny CPU rows take every path of the
# one-program-per-row kernel: the register-only path (length <= cap), the
# bounded-candidates path and the counting fallback (more candidates than cap).
SMALL = TopKConfig(chunks=64, cap=128, num_warps=4, num_stages=1, split_rows=False)
# On the GPU (k = 2048): chunks = k gives a weak bound, so long rows mostly
# take the counting fallback.
TIGHT_GPU = TopKConfig(chunks=2048, cap=2048, num_warps=16, num_stages=1, split_rows=False)
# The split-row path forced; on the CPU 32-position blocks give tiny rows
# several segments (about 2 programs per interpreter "SM").
SPLIT_CPU = TopKConfig(chunks=64, cap=128, num_warps=4, num_stages=1, split_rows=True, split_block=32)
SPLIT_GPU = replace(default_config(2048), split_rows=True)
PER_ROW_GPU = replace(default_config(2048), split_rows=False)


def path_config(target, path):
    """The config forcing ``path`` ("per_row" or "split") at the target's sizes."""
    if path == "split":
        return target.pick(cpu=SPLIT_CPU, gpu=SPLIT_GPU)
    return target.pick(cpu=SMALL, gpu=PER_ROW_GPU)


def distinct_logits(target, rng, rows, cols):
    """Distinct, non-zero values of both signs over many binades: a strictly
    increasing map of a random permutation of each row's positions."""
    dev = target.device
    perm = torch.argsort(torch.rand(rows, cols, generator=rng, device=dev), dim=1)
    return torch.sinh((perm.double() - cols / 2 + 0.5) * (16 / cols)).float()


def random_lengths(target, rng, rows, cols, k):
    dev = target.device
    lengths = torch.randint(0, cols + 1, (rows,), generator=rng, device=dev, dtype=torch.int32)
    lengths[0] = cols
    if rows > 1:
        lengths[1] = 0
    if rows > 2:
        lengths[2] = min(k - 1, cols)
    if rows > 3:
        lengths[3] = min(k, cols)
    return lengths


def assert_rows_match(out, ref):
    """Same selected set per row, positions ascending, the same ``-1`` padding."""
    assert out.dtype == torch.int32 and out.shape == ref.shape
    valid = ref >= 0
    assert torch.equal(out >= 0, valid), "different number of selected entries"
    out_sorted = torch.where(valid, out, torch.iinfo(torch.int32).max).sort(dim=1).values
    ref_sorted = torch.where(valid, ref, torch.iinfo(torch.int32).max).sort(dim=1).values
    assert torch.equal(out_sorted, ref_sorted)
    assert torch.equal(torch.where(valid, out, 0), torch.where(valid, out_sorted, 0)), "not in position order"


@pytest.mark.parametrize("config", ["default", "small"])
def test_distinct_values_match_reference(target, rng, config):
    rows, cols, k = target.pick(cpu=(6, 700, 40), gpu=(64, 20000, 2048))
    cfg = target.pick(cpu=SMALL, gpu=TIGHT_GPU) if config == "small" else None
    logits = distinct_logits(target, rng, rows, cols)
    lengths = random_lengths(target, rng, rows, cols, k)
    out = topk_indices(logits, lengths, k, config=cfg)
    assert_rows_match(out, topk_indices_reference(logits, lengths, k))


def test_long_rows(target, rng):
    """Rows far longer than the candidate capacity (decode at long context)."""
    rows, cols, k, cfg = target.pick(cpu=(3, 3000, 40, SMALL), gpu=(16, 160000, 2048, None))
    logits = torch.randn(rows, cols, generator=rng, device=target.device)
    lengths = torch.full((rows,), cols, dtype=torch.int32, device=target.device)
    lengths[1] = cols - 1000
    out = topk_indices(logits, lengths, k, config=cfg)
    assert_rows_match(out, topk_indices_reference(logits, lengths, k))


@pytest.mark.parametrize("pattern", ["constant", "two_levels", "sorted_up", "sorted_down", "infinities"])
def test_ties_and_structure(target, rng, pattern):
    """Heavy ties (lower positions win), monotone rows, and +-inf entries."""
    rows, cols, k, cfg = target.pick(cpu=(3, 900, 50, SMALL), gpu=(8, 50000, 2048, None))
    dev = target.device
    pos = torch.arange(cols, device=dev, dtype=torch.float32).expand(rows, cols)
    if pattern == "constant":
        logits = torch.full((rows, cols), 1.5, device=dev)
    elif pattern == "two_levels":
        logits = torch.where(torch.rand(rows, cols, generator=rng, device=dev) < 0.02, 2.0, -1.0)
    elif pattern == "sorted_up":
        logits = pos * 0.25 + 1
    elif pattern == "sorted_down":
        logits = -pos * 0.25 - 1
    else:
        logits = torch.randn(rows, cols, generator=rng, device=dev)
        logits[:, ::7] = float("inf")
        logits[:, 3::5] = float("-inf")
    logits = logits.contiguous()
    lengths = torch.full((rows,), cols, dtype=torch.int32, device=dev)
    lengths[-1] = cols // 2
    out = topk_indices(logits, lengths, k, config=cfg)
    ref = topk_indices_reference(logits, lengths, k)
    assert_rows_match(out, ref)


@pytest.mark.parametrize("path", ["per_row", "split"])
def test_row_starts_strided_and_poisoned_out(target, rng, path):
    """Windows ``[row_starts, row_starts + lengths)`` of a padded-stride
    logits view, relative positions, into a garbage-filled ``out``."""
    rows, cols, k = target.pick(cpu=(5, 600, 30), gpu=(256, 40000, 2048))
    dev = target.device
    logits = torch.randn(rows, cols + 8, generator=rng, device=dev)[:, :cols]
    starts = torch.randint(0, cols, (rows,), generator=rng, device=dev, dtype=torch.int32)
    lengths = torch.randint(0, cols, (rows,), generator=rng, device=dev, dtype=torch.int32)
    lengths = torch.minimum(lengths, cols - starts)
    out = torch.full((rows, k), 12345, dtype=torch.int32, device=dev)
    got = topk_indices(logits, lengths, k, row_starts=starts, out=out, config=path_config(target, path))
    assert got.data_ptr() == out.data_ptr()
    assert_rows_match(got, topk_indices_reference(logits, lengths, k, row_starts=starts))


def test_sweep_configs_and_small_k(target, rng):
    rows, cols = target.pick(cpu=(4, 1500), gpu=(64, 131072))
    logits = distinct_logits(target, rng, rows, cols)
    lengths = random_lengths(target, rng, rows, cols, 2048)
    ref = topk_indices_reference(logits, lengths, 2048)
    for cfg in sweep_configs(2048):
        assert_rows_match(topk_indices(logits, lengths, 2048, config=cfg), ref)
    for k in (1, 7):
        assert_rows_match(topk_indices(logits, lengths, k), topk_indices_reference(logits, lengths, k))


def make_slot_tables(target, rng, num_reqs, max_context):
    dev = target.device
    req_to_token = torch.randperm(num_reqs * 2 * max_context, generator=rng, device=dev)
    req_to_token = req_to_token[: 2 * num_reqs * max_context].view(2 * num_reqs, max_context).to(torch.int32)
    pool = torch.randperm(2 * num_reqs, generator=rng, device=dev)[:num_reqs].to(torch.int32)
    return req_to_token, pool


@pytest.mark.parametrize("path", ["per_row", "split"])
@pytest.mark.parametrize("mode", ["decode", "mtp", "extend"])
def test_kv_slots_mapping_and_fusion(target, rng, mode, path):
    rows, cols, k = target.pick(cpu=(6, 500, 30), gpu=(128, 65536, 2048))
    dev = target.device
    logits = distinct_logits(target, rng, rows, cols)
    lengths = random_lengths(target, rng, rows, cols, k)
    kwargs = {}
    if mode == "decode":
        num_reqs = rows
    elif mode == "mtp":
        kwargs["tokens_per_req"] = 2
        num_reqs = rows // 2
    else:
        num_reqs = 3
        kwargs["token_to_req"] = torch.randint(0, num_reqs, (rows,), generator=rng, device=dev, dtype=torch.int32)
    req_to_token, pool = make_slot_tables(target, rng, num_reqs, cols)
    cfg = path_config(target, path)

    positions = topk_indices(logits, lengths, k, config=cfg)
    slots = topk_to_kv_slots(positions, req_to_token, pool, **kwargs)
    expected = topk_to_kv_slots_reference(positions, req_to_token, pool, **kwargs)
    assert torch.equal(slots, expected)
    assert torch.equal(slots < 0, positions < 0)

    fused = topk_indices(logits, lengths, k, req_to_token=req_to_token, req_pool_indices=pool, config=cfg, **kwargs)
    assert torch.equal(fused, slots)


@pytest.mark.parametrize("path", ["default", "split"])
def test_empty(target, path):
    dev = target.device
    cfg = SPLIT_CPU if path == "split" else None
    out = topk_indices(torch.empty(0, 10, device=dev), torch.empty(0, dtype=torch.int32, device=dev), 4, config=cfg)
    assert out.shape == (0, 4)
    out = topk_indices(torch.empty(2, 0, device=dev), torch.zeros(2, dtype=torch.int32, device=dev), 4, config=cfg)
    assert (out == -1).all()
    slots = topk_to_kv_slots(
        torch.empty(0, 4, dtype=torch.int32, device=dev),
        torch.zeros(1, 8, dtype=torch.int32, device=dev),
        torch.zeros(1, dtype=torch.int32, device=dev),
    )
    assert slots.shape == (0, 4)


def test_validation(target):
    dev = target.device
    logits = torch.zeros(3, 50, device=dev)
    lengths = torch.zeros(3, dtype=torch.int32, device=dev)
    r2t = torch.zeros(2, 50, dtype=torch.int32, device=dev)
    pool = torch.zeros(3, dtype=torch.int32, device=dev)
    bad = {
        "logits must be": lambda: topk_indices(logits.double(), lengths, 4),
        "k must be": lambda: topk_indices(logits, lengths, 0),
        "lengths must be": lambda: topk_indices(logits, lengths.long(), 4),
        r"lengths.shape\[0\]": lambda: topk_indices(logits, lengths[:2], 4),
        r"row_starts.shape\[0\]": lambda: topk_indices(logits, lengths, 4, row_starts=lengths[:1]),
        r"out.shape\[1\]": lambda: topk_indices(logits, lengths, 4, out=torch.empty(3, 5, dtype=torch.int32, device=dev)),
        "req_pool_indices is required": lambda: topk_indices(logits, lengths, 4, req_to_token=r2t),
        "only used with req_to_token": lambda: topk_indices(logits, lengths, 4, req_pool_indices=pool),
        "token_to_req has": lambda: topk_to_kv_slots(
            torch.zeros(3, 4, dtype=torch.int32, device=dev), r2t, pool, token_to_req=pool[:2]
        ),
        "need 3 requests": lambda: topk_to_kv_slots(torch.zeros(3, 4, dtype=torch.int32, device=dev), r2t, pool[:2]),
        "req_to_token must be": lambda: topk_to_kv_slots(torch.zeros(3, 4, dtype=torch.int32, device=dev), r2t.long(), pool),
        "config.cap": lambda: topk_indices(logits, lengths, 64, config=TopKConfig(64, 32, 4, 1)),
        "power of two": lambda: topk_indices(logits, lengths, 4, config=TopKConfig(96, 128, 4, 1)),
        "config.split_block": lambda: topk_indices(logits, lengths, 4, config=replace(SMALL, split_block=16)),
        "split_programs_per_sm": lambda: topk_indices(logits, lengths, 4, config=replace(SMALL, split_programs_per_sm=0)),
    }
    for message, fn in bad.items():
        with pytest.raises(ValueError, match=message):
            fn()
    assert default_config(2048).cap >= 2048


# ---------------------------------------------------------------------------
# Split rows (each row across several programs)
# ---------------------------------------------------------------------------

SPLIT_PATTERNS = ["distinct", "random", "constant", "two_levels", "all_neg_inf", "narrow_band"]


def pattern_logits(target, rng, pattern, rows, cols):
    dev = target.device
    if pattern == "distinct":
        return distinct_logits(target, rng, rows, cols)
    if pattern == "random":
        return torch.randn(rows, cols, generator=rng, device=dev)
    if pattern == "constant":
        return torch.full((rows, cols), -0.75, device=dev)
    if pattern == "two_levels":  # many ties at the threshold
        return torch.where(torch.rand(rows, cols, generator=rng, device=dev) < 0.02, 3.0, 0.0)
    if pattern == "all_neg_inf":
        return torch.full((rows, cols), float("-inf"), device=dev)
    # Every value in [1, 1 + 2**-10): leading key bits shared by the whole row, ties at each value.
    return 1 + torch.randint(0, 8192, (rows, cols), generator=rng, device=dev).float() * 2.0**-23


@pytest.mark.parametrize("batch", ["b1", "b8", "b32"])
@pytest.mark.parametrize("pattern", SPLIT_PATTERNS)
def test_split_rows_match_per_row_path(target, rng, pattern, batch):
    """Long rows in decode-sized batches (the dispatch's split-row case): the
    split path returns the one-program-per-row path's output bit for bit,
    and the reference's selection; lengths include 0 and rows shorter than k."""
    rows = {"b1": 1, "b8": 8, "b32": 32}[batch]
    rows, cols, k = target.pick(cpu=(min(rows, 3), 300, 24), gpu=(rows, 131072, 2048))
    logits = pattern_logits(target, rng, pattern, rows, cols)
    lengths = random_lengths(target, rng, rows, cols, k)
    split = topk_indices(logits, lengths, k, config=path_config(target, "split"))
    assert torch.equal(split, topk_indices(logits, lengths, k, config=path_config(target, "per_row")))
    assert_rows_match(split, topk_indices_reference(logits, lengths, k))
    if pattern == "distinct":  # no ties: torch.topk's set
        full = lengths >= k
        past_end = torch.arange(cols, device=target.device)[None, :] >= lengths[:, None]
        expected = torch.topk(logits.masked_fill(past_end, float("-inf"))[full], k, dim=1).indices
        expected = expected.sort(dim=1).values.int()
        assert torch.equal(split[full], expected)


def test_split_rows_every_length(target, rng):
    """Row t has length t (0 .. N, some shorter than k), several segments
    each: the rows go in slices small enough that a launch gives each row
    several programs."""
    cols, k, slice_rows = target.pick(cpu=(70, 20, 2), gpu=(3000, 2048, 16))
    rows = cols + 1
    logits = torch.randn(rows, cols, generator=rng, device=target.device)
    logits[:, ::3] = logits[:, :1]  # ties with the first column
    lengths = torch.arange(rows, dtype=torch.int32, device=target.device)
    # GPU: 256-position blocks, 12 segments a row.
    split_cfg = target.pick(cpu=SPLIT_CPU, gpu=replace(SPLIT_GPU, split_block=256))
    per_row_cfg = path_config(target, "per_row")
    for r0 in range(0, rows, slice_rows):
        part, part_lengths = logits[r0 : r0 + slice_rows], lengths[r0 : r0 + slice_rows]
        split = topk_indices(part, part_lengths, k, config=split_cfg)
        assert torch.equal(split, topk_indices(part, part_lengths, k, config=per_row_cfg)), f"rows from {r0}"
        assert_rows_match(split, topk_indices_reference(part, part_lengths, k))


@pytest.mark.parametrize("batch", ["b1", "b32"])
def test_split_rows_share_the_length_not_the_width(target, rng, batch):
    """CUDA-graph decode: logits as wide as the longest context allowed, rows
    far shorter. Each row's length is shared among its programs; the columns
    past it hold huge values that must never be read."""
    rows = {"b1": 1, "b32": 32}[batch]
    rows, cols, short, k = target.pick(cpu=(min(rows, 3), 400, 90, 24), gpu=(rows, 163840, 4096, 2048))
    logits = torch.randn(rows, cols, generator=rng, device=target.device)
    lengths = torch.randint(short // 2, short + 1, (rows,), generator=rng, device=target.device, dtype=torch.int32)
    lengths[0] = short
    past_end = torch.arange(cols, device=target.device)[None, :] >= lengths[:, None]
    poisoned = logits.masked_fill(past_end, 1e30)
    cfg = path_config(target, "split")
    segments, _ = split_grid(rows, cols, device_info(target.device).num_sms, cfg)
    assert segments * cfg.split_block > 2 * short, "the width must allow more programs than the length needs"
    split = topk_indices(poisoned, lengths, k, config=cfg)
    assert torch.equal(split, topk_indices(logits, lengths, k, config=path_config(target, "per_row")))
    assert_rows_match(split, topk_indices_reference(logits, lengths, k))


def test_split_rows_more_rows_than_one_launch(target, rng):
    """Forced split rows beyond what one launch holds take several launches."""
    rows, cols, k = target.pick(cpu=(40, 200, 16), gpu=(600, 20000, 2048))
    logits = pattern_logits(target, rng, "two_levels", rows, cols)
    lengths = random_lengths(target, rng, rows, cols, k)
    cfg = path_config(target, "split")
    assert split_grid(rows, cols, device_info(target.device).num_sms, cfg)[1] < rows
    split = topk_indices(logits, lengths, k, config=cfg)
    assert torch.equal(split, topk_indices(logits, lengths, k, config=path_config(target, "per_row")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph")
@pytest.mark.parametrize("path", ["per_row", "split"])
def test_cuda_graph_replay(target, rng, path):
    """Decode captures the top-k in a CUDA graph: a replay over new logits
    and lengths in the captured buffers returns the eager selection (the
    split path's cooperative launch and its zeroed barrier counters are
    captured too)."""
    if not target.gpu:
        pytest.skip("the interpreter does not capture")
    rows, cols, k = 8, 65536, 2048
    cfg = path_config(target, path)
    logits = torch.empty(rows, cols, device=target.device)
    lengths = torch.empty(rows, dtype=torch.int32, device=target.device)
    logits.copy_(distinct_logits(target, rng, rows, cols))
    lengths.copy_(random_lengths(target, rng, rows, cols, k))
    topk_indices(logits, lengths, k, config=cfg)  # compiles before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = topk_indices(logits, lengths, k, config=cfg)
    for _ in range(2):
        logits.copy_(pattern_logits(target, rng, "two_levels", rows, cols))
        lengths.copy_(random_lengths(target, rng, rows, cols, k).flip(0))
        out.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, topk_indices(logits, lengths, k, config=cfg))
        assert_rows_match(out, topk_indices_reference(logits, lengths, k))


@pytest.mark.parametrize("pattern", ["random", "narrow_band"])
def test_rows_of_a_million(target, rng, pattern):
    """1M-position rows (GPU): where SGLang's fast top-k overflows a radix
    bucket. The narrow band shares its leading key bits over the whole row,
    which sends the one-program-per-row path to its counting fallback (more
    candidates than ``cap``; on the CPU a 20000-wide row with k = 64 and
    cap 1024 takes the same path) and puts every key in the split path's
    first-round bucket."""
    rows, cols, k = target.pick(cpu=(1, 20000, 64), gpu=(2, 1 << 20, 2048))
    logits = pattern_logits(target, rng, pattern, rows, cols)
    lengths = torch.full((rows,), cols, dtype=torch.int32, device=target.device)
    split_cfg = target.pick(cpu=replace(SPLIT_CPU, split_block=1024), gpu=SPLIT_GPU)
    per_row_cfg = target.pick(cpu=TopKConfig(1024, 1024, 4, 1, split_rows=False), gpu=PER_ROW_GPU)
    split = topk_indices(logits, lengths, k, config=split_cfg)
    assert torch.equal(split, topk_indices(logits, lengths, k, config=per_row_cfg))
    assert_rows_match(split, topk_indices_reference(logits, lengths, k))
    assert torch.equal(split, topk_indices(logits, lengths, k))  # whatever the dispatch picks


def test_split_rows_dispatch_rule():
    cfg = default_config(2048)
    assert use_split_rows(1, 8448, 132, cfg) and use_split_rows(1, 1 << 20, 132, cfg)
    assert use_split_rows(32, 131072, 132, cfg) and use_split_rows(64, 8448, 132, cfg)
    assert not use_split_rows(4096, 8192, 132, cfg)  # prefill: the rows fill the GPU
    assert not use_split_rows(1, cfg.cap, 132, cfg)  # rows in registers
    assert use_split_rows(4096, 100, 132, replace(cfg, split_rows=True))
    assert not use_split_rows(1, 1 << 20, 132, replace(cfg, split_rows=False))
