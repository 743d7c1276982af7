"""Sparse MLA decode/prefill against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from utils import relative_error

from sglang_sparse_mla.kernels import quantize_kv_fp8, sparse_mla_decode, sparse_mla_prefill
from sglang_sparse_mla.kernels.device_info import device_info
from sglang_sparse_mla.kernels.reference import sparse_mla_reference
from sglang_sparse_mla.kernels.sparse_mla import sparse_mla_forward
from sglang_sparse_mla.kernels.sparse_mla_configs import choose_num_kv_splits, select_config

SM_SCALE = 576**-0.5
OUT_TOL = 1.5e-2  # bf16 output, bf16 probabilities in the PV product
LSE_TOL = 2e-3


def make_cache(target, rng, num_slots: int, kv_format: str) -> torch.Tensor:
    kv = torch.randn(num_slots, 576, generator=rng, device=target.device).bfloat16()
    return quantize_kv_fp8(kv) if kv_format == "fp8" else kv


def make_indices(target, rng, tokens: int, topk: int, num_slots: int) -> torch.Tensor:
    """Random slots with every awkward case mixed in: -1 holes, a duplicated
    slot, a short row (-1 tail), an all-invalid row, an out-of-range slot."""
    idx = torch.randint(0, num_slots, (tokens, topk), generator=rng, device=target.device, dtype=torch.int32)
    holes = torch.rand(tokens, topk, generator=rng, device=target.device) < 0.1
    idx[holes] = -1
    idx[0, 1] = idx[0, 0]
    if tokens > 1:
        idx[1, topk // 3 :] = -1
    if tokens > 2:
        idx[2] = -1
    if tokens > 3:
        idx[3, 5] = num_slots + 7
    return idx


def end_rows_in_padding(idx: torch.Tensor, rng, edges) -> None:
    """Rows as top-k writes them for the first tokens of a prompt: row ``t`` keeps its first
    ``counts[t]`` entries, then ``-1``. The first rows' counts are ``edges`` (capped at the top-k
    width), the others random."""
    tokens, topk = idx.shape
    counts = torch.randint(0, topk + 1, (tokens,), generator=rng, device=idx.device)
    counts[: len(edges)] = torch.tensor([min(e, topk) for e in edges], device=idx.device)[:tokens]
    idx[torch.arange(topk, device=idx.device)[None, :] >= counts[:, None]] = -1


def make_q(target, rng, tokens: int, heads: int) -> torch.Tensor:
    return (2 * torch.randn(tokens, heads, 576, generator=rng, device=target.device)).bfloat16()


def make_inputs(target, rng, tokens: int, heads: int, topk: int, num_slots: int, kv_format: str):
    """``(kv cache, q, indices)`` drawn in that order (see the three makers above)."""
    kv = make_cache(target, rng, num_slots, kv_format)
    return kv, make_q(target, rng, tokens, heads), make_indices(target, rng, tokens, topk, num_slots)


def assert_matches_reference(out, lse, q, kv, idx):
    ref_out, ref_lse = sparse_mla_reference(q, kv, idx, SM_SCALE)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert relative_error(out, ref_out) < OUT_TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    assert (out[~finite] == 0).all()
    if finite.any():
        assert (lse[finite].double() - ref_lse[finite]).abs().max().item() < LSE_TOL


def poisoned(shape, dtype, device):
    fill = float("nan")
    return torch.full(shape, fill, dtype=dtype, device=device)


def poisoned_outputs(tokens: int, heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-filled ``out`` ``[tokens, heads, 512]`` bf16 and ``lse`` ``[tokens, heads]`` fp32 for a
    launch to overwrite: any element it leaves unwritten fails the reference comparison."""
    return poisoned((tokens, heads, 512), torch.bfloat16, device), poisoned((tokens, heads), torch.float32, device)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("heads", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("num_kv_splits", [None, 1, 3])
def test_decode_matches_reference(target, rng, arch_path, kv_format, heads, num_kv_splits):
    tokens = target.pick(cpu=5, gpu=37)
    topk = target.pick(cpu=96, gpu=2048)
    num_slots = target.pick(cpu=700, gpu=1 << 20)
    kv, q, idx = make_inputs(target, rng, tokens, heads, topk, num_slots, kv_format)
    out, lse = poisoned_outputs(tokens, heads, target.device)
    sparse_mla_decode(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits, out=out, lse=lse)
    assert_matches_reference(out, lse, q, kv, idx)


@pytest.mark.parametrize("heads, tokens", [(64, 1), (64, 2), (128, 1)])
def test_few_token_decode_uses_small_head_blocks(target, rng, arch_path, heads, tokens):
    """A BF16 decode of at most two 64-head blocks runs 16-head blocks (more programs), still exact."""
    info = device_info(target.device)
    assert select_config(heads, False, info, tokens).block_h == 16
    assert select_config(heads, False, info).block_h > 16
    assert select_config(heads, True, info, tokens) == select_config(heads, True, info)
    topk = target.pick(cpu=96, gpu=2048)
    num_slots = target.pick(cpu=700, gpu=1 << 20)
    kv, q, idx = make_inputs(target, rng, tokens, heads, topk, num_slots, "bf16")
    out, lse = poisoned_outputs(tokens, heads, target.device)
    sparse_mla_decode(q, kv, idx, SM_SCALE, out=out, lse=lse)
    assert_matches_reference(out, lse, q, kv, idx)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("heads", [16, 128])
def test_prefill_matches_reference(target, rng, kv_format, heads):
    tokens = target.pick(cpu=6, gpu=300)
    topk = target.pick(cpu=128, gpu=2048)
    num_slots = target.pick(cpu=500, gpu=1 << 16)
    kv, q, idx = make_inputs(target, rng, tokens, heads, topk, num_slots, kv_format)
    out, lse = sparse_mla_prefill(q, kv, idx, SM_SCALE)
    assert_matches_reference(out, lse, q, kv, idx)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_skipping_the_invalid_tail_changes_no_bit(target, rng, kv_format, num_kv_splits):
    """Rows as top-k writes them for the first tokens of a prompt: the valid entries first (holes and
    out-of-range slots among them here), then ``-1``, with the valid count on and around tile and scan
    edges. Stopping after a row's last valid entry gives the bits of the whole-row pass."""
    tokens, heads = target.pick(cpu=12, gpu=400), 16
    topk = target.pick(cpu=128, gpu=2048)
    num_slots = target.pick(cpu=500, gpu=1 << 16)
    kv, q, idx = make_inputs(target, rng, tokens, heads, topk, num_slots, kv_format)
    end_rows_in_padding(idx, rng, [0, 1, 31, 32, 33, 63, 64, 65, topk - 1, topk, 1023, 1024, 1025])
    whole = sparse_mla_forward(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits)
    skipped = sparse_mla_forward(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits, skip_invalid_tail=True)
    assert torch.equal(skipped[0], whole[0]) and torch.equal(skipped[1], whole[1])
    assert_matches_reference(*skipped, q, kv, idx)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_split_and_single_pass_agree(target, rng, kv_format):
    tokens, heads = target.pick(cpu=3, gpu=16), 16
    topk = target.pick(cpu=256, gpu=2048)
    num_slots = target.pick(cpu=600, gpu=1 << 18)
    kv, q, idx = make_inputs(target, rng, tokens, heads, topk, num_slots, kv_format)
    single, single_lse = sparse_mla_decode(q, kv, idx, SM_SCALE, num_kv_splits=1)
    for splits in (2, 4, 7):
        split, split_lse = sparse_mla_decode(q, kv, idx, SM_SCALE, num_kv_splits=splits)
        assert relative_error(split, single) < 1e-2
        finite = torch.isfinite(single_lse)
        assert torch.equal(torch.isfinite(split_lse), finite)
        assert (split_lse[finite] - single_lse[finite]).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["single_pass", "batch_invariant"])
