"""Server-argument resolution with the plugin loaded: SGLang's real parser and pipeline.

The machine has no GPU, so resolution runs with ``--device cpu`` and a faked
compute capability (the ``resolve`` fixture of ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("sglang.srt")

from sglang_sparse_mla.backend.spec import BACKEND_NAME, UnsupportedConfiguration  # noqa: E402
from sglang_sparse_mla.testing.serving import e2e  # noqa: E402
from sglang_sparse_mla.testing.tiny_model import tiny_config  # noqa: E402

DSA_CONFIG = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "q_lora_rank": 64,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 4096,
    "index_topk": 2048,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "torch_dtype": "bfloat16",
}


def model_dir(tmp_path, **changes) -> str:
    config = {**DSA_CONFIG, **changes}
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("sm,kv_dtype", [(80, "bfloat16"), (90, "bfloat16"), (100, "fp8_e4m3")])
def test_dsa_model_keeps_our_backend_and_layouts(tmp_path, resolve, sm, kv_dtype):
    view = resolve(model_dir(tmp_path), "--attention-backend", BACKEND_NAME, sm=sm)
    assert view.attention_backend == BACKEND_NAME  # SGLang fills "dsa" only when unset
    assert view.page_size == 64
    assert view.kv_cache_dtype == kv_dtype  # SGLang's DSA default for the architecture
    # No SGLang DSA kernel is selected, so an FP8 pool keeps the scaled 656-byte rows.
    assert view.dsa_prefill_backend is None and view.dsa_decode_backend is None
    assert view.cuda_graph_config.prefill.backend == "disabled"
    assert view.cuda_graph_config.decode.backend == "full"


def test_sglang_default_without_our_backend_is_untouched(tmp_path, resolve):
    view = resolve(model_dir(tmp_path), "--attention-backend", "dsa", sm=100)
    assert view.dsa_prefill_backend == view.dsa_decode_backend == "trtllm"
    assert view.cuda_graph_config.prefill.backend == "breakable"


def test_explicit_fp8_kv_cache_and_page_size(tmp_path, resolve):
    flags = ["--attention-backend", BACKEND_NAME, "--kv-cache-dtype", "fp8_e4m3", "--page-size", "32"]
    view = resolve(model_dir(tmp_path), *flags)
    assert view.kv_cache_dtype == "fp8_e4m3" and view.page_size == 64


@pytest.mark.parametrize(
    "flags,flag_named",
    [
        (["--dsa-decode-backend", "flashmla_kv"], "--dsa-decode-backend"),
        (["--cuda-graph-backend-prefill", "breakable"], "--cuda-graph-backend-prefill"),
        (["--decode-attention-backend", "dsa"], "--attention-backend"),
        (["--dcp-size", "2", "--tp", "2"], "--dcp-size"),
        (["--attn-cp-size", "2", "--tp", "2"], "--attn-cp-size"),
        (["--enable-prefill-cp", "--cp-strategy", "interleave", "--tp", "2"], "--enable-prefill-cp"),
        (["--enable-two-batch-overlap"], "--enable-two-batch-overlap"),
        (["--enable-hisparse"], "--enable-hisparse"),
    ],
)
def test_conflicting_flags_fail_at_startup(tmp_path, resolve, flags, flag_named):
    with pytest.raises(UnsupportedConfiguration, match=flag_named):
        resolve(model_dir(tmp_path), "--attention-backend", BACKEND_NAME, *flags)


def test_dcp_is_refused_by_its_own_flag(tmp_path, resolve):
    """SGLang's DCP override fills --dsa-prefill/decode-backend with trtllm; the refusal names --dcp-size."""
    with pytest.raises(UnsupportedConfiguration) as refused:
        resolve(model_dir(tmp_path), "--attention-backend", BACKEND_NAME, "--dcp-size", "2", "--tp", "2")
    assert "--dcp-size" in str(refused.value) and "--dsa-" not in str(refused.value)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("page_size,warned", [(None, False), ("64", False), ("1", True), ("32", True)])
def test_page_size_override_is_logged(tmp_path, resolve, page_size, warned):
    """SGLang sets 64 over any --page-size for DSA models; the log says so, naming the flag.
    (A handler on our logger: SGLang's logging set-up replaces the root handlers caplog uses.)"""
    flags = ["--attention-backend", BACKEND_NAME, *(["--page-size", page_size] if page_size else [])]
    records = _Records()
    logger = logging.getLogger("sglang_sparse_mla")
    logger.addHandler(records)
    try:
        view = resolve(model_dir(tmp_path), *flags)
    finally:
        logger.removeHandler(records)
    assert view.page_size == 64
    assert any(f"--page-size {page_size} is overridden to 64" in m for m in records.messages) == warned


def test_non_dsa_model_is_refused(tmp_path, resolve):
    path = model_dir(tmp_path, architectures=["DeepseekV3ForCausalLM"], index_topk=None)
    with pytest.raises(UnsupportedConfiguration, match="DeepSeek Sparse Attention"):
        resolve(path, "--attention-backend", BACKEND_NAME)


# SGLang's MTP flags for DSA models (its docs for DeepSeek-V3.2 / GLM-5).
MTP = ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
       "--speculative-num-draft-tokens", "4"]  # fmt: skip


