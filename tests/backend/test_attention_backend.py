"""The backend's attention on SGLang's real pools, batches and RadixAttention.

Top-k slots come from a deterministic stand-in for the indexer (logical
positions mapped through each request's own slots), so these tests run the
KV write and sparse MLA kernels through the backend against an fp64
reference of the same sparse attention over the requests' logical rows.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt")

from utils import relative_error  # noqa: E402
from dsa_world import DSAWorld, sglang_config  # noqa: E402,F401

HEADS = 8
TOL = {False: 1e-2, True: 2e-2}  # bf16 output rounding; fp8 cache adds its own


def run(world: DSAWorld, fb, reqs, q, k_rows, split: bool = False):
    world.backend.init_forward_metadata(fb)
    counts = world.counts(fb)
    positions = world.reference_positions(reqs, counts)
    out = world.attend(fb, q, k_rows, world.slots_of(reqs, counts, positions), split=split)
    return out, world.reference(reqs, counts, q, positions)


# The model's two calling conventions: q and k whole, or their rope parts apart (absorb core).
CALLS = pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])


@CALLS
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_extend_without_prefix(sglang_config, fp8, split):
    world = DSAWorld(num_heads=HEADS, fp8=fp8)
    reqs = [world.new_request(), world.new_request()]
    rows = [world.random(70, 576), world.random(9, 576)]
    fb = world.extend_batch(reqs, rows)
    out, ref = run(world, fb, reqs, world.random(79, HEADS, 576), torch.cat(rows), split)
    assert relative_error(out, ref) < TOL[fp8]


@CALLS
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode(sglang_config, fp8, split):
    world = DSAWorld(num_heads=HEADS, fp8=fp8)
    reqs = [world.new_request() for _ in range(3)]
    for req, n in zip(reqs, (66, 3, 40), strict=True):
        world.cache(req, world.random(n, 576))
    rows = [world.random(1, 576) for _ in reqs]
    fb = world.decode_batch(reqs, rows)
    out, ref = run(world, fb, reqs, world.random(3, HEADS, 576), torch.cat(rows), split)
    assert relative_error(out, ref) < TOL[fp8]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_split_call_matches_whole_call_bit_for_bit(sglang_config, fp8):
    """Rope parts apart (read in place) or concatenated: the same cache bytes and output bits."""
    results = []
    for split in (False, True):
        world = DSAWorld(num_heads=HEADS, fp8=fp8)
        reqs = [world.new_request() for _ in range(2)]
        for req, n in zip(reqs, (50, 7), strict=True):
            world.cache(req, world.random(n, 576))
        rows = [world.random(1, 576) for _ in reqs]
        fb = world.decode_batch(reqs, rows)
        out, _ = run(world, fb, reqs, world.random(2, HEADS, 576), torch.cat(rows), split)
        results.append((out, torch.cat([world.kv_bytes(r.slots) for r in reqs])))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_prefix_hit_equals_no_cache(sglang_config, fp8):
    """A radix hit reads the donor's pages in place and matches a full recompute."""
    world = DSAWorld(num_heads=HEADS, fp8=fp8)
    donor = world.new_request()
    world.cache(donor, world.random(130, 576))
    donor_bytes = world.kv_bytes(donor.slots)

    tail = world.random(12, 576)
    q = world.random(140, HEADS, 576)
    hit = world.new_request(shared_prefix=donor, prefix_len=128)
    fb_hit = world.extend_batch([hit], [tail])
    out_hit, ref_hit = run(world, fb_hit, [hit], q[128:], tail)

    fresh = world.new_request()
    full = torch.cat([donor.rows[:128], tail])
    fb_fresh = world.extend_batch([fresh], [full])
    out_fresh, _ = run(world, fb_fresh, [fresh], q, full)

    assert hit.slots[:128] == donor.slots[:128]
    assert set(hit.slots[128:]).isdisjoint(donor.slots)
    assert torch.equal(world.kv_bytes(donor.slots), donor_bytes)
    assert relative_error(out_hit, ref_hit) < TOL[fp8]
    assert relative_error(out_hit, out_fresh[128:]) < 1e-2


