"""Every sparse MLA configuration the dispatcher can pick compiles for every
supported architecture, fits its shared memory and spills no registers.

Runs without a GPU: Triton lowers the kernels for a named target and ptxas
reports the resources (see ``target_compile.py``).
"""

from __future__ import annotations

import pytest
from target_compile import SHARED_MEMORY_LIMIT, CompileJob, CompileReport, compile_many, toolchain_accepts

from sglang_sparse_mla.kernels.device_info import DeviceInfo, gluon_ampere_available, gluon_hopper_available
from sglang_sparse_mla.kernels.sparse_mla_configs import all_configs

_SHAPE_ARGS = ["num_heads", "num_slots", "topk", "keys_per_split"]
_STRIDES = [
    "stride_qt", "stride_qh", "stride_qrt", "stride_qrh",
    "stride_it", "stride_ot", "stride_oh", "stride_os", "stride_lt", "stride_lh", "stride_ls",
]  # fmt: skip


def kernel_signature(fp8: bool, split: bool, gluon_sm80: bool = False) -> tuple[dict[str, str], tuple[str, ...]]:
    """Argument types of the forward kernel, and the arguments a real launch
    sees as 16-divisible (aligned base pointers and row strides)."""
    sig = {"q_ptr": "*bf16", "qr_ptr": "*bf16"}
    if gluon_sm80:  # the rows and their rope view, both row strides
        sig |= {"kv_ptr": "*i32" if fp8 else "*bf16", "rope_ptr": "*bf16"}
        strides = ["stride_kv", "stride_rope"]
    elif fp8:
        sig |= {"words_ptr": "*i32", "rope_ptr": "*bf16"}
        strides = ["stride_words", "stride_rope"]
    else:
        sig |= {"kv_ptr": "*bf16"}
        strides = ["stride_kv"]
    sig |= {"idx_ptr": "*i32", "ends_ptr": "*i32", "out_ptr": "*fp32" if split else "*bf16", "lse_ptr": "*fp32"}
    sig |= {name: "i32" for name in _SHAPE_ARGS} | {"qk_scale_log2": "fp32"}
    sig |= {name: "i32" for name in _STRIDES[:4] + strides + _STRIDES[4:]}
    aligned = tuple(n for n in sig if n.endswith("_ptr"))
    aligned += ("stride_qt", "stride_qh", "stride_qrt", "stride_qrh", "stride_ot", "stride_oh", "stride_os")
    aligned += tuple(s for s in strides if not fp8)  # FP8 rows: 656 bytes, 164 words, 328 bf16
    return sig, aligned


_MODULE = "sglang_sparse_mla.kernels.sparse_mla"


