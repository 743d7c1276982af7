"""Start-up checks: what is served, and errors that name the flag to change (pure Python)."""

from __future__ import annotations

import re

import pytest

from sglang_sparse_mla.backend import spec

Bad = spec.UnsupportedConfiguration


@pytest.mark.parametrize("heads", [128, 64])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_per_rank_heads(heads, tp):
    assert spec.per_rank_heads(heads, tp) == heads // tp


@pytest.mark.parametrize("heads,tp", [(128, 3), (64, 128), (8, 0)])
def test_heads_that_do_not_split(heads, tp):
    with pytest.raises(Bad, match="--tp-size"):
        spec.per_rank_heads(heads, tp)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (11, 0), (12, 0), (12, 1)])
def test_gpus_from_sm80_accepted(capability):
    spec.check_gpu("some GPU", capability)


@pytest.mark.parametrize("name, capability", [("Tesla V100-SXM2-32GB", (7, 0)), ("Tesla T4", (7, 5))])
def test_gpus_below_sm80_refused_by_name(name, capability):
    with pytest.raises(Bad, match=f"8\\.0 or newer.*{re.escape(name)} is sm{capability[0]}{capability[1]}"):
        spec.check_gpu(name, capability)


def test_dsa_models_accepted():
    spec.check_model(
        "DeepseekV32ForCausalLM",
        is_dsa=True,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        index_head_dim=128,
        index_n_heads=64,
    )
    spec.check_model(
        "GlmMoeDsaForCausalLM", is_dsa=True, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128, index_n_heads=32
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(is_dsa=False), "--attention-backend"),
        (dict(is_dsa=True, kv_lora_rank=256), "kv_lora_rank"),
        (dict(is_dsa=True, index_n_heads=16), "index heads"),
        (dict(is_dsa=True, index_kpool=4), "--attention-backend dsa"),
        (dict(is_dsa=True, learnable_sink=True), "--attention-backend dsa"),
    ],
)
def test_models_refused(kwargs, message):
    with pytest.raises(Bad, match=message):
        spec.check_model("SomeForCausalLM", **kwargs)


@pytest.mark.parametrize(
    "check,args,flag",
    [
        (spec.check_page_size, (16,), "--page-size 64"),
        (spec.check_kv_cache_dtype, ("fp8_e5m2",), "--kv-cache-dtype"),
        (spec.check_kv_cache_row, (576, True), "--kv-cache-dtype"),
        (spec.check_attention_backends, (spec.BACKEND_NAME, "dsa"), "--attention-backend"),
    ],
)
def test_flag_errors(check, args, flag):
    with pytest.raises(Bad, match=flag):
        check(*args)


@pytest.mark.parametrize(
    "algorithm,kwargs,message",
    [
        ("NGRAM", {}, "not NGRAM: NGRAM verifies token trees"),
        ("DFLASH", {}, "not DFLASH"),
        ("EAGLE", dict(eagle_topk=2), "--speculative-eagle-topk 1"),
        ("EAGLE", dict(multi_layer_eagle=True), "--enable-multi-layer-eagle"),
        ("EAGLE3", dict(draft_architecture="LlamaForCausalLMEagle3", draft_is_dsa=False),
         r"LlamaForCausalLMEagle3\) is not a DeepSeek Sparse Attention model.*--speculative-draft-attention-backend"),
        ("EAGLE", dict(draft_window_size=64), "--speculative-draft-window-size"),
        ("EAGLE", dict(draft_backend=spec.BACKEND_NAME, draft_window_size=64), "--speculative-draft-window-size"),
    ],
)  # fmt: skip
def test_speculative_setups_refused_by_flag(algorithm, kwargs, message):
    with pytest.raises(Bad, match=message):
        spec.check_speculative(algorithm, **kwargs)


@pytest.mark.parametrize(
    "algorithm,kwargs",
    [
        (None, dict(eagle_topk=4)),  # no speculation: the draft flags are unused
        ("EAGLE", dict(eagle_topk=1)),
        ("eagle3", dict(eagle_topk=1)),
        ("STANDALONE", {}),
        # A draft on another backend: its window and architecture are that backend's business.
        ("EAGLE3", dict(draft_backend="fa3", draft_is_dsa=False, draft_window_size=64)),
    ],
)
def test_speculative_setups_accepted(algorithm, kwargs):
    spec.check_speculative(algorithm, **kwargs)


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(dcp_size=2), "--dcp-size"),
        (dict(attn_cp_size=2), "--enable-prefill-cp"),
        (dict(two_batch_overlap=True), "--enable-two-batch-overlap"),
    ],
)
def test_parallelism_errors(kwargs, flag):
    with pytest.raises(Bad, match=flag):
        spec.check_parallelism(**kwargs)


def test_accepted_settings():
    spec.check_page_size(64)
    for dtype in ("bfloat16", "bf16", "fp8_e4m3"):
        spec.check_kv_cache_dtype(dtype)
    spec.check_kv_cache_row(576, False)
    spec.check_kv_cache_row(656, True)
    spec.check_attention_backends(spec.BACKEND_NAME, spec.BACKEND_NAME)
    spec.check_attention_backends("dsa", "dsa")
    spec.check_parallelism()
    spec.check_speculative("EAGLE", eagle_topk=1)
