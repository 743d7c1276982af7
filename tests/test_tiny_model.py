"""The tiny DSA checkpoints: files, names and shapes SGLang loads, determinism, IndexShare, scale."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from sglang_sparse_mla.testing.tiny_model import (
    ARCHITECTURES,
    checkpoint_spec,
    main,
    random_weights,
    tiny_config,
    write_tiny_model,
)

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
needs_sglang = pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="SGLang is not installed")


# Both architectures small and as one TP-8 rank, DeepSeek-V3.2 also whole (GLM-5's whole released shape,
# 295M parameters, has only its config checked: its checkpoint is a DeepSeek-V3.2 one's tensors, wider).
MODELS = [(arch, shape) for arch in ARCHITECTURES for shape in ("small", "released-tp8")]
MODELS.append(("deepseek-v3.2", "released"))
MODEL_IDS = [f"{arch}-{shape}" for arch, shape in MODELS]


@pytest.fixture(scope="module", params=MODELS, ids=MODEL_IDS)
def written(request, tmp_path_factory):
    """``(arch, shape, directory)`` of a model written once per architecture and shape."""
    arch, shape = request.param
    return arch, shape, write_tiny_model(tmp_path_factory.mktemp(f"{arch}-{shape}"), arch, seed=0, shape=shape)


@pytest.mark.parametrize(
    "arch,heads,q_lora,index_heads", [("deepseek-v3.2", 128, 1536, 64), ("glm-5", 64, 2048, 32)]
)
def test_released_shape_is_the_released_attention(arch, heads, q_lora, index_heads):
    config = tiny_config(arch, "released")
    assert (config["num_attention_heads"], config["q_lora_rank"], config["index_topk"]) == (heads, q_lora, 2048)
    assert config["index_n_heads"] == index_heads and config["max_position_embeddings"] == 32768
    assert config["hidden_size"] == tiny_config(arch)["hidden_size"]  # the body stays tiny
    assert len(config.get("indexer_types", [None] * config["num_hidden_layers"])) == config["num_hidden_layers"]
    with pytest.raises(ValueError, match="unknown shape"):
        tiny_config(arch, "released-tp4")


@pytest.mark.parametrize("arch,heads", [("deepseek-v3.2", 16), ("glm-5", 8)])
def test_tp8_shape_is_one_rank_of_the_released_attention(arch, heads):
    """Tensor parallelism 8 splits the query heads only: the cache, indexer and top-k stay whole."""
    released, rank = tiny_config(arch, "released"), tiny_config(arch, "released-tp8")
    assert rank["num_attention_heads"] == rank["num_key_value_heads"] == heads
    assert {k: v for k, v in rank.items() if k not in ("num_attention_heads", "num_key_value_heads")} == {
        k: v for k, v in released.items() if k not in ("num_attention_heads", "num_key_value_heads")
    }


def test_files_names_and_shapes(written):
    from safetensors.torch import load_file

    arch, shape, path = written
    config = json.loads((path / "config.json").read_text())
    assert config == tiny_config(arch, shape)
    assert config["kv_lora_rank"] == 512 and config["qk_rope_head_dim"] == 64 and config["index_head_dim"] == 128
    tensors = load_file(path / "model.safetensors")
    spec = checkpoint_spec(config)
    assert tensors.keys() == spec.keys()
    for name, tensor in tensors.items():
        assert tuple(tensor.shape) == spec[name].shape and tensor.dtype == spec[name].dtype, name
        assert torch.isfinite(tensor.float()).all(), name
    layers = range(config["num_hidden_layers"])
    assert any(f"model.layers.{i}.mlp.gate_proj.weight" in tensors for i in layers)  # a dense layer
    assert any(f"model.layers.{i}.mlp.experts.0.down_proj.weight" in tensors for i in layers)  # a MoE layer


def test_tokenizer_loads_offline(written, monkeypatch):
    transformers = pytest.importorskip("transformers")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch, shape, path = written
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) <= tiny_config(arch, shape)["vocab_size"]
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1
    text = "Sparse attention keeps the top tokens; unseen words still encode: Zürich 42!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|begin_of_text|><|user|>hi<|assistant|>"


def test_deterministic_for_a_seed(tmp_path):
    config = tiny_config("glm-5")
    first, again, other = random_weights(config, 3), random_weights(config, 3), random_weights(config, 4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
    a, b = write_tiny_model(tmp_path / "a", "deepseek-v3.2", 5), write_tiny_model(tmp_path / "b", "deepseek-v3.2", 5)
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cli_prints_what_it_wrote_and_keeps_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "model"
    main([str(out), "--arch", "glm-5"])
    printed = capsys.readouterr().out
    assert printed.startswith("Writing a tiny glm-5 model (GlmMoeDsaForCausalLM") and str(out) in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file() and name in printed
    assert "--attention-backend triton_sparse_mla" in printed.splitlines()[-1]
    weights = (out / "model.safetensors").read_bytes()

    with pytest.raises(SystemExit) as refused:  # a second run would replace the checkpoint
        main([str(out), "--seed", "1"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "is not empty" in err and "pass --force" in err
    assert (out / "model.safetensors").read_bytes() == weights

    main([str(out), "--arch", "glm-5", "--seed", "1", "--force"])
    assert (out / "model.safetensors").read_bytes() != weights
    (tmp_path / "empty").mkdir()
    main([str(tmp_path / "empty"), "--layers", "1"])  # an existing empty folder is fine
    assert (tmp_path / "empty" / "config.json").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--shape", "released-tp4"], "invalid choice"),
        (["--layers", "0"], "layers must be at least 1"),
        (["--arch", "llama"], "invalid choice"),
    ],
)
def test_cli_refuses_unsupported_combinations_as_usage_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "model"), *argv])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and message in err
    assert err.startswith("usage: python -m sglang_sparse_mla.testing.tiny_model")
    assert "Traceback" not in err and not (tmp_path / "model").exists()


def test_glm5_has_shared_indexer_layers():
    config = tiny_config("glm-5")
    spec = checkpoint_spec(config)
    shared = [i for i, kind in enumerate(config["indexer_types"]) if kind == "shared"]
    assert shared and config["indexer_types"][0] == "full"
    for i in range(config["num_hidden_layers"]):
        has_indexer = f"model.layers.{i}.self_attn.indexer.wq_b.weight" in spec
        assert has_indexer == (i not in shared)
    assert all(kind == "full" for kind in tiny_config("deepseek-v3.2").get("indexer_types", ["full"]))


def test_layers_override_deepens_the_model_and_repeats_index_share():
    deep = tiny_config("glm-5", "small", layers=7)
    assert deep["num_hidden_layers"] == 7 and deep["indexer_types"] == ["full", "shared"] * 3 + ["full"]
    spec = checkpoint_spec(deep)
    assert "model.layers.6.self_attn.indexer.wq_b.weight" in spec
    assert "model.layers.8.input_layernorm.weight" not in spec
    assert "model.layers.5.self_attn.indexer.wq_b.weight" not in spec
    released = tiny_config("deepseek-v3.2", "released", layers=3)
    assert {k: v for k, v in released.items() if k != "num_hidden_layers"} == {
        k: v for k, v in tiny_config("deepseek-v3.2", "released").items() if k != "num_hidden_layers"
    }
    with pytest.raises(ValueError, match="at least 1"):
        tiny_config("deepseek-v3.2", layers=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mtp_layer_follows_the_model_layers(arch):
    """One MTP layer at ``model.layers.{num_hidden_layers}``, whatever the depth: a MoE decoder layer
    with its own indexer (even past GLM-5's IndexShare pattern) and the NextN head's tensors."""
    for layers in (2, 4, 5):
        config = tiny_config(arch, layers=layers)
        spec = checkpoint_spec(config)
        mtp = f"model.layers.{layers}"
        assert config["num_nextn_predict_layers"] == 1
        assert spec[f"{mtp}.eh_proj.weight"].shape == (config["hidden_size"], 2 * config["hidden_size"])
        for name in ("enorm", "hnorm", "shared_head.norm", "self_attn.indexer.wq_b", "mlp.experts.0.down_proj"):
            assert f"{mtp}.{name}.weight" in spec, name
        assert not any(name.startswith(f"model.layers.{layers + 1}.") for name in spec)
        assert f"{mtp}.embed_tokens.weight" not in spec and f"{mtp}.shared_head.head.weight" not in spec
    # SGLang reads a one-layer checkpoint's draft at layer 0, the model's own: no MTP layer then.
    single = tiny_config(arch, layers=1)
    assert single["num_nextn_predict_layers"] == 0
    assert not any(name.startswith("model.layers.1.") for name in checkpoint_spec(single))


def _rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _mlp(w, prefix, x):
    gate, up = x @ w[f"{prefix}.gate_proj.weight"].T, x @ w[f"{prefix}.up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ w[f"{prefix}.down_proj.weight"].T


def _forward_scales(config, w, tokens):
    """Hidden-state RMS after every layer and the logits of a float32 dense forward (no rope, no indexer:
    with at most index_topk tokens the sparse attention sees every position)."""
    c, h = config, config["num_attention_heads"]
    nope, rope, v_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    x = w["model.embed_tokens.weight"][tokens]
    causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    scales = []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a = _rms_norm(x, w[f"{p}.input_layernorm.weight"])
        q_lora = _rms_norm(a @ w[f"{p}.self_attn.q_a_proj.weight"].T, w[f"{p}.self_attn.q_a_layernorm.weight"])
        q = (q_lora @ w[f"{p}.self_attn.q_b_proj.weight"].T).view(-1, h, nope + rope)
        latent, k_rope = (a @ w[f"{p}.self_attn.kv_a_proj_with_mqa.weight"].T).split([c["kv_lora_rank"], rope], -1)
        kv = _rms_norm(latent, w[f"{p}.self_attn.kv_a_layernorm.weight"]) @ w[f"{p}.self_attn.kv_b_proj.weight"].T
        k_nope, v = kv.view(-1, h, nope + v_dim).split([nope, v_dim], -1)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, h, -1)], -1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * (nope + rope) ** -0.5
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", probs, v).reshape(len(tokens), -1) @ w[f"{p}.self_attn.o_proj.weight"].T
        m = _rms_norm(x, w[f"{p}.post_attention_layernorm.weight"])
        if f"{p}.mlp.gate.weight" not in w:
            x = x + _mlp(w, f"{p}.mlp", m)
        else:
            affinity = torch.sigmoid(m @ w[f"{p}.mlp.gate.weight"].T)
            chosen = (affinity + w[f"{p}.mlp.gate.e_score_correction_bias"]).topk(c["num_experts_per_tok"]).indices
            gates = affinity.gather(1, chosen)
            gates = gates / gates.sum(-1, keepdim=True) * c["routed_scaling_factor"]
            routed = torch.stack([_mlp(w, f"{p}.mlp.experts.{e}", m) for e in range(c["n_routed_experts"])], 1)
            x = x + (routed.gather(1, chosen[..., None].expand(-1, -1, x.shape[-1])) * gates[..., None]).sum(1)
            x = x + _mlp(w, f"{p}.mlp.shared_experts", m)
        scales.append(x.pow(2).mean().sqrt().item())
    logits = _rms_norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
    return scales, logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_activations_stay_order_one(arch):
    config = tiny_config(arch)
    weights = {k: v.float() for k, v in random_weights(config, 0).items()}
    tokens = torch.randint(5, 800, (config["index_topk"],), generator=torch.Generator().manual_seed(0))
    scales, logits = _forward_scales(config, weights, tokens)
    assert all(0.3 < s < 10 for s in scales), scales
    assert torch.isfinite(logits).all() and 0.5 < logits.std().item() < 8


@needs_sglang
def test_sglang_sees_a_dsa_model_for_our_backend(written):
    from sglang.srt.configs.model_config import AttentionArch, ModelConfig, dsa_layer_skips_topk, is_deepseek_dsa

    arch, shape, path = written
    model_config = ModelConfig(str(path))
    hf_config = model_config.hf_config
    assert is_deepseek_dsa(hf_config) and model_config.attention_arch == AttentionArch.MLA
    assert (model_config.kv_lora_rank, model_config.qk_rope_head_dim, model_config.index_head_dim) == (512, 64, 128)
    types = tiny_config(arch, shape).get("indexer_types") or ["full"] * hf_config.num_hidden_layers
    assert [dsa_layer_skips_topk(hf_config, i) for i in range(len(types))] == [t == "shared" for t in types]
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    tokenizer = get_tokenizer(str(path))  # what the server's tokenizer manager loads
    assert tokenizer.eos_token_id == 1 and tokenizer.chat_template and len(tokenizer) <= hf_config.vocab_size


@needs_sglang
def test_server_arguments_resolve_to_our_backend(written, resolve):
    *_, path = written
    view = resolve(str(path), "--attention-backend", "triton_sparse_mla")  # the plugin's start-up validation
    assert view.attention_backend == "triton_sparse_mla" and view.page_size == 64


@pytest.fixture(scope="module")
def sglang_load_reports(tmp_path_factory) -> dict:
    """``(arch, shape, fused) -> report`` of tests/sglang_load_check.py, one subprocess for every model."""
    paths = {
        (arch, shape): write_tiny_model(tmp_path_factory.mktemp(f"load-{arch}-{shape}"), arch, shape=shape)
        for arch, shape in MODELS
    }
    script = os.path.join(os.path.dirname(__file__), "sglang_load_check.py")
    argv = [sys.executable, script, *map(str, paths.values())]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    reports = [json.loads(line[len("REPORT ") :]) for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    # Every model is built as the target and as its MTP draft, each with both indexer builds.
    assert len(reports) == 4 * len(paths), proc.stdout[-2000:] + proc.stderr[-4000:]
    model_of = {str(path): model for model, path in paths.items()}
    return {(*model_of[r["path"]], r["fused"], r["draft"]): r for r in reports}


# SGLang's speculative worker renames a DSA target's architecture to its NextN draft class.
DRAFT_CLASSES = {"deepseek-v3.2": "DeepseekV3ForCausalLMNextN", "glm-5": "GlmMoeDsaForCausalLMNextN"}


@needs_sglang
@pytest.mark.parametrize(("arch", "shape"), MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("fused_indexer", [False, True], ids=["cpu_build", "cuda_build"])
@pytest.mark.parametrize("draft", [False, True], ids=["target", "mtp_draft"])
def test_sglang_model_class_loads_every_parameter(sglang_load_reports, arch, shape, fused_indexer, draft):
    """The target loads every tensor but the MTP layer's; the draft loads the MTP layer's, all of
    them (its decoder, with the layer's own indexer and experts, and its norms and projection),
    and leaves only the embedding and head, which SGLang's worker sets to the target's."""
    report = sglang_load_reports[arch, shape, fused_indexer, draft]
    config = tiny_config(arch, shape)
    assert report["class"] == (DRAFT_CLASSES[arch] if draft else config["architectures"][0])
    assert report["unfilled"] == (["model.embed_tokens.weight", "lm_head.weight"] if draft else [])
    assert report["warnings"] == []
    assert all(report["fused_checks"].values()), report["fused_checks"]
    fused = any(name.endswith("indexer.wk_weights_proj.weight") for name in report["shapes"])
    assert fused == (fused_indexer and arch == "glm-5")  # only an interleaved-rope indexer fuses on CUDA
    if draft:
        assert any(name.startswith("model.decoder.mlp.experts.") for name in report["shapes"])
        assert report["mtp_index_share"] == (arch == "glm-5")  # GLM-5.2 shares the index over the MTP steps
