"""The warp-specialized SM90 sparse MLA kernel (Gluon): when the dispatcher picks it, and its
results against the float64 reference and the Triton kernel on an SM90 GPU. Gluon has no
interpreter: the CPU suite checks the dispatch here and compiles the kernel for sm_90 in
``test_sparse_mla_compile.py``."""

from __future__ import annotations

import pytest
import torch
from utils import relative_error
from test_sparse_mla import SM_SCALE, assert_matches_reference, end_rows_in_padding, make_inputs, poisoned_outputs

from sglang_sparse_mla.kernels.device_info import SMEM_LARGE, WARP_SPECIALIZED_ENV, DeviceInfo, device_info
from sglang_sparse_mla.kernels.sparse_mla import sparse_mla_decode, sparse_mla_forward, sparse_mla_prefill
from sglang_sparse_mla.kernels.sparse_mla_configs import WARP_SPECIALIZED_SM90, SparseMLAConfig, select_config

HOPPER = DeviceInfo((9, 0), SMEM_LARGE, 132, warp_specialized=True)
HOPPER_WITHOUT_WS = DeviceInfo((9, 0), SMEM_LARGE, 132)
TRITON_64_HEADS = SparseMLAConfig(64, 64, 8, 3)


def _ws_gpu() -> bool:
    return torch.cuda.is_available() and device_info(torch.device("cuda")).warp_specialized


on_ws_gpu = pytest.mark.skipif(not _ws_gpu(), reason="needs an SM90 GPU with Gluon (the kernel has no interpreter)")


@pytest.mark.parametrize(
    "heads, kv_fp8, tokens, warp_specialized",
    [
        (128, False, None, True),  # any batch (batch-invariant mode): one kernel whatever the batch
        (64, False, None, True),
        (40, False, None, True),
        (128, False, 2, True),
        (128, False, 37, True),
        (64, False, 3, True),
        (128, False, 1, False),  # at most 2 programs (64-head blocks): 16-head Triton blocks fill more SMs
        (64, False, 2, False),
        (64, False, 1, False),
        (128, True, None, False),  # FP8 cache: the Triton kernel dequantizes in registers
        (32, False, None, False),
        (16, False, 37, False),
    ],
)
def test_dispatch_on_hopper(heads, kv_fp8, tokens, warp_specialized):
    cfg = select_config(heads, kv_fp8, HOPPER, tokens)
    assert (cfg == WARP_SPECIALIZED_SM90) is warp_specialized
    assert not select_config(heads, kv_fp8, HOPPER_WITHOUT_WS, tokens).warp_specialized


def test_forcing_it_where_it_cannot_run_is_an_error(target, rng):
    kv, q, idx = make_inputs(target, rng, 2, 64, 64, 300, "fp8")
    with pytest.raises(ValueError, match="BF16 cache on an SM90 GPU"):
        sparse_mla_forward(q, kv, idx, SM_SCALE, config=WARP_SPECIALIZED_SM90)
    if not device_info(target.device).warp_specialized:
        kv, q, idx = make_inputs(target, rng, 2, 64, 64, 300, "bf16")
        with pytest.raises(ValueError, match="warp-specialized kernels usable: False"):
            sparse_mla_forward(q, kv, idx, SM_SCALE, config=WARP_SPECIALIZED_SM90)


@on_ws_gpu
def test_the_environment_switch_keeps_hopper_on_triton(monkeypatch):
    monkeypatch.setenv(WARP_SPECIALIZED_ENV, "0")
    info = device_info(torch.device("cuda"))
    assert not info.warp_specialized
    assert not select_config(128, False, info).warp_specialized


@on_ws_gpu
@pytest.mark.parametrize("heads", [16, 64, 128])
@pytest.mark.parametrize("num_kv_splits", [None, 1, 3])
@pytest.mark.parametrize("tokens", [1, 37])
def test_matches_reference_and_triton(target, rng, heads, num_kv_splits, tokens):
    kv, q, idx = make_inputs(target, rng, tokens, heads, 2048, 1 << 20, "bf16")
    out, lse = poisoned_outputs(tokens, heads, target.device)
    kwargs = dict(num_kv_splits=num_kv_splits, out=out, lse=lse)
    sparse_mla_forward(q, kv, idx, SM_SCALE, config=WARP_SPECIALIZED_SM90, **kwargs)
    assert_matches_reference(out, lse, q, kv, idx)
    triton_out, _ = sparse_mla_forward(q, kv, idx, SM_SCALE, num_kv_splits=num_kv_splits, config=TRITON_64_HEADS)
    assert relative_error(out, triton_out) < 1e-2


@on_ws_gpu
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_skipping_the_invalid_tail_changes_no_bit(target, rng, num_kv_splits):
    tokens, heads, topk = 300, 128, 2048
    kv, q, idx = make_inputs(target, rng, tokens, heads, topk, 1 << 16, "bf16")
    end_rows_in_padding(idx, rng, [0, 1, 63, 64, 65, 127, 128, 1023, 1024, topk - 1, topk])
    kwargs = dict(num_kv_splits=num_kv_splits, config=WARP_SPECIALIZED_SM90)
    whole = sparse_mla_forward(q, kv, idx, SM_SCALE, **kwargs)
    skipped = sparse_mla_forward(q, kv, idx, SM_SCALE, skip_invalid_tail=True, **kwargs)
    assert torch.equal(skipped[0], whole[0]) and torch.equal(skipped[1], whole[1])
    assert_matches_reference(*skipped, q, kv, idx)


@on_ws_gpu
def test_dispatched_for_many_heads_and_batch_invariant(target, rng):
    """The default path takes the kernel at 128 heads; in batch-invariant mode a token's bits do
    not depend on its batch, decode or prefill."""
    tokens, heads = 40, 128
    kv, q, idx = make_inputs(target, rng, tokens, heads, 2048, 1 << 18, "bf16")
    forced, _ = sparse_mla_forward(q, kv, idx, SM_SCALE, config=WARP_SPECIALIZED_SM90)
    dispatched, _ = sparse_mla_decode(q, kv, idx, SM_SCALE)
    assert torch.equal(dispatched, forced)
    batch_out, batch_lse = sparse_mla_decode(q, kv, idx, SM_SCALE, batch_invariant=True)
    assert_matches_reference(batch_out, batch_lse, q, kv, idx)
    prefill_out, prefill_lse = sparse_mla_prefill(q, kv, idx, SM_SCALE, batch_invariant=True)
    assert torch.equal(prefill_out, batch_out) and torch.equal(prefill_lse, batch_lse)
    for t in (0, tokens - 1):
        one_out, one_lse = sparse_mla_decode(q[t : t + 1], kv, idx[t : t + 1], SM_SCALE, batch_invariant=True)
        assert torch.equal(one_out[0], batch_out[t]) and torch.equal(one_lse[0], batch_lse[t])


@on_ws_gpu
def test_split_query_parts(target, rng):
    kv, q, idx = make_inputs(target, rng, 8, 128, 512, 4096, "bf16")
    whole, whole_lse = sparse_mla_forward(q, kv, idx, SM_SCALE, config=WARP_SPECIALIZED_SM90)
    nope, rope = q[..., :512].contiguous(), q[..., 512:].contiguous()
    split, split_lse = sparse_mla_forward(nope, kv, idx, SM_SCALE, q_rope=rope, config=WARP_SPECIALIZED_SM90)
    assert torch.equal(whole, split) and torch.equal(whole_lse, split_lse)
