"""Triton kernels for DeepSeek Sparse Attention (pure torch + Triton, no SGLang)."""

from .device_info import DeviceInfo, device_info
from .fp8_mqa_logits import fp8_mqa_logits
from .fp8_paged_mqa_logits import fp8_paged_mqa_logits
from .index_format import IndexNorm, IndexRope
from .index_fp8_quant import quantize_index_keys_and_queries, quantize_index_keys_to_cache, quantize_index_queries
from .kv_cache_layout import dequantize_kv_fp8, quantize_kv_fp8
from .kv_cache_store import store_latent_rows
from .sparse_mla import SparseMLAPlan, plan_sparse_mla, sparse_mla_decode, sparse_mla_forward, sparse_mla_prefill
from .sparse_mla_configs import SparseMLAConfig, select_config, triton_config
from .topk import topk_indices
from .topk_to_kv_slots import topk_to_kv_slots

__all__ = [
    "DeviceInfo",
    "IndexNorm",
    "IndexRope",
    "SparseMLAConfig",
    "SparseMLAPlan",
    "dequantize_kv_fp8",
    "device_info",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "plan_sparse_mla",
    "quantize_index_keys_and_queries",
    "quantize_index_keys_to_cache",
    "quantize_index_queries",
    "quantize_kv_fp8",
    "select_config",
    "sparse_mla_decode",
    "sparse_mla_forward",
    "sparse_mla_prefill",
    "store_latent_rows",
    "topk_indices",
    "topk_to_kv_slots",
    "triton_config",
]
