"""SGLang's own DSA attention test kits, run against ``triton_sparse_mla`` by name.

The cases come from the kits' factories (``make_dsa_sparse_cases``), the
fixtures from the kits' builders, which take the backend from SGLang's
``ATTENTION_BACKENDS`` registry after the plugin registered it, so a change in
SGLang's runner, pools, batches or backend protocol that breaks this backend
fails here. The kits' own tolerances stay as they are; at the kits' shapes
(hidden size 64, outputs below 0.2) their absolute tolerance of 0.16 admits
attention over the wrong rows, so each comparison also bounds the relative
error. How the kits' inputs are adapted (top-k positions to KV slots, the
model's index heads) and why: :mod:`sglang_kits`.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang_kits import KitTestCase, backend_topk, import_kits, kit_context, with_index_heads  # noqa: E402
from utils import relative_error  # noqa: E402

from sglang_sparse_mla import plugin  # noqa: E402
from sglang_sparse_mla.backend.spec import BACKEND_NAME  # noqa: E402

kits, KIT_PARALLEL = import_kits()
dsa = kits.dsa

SPARSE_CASES = dsa.make_dsa_sparse_cases(BACKEND_NAME)
DECODE_CASES = [case for case in SPARSE_CASES if case.forward_mode.is_decode()]
CASE_BY_NAME = {case.name: case for case in SPARSE_CASES}

# ‖actual − expected‖ / ‖expected‖ of the layer output: BF16 rounding (measured
# 0.006 on CPU); FP8 adds the cache's quantization, since the kit's reference
# reads the unquantized keys (measured 0.04-0.05).
REL_TOL = {False: 1.5e-2, True: 8e-2}
KIT_TOL = {False: (dsa.DSA_SPARSE_ATOL, dsa.DSA_SPARSE_RTOL), True: (dsa.DSA_SPARSE_FP8_ATOL, dsa.DSA_SPARSE_FP8_RTOL)}
KV = pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])

# SGLang writes the kit's FP8 prefix rows with its Triton quantizer, about
# 20 ms a row through the interpreter; tests writing more run in the GPU suite.
CPU_FP8_ROWS = 256


@pytest.fixture
def kit(target, monkeypatch):
    """A kit ``testcase``, the device, and SGLang's state put back after the test."""
    plugin.register()
    monkeypatch.setattr(dsa, "TinyDSAModelConfig", with_index_heads(dsa.TinyDSAModelConfig))
    with kit_context(KIT_PARALLEL):
        yield KitTestCase(), target.device.type


def skip_slow_fp8_on_cpu(target, fp8: bool, rows: int) -> None:
    """``rows``: the FP8 rows SGLang's pool writes for the test."""
    if fp8 and not target.gpu and rows > CPU_FP8_ROWS:
        pytest.skip(
            f"SGLang's Triton quantizer writes {rows} FP8 rows here, ~{rows // 50} s through the "
            "interpreter; GPU suite only"
        )


def check_sparse_case(kit, case, *, fp8: bool = False, **build) -> None:
    """A kit sparse fixture through the backend's eager forward, against the kit's reference."""
    testcase, device = kit
    fixture = dsa.build_dsa_sparse_attention_fixture(testcase, case, device=device, fp8_kv_cache=fp8, **build)
    fixture.topk_indices = backend_topk(fixture)
    actual = dsa.run_dsa_sparse_fixture_eager(fixture, testcase)
    expected = dsa.expected_dsa_sparse_fixture_output(fixture)
    atol, rtol = KIT_TOL[fp8]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    assert relative_error(actual, expected) < REL_TOL[fp8]


@KV
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda case: case.name)
def test_sparse_case(kit, target, case, fp8):
    skip_slow_fp8_on_cpu(target, fp8, sum(case.prefix_lens))
    check_sparse_case(kit, case, fp8=fp8)


@pytest.mark.parametrize("pattern", ["strided", "head_tail"])
@pytest.mark.parametrize("name", ["dsa_sparse_decode_long_prefix", "dsa_sparse_prefill_long_extend"])
def test_non_trailing_topk(kit, name, pattern):
    """The kit's non-contiguous top-k rows (every other key; first and last halves)."""
    check_sparse_case(kit, CASE_BY_NAME[name], index_pattern=pattern)


@pytest.mark.parametrize("layout", ["contiguous", "interleaved_pages", "non_monotonic_extend"])
@pytest.mark.parametrize("name", ["dsa_sparse_prefill_multi_request", "dsa_sparse_decode_ragged_prefix"])
def test_kv_slot_layout(kit, name, layout):
    """The kit's page layouts besides its default ``shuffled_pages``: requests' pages in
    order, interleaved between requests, and new tokens' slots out of order."""
    check_sparse_case(kit, CASE_BY_NAME[name], loc_layout=layout)