def device_for(capability: int) -> DeviceInfo:
    """What the dispatch sees on an arch of this family (132 SMs, the arch's shared memory)."""
    ws_target = capability == 90 and gluon_hopper_available()  # the Gluon kernels need Triton 3.6+
    return DeviceInfo((capability // 10, capability % 10), SHARED_MEMORY_LIMIT[capability], 132,
                      warp_specialized=ws_target, gluon_sm80=gluon_ampere_available())  # fmt: skip


def sparse_mla_job(capability: int, fp8: bool, config, split: bool, skip_tail: bool) -> CompileJob:
    """The launch of ``config`` on ``sm_<capability>``: split (decode partials) or single pass, scanning
    for the valid tail (prefill) or not."""
    info = device_for(capability)
    sig, aligned = kernel_signature(fp8, split, config.gluon_sm80)
    constexprs = dict(BLOCK_H=config.block_h, BLOCK_N=config.block_n, SPLIT_OUTPUT=split,
                      SKIP_INVALID_TAIL=skip_tail, UPCAST=False)  # fmt: skip
    fp8_format = dict(FP8_NATIVE=info.native_fp8, FP8_FACTOR=1.0 if info.native_fp8 else 256.0)
    if fp8:
        constexprs |= fp8_format
    kernel = f"{_MODULE}:{'_sparse_mla_fp8_kernel' if fp8 else '_sparse_mla_bf16_kernel'}"
    if config.warp_specialized:
        from sglang_sparse_mla.kernels import sparse_mla_sm90_ws as ws

        del constexprs["UPCAST"]
        constexprs |= dict(STAGES=config.num_stages, LOADER_WARPS=ws.LOADER_WARPS,
                           LOADER_REGS=ws.LOADER_REGS, VALUES_REGS=ws.VALUES_REGS)  # fmt: skip
        kernel = f"{ws.__name__}:sparse_mla_sm90_ws_kernel"
    if config.gluon_sm80:
        constexprs = dict(BLOCK_H=config.block_h, BLOCK_N=config.block_n, STAGES=config.num_stages,
                          WARPS_M=config.warps_m, KV_FP8=fp8, SPLIT_OUTPUT=split, SKIP_INVALID_TAIL=skip_tail)  # fmt: skip
        if config.plane_warps:
            kernel = "sglang_sparse_mla.kernels.sparse_mla_sm80_planes:sparse_mla_sm80_planes_kernel"
        else:
            kernel = "sglang_sparse_mla.kernels.sparse_mla_sm80:sparse_mla_sm80_kernel"
            constexprs |= fp8_format | dict(WORD_DEQUANT=config.word_dequant, DEQUANT_AHEAD=config.dequant_ahead)
    return CompileJob(kernel, sig, constexprs, capability, config.num_warps, config.num_stages, aligned)


def _cases():
    for capability, limit in SHARED_MEMORY_LIMIT.items():
        for fp8, config in all_configs(device_for(capability)):
            # Decode launches (split or not) and prefill launches (single pass, scanning for the valid tail).
            for split, skip_tail in ((False, False), (True, False), (False, True)):
                mode = "split" if split else "single-skip-tail" if skip_tail else "single"
                label = f"sm{capability}-{'fp8' if fp8 else 'bf16'}-{config}-{mode}"
                yield label, limit, sparse_mla_job(capability, fp8, config, split, skip_tail)
    for capability, limit in SHARED_MEMORY_LIMIT.items():
        sig = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32", "num_splits": "i32"}
        sig |= {n: "i32" for n in ["stride_pt", "stride_ph", "stride_ps", "stride_plt", "stride_plh", "stride_pls", "stride_ot", "stride_oh", "stride_lt", "stride_lh"]}
        ends_sig = {"idx_ptr": "*i32", "ends_ptr": "*i32", "topk": "i32", "num_slots": "i32", "stride_it": "i32"}
        job = CompileJob(f"{_MODULE}:_valid_ends_kernel", ends_sig, dict(SCAN=1024), capability, 4, 2, ("idx_ptr",))
        yield f"sm{capability}-valid-ends", limit, job
        for splits in (2, 64):
            job = CompileJob(f"{_MODULE}:_merge_splits_kernel", sig, dict(SPLITS=splits, BLOCK_D=min(512, 4096 // splits)), capability, 4, 2, ("part_out_ptr", "out_ptr"))
            yield f"sm{capability}-merge-{splits}", limit, job


CASES = list(_cases())


@pytest.fixture(scope="module")
def reports() -> dict[str, CompileReport]:
    cases = [(label, job) for label, _, job in CASES if toolchain_accepts(job.capability)]
    return dict(zip((label for label, _ in cases), compile_many([job for _, job in cases])))


@pytest.mark.parametrize("label, limit", [(label, limit) for label, limit, _ in CASES], ids=[c[0] for c in CASES])
def test_config_fits(reports, label, limit):
    if label not in reports:
        pytest.skip(f"this Triton's ptxas cannot target {label.split('-')[0]}")
    report = reports[label]
    assert report.error is None, report.error
    assert report.shared_bytes <= limit, report
    assert report.local_accesses == 0, report
