"""What the ``triton_sparse_mla`` attention backend serves, as data and checks.

Pure Python (no SGLang import), so the plugin, the server-argument hooks and
the backend share one definition of the supported configurations and of the
start-up error messages, each naming the flag to change.
"""

from __future__ import annotations

from ..kernels.kv_cache_layout import D_LATENT, D_QK, D_ROPE, FP8_ROW_BYTES
from ..kernels.index_format import INDEX_HEAD_DIM
from ..kernels.mqa_logits_common import SUPPORTED_INDEX_HEADS

BACKEND_NAME = "triton_sparse_mla"

# DSA models page their KV and index-K caches in 64-token pages.
PAGE_SIZE = 64

# ``--kv-cache-dtype`` values served (SGLang's DSA default turns ``auto`` into
# one of them): 576 bf16 values or the 656-byte FP8 row per token.
KV_CACHE_DTYPES = ("bfloat16", "bf16", "fp8_e4m3")


class UnsupportedConfiguration(ValueError):
    """A launch configuration the backend cannot serve; the message names the flag."""


# The oldest GPUs the kernels run on: Ampere (cp.async, bf16 tensor cores).
MIN_CAPABILITY = (8, 0)


def check_gpu(name: str, capability: tuple[int, int]) -> None:
    """The GPU must be SM80 or newer: the kernels need bf16 tensor cores and ``cp.async``."""
    if tuple(capability) < MIN_CAPABILITY:
        raise UnsupportedConfiguration(
            f"--attention-backend {BACKEND_NAME} needs an NVIDIA GPU of compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (A100, A10, RTX 30xx and later: bf16 "
            f"tensor cores); {name} is sm{capability[0]}{capability[1]}. DSA models cannot run "
            "on it with this backend; SGLang's --attention-backend dsa falls back to torch "
            "kernels there, if its other kernels load"
        )


def check_attention_backends(prefill: str | None, decode: str | None) -> None:
    """Prefill and decode must both run here: the indexer is routed per backend."""
    if (prefill == BACKEND_NAME) != (decode == BACKEND_NAME):
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} must serve both prefill and decode (got prefill="
            f"{prefill!r}, decode={decode!r}); use --attention-backend {BACKEND_NAME} "
            "without --prefill-attention-backend/--decode-attention-backend"
        )


def check_model(
    architecture: str,
    *,
    is_dsa: bool,
    kv_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
    index_head_dim: int | None = None,
    index_n_heads: int | None = None,
    index_kpool: int = 1,
    learnable_sink: bool = False,
) -> None:
    """The model must be a DeepSeek Sparse Attention model the kernels fit."""
    if not is_dsa:
        raise UnsupportedConfiguration(
            f"--attention-backend {BACKEND_NAME} serves DeepSeek Sparse Attention "
            f"models (DeepSeek-V3.2, GLM-5); {architecture} is not one. Choose another "
            "--attention-backend for this model"
        )
    if kv_lora_rank is not None and kv_lora_rank != D_LATENT:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} needs kv_lora_rank {D_LATENT}, the model has {kv_lora_rank}; "
            "choose another --attention-backend"
        )
    if qk_rope_head_dim is not None and qk_rope_head_dim != D_ROPE:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} needs qk_rope_head_dim {D_ROPE}, the model has "
            f"{qk_rope_head_dim}; choose another --attention-backend"
        )
    if index_head_dim is not None and index_head_dim != INDEX_HEAD_DIM:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} needs index_head_dim {INDEX_HEAD_DIM}, the model has "
            f"{index_head_dim}; choose another --attention-backend"
        )
    if index_n_heads is not None and index_n_heads not in SUPPORTED_INDEX_HEADS:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME}'s indexer kernels take {SUPPORTED_INDEX_HEADS} index heads, the "
            f"model has {index_n_heads}; choose another --attention-backend"
        )
    if index_kpool != 1:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} does not serve pooled index keys (index_kpool="
            f"{index_kpool}); use --attention-backend dsa for this model"
        )
    if learnable_sink:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} has no learnable attention sinks; use --attention-backend dsa for this model"
        )


def check_hf_config(hf_config, *, is_dsa: bool, index_kpool: int = 1) -> None:
    """:func:`check_model` on the dimensions of a Hugging Face model config."""
    check_model(
        (getattr(hf_config, "architectures", None) or ["unknown"])[0],
        is_dsa=is_dsa,
        kv_lora_rank=getattr(hf_config, "kv_lora_rank", None),
        qk_rope_head_dim=getattr(hf_config, "qk_rope_head_dim", None),
        index_head_dim=getattr(hf_config, "index_head_dim", None),
        index_n_heads=getattr(hf_config, "index_n_heads", None),
        index_kpool=index_kpool,
        learnable_sink=bool(getattr(hf_config, "learnable_sink", False)),
    )