@pytest.mark.parametrize("mode", [ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_EXTEND_V2], ids=lambda m: m.name)
def test_speculative_forward_mode(kit, mode):
    """MTP target verify and draft extend: three draft tokens per request, as the kit's
    ``run_dsa_sparse_speculative_forward_mode_case`` expects (its runner derives
    ``speculative_num_draft_tokens`` from the extend lengths); the kit ships no case factory."""
    case = dsa.DSAAttentionCase(
        name=f"dsa_sparse_{mode.name.lower()}",
        backend=BACKEND_NAME,
        forward_mode=mode,
        num_heads=4,
        num_kv_heads=1,
        page_size=dsa.DSA_PAGE_SIZE,
        prefix_lens=(128, 70),
        extend_lens=(3, 3),
    )
    check_sparse_case(kit, case)


@KV
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda case: case.name)
def test_cuda_graph_decode_runner(kit, target, case, fp8):
    """The kit's decode graph protocol (``init_cuda_graph_state``, capture and replay
    metadata, warm-up hook, metadata invariants), replay against eager and the reference.

    Its top-k rows are request-local positions fed unmapped to the backend, so its
    numeric comparisons do not bind here (see the module docstring); what binds is
    that SGLang's capture / replay protocol runs through this backend.
    """
    skip_slow_fp8_on_cpu(target, fp8, 3 * sum(case.prefix_lens))  # eager, graph and replay fixtures
    testcase, device = kit
    kits.cuda_graph_decode.run_dsa_sparse_cuda_graph_decode_case(testcase, case, device=device, fp8_kv_cache=fp8)


@pytest.mark.parametrize("case", [c for c in DECODE_CASES if c.batch_size <= 2], ids=lambda case: case.name)
def test_eagle_draft_cuda_graph_runner(kit, target, case):
    """SGLang's EAGLE draft worker and its CUDA-graph runner over this backend's MTP
    draft backends (chain drafts), graph replay against eager."""
    if not target.gpu:
        pytest.skip("the kit captures a CUDA graph (EAGLEDraftCudaGraphRunner) and seeds CUDA RNG; GPU suite only")
    testcase, device = kit
    max_context_len = -(-(max(case.prefix_lens) + dsa.DSA_PAGE_SIZE) // dsa.DSA_PAGE_SIZE) * dsa.DSA_PAGE_SIZE
    kits.draft.run_dsa_eagle_draft_cuda_graph_runner_case(
        testcase, case, cuda_graph_capture_batch_size=case.batch_size, max_context_len=max_context_len, device=device
    )


@pytest.mark.parametrize("case", dsa.make_dsa_dense_fallback_cases(BACKEND_NAME), ids=lambda case: case.name)
def test_dense_fallback_case(case):
    pytest.skip(
        "not applicable: the kit's dense MHA_ONE_SHOT fallback of SGLang's dsa backend; this backend "
        "runs sparse MLA for every batch (use_mha is False) and refuses the case's model "
        "(kv_lora_rank 16, no rope)"
    )


NOT_APPLICABLE = {
    "dsa_impl_variants": "the kit's --dsa-prefill-backend / --dsa-decode-backend matrix "
    "(run_dsa_sparse_{prefill,decode,fp8_*,cuda_graph_decode_impl_variant,tilelang_*}_case) picks "
    "SGLang dsa's own kernels; this backend has none and refuses those flags",
    "dsa_mtp_seed_handoff": "run_dsa_mtp_seed_handoff_case checks dsa's fused-top-k MTP seed export "
    "through flashmla_sparse_q8 (SM90, use_fused_topk, IndexTopKShareState.publish)",
    "dsa_metadata_kit": "sglang.test.kits.dsa_metadata_kit builds DeepseekSparseAttnBackend itself "
    "and checks its private CUDA-graph metadata (_apply_cuda_graph_metadata, kpool fusion, top-k v2 plans); "
    "it takes no backend name",
    "split_op_runner": "split_op_runner has no DSA entry point (piecewise prefill graphs; the plugin "
    "turns prefill CUDA graphs off)",
    "speculative_target_verify_runner": "no DSA entry point; DSA target verify is the attention kit's "
    "speculative forward mode (test_speculative_forward_mode)",
    "speculative_draft_extend_runner": "no DSA entry point (dense and MLA models only)",
}


@pytest.mark.parametrize("entry", list(NOT_APPLICABLE))
def test_not_applicable(entry):
    pytest.skip(f"not applicable: {NOT_APPLICABLE[entry]}")
