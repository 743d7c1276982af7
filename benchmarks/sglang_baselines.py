"""SGLang 0.5.23's own DSA kernels, loaded for side-by-side timing.

Its SM90 kernels (FlashMLA's sparse prefill, FA3's paged decode, DeepGEMM's MQA logits) come from
the packages SGLang's ``dsa`` backend calls; they load only under the staged
SGLang runtime (``benchmarks/e2e``, torch 2.14.1), not on the image's torch.

On the GPU test machine SGLang is not installed: ``benchmarks/gpu_suite.sh``
unpacks the sglang 0.5.23 wheel (its Rust extension ``.so`` files removed: no
kernel imports them) and a few pure-Python dependencies its import chain needs
onto ``PYTHONPATH``. Every loader returns ``(callable, None)`` or
``(None, reason)`` so that a missing baseline is reported, not fatal.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def _load(module: str, name: str) -> tuple[Callable | None, str | None]:
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as err:  # any import failure makes the baseline unavailable
        return None, f"{module}.{name}: {type(err).__name__}: {err}"


def sglang_version() -> str | None:
    try:
        return importlib.import_module("sglang.version").__version__
    except Exception:
        return None


def sparse_mla_decode() -> tuple[Callable | None, str | None]:
    """``triton_sparse_mla_decode(q_nope, q_rope, kv[S,1,576], indices[T,1,topk], sm_scale, d_v)``."""
    return _load("sglang.kernels.ops.attention.dsa.triton_sparse_mla_decode", "triton_sparse_mla_decode")


def sparse_mla_prefill() -> tuple[Callable | None, str | None]:
    """``sparse_mla_prefill(q[T,H,576], kv[S,576], indices[T,topk], sm_scale, d_v)``."""
    return _load("sglang.kernels.ops.attention.dsa.triton_sparse_mla_prefill", "sparse_mla_prefill")


def fp8_mqa_logits_torch() -> tuple[Callable | None, str | None]:
    return _load("sglang.srt.layers.attention.dsa.utils", "_fp8_mqa_logits_torch")


def fp8_paged_mqa_logits_torch() -> tuple[Callable | None, str | None]:
    return _load("sglang.srt.layers.attention.dsa.utils", "_fp8_paged_mqa_logits_torch")


def tilelang_sparse_attention() -> tuple[Callable | None, str | None]:
    """SGLang's fallback for GPUs without FlashMLA (``--dsa-{prefill,decode}-backend tilelang``),
    decode and prefill alike over a BF16 cache: ``tilelang_sparse_fwd(q[T,H,576], kv[S,1,576],
    indices[T,1,topk] int32, sm_scale, d_v) -> [1,T,H,512]`` (JIT-compiled per head count on first
    use: tens of seconds)."""
    return _load("sglang.kernels.ops.attention.dsa.tilelang_kernel", "tilelang_sparse_fwd")


def flash_mla_sparse_prefill() -> tuple[Callable | None, str | None]:
    """FlashMLA's sparse prefill through SGLang's wrapper, as its ``dsa`` backend calls it:
    ``flash_mla_sparse_fwd(q[T,H,576], kv[S,1,576], indices[T,1,topk], sm_scale, d_v)``, the
    legacy kernel (the only one on SM90; FlashMLA's current ``sparse_prefill_fwd`` is SM100 only),
    H a multiple of 64 on SM90 (``dsa`` pads the heads)."""
    return _load("sglang.kernels.ops.attention.flash_mla_interface", "flash_mla_sparse_fwd")


def fa3_sparse_decode() -> tuple[Callable | None, str | None]:
    """FlashAttention-3 as SGLang's ``dsa`` backend decodes over a BF16 KV cache on SM90 (its log:
    "prefill=flashmla_sparse, decode=fa3"): each query token a one-token sequence whose page table
    (page size 1) is its top-k slots, ``flash_attn_with_kvcache(q=q_rope, k_cache=rope part,
    v_cache=latent, qv=q_nope, page_table, cache_seqlens=valid counts, ...)``."""
    return _load("sglang.kernels.ops.attention.flash_attention", "flash_attn_with_kvcache")


def deep_gemm_mqa_logits() -> tuple[Callable | None, str | None]:
    """DeepGEMM ``fp8_mqa_logits(q[T,H,128], (k[N,128], k_scale[N]), weights[T,H], ks, ke, clean_logits)``."""
    return _load("deep_gemm", "fp8_mqa_logits")


def deep_gemm_paged_mqa_logits() -> tuple[Callable | None, str | None]:
    """DeepGEMM's paged decode logits as SGLang's ``dsa`` calls them:
    ``fp8_paged_mqa_logits(q[B,1,H,128] fp8, kv_cache[blocks,64,1,132] uint8, weights[B,H],
    context_lens[B,1] int32, block_table[B,W] int32, schedule, max_len, clean_logits=False)`` with
    ``schedule = get_paged_mqa_logits_metadata(context_lens, 64, num_sms)`` computed once a step
    (returned as a pair ``(logits_fn, schedule_fn)``)."""
    logits, reason = _load("deep_gemm", "fp8_paged_mqa_logits")
    schedule, schedule_reason = _load("deep_gemm", "get_paged_mqa_logits_metadata")
    if logits is None or schedule is None:
        return None, reason or schedule_reason
    return (logits, schedule), None


def sgl_kernel_fast_topk() -> tuple[Callable | None, str | None]:
    """sgl-kernel's DSA top-k as SGLang's ``dsa`` top-k backend calls it:
    ``fast_topk_v2(score[B, L] fp32, lengths[B] int32, 2048, row_starts=None) -> [B, 2048] int32``
    (k = 2048 only; a CUDA op, importable where the ``sgl_kernel`` wheel matches torch)."""
    return _load("sgl_kernel", "fast_topk_v2")
