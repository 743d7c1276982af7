"""Seeded tiny DSA checkpoints for end-to-end serving tests.

``python -m sglang_sparse_mla.testing.tiny_model OUT_DIR [--arch deepseek-v3.2|glm-5] [--shape small|released|released-tp8]
[--seed N] [--layers N] [--force]``

writes a randomly initialised model of the real architecture, small enough to
load in seconds, in the layout SGLang 0.5.23's DeepSeek loader consumes
(``DeepseekV2WeightLoaderMixin.do_load_weights``: the Hugging Face names of
the released checkpoints, bf16, one ``model.safetensors``):

* ``deepseek-v3.2``: ``DeepseekV32ForCausalLM`` — MLA with the released head
  dimensions (kv_lora_rank 512, qk_nope / rope / v 128 / 64 / 128), an
  indexer with 64 heads x 128 on every layer, YaRN rope, grouped sigmoid
  routing (``noaux_tc``) with a shared expert;
* ``glm-5``: ``GlmMoeDsaForCausalLM`` (``glm_moe_dsa``) — qk_nope / v
  192 / 256 as released, 32 index heads, interleaved rope, and IndexShare
  (``indexer_types``): "shared" layers have no indexer of their own and
  reuse the previous layer's top-k.

Both have 4 layers (layer 0 dense, 1-3 MoE with 8 routed experts), 16 query
heads and ``index_topk`` 256, so prompts of a few hundred tokens already make
the attention sparse, and an MTP layer after them as released
(``num_nextn_predict_layers`` 1, ``model.layers.{num_hidden_layers}``: a MoE
decoder layer with its own indexer, ``enorm``/``hnorm``/``eh_proj`` and
``shared_head.norm``), which SGLang serves as the NextN draft of
``--speculative-algorithm EAGLE``/``NEXTN``; GLM-5's config sets
``index_share_for_mtp_iteration`` as GLM-5.2's does. The head dimensions are the released ones because
SGLang's own DSA paths (compared against in ``benchmarks/e2e``) refuse others
(its FA3 dense prefill rejected q/k 128 with v 64 on the H100). Weights are
drawn per tensor from ``(seed, name)`` (independent of write order) with
standard deviation ``fan_in ** -0.5`` and norms at 1, which keeps activations
O(1) through the layers. A byte-level BPE tokenizer with a chat template is
written beside them (:mod:`.tiny_tokenizer`).

``--shape released`` keeps the narrow hidden size but gives the attention its
released shape: for DeepSeek-V3.2 128 query heads, q_lora_rank 1536, 2 layers
(about 290 MB with the MTP layer's 72M parameters more); for GLM-5 64 query
heads, q_lora_rank 2048, 4 layers; both index_topk 2048 and 32k positions.
There attention and the indexer dominate a step at long contexts, as in the
real model, and SGLang's sgl-kernel top-k (which asserts index_topk 2048) runs
unmodified. ``--shape released-tp8`` is the same attention as one rank of a
tensor-parallel-8 server sees it: 16 query heads for DeepSeek-V3.2, 8 for GLM-5
(the latent cache, the indexer's heads and its top-k are not split across
ranks), the regime most users serve DSA models in.
``--layers N`` deepens any shape (about 72M parameters per released-shape
layer), so that attention weighs more against a decode step's fixed cost
(scheduler, sampling, launches), closer to the 61-layer released model.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHITECTURES = ("deepseek-v3.2", "glm-5")
SHAPES = ("small", "released", "released-tp8")
VOCAB_SIZE = 1024  # >= the tokenizer's vocabulary (see tiny_tokenizer.TARGET_VOCAB)
MAX_POSITIONS = 8192

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": 128,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "routed_scaling_factor": 1.0,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "index_topk": 256,
    "index_head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}

_ARCH_CONFIGS = {
    "deepseek-v3.2": {
        "architectures": ["DeepseekV32ForCausalLM"],
        "model_type": "deepseek_v32",
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "index_n_heads": 64,
        "n_group": 2,
        "topk_group": 1,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": MAX_POSITIONS // 2,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    "glm-5": {
        "architectures": ["GlmMoeDsaForCausalLM"],
        "model_type": "glm_moe_dsa",
        "qk_nope_head_dim": 192,
        "v_head_dim": 256,
        "index_n_heads": 32,
        "n_group": 1,
        "topk_group": 1,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "rope_interleave": True,
        "indexer_rope_interleave": True,
        "indexer_types": ["full", "shared", "full", "shared"],
        # GLM-5.2's MTP draft reuses its first step's top-k over the rest of the iteration.
        "index_share_for_mtp_iteration": True,
        "pad_token_id": 1,
    },
}


_RELEASED_POSITIONS = 32768
# The released attention shapes (query heads, q_lora_rank, index_topk) on the tiny model's body.
_RELEASED_ATTENTION = {
    "deepseek-v3.2": {
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "index_topk": 2048,
        "num_hidden_layers": 2,
        "max_position_embeddings": _RELEASED_POSITIONS,
        "rope_scaling": {
            **_ARCH_CONFIGS["deepseek-v3.2"]["rope_scaling"],
            "original_max_position_embeddings": _RELEASED_POSITIONS // 2,
        },
    },
    # GLM-5.x: 64 heads, q_lora_rank 2048; the 4 layers keep the small model's IndexShare pattern.
    "glm-5": {
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "q_lora_rank": 2048,
        "index_topk": 2048,
        "max_position_embeddings": _RELEASED_POSITIONS,
    },
}
# Tensor parallelism splits the query heads across ranks; everything else of the attention
# (latent KV cache, indexer, top-k) is whole on every rank.
_TP = 8


def tiny_config(arch: str = "deepseek-v3.2", shape: str = "small", layers: int | None = None) -> dict:
    """The ``config.json`` contents of the tiny model of ``arch`` (one of :data:`ARCHITECTURES`),
    ``shape`` one of :data:`SHAPES`; ``layers`` overrides the shape's layer count (IndexShare
    patterns repeat)."""
    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    if shape == "small":
        config = {**_COMMON, **_ARCH_CONFIGS[arch]}
    elif shape in ("released", "released-tp8"):
        config = {**_COMMON, **_ARCH_CONFIGS[arch], **_RELEASED_ATTENTION[arch]}
        if shape == "released-tp8":
            config["num_attention_heads"] = config["num_key_value_heads"] = config["num_attention_heads"] // _TP
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        config["num_hidden_layers"] = layers
        if "indexer_types" in config:
            pattern = config["indexer_types"]
            config["indexer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    if config["num_hidden_layers"] == 1:
        # SGLang reads a one-layer checkpoint's draft layer at model.layers.0 (a draft-only
        # checkpoint): that is the model's own layer here, so a one-layer model has no MTP layer.
        config["num_nextn_predict_layers"] = 0
    return config


def nextn_layer(config: dict) -> int | None:
    """The checkpoint index of the MTP (NextN) layer, after the model's layers as released
    (``model.layers.61`` of DeepSeek-V3.2); ``None`` if the model has none."""
    return config["num_hidden_layers"] if config["num_nextn_predict_layers"] else None


def is_moe_layer(config: dict, layer: int) -> bool:
    """Whether ``layer`` has routed experts (DeepSeek's ``first_k_dense_replace`` rule; the MTP
    layer always has)."""
    if layer == nextn_layer(config):
        return True
    return layer >= config["first_k_dense_replace"] and layer % config["moe_layer_freq"] == 0


def has_indexer(config: dict, layer: int) -> bool:
    """Whether ``layer`` runs its own indexer (IndexShare "shared" layers do not; the MTP layer,
    past ``indexer_types``, always has one)."""
    types = config.get("indexer_types")
    return types is None or layer >= len(types) or types[layer] != "shared"


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: shape, dtype and how it is initialised.

    ``std`` > 0 draws ``N(0, std**2)``; ``std == 0`` fills ``fill``.
    """

    shape: tuple[int, ...]
    std: float = 0.0
    fill: float = 0.0
    dtype: torch.dtype = torch.bfloat16