@pytest.mark.parametrize("flags", [MTP, ["--speculative-algorithm", "EAGLE"]], ids=["nextn", "eagle_auto"])
def test_mtp_resolves_to_chain_drafts_of_the_models_own_layer(tmp_path, resolve, flags):
    path = model_dir(tmp_path, num_nextn_predict_layers=1)
    view = resolve(path, "--attention-backend", BACKEND_NAME, *flags)
    assert view.speculative_algorithm == "EAGLE" and view.speculative_draft_model_path == path
    assert (view.speculative_num_steps, view.speculative_eagle_topk, view.speculative_num_draft_tokens) == (3, 1, 4)


def llama_draft_dir(path) -> str:
    path.mkdir()
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
              "vocab_size": 1024}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "flags,flag_named",
    [
        (["--speculative-algorithm", "NGRAM", "--speculative-ngram-max-bfs-breadth", "1"], "NGRAM"),
        ([*MTP, "--enable-multi-layer-eagle"], "--enable-multi-layer-eagle"),
        ([*MTP, "--speculative-draft-window-size", "64"], "--speculative-draft-window-size"),
        (["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "LLAMA", *MTP[2:]],
         "LlamaForCausalLMEagle3.*--speculative-draft-attention-backend"),
    ],
    ids=["ngram", "multi_layer", "draft_window", "eagle3_llama_draft"],
)  # fmt: skip
def test_speculative_setups_we_cannot_serve_fail_at_startup(tmp_path, resolve, flags, flag_named):
    flags = [llama_draft_dir(tmp_path / "draft") if f == "LLAMA" else f for f in flags]
    path = model_dir(tmp_path, num_nextn_predict_layers=1)
    with pytest.raises(UnsupportedConfiguration, match=flag_named):
        resolve(path, "--attention-backend", BACKEND_NAME, *flags)


def test_a_draft_on_another_backend_is_its_business(tmp_path, resolve):
    """A non-DSA EAGLE3 draft whose attention runs on a backend named for it starts."""
    draft = llama_draft_dir(tmp_path / "draft")
    flags = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", draft, *MTP[2:]]
    view = resolve(model_dir(tmp_path), "--attention-backend", BACKEND_NAME, *flags,
                   "--speculative-draft-attention-backend", "triton")  # fmt: skip
    assert view.speculative_algorithm == "EAGLE3" and view.attention_backend == BACKEND_NAME


def test_fp8_pool_row_is_656_bytes_without_sglang_dsa_kernels():
    """Why SGLang's DSA kernel choice is suppressed: ``trtllm`` would drop the FP8 scales."""
    from sglang.srt.mem_cache.kv_cache_configurator import calculate_mla_kv_cache_dim
    from sglang.srt.runtime_context import get_context
    from transformers import DeepseekV3Config

    model_config = type("ModelConfig", (), {})()
    model_config.hf_config = DeepseekV3Config(architectures=["DeepseekV32ForCausalLM"], index_topk=2048)
    model_config.kv_lora_rank, model_config.qk_rope_head_dim = 512, 64
    for decode_backend, row in ((None, 656), ("trtllm", 576)):
        with get_context().override_server_args(
            attention_backend=BACKEND_NAME, kv_cache_dtype="fp8_e4m3", dsa_decode_backend=decode_backend
        ):
            assert calculate_mla_kv_cache_dim(model_config=model_config, kv_cache_dtype=torch.float8_e4m3fn) == row


def test_deterministic_inference_keeps_our_backend_and_radix_cache(tmp_path, resolve):
    """SGLang accepts only listed backends for deterministic DSA serving; the plugin lists ours."""
    view = resolve(model_dir(tmp_path), "--attention-backend", BACKEND_NAME, "--enable-deterministic-inference")
    assert view.attention_backend == BACKEND_NAME
    assert view.enable_deterministic_inference and not view.disable_radix_cache
    with pytest.raises(ValueError, match="deterministic inference"):
        resolve(model_dir(tmp_path), "--attention-backend", "dsa", "--enable-deterministic-inference")


@pytest.mark.parametrize("arch", ["deepseek-v3.2", "glm-5"])
@pytest.mark.parametrize("name", e2e.CONFIG_NAMES)
def test_every_e2e_configuration_resolves(tmp_path, resolve, name, arch):
    """Each run_e2e.py server's arguments pass SGLang's parser and resolution with the plugin loaded
    (the model's config, CPU stand-in for the GPU), so a misspelt flag or a combination SGLang or the
    plugin refuses fails here, not in a device call."""
    config = tiny_config(arch, "released-tp8")
    (tmp_path / "config.json").write_text(json.dumps(config))
    launch = e2e.make_configs(config["index_topk"])[name]
    view = resolve(str(tmp_path), *e2e.COMMON, *launch.args)
    assert view.attention_backend == (BACKEND_NAME if launch.args[:2] == e2e.OURS else "dsa")
    assert view.cuda_graph_config.decode.max_bs == 32
    assert (view.speculative_algorithm == "EAGLE") == ("-mtp" in name)


def test_mixed_chunk_is_kept(tmp_path, resolve):
    """Mixed prefill-and-decode batches stay on with our backend (the MIXED forward mode: extend metadata)."""
    view = resolve(model_dir(tmp_path), "--attention-backend", BACKEND_NAME, "--enable-mixed-chunk")
    assert view.enable_mixed_chunk
