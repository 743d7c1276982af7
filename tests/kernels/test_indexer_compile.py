"""Every indexer kernel configuration fits every supported GPU.

Compiles (without a GPU) each configuration the launchers can pick or a
benchmark sweep can try, for SM80/86/89/90/120 and for the forced SM80 path on
an SM90, and checks shared memory against the arch's opt-in limit, that
the kernel touches no local memory (no spills; see ``target_compile.py``), and that the programs of a cooperative launch that an
SM must hold at once fit its registers and shared memory. SM80/86 (and the forced path) compile the emulated FP8
path (uint8 codes -> fp16 dots), the others native FP8 dots.

Compilation runs outside the interpreter through ``target_compile.compile_many``
(one child process, spread over the machine's cores).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
from target_compile import SHARED_MEMORY_LIMIT, CompileJob, compile_many, toolchain_accepts

from sglang_sparse_mla.kernels.device_info import DeviceInfo

RAGGED = "sglang_sparse_mla.kernels.fp8_mqa_logits"
PAGED = "sglang_sparse_mla.kernels.fp8_paged_mqa_logits"
TOPK = "sglang_sparse_mla.kernels.topk"
INDEX_FP8 = "sglang_sparse_mla.kernels.index_fp8_quant"
HEADS = 64
REGISTERS_PER_SM = 65536  # every arch from sm80 to sm121
BLOCK_SIZE = 64
K = 2048

# (target id, compute capability, native FP8, shared memory the launcher sees)
TARGETS = [
    ("sm80", 80, False, SHARED_MEMORY_LIMIT[80]),
    ("sm86", 86, False, SHARED_MEMORY_LIMIT[86]),
    ("sm89", 89, True, SHARED_MEMORY_LIMIT[89]),
    ("sm90", 90, True, SHARED_MEMORY_LIMIT[90]),
    ("sm90_forced_sm80", 90, False, min(SHARED_MEMORY_LIMIT[90], SHARED_MEMORY_LIMIT[80])),
    ("sm100", 100, True, SHARED_MEMORY_LIMIT[100]),
    ("sm110", 110, True, SHARED_MEMORY_LIMIT[110]),
    ("sm120", 120, True, SHARED_MEMORY_LIMIT[120]),
    ("sm121", 121, True, SHARED_MEMORY_LIMIT[121]),
]
KERNELS = ("ragged", "paged", "topk", "index_fp8")
# Top-k and the index FP8 quantization have no arch-specific path: the forced SM80 path on sm90 is plain sm90.
CASES = [
    (t[0], kernel)
    for t in TARGETS
    for kernel in KERNELS
    if not (t[0] == "sm90_forced_sm80" and kernel in ("topk", "index_fp8"))
]


@dataclass(frozen=True)
class Job:
    target: str
    kernel: str  # one of KERNELS
    label: str
    module: str
    function: str
    signature: dict
    constexprs: dict
    capability: int
    num_warps: int
    num_stages: int
    aligned: tuple
    resident: int = 1  # programs an SM must hold at once (cooperative launches)
    maxnreg: int | None = None  # the launch's register cap per thread


def _fp8_ptr(native: bool) -> str:
    return "*fp8e4nv" if native else "*u8"


def _device(capability: int, native: bool, smem: int) -> DeviceInfo:
    """The device the launcher sees: the forced SM80 path reports SM80 (no native FP8)."""
    cap = (capability // 10, capability % 10) if native or capability < 89 else (8, 0)
    return DeviceInfo(cap, smem, 132)


def _ragged_jobs(target, capability, native, smem):
    module = importlib.import_module(RAGGED)
    signature = dict(
        q_ptr=_fp8_ptr(native), k_ptr=_fp8_ptr(native), k_scale_ptr="*fp32", w_ptr="*fp32", ks_ptr="*i32",
        ke_ptr="*i32", out_ptr="*fp32", num_tokens="i32", num_keys="i32", cols_per_split="i32", stride_qt="i32",
        stride_kn="i32", stride_wt="i32", stride_ot="i32", score_factor="fp32",
    )
    aligned = ("q_ptr", "k_ptr", "k_scale_ptr", "w_ptr", "ks_ptr", "ke_ptr", "out_ptr",
               "stride_qt", "stride_kn", "stride_wt", "stride_ot")
    for cfg in module.CONFIGS.candidates(_device(capability, native, smem)):
        constexprs = dict(HEADS=HEADS, TOKENS=cfg.tokens_for(HEADS), BLOCK_N=cfg.block_n,
                          FILL_BLOCK=module._FILL_BLOCK, FP8_NATIVE=native)
        yield Job(target, "ragged", str(cfg), RAGGED, "_fp8_mqa_logits_kernel", signature, constexprs,
                  capability, cfg.num_warps, cfg.num_stages, aligned)


def _paged_jobs(target, capability, native, smem):
    module = importlib.import_module(PAGED)
    signature = dict(
        q_ptr=_fp8_ptr(native), kv_ptr=_fp8_ptr(native), kv_scale_ptr="*fp32", w_ptr="*fp32",
        context_lens_ptr="*i32", block_table_ptr="*i32", out_ptr="*fp32", next_n="i32", max_positions="i32",
        out_cols="i32", splits="i32", stride_qb="i32", stride_qj="i32", stride_block="i32",
        stride_bt="i32", stride_wr="i32", stride_or="i32", score_factor="fp32",
    )
    aligned = ("q_ptr", "kv_ptr", "kv_scale_ptr", "w_ptr", "context_lens_ptr", "block_table_ptr", "out_ptr",
               "stride_qb", "stride_qj", "stride_block", "stride_wr", "stride_or")
    for cfg in module.CONFIGS.candidates(_device(capability, native, smem)):
        # next_n = 1, 2, 4 give every token count a program can handle; with and without the -inf tail.
        for tokens in sorted({cfg.tokens_for(HEADS, n) for n in (1, 2, 4)}):
            for clean in (True, False):
                constexprs = dict(HEADS=HEADS, TOKENS=tokens, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=cfg.block_n,
                                  FILL_BLOCK=module._FILL_BLOCK, FP8_NATIVE=native, CLEAN=clean)
                yield Job(target, "paged", f"{cfg} tokens={tokens} clean={clean}", PAGED,
                          "_fp8_paged_mqa_logits_kernel", signature, constexprs, capability, cfg.num_warps,
                          cfg.num_stages, aligned)


def _topk_jobs(target, capability):
    module = importlib.import_module(TOPK)
    signature = dict(
        logits_ptr="*fp32", lengths_ptr="*i32", row_starts_ptr="*i32", out_ptr="*i32", scratch_ptr="*i32",
        req_to_token_ptr="*i32", req_pool_indices_ptr="*i32", token_to_req_ptr="*i32", num_rows="i32",
        num_cols="i32", k="i32", tokens_per_req="i32", slot_cols="i32", stride_lr="i32", stride_or="i32",
        stride_r2t="i32",
    )
    aligned = ("logits_ptr", "lengths_ptr", "row_starts_ptr", "out_ptr", "scratch_ptr", "stride_lr", "stride_or")
    # Plain selection with the default; every candidate with all options on
    # (the fused slot mapping is the variant with the most live values).
    per_row = [cfg for cfg in module.sweep_configs(K) if not cfg.split_rows]
    variants = [(module.default_config(K), False)] + [(cfg, True) for cfg in per_row]
    for cfg, options in variants:
        constexprs = dict(HAS_ROW_STARTS=options, MAP_SLOTS=options, HAS_TOKEN_TO_REQ=options,
                          CHUNKS=cfg.chunks, CAP=cfg.cap, EMIT_BLOCK=module._EMIT_BLOCK)
        yield Job(target, "topk", f"{cfg} options={options}", TOPK, "_topk_kernel", signature, constexprs,
                  capability, cfg.num_warps, cfg.num_stages, aligned)
    # Split rows: the cooperative launch of all five phases, plain and with
    # every option; MAX_SPLIT_PROGRAMS_PER_SM programs must fit an SM at once.
    signature = dict(
        logits_ptr="*fp32", lengths_ptr="*i32", row_starts_ptr="*i32", out_ptr="*i32", sync_ptr="*i32",
        seg_counts_ptr="*i32", req_to_token_ptr="*i32", req_pool_indices_ptr="*i32", token_to_req_ptr="*i32",
        row0="i32", num_cols="i32", k="i32", segments="i32", tokens_per_req="i32",
        slot_cols="i32", stride_lr="i32", stride_or="i32", stride_r2t="i32",
    )  # fmt: skip
    aligned = ("logits_ptr", "lengths_ptr", "row_starts_ptr", "out_ptr", "sync_ptr", "seg_counts_ptr", "stride_lr",
               "stride_or")  # fmt: skip
    blocks = sorted({cfg.split_block for cfg in module.sweep_configs(K)})
    for block, options in [(b, False) for b in blocks] + [(b, True) for b in blocks]:
        constexprs = dict(FIRST_PHASE=0, LAST_PHASE=4, HAS_ROW_STARTS=options, MAP_SLOTS=options,
                          HAS_TOKEN_TO_REQ=options, BLOCK=block, SEGMENT_BLOCK=module._SEGMENT_BLOCK,
                          SEGMENT_ALIGN=module._SEGMENT_ALIGN)  # fmt: skip
        yield Job(target, "topk", f"split rows block={block} options={options}", TOPK, "_split_rows_kernel", signature,
                  constexprs, capability, module._SPLIT_NUM_WARPS, 1, aligned,
                  module.MAX_SPLIT_PROGRAMS_PER_SM, module.SPLIT_MAX_REGISTERS)  # fmt: skip


def _index_fp8_jobs(target, capability):
    """The keys-and-queries kernel in SGLang's indexer variants (a launch of either part alone is one
    of these with the other part's rows at zero)."""
    module = importlib.import_module(INDEX_FP8)
    aligned = ("k_ptr", "cache_ptr", "cache_scales_ptr", "q_ptr", "q_codes_ptr", "q_scales_ptr", "weights_ptr")
    parts = dict(
        k_ptr="*bf16", stride_kt="i32", key_rows="i32", cache_ptr="*u8", cache_scales_ptr="*fp32", loc_ptr="*i64",
        page_size="i32", q_ptr="*bf16", stride_qt="i32", stride_qh="i32", query_rows="i32", heads="i32",
        q_codes_ptr="*u8", q_scales_ptr="*fp32",
    )  # fmt: skip
    # Unfused (gate fp32 from its own projection, or a bf16 fused slice): rotated or not, the query format.
    for rotate, ue8m0, gate in ((False, False, "*bf16"), (True, True, "*fp32"), (True, False, "*fp32")):
        signature = dict(
            parts, gate_ptr=gate, stride_gt="i32", head_scale="fp32", softmax_scale="fp32", weights_ptr="*fp32",
            signs_ptr="*bf16", positions_ptr="*bf16", cos_sin_ptr="*bf16", stride_cs="i32", norm_weight_ptr="*bf16",
            norm_bias_ptr="*bf16", eps="fp32",
        )  # fmt: skip
        constexprs = dict(ROPE=False, NORM=False, ROTATE=rotate, ROTATE_SCALE=module.HEAD_DIM**-0.5, DOT_FP32=False,
                          KEY_UE8M0=False, QUERY_UE8M0=ue8m0, BLOCK_R=module.BLOCK_ROWS, D=module.HEAD_DIM,
                          PAIRS=module.ROPE_DIM // 2)  # fmt: skip
        yield Job(target, "index_fp8", f"rotate={rotate} query_ue8m0={ue8m0} gate={gate}", INDEX_FP8,
                  "_index_fp8_kernel", signature, constexprs, capability, module.NUM_WARPS, 1, aligned)  # fmt: skip
    # The fused indexer's: keys LayerNorm + rope, queries rope, bf16 gate slice; either rope cache dtype.
    for cache in ("*fp32", "*bf16"):
        signature = dict(
            parts, gate_ptr="*bf16", stride_gt="i32", head_scale="fp32", softmax_scale="fp32", weights_ptr="*fp32",
            signs_ptr=cache, positions_ptr="*i64", cos_sin_ptr=cache, stride_cs="i32", norm_weight_ptr="*fp32",
            norm_bias_ptr="*fp32", eps="fp32",
        )  # fmt: skip
        for ue8m0 in (False, True):
            constexprs = dict(ROPE=True, NORM=True, ROTATE=False, ROTATE_SCALE=module.HEAD_DIM**-0.5, DOT_FP32=False,
                              KEY_UE8M0=ue8m0, QUERY_UE8M0=ue8m0, BLOCK_R=module.BLOCK_ROWS, D=module.HEAD_DIM,
                              PAIRS=module.ROPE_DIM // 2)  # fmt: skip
            yield Job(target, "index_fp8", f"rope cache={cache} ue8m0={ue8m0}", INDEX_FP8,
                      "_index_fp8_kernel", signature, constexprs, capability, module.NUM_WARPS, 1, aligned)  # fmt: skip


def compile_jobs() -> list[Job]:
    jobs = []
    for target, capability, native, smem in TARGETS:
        jobs += _ragged_jobs(target, capability, native, smem)
        jobs += _paged_jobs(target, capability, native, smem)
        if (target, "topk") in CASES:
            jobs += _topk_jobs(target, capability)
        if (target, "index_fp8") in CASES:
            jobs += _index_fp8_jobs(target, capability)
    return jobs


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    jobs = [j for j in compile_jobs() if toolchain_accepts(j.capability)]
    compiled = compile_many(
        [
            CompileJob(f"{j.module}:{j.function}", j.signature, j.constexprs, j.capability, j.num_warps, j.num_stages,
                       j.aligned, j.maxnreg)  # fmt: skip
            for j in jobs
        ]
    )
    for job, report in zip(jobs, compiled, strict=True):
        assert report.error is None, f"{job.target} {job.kernel} {job.label}: {report.error}"
    return [
        {"target": j.target, "kernel": j.kernel, "label": j.label, "capability": j.capability,
         "shared_bytes": r.shared_bytes, "registers": r.registers, "local_accesses": r.local_accesses,
         "stack_bytes": r.stack_bytes,
         "num_warps": j.num_warps, "resident": j.resident}
        for j, r in zip(jobs, compiled, strict=True)
    ]  # fmt: skip


@pytest.mark.parametrize("target,kernel", CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_configs_fit(reports, target, kernel):
    capability = next(cap for name, cap, _, _ in TARGETS if name == target)
    if not toolchain_accepts(capability):
        pytest.skip(f"this Triton's ptxas cannot target sm_{capability}")
    mine = [r for r in reports if r["target"] == target and r["kernel"] == kernel]
    assert mine, f"no {kernel} configuration compiled for {target}"
    for r in mine:
        limit = SHARED_MEMORY_LIMIT[r["capability"]]
        what = f"{target} {kernel} {r['label']}"
        assert r["shared_bytes"] <= limit, f"{what}: {r['shared_bytes']} B of shared memory > {limit}"
        assert r["local_accesses"] == 0, (
            f"{what}: {r['local_accesses']} local-memory instructions (spills; {r['stack_bytes']} B of stack, "
            f"{r['registers']} registers)"
        )
        n = r["resident"]
        assert n * r["shared_bytes"] <= limit, f"{what}: {n} programs need {n * r['shared_bytes']} B > {limit}"
        registers = n * r["registers"] * 32 * r["num_warps"]
        assert registers <= REGISTERS_PER_SM, f"{what}: {n} programs need {registers} registers > {REGISTERS_PER_SM}"