def _linear(out_features: int, in_features: int, gain: float = 1.0) -> TensorSpec:
    return TensorSpec((out_features, in_features), std=gain * in_features**-0.5)


def _norm(width: int) -> TensorSpec:
    return TensorSpec((width,), fill=1.0)


def _mlp(prefix: str, hidden: int, inner: int) -> dict[str, TensorSpec]:
    return {
        f"{prefix}.gate_proj.weight": _linear(inner, hidden),
        f"{prefix}.up_proj.weight": _linear(inner, hidden),
        f"{prefix}.down_proj.weight": _linear(hidden, inner),
    }


def _attention(prefix: str, c: dict, layer: int) -> dict[str, TensorSpec]:
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    q_lora, kv_lora, rope = c["q_lora_rank"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    nope, v = c["qk_nope_head_dim"], c["v_head_dim"]
    specs = {
        f"{prefix}.q_a_proj.weight": _linear(q_lora, hidden),
        f"{prefix}.q_a_layernorm.weight": _norm(q_lora),
        f"{prefix}.q_b_proj.weight": _linear(heads * (nope + rope), q_lora),
        f"{prefix}.kv_a_proj_with_mqa.weight": _linear(kv_lora + rope, hidden),
        f"{prefix}.kv_a_layernorm.weight": _norm(kv_lora),
        f"{prefix}.kv_b_proj.weight": _linear(heads * (nope + v), kv_lora),
        f"{prefix}.o_proj.weight": _linear(hidden, heads * v),
    }
    if has_indexer(c, layer):
        index_heads, index_dim = c["index_n_heads"], c["index_head_dim"]
        specs |= {
            f"{prefix}.indexer.wq_b.weight": _linear(index_heads * index_dim, q_lora),
            f"{prefix}.indexer.wk.weight": _linear(index_dim, hidden),
            f"{prefix}.indexer.k_norm.weight": _norm(index_dim),
            f"{prefix}.indexer.k_norm.bias": TensorSpec((index_dim,)),
            f"{prefix}.indexer.weights_proj.weight": _linear(index_heads, hidden),
        }
    return specs


def _moe(prefix: str, c: dict) -> dict[str, TensorSpec]:
    hidden, inner, experts = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
    specs = {
        f"{prefix}.gate.weight": _linear(experts, hidden),
        f"{prefix}.gate.e_score_correction_bias": TensorSpec((experts,), std=0.02, dtype=torch.float32),
    }
    for e in range(experts):
        specs |= _mlp(f"{prefix}.experts.{e}", hidden, inner)
    return specs | _mlp(f"{prefix}.shared_experts", hidden, inner * c["n_shared_experts"])


def _decoder_layer(prefix: str, c: dict, layer: int) -> dict[str, TensorSpec]:
    hidden = c["hidden_size"]
    specs = {
        f"{prefix}.input_layernorm.weight": _norm(hidden),
        f"{prefix}.post_attention_layernorm.weight": _norm(hidden),
    }
    specs |= _attention(f"{prefix}.self_attn", c, layer)
    if is_moe_layer(c, layer):
        return specs | _moe(f"{prefix}.mlp", c)
    return specs | _mlp(f"{prefix}.mlp", hidden, c["intermediate_size"])


def _nextn(prefix: str, c: dict, layer: int) -> dict[str, TensorSpec]:
    """The MTP layer as SGLang's NextN draft loads it: a decoder layer, the norms of the token
    embedding and of the target's hidden state, and their projection ``eh_proj`` ``[hidden,
    2 * hidden]``. The released layer also repeats ``embed_tokens`` and ``shared_head.head``, which
    SGLang does not load (the draft shares the target's); they are left out."""
    hidden = c["hidden_size"]
    return _decoder_layer(prefix, c, layer) | {
        f"{prefix}.enorm.weight": _norm(hidden),
        f"{prefix}.hnorm.weight": _norm(hidden),
        f"{prefix}.eh_proj.weight": _linear(hidden, 2 * hidden),
        f"{prefix}.shared_head.norm.weight": _norm(hidden),
    }


def checkpoint_spec(config: dict) -> dict[str, TensorSpec]:
    """Every tensor of the checkpoint, by its Hugging Face name."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    specs = {"model.embed_tokens.weight": TensorSpec((vocab, hidden), std=1.0)}
    for layer in range(config["num_hidden_layers"]):
        specs |= _decoder_layer(f"model.layers.{layer}", config, layer)
    mtp = nextn_layer(config)
    if mtp is not None:
        specs |= _nextn(f"model.layers.{mtp}", config, mtp)
    specs["model.norm.weight"] = _norm(hidden)
    # Logits with a standard deviation of about 2: a peaked, not flat, next-token distribution.
    specs["lm_head.weight"] = _linear(vocab, hidden, gain=2.0)
    return specs


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, each drawn from a generator seeded by ``(seed, name)``."""
    tensors = {}
    for name, spec in checkpoint_spec(config).items():
        if spec.std > 0:
            gen = torch.Generator().manual_seed(seed * 0x9E3779B1 + zlib.crc32(name.encode()))
            value = torch.randn(spec.shape, generator=gen) * spec.std
        else:
            value = torch.full(spec.shape, spec.fill)
        tensors[name] = value.to(spec.dtype)
    return tensors


def write_tiny_model(
    out_dir: str | Path, arch: str = "deepseek-v3.2", seed: int = 0, shape: str = "small", layers: int | None = None
) -> Path:
    """Write config, generation config, weights and tokenizer of the tiny ``arch`` model; return the directory."""
    from safetensors.torch import save_file

    from .tiny_tokenizer import write_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, shape, layers)
    vocab = write_tokenizer(out, model_max_length=config["max_position_embeddings"])
    if vocab > config["vocab_size"]:
        raise RuntimeError(f"tokenizer has {vocab} tokens, more than the model's {config['vocab_size']}")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(random_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_sparse_mla.testing.tiny_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", help="directory to write the checkpoint into (created if missing; must be empty)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="deepseek-v3.2")
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="small",
        help="released: the architecture's released attention shapes; released-tp8: the same at one TP-8 rank's "
        "heads (16 for deepseek-v3.2, 8 for glm-5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="layer count (default: the shape's)")
    parser.add_argument(
        "--force", action="store_true", help="write into a non-empty OUT_DIR (files of the same name are replaced)"
    )
    args = parser.parse_args(argv)
    try:
        config = tiny_config(args.arch, args.shape, args.layers)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        parser.error(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        parser.error(f"{out} is not empty; choose a new directory, or pass --force to write over its files")
    parameters = sum(math.prod(spec.shape) for spec in checkpoint_spec(config).values())
    print(
        f"Writing a tiny {args.arch} model ({config['architectures'][0]}, shape {args.shape!r}, random weights, "
        f"seed {args.seed}): {config['num_hidden_layers']} layers, {config['num_attention_heads']} query heads, "
        f"index_topk {config['index_topk']}, {parameters / 1e6:.1f}M parameters, to {out} ...",
        flush=True,
    )
    write_tiny_model(out, args.arch, args.seed, args.shape, args.layers)
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name:<24} {_size(path.stat().st_size):>10}")
    print(
        f"Done. Serve it with: python -m sglang.launch_server --model-path {out} "
        "--attention-backend triton_sparse_mla (needs an NVIDIA GPU)"
    )


if __name__ == "__main__":
    main()