def test_chunked_prefill_equals_one_shot(sglang_config):
    """A prompt prefilled in two chunks (the second not page aligned) matches one extend."""
    world = DSAWorld(num_heads=HEADS)
    prompt = world.random(90, 576)
    q = world.random(90, HEADS, 576)

    chunked = world.new_request()
    out_1, ref_1 = run(world, world.extend_batch([chunked], [prompt[:70]]), [chunked], q[:70], prompt[:70])
    out_2, ref_2 = run(world, world.extend_batch([chunked], [prompt[70:]]), [chunked], q[70:], prompt[70:])

    whole = world.new_request()
    out_all, _ = run(world, world.extend_batch([whole], [prompt]), [whole], q, prompt)

    assert relative_error(out_1, ref_1) < TOL[False] and relative_error(out_2, ref_2) < TOL[False]
    assert relative_error(torch.cat([out_1, out_2]), out_all) < 1e-2


def test_lengths_shorter_than_topk(sglang_config):
    """Rows with fewer visible positions than index_topk carry -1 padding, never garbage."""
    world = DSAWorld(num_heads=HEADS, index_topk=32)
    reqs = [world.new_request() for _ in range(3)]
    rows = [world.random(n, 576) for n in (1, 5, 40)]
    fb = world.extend_batch(reqs, rows)
    world.backend.init_forward_metadata(fb)
    counts = world.counts(fb)
    positions = world.reference_positions(reqs, counts)
    slots = world.slots_of(reqs, counts, positions)
    assert (slots[0, 1:] == -1).all() and (slots[:6] == -1).any(dim=1).all()
    q = world.random(46, HEADS, 576)
    out = world.attend(fb, q, torch.cat(rows), slots)
    ref = world.reference(reqs, counts, q, positions)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < TOL[False]


def _decode_outputs(batch_size: int, num_requests: int) -> torch.Tensor:
    """Decode outputs of the first ``batch_size`` of ``num_requests`` (same rows, same slots, any batch)."""
    world = DSAWorld(num_heads=16, index_topk=512, max_reqs=num_requests, max_context=1024, num_pages=12 * num_requests)
    assert world.backend.batch_invariant
    reqs = [world.new_request() for _ in range(num_requests)]
    lengths = torch.randint(520, 700, (num_requests,), generator=torch.Generator().manual_seed(1)).tolist()
    for req, n in zip(reqs, lengths, strict=True):
        world.cache(req, world.random(n, 576))
    rows = [world.random(1, 576) for _ in reqs]
    q = world.random(num_requests, 16, 576)
    fb = world.decode_batch(reqs[:batch_size], rows[:batch_size])
    out, ref = run(world, fb, reqs[:batch_size], q[:batch_size], torch.cat(rows[:batch_size]))
    assert relative_error(out, ref) < TOL[False]
    return out


@pytest.mark.parametrize("sglang_config", [{"enable_deterministic_inference": True}], indirect=True)
def test_deterministic_inference_is_batch_invariant(sglang_config, target):
    """``--enable-deterministic-inference``: a request decodes to the same bits alone or in a batch
    that the occupancy heuristic would split differently (on this device: a few rows under the
    interpreter's 8 SMs, a few dozen on an H100's 132)."""
    from sglang_sparse_mla.kernels.device_info import device_info
    from sglang_sparse_mla.kernels.sparse_mla_configs import choose_num_kv_splits, select_config

    info = device_info(target.device)
    cfg = select_config(16, False, info)
    alone = choose_num_kv_splits(1, 512, cfg, False, info)
    batch = next(b for b in range(2, 257) if choose_num_kv_splits(b, 512, cfg, False, info) != alone)
    assert torch.equal(_decode_outputs(1, batch)[0], _decode_outputs(batch, batch)[0])