def check_page_size(page_size: int | None) -> None:
    if page_size != PAGE_SIZE:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} needs --page-size {PAGE_SIZE} (DSA's 64-token pages), got {page_size}"
        )


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} serves --kv-cache-dtype bfloat16 or fp8_e4m3, got {kv_cache_dtype!r}"
        )


def check_kv_cache_row(kv_cache_dim: int, is_fp8: bool) -> None:
    """The KV pool must hold 576 bf16 values or the 656-byte FP8 row per slot."""
    expected = FP8_ROW_BYTES if is_fp8 else D_QK
    if kv_cache_dim != expected:
        layout = "656-byte FP8 (FlashMLA)" if is_fp8 else f"{D_QK}-value bf16"
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} reads the {layout} KV layout, but the pool stores "
            f"{kv_cache_dim} per slot; do not combine it with --dsa-prefill-backend/"
            "--dsa-decode-backend, and use --kv-cache-dtype bfloat16 or fp8_e4m3"
        )


def per_rank_heads(num_heads: int, attn_tp_size: int) -> int:
    """Query heads on one attention-TP rank; every positive count is served."""
    if attn_tp_size < 1 or num_heads % attn_tp_size != 0 or num_heads < attn_tp_size:
        raise UnsupportedConfiguration(
            f"{num_heads} attention heads do not split over an attention TP size of "
            f"{attn_tp_size}; change --tp-size (or --dp-size with --enable-dp-attention)"
        )
    return num_heads // attn_tp_size


def check_parallelism(*, dcp_size: int = 1, attn_cp_size: int = 1, two_batch_overlap: bool = False) -> None:
    if dcp_size > 1:
        raise UnsupportedConfiguration(f"{BACKEND_NAME} does not support decode context parallelism; drop --dcp-size")
    if attn_cp_size > 1:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} does not support prefill context parallelism; drop --enable-prefill-cp/--attn-cp-size"
        )
    if two_batch_overlap:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} does not support two-batch overlap; drop --enable-two-batch-overlap"
        )


# ``--speculative-algorithm`` values served, as SGLang resolves them (NEXTN is EAGLE): a draft
# model proposes a chain that the target verifies in one batch. NGRAM verifies token trees
# through attention masks, and DFLASH, UNO, DSPARK and FROZEN_KV_MTP need attention paths of
# their own; none of them is served.
SPECULATIVE_ALGORITHMS = ("EAGLE", "EAGLE3", "STANDALONE")


def check_speculative(
    algorithm: str | None,
    *,
    eagle_topk: int | None = None,
    multi_layer_eagle: bool = False,
    draft_backend: str | None = None,
    draft_architecture: str | None = None,
    draft_is_dsa: bool = True,
    draft_window_size: int | None = None,
) -> None:
    """A speculative set-up: chain drafts verified here, and a draft model whose attention runs
    here a DSA one (or another ``--speculative-draft-attention-backend`` named for it).

    ``draft_backend``: the draft's ``--speculative-draft-attention-backend`` (``None``: the
    target's, this backend); ``draft_architecture`` / ``draft_is_dsa``: the draft checkpoint's.
    """
    if algorithm is None or algorithm.upper() == "NONE":
        return
    if algorithm.upper() not in SPECULATIVE_ALGORITHMS:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} serves --speculative-algorithm EAGLE / NEXTN (the model's MTP layer), "
            f"EAGLE3 and STANDALONE, not {algorithm}: NGRAM verifies token trees, and DFLASH, UNO, "
            "DSPARK and FROZEN_KV_MTP need attention paths of their own"
        )
    if eagle_topk not in (None, 0, 1):
        raise UnsupportedConfiguration(f"{BACKEND_NAME} verifies chain drafts only; use --speculative-eagle-topk 1")
    if multi_layer_eagle:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} drafts with one MTP layer (DSA models ship one); drop --enable-multi-layer-eagle"
        )
    if draft_backend not in (None, BACKEND_NAME):
        return  # the draft's attention runs on the backend named for it
    if not draft_is_dsa:
        raise UnsupportedConfiguration(
            f"the draft model ({draft_architecture}) is not a DeepSeek Sparse Attention model, so its attention "
            f"cannot run on {BACKEND_NAME}; name a backend for it with --speculative-draft-attention-backend"
        )
    if draft_window_size is not None:
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME}'s draft decode attends to the draft layer's top-k, not to a window; drop "
            "--speculative-draft-window-size (or name another --speculative-draft-attention-backend)"
        )