@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_rows_are_batch_invariant(target, rng, mode, kv_format):
    """A token's result alone equals, bit for bit, its result inside a decode or prefill batch.

    The shapes are ones where the occupancy heuristic splits a lone token's
    top-k list differently from the batch's, so only the mode keeps the rounding.
    """
    tokens, heads = target.pick(cpu=6, gpu=64), 16
    topk = target.pick(cpu=1024, gpu=2048)
    num_slots = target.pick(cpu=1500, gpu=1 << 18)
    kv, q, idx = make_inputs(target, rng, tokens, heads, topk, num_slots, kv_format)
    info = device_info(target.device)
    cfg = select_config(heads, kv_format == "fp8", info)
    blocks = -(-heads // cfg.block_h)
    fp8 = kv_format == "fp8"
    assert choose_num_kv_splits(blocks, topk, cfg, fp8, info) != choose_num_kv_splits(tokens * blocks, topk, cfg, fp8, info)

    kwargs = {"num_kv_splits": 1} if mode == "single_pass" else {"batch_invariant": True}
    batch_out, batch_lse = sparse_mla_decode(q, kv, idx, SM_SCALE, **kwargs)
    assert_matches_reference(batch_out, batch_lse, q, kv, idx)
    if mode == "batch_invariant":
        prefill_out, prefill_lse = sparse_mla_prefill(q, kv, idx, SM_SCALE, batch_invariant=True)
        assert torch.equal(prefill_out, batch_out) and torch.equal(prefill_lse, batch_lse)
    for t in (0, tokens - 1):
        one_out, one_lse = sparse_mla_decode(q[t : t + 1], kv, idx[t : t + 1], SM_SCALE, **kwargs)
        assert torch.equal(one_out[0], batch_out[t])
        assert torch.equal(one_lse[0], batch_lse[t])


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_paged_and_slot_views_agree(target, rng, kv_format):
    page_size, pages = 64, target.pick(cpu=8, gpu=512)
    kv, q, idx = make_inputs(target, rng, 3, 16, 64, page_size * pages, kv_format)
    flat, flat_lse = sparse_mla_decode(q, kv, idx, SM_SCALE, num_kv_splits=1)
    for view in (kv.view(pages, page_size, 1, kv.shape[-1]), kv.view(-1, 1, kv.shape[-1])):
        paged, paged_lse = sparse_mla_decode(q, view, idx, SM_SCALE, num_kv_splits=1)
        assert torch.equal(paged, flat) and torch.equal(paged_lse, flat_lse)


def test_rows_shorter_than_one_tile_and_tiny_topk(target, rng):
    kv = make_cache(target, rng, 50, "bf16")
    q = make_q(target, rng, 2, 16)
    idx = torch.tensor([[3, -1, 7], [-1, -1, 49]], dtype=torch.int32, device=target.device)
    out, lse = sparse_mla_decode(q, kv, idx, SM_SCALE)
    assert_matches_reference(out, lse, q, kv, idx)


def test_empty_batch(target):
    q = torch.empty(0, 16, 576, dtype=torch.bfloat16, device=target.device)
    kv = torch.zeros(10, 576, dtype=torch.bfloat16, device=target.device)
    idx = torch.empty(0, 64, dtype=torch.int32, device=target.device)
    out, lse = sparse_mla_decode(q, kv, idx, SM_SCALE)
    assert out.shape == (0, 16, 512) and lse.shape == (0, 16)
    out, lse = sparse_mla_prefill(q, kv, idx, SM_SCALE)
    assert out.shape == (0, 16, 512)


def test_non_contiguous_q_rows(target, rng):
    kv = make_cache(target, rng, 300, "bf16")
    q_wide = make_q(target, rng, 3, 32)
    q = q_wide[:, ::2]  # every other head: strided heads, contiguous head dim
    idx = make_indices(target, rng, 3, 64, 300)
    out, lse = sparse_mla_decode(q, kv, idx, SM_SCALE)
    assert_matches_reference(out, lse, q, kv, idx)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_rope_part_apart_gives_the_same_bits(target, rng, kv_format, prefill):
    """``q [T, H, 512]`` with ``q_rope [T, H, 64]``, both strided like SGLang's absorbed MLA tensors
    (the per-head product transposed, a slice of wider rows), equals the concatenated query."""
    kv, q, idx = make_inputs(target, rng, 4, 16, 96, 400, kv_format)
    q_nope = q[..., :512].transpose(0, 1).contiguous().transpose(0, 1)
    q_rope = torch.cat([q[..., 512:], q[..., 512:]], dim=-1)[..., :64]
    fn = sparse_mla_prefill if prefill else sparse_mla_decode
    whole = fn(q, kv, idx, SM_SCALE)
    apart = fn(q_nope, kv, idx, SM_SCALE, q_rope=q_rope)
    assert all(torch.equal(a, b) for a, b in zip(whole, apart, strict=True))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(q=a["q"][..., :512], q_rope=a["q"][..., :32]), "q_rope.shape\\[2\\]"),
        (lambda a: a.update(q=a["q"][..., :512], q_rope=a["q"][:1, :, :64]), "tokens and heads must match"),
        (lambda a: a.update(q_rope=a["q"][..., :64]), "q.shape\\[2\\] \\(latent; q_rope holds"),
        (lambda a: a.update(q=a["q"][..., :512], q_rope=a["q"][..., :64].half()), "q_rope must be torch.bfloat16"),
        (lambda a: a.update(q=a["q"].half()), "q must be torch.bfloat16"),
        (lambda a: a.update(q=a["q"][..., :512]), "q.shape\\[2\\]"),
        (lambda a: a.update(q=a["q"][0]), "q must be \\[tokens, heads, 576\\]"),
        (lambda a: a.update(indices=a["indices"].long()), "indices must be torch.int32"),
        (lambda a: a.update(indices=a["indices"][:1]), "indices has 1 rows but q has 2"),
        (lambda a: a.update(kv_cache=a["kv_cache"][:, :512]), "576 values per slot"),
        (lambda a: a.update(kv_cache=a["kv_cache"].float()), "kv_cache must be"),
        (lambda a: a.update(kv_cache=torch.zeros(8, 600, dtype=torch.uint8, device=a["q"].device)), "656 bytes"),
        (lambda a: a.update(kv_cache=a["kv_cache"].view(4, 2, 576)), "\\[num_slots, 1, D\\]"),
        (lambda a: a.update(d_v=256), "d_v must be 512"),
        (lambda a: a.update(out=torch.empty(2, 4, 512, device=a["q"].device)), "out must be torch.bfloat16"),
    ],
)
def test_bad_input_is_refused(target, change, message):
    args = dict(
        q=torch.zeros(2, 4, 576, dtype=torch.bfloat16, device=target.device),
        kv_cache=torch.zeros(8, 576, dtype=torch.bfloat16, device=target.device),
        indices=torch.zeros(2, 16, dtype=torch.int32, device=target.device),
        sm_scale=SM_SCALE,
    )
    change(args)
    with pytest.raises(ValueError, match=message):
        sparse_mla_decode(**args)
