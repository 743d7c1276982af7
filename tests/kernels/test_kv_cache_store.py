"""Writing latent KV rows into the BF16 and FP8 cache layouts, whole or with the rope part apart."""

from __future__ import annotations

import pytest
import torch
from target_compile import CompileJob, compile_many, compile_targets

from sglang_sparse_mla.kernels import quantize_kv_fp8, store_latent_rows


def _rows(target, rng, n):
    return torch.randn(n, 576, generator=rng, device=target.device).bfloat16()


@pytest.mark.parametrize("apart", [False, True], ids=["whole", "apart"])
def test_bf16_rows_land_at_their_slots(target, rng, apart):
    slots = target.pick(cpu=300, gpu=1 << 20)
    n = target.pick(cpu=7, gpu=4096)
    rows = _rows(target, rng, n)
    loc = torch.randperm(slots, generator=rng, device=target.device)[:n]
    cache = torch.full((slots, 1, 576), float("nan"), dtype=torch.bfloat16, device=target.device)
    if apart:  # strided like SGLang's k_nope / k_pe: slices of wider rows
        wide = torch.cat([rows, rows[:, :64]], dim=1)
        store_latent_rows(cache, loc.int(), wide[:, :512].unsqueeze(1), wide[:, 512:576].unsqueeze(1))
    else:
        store_latent_rows(cache, loc, rows.view(n, 1, 576))
    assert torch.equal(cache[loc, 0], rows)
    untouched = torch.ones(slots, dtype=torch.bool, device=target.device)
    untouched[loc] = False
    assert cache[untouched].isnan().all()


def test_bf16_slots_outside_the_cache_are_skipped(target, rng):
    rows = _rows(target, rng, 3)
    cache = torch.zeros(10, 576, dtype=torch.bfloat16, device=target.device)
    store_latent_rows(cache, torch.tensor([4, -1, 10], device=target.device), rows)
    assert torch.equal(cache[4], rows[0]) and cache[torch.arange(10, device=target.device) != 4].abs().sum() == 0


def test_fp8_rows_are_the_quantized_rows(target, rng):
    rows = _rows(target, rng, 5)
    loc = torch.tensor([3, 64, 65, 9, 130], device=target.device)
    cache = torch.zeros(200, 1, 656, dtype=torch.uint8, device=target.device)
    store_latent_rows(cache.view(torch.float8_e4m3fn), loc, rows[:, :512].float(), rows[:, 512:])
    assert torch.equal(cache[loc, 0], quantize_kv_fp8(rows))
    assert cache[torch.tensor([0, 4, 66], device=target.device)].sum() == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(k_nope=a["k_nope"][:, :500]), "k_nope.shape\\[1\\] \\(row width\\) must be 512"),
        (lambda a: a.update(k_rope=None), "k_nope.shape\\[1\\] \\(row width\\) must be 576"),
        (lambda a: a.update(k_rope=a["k_rope"][:1]), "k_rope has 1 rows but loc has 2"),
        (lambda a: a.update(k_rope=a["k_rope"].half()), "k_rope must be"),
        (lambda a: a.update(loc=a["loc"].float()), "loc must be"),
        (lambda a: a.update(kv_cache=a["kv_cache"][:, :500]), "576 values per slot"),
    ],
)
def test_bad_input_is_refused(target, change, message):
    args = dict(
        kv_cache=torch.zeros(8, 576, dtype=torch.bfloat16, device=target.device),
        loc=torch.tensor([1, 2], device=target.device),
        k_nope=torch.zeros(2, 512, dtype=torch.bfloat16, device=target.device),
        k_rope=torch.zeros(2, 64, dtype=torch.bfloat16, device=target.device),
    )
    change(args)
    with pytest.raises(ValueError, match=message):
        store_latent_rows(**args)


@pytest.mark.parametrize("loc_type", ["*i32", "*i64"])
def test_store_kernel_compiles_for_every_architecture(loc_type):
    signature = {"rows_ptr": "*bf16", "loc_ptr": loc_type, "nope_ptr": "*bf16", "rope_ptr": "*bf16"}
    signature |= {name: "i32" for name in ("num_slots", "stride_row", "stride_nope", "stride_rope")}
    kernel = "sglang_sparse_mla.kernels.kv_cache_store:_store_bf16_rows_kernel"
    jobs = [
        CompileJob(kernel, signature, dict(D_NOPE=512, D_PE=64), capability, 2, 2, ("rows_ptr", "nope_ptr"))
        for capability in compile_targets()
    ]
    for capability, report in zip(compile_targets(), compile_many(jobs), strict=True):
        assert report.error is None and report.local_accesses == 0, (capability, report)
