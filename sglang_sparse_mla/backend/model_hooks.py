"""Route a DSA model's forward to ``triton_sparse_mla`` where SGLang hard-codes its own paths.

Installed in the scheduler/worker process when the backend is first built
(the model and SGLang's DSA modules are imported by then, so installing costs
no import; doing it at plugin load would import them into every process).
Each hook hands over only when the active attention backend is ours and
otherwise calls SGLang's original, so other backends in the same process are
untouched.

* ``AttentionBackendRegistry``: the DeepSeek attention picks its forward
  method per backend name and falls back to the ``triton`` handler, which
  would run dense MHA prefill; ours always takes the absorbed MLA path (the
  one that calls the indexer and passes ``topk_indices``).
* ``Indexer.forward_cuda``: the stock indexer runs DeepGEMM MQA logits,
  sgl-kernel/TileLang top-k and CUDA fused stores; ours runs
  :meth:`TritonSparseMLABackend.run_indexer`. IndexShare (GLM-5.2
  ``indexer_types == "shared"``) needs nothing more: shared layers build no
  indexer and the model carries the previous layer's slots forward.
* ``DraftBackendFactory``: MTP draft backends are chosen from a fixed table;
  ours builds :class:`TritonSparseMLABackend` / the multi-step container.
* ``FORWARD_ABSORB_CORE_ATTENTION_BACKENDS``: the backends to which the absorbed
  MLA passes ``q_nope``/``q_rope`` and ``k_nope``/``k_rope`` apart (FA3, FlashMLA,
  ``dsa``...); for any other it concatenates both per layer first. Ours reads the
  parts in place, so it is listed (a name in a list, no patch).
"""

from __future__ import annotations

from . import spec

_INDEXER = "sglang.srt.layers.attention.dsa.dsa_indexer.Indexer.forward_cuda"
_DRAFT_DECODE = "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_decode_backend"
_DRAFT_EXTEND = "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_draft_extend_backend"
_installed = False


def absorbed_mla_method(attn, forward_batch):
    """Forward-method handler: always the absorbed (sparse) MLA path."""
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (
        AttnForwardMethod,
    )

    return AttnForwardMethod.MLA


def route_indexer(
    original,
    indexer,
    x,
    q_lora,
    positions,
    forward_batch,
    layer_id,
    return_indices=True,
    use_cuda_graph=True,
):
    """Around ``Indexer.forward_cuda``: our indexer when our backend is active. Its slots then go
    through SGLang's own finishing steps: the rank-0 broadcast over the attention-TP group that
    ``SGLANG_DSA_TOPK_BROADCAST=1`` asks for (a no-op otherwise; our kernels give every rank the
    same bits anyway), and the top-k capture."""
    from sglang.srt.layers.attention.dsa.dsa_indexer import _broadcast_indexer_topk_from_rank0
    from sglang.srt.model_executor.forward_context import get_attn_backend
    from sglang.srt.state_capturer.indexer_topk import maybe_capture_indexer_topk

    from .attention_backend import TritonSparseMLABackend

    backend = get_attn_backend()
    if not isinstance(backend, TritonSparseMLABackend):
        return original(indexer, x, q_lora, positions, forward_batch, layer_id, return_indices, use_cuda_graph)
    topk = backend.run_indexer(indexer, x, q_lora, positions, forward_batch, layer_id, return_indices)
    return maybe_capture_indexer_topk(layer_id, _broadcast_indexer_topk_from_rank0(topk))


def _draft_backend_name(factory, which: str) -> str | None:
    from sglang.srt.runtime_context import attention_backends

    prefill, decode = attention_backends()
    return factory.draft_attn_backend or (decode if which == "decode" else prefill)


def _stamp(backend) -> None:
    backend.prefill_attention_backend_str = spec.BACKEND_NAME
    backend.decode_attention_backend_str = spec.BACKEND_NAME


def draft_decode_backend(original, factory):
    """Around ``create_decode_backend``: per-step backends of MTP draft decoding."""
    if _draft_backend_name(factory, "decode") != spec.BACKEND_NAME:
        return original(factory)
    if factory.speculative_num_steps <= 1:
        return None
    from .multi_step import TritonSparseMLAMultiStepBackend

    backend = TritonSparseMLAMultiStepBackend(factory.draft_model_runner, factory.topk, factory.speculative_num_steps)
    _stamp(backend)
    for child in backend.attn_backends:
        _stamp(child)
    return backend


def draft_extend_backend(original, factory):
    """Around ``create_draft_extend_backend``: the draft model's extend backend."""
    from sglang.srt.runtime_context import get_spec

    which = "decode" if get_spec().speculative_attention_mode == "decode" else "prefill"
    if _draft_backend_name(factory, which) != spec.BACKEND_NAME:
        return original(factory)
    from .attention_backend import TritonSparseMLABackend

    backend = TritonSparseMLABackend(factory.draft_model_runner)
    _stamp(backend)
    return backend


def install() -> None:
    """Register and apply the model-side hooks once per process (idempotent)."""
    global _installed
    if _installed:
        return
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry
    from sglang.srt.models.deepseek_common.utils import FORWARD_ABSORB_CORE_ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType

    AttentionBackendRegistry.register(spec.BACKEND_NAME, absorbed_mla_method)
    if spec.BACKEND_NAME not in FORWARD_ABSORB_CORE_ATTENTION_BACKENDS:
        FORWARD_ABSORB_CORE_ATTENTION_BACKENDS.append(spec.BACKEND_NAME)
    source = HookSource(plugin_name=spec.BACKEND_NAME, dist_name="sglang-sparse-mla")
    HookRegistry.register(_INDEXER, route_indexer, HookType.AROUND, source=source)
    HookRegistry.register(_DRAFT_DECODE, draft_decode_backend, HookType.AROUND, source=source)
    HookRegistry.register(_DRAFT_EXTEND, draft_extend_backend, HookType.AROUND, source=source)
    HookRegistry.apply_hooks()
    # apply_hooks logs and skips a target it cannot patch; an unrouted indexer
    # would silently fall back to DeepGEMM, so refuse to start instead.
    missing = [t for t in (_INDEXER, _DRAFT_DECODE, _DRAFT_EXTEND) if t not in HookRegistry._patched]
    if missing:
        raise RuntimeError(f"{spec.BACKEND_NAME} could not hook {missing} in this SGLang version")
    _installed = True
