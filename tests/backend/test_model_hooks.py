"""Model-side routing hooks, applied through SGLang's HookRegistry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt")

from sglang.srt.layers.attention.dsa.dsa_indexer import Indexer  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # noqa: E402
from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry  # noqa: E402
from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (  # noqa: E402
    AttnForwardMethod,
)
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402
from sglang.srt.speculative.draft_utils import DraftBackendFactory  # noqa: E402

from sglang_sparse_mla.backend.attention_backend import TritonSparseMLABackend  # noqa: E402
from sglang_sparse_mla.backend.spec import BACKEND_NAME  # noqa: E402
from sglang_sparse_mla.backend import install_model_hooks, model_hooks  # noqa: E402


@pytest.fixture(autouse=True)
def hooks():
    install_model_hooks()
    install_model_hooks()  # idempotent


def test_hooks_are_applied_once():
    for target, hook in (
        (model_hooks._INDEXER, model_hooks.route_indexer),
        (model_hooks._DRAFT_DECODE, model_hooks.draft_decode_backend),
        (model_hooks._DRAFT_EXTEND, model_hooks.draft_extend_backend),
    ):
        assert target in HookRegistry._patched
        assert [h for _, h, _ in HookRegistry._hooks[target]].count(hook) == 1
    assert hasattr(Indexer.forward_cuda, "__wrapped__")
    assert hasattr(DraftBackendFactory.create_decode_backend, "__wrapped__")


def test_absorbed_mla_passes_the_rope_parts_apart():
    """Listed once among SGLang's absorb-core backends: the model hands q_nope/q_rope and
    k_nope/k_rope over as they are instead of concatenating them per layer."""
    from sglang.srt.models.deepseek_common.attention_forward_methods import forward_mla
    from sglang.srt.models.deepseek_common.utils import FORWARD_ABSORB_CORE_ATTENTION_BACKENDS

    assert FORWARD_ABSORB_CORE_ATTENTION_BACKENDS.count(BACKEND_NAME) == 1
    assert forward_mla.FORWARD_ABSORB_CORE_ATTENTION_BACKENDS is FORWARD_ABSORB_CORE_ATTENTION_BACKENDS


def test_deepseek_attention_takes_the_absorbed_sparse_path():
    """Unregistered names fall back to the ``triton`` handler (dense MHA prefill); ours is MLA."""
    handler = AttentionBackendRegistry.get_handler(BACKEND_NAME)
    assert handler is model_hooks.absorbed_mla_method
    assert handler(SimpleNamespace(), SimpleNamespace()) == AttnForwardMethod.MLA


def test_indexer_routing_depends_on_the_active_backend(monkeypatch):
    calls = []

    def original(*args):
        calls.append(("sglang", args))
        return "sglang"

    ours = object.__new__(TritonSparseMLABackend)
    topk = torch.zeros(2, 4, dtype=torch.int32)
    monkeypatch.setattr(TritonSparseMLABackend, "run_indexer", lambda self, *args: calls.append(("ours", args)) or topk)
    args = ("module", "x", "q_lora", "positions", "forward_batch", 3)
    with forward_context(ForwardContext(attn_backend=SimpleNamespace())):
        assert model_hooks.route_indexer(original, *args) == "sglang"
    with forward_context(ForwardContext(attn_backend=ours)):
        assert model_hooks.route_indexer(original, *args) is topk
    assert calls == [("sglang", (*args, True, True)), ("ours", (*args, True))]


@pytest.mark.parametrize("broadcast", [False, True], ids=["default", "SGLANG_DSA_TOPK_BROADCAST"])
def test_indexer_slots_are_broadcast_from_rank0_where_sglang_would(monkeypatch, broadcast):
    """``SGLANG_DSA_TOPK_BROADCAST=1``: our slots, like the stock indexer's, are broadcast from the
    attention-TP group's rank 0 (in place); by default no collective is issued."""
    from sglang.srt.layers.attention.dsa import dsa_indexer

    sent = []
    group = SimpleNamespace(world_size=2, pynccl_comm=None, broadcast=lambda t, src: sent.append((t, src)))
    monkeypatch.setattr(dsa_indexer, "get_parallel", lambda: SimpleNamespace(attn_tp_group=group))
    monkeypatch.setenv("SGLANG_DSA_TOPK_BROADCAST", "1" if broadcast else "0")
    ours = object.__new__(TritonSparseMLABackend)
    topk = torch.zeros(2, 4, dtype=torch.int32)
    monkeypatch.setattr(TritonSparseMLABackend, "run_indexer", lambda self, *args: topk)
    with forward_context(ForwardContext(attn_backend=ours)):
        assert model_hooks.route_indexer(None, "module", "x", "q_lora", "positions", "forward_batch", 3) is topk
    assert sent == ([(topk, 0)] if broadcast else [])


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.TARGET_VERIFY])
def test_deepseek_dispatch_reaches_sparse_mla(mode):
    """The model's own dispatch, with our backend stamped on the runner, picks the absorbed path.

    Without the registration it would fall back to the ``triton`` handler: dense MHA for a
    prefill without prefix, which bypasses the indexer.
    """
    from sglang.srt.models.deepseek_v2 import DeepseekV2AttentionMLA
    from sglang.srt.runtime_context import get_context

    backend = object.__new__(TritonSparseMLABackend)
    backend.prefill_attention_backend_str = backend.decode_attention_backend_str = BACKEND_NAME
    attn = SimpleNamespace(current_attention_backend=None)
    batch = SimpleNamespace(forward_mode=mode, extend_prefix_lens_cpu=[0], seq_lens_cpu=None)
    with get_context().override_server_args(attention_backend=BACKEND_NAME, device="cpu"):
        with forward_context(ForwardContext(attn_backend=backend)):
            assert DeepseekV2AttentionMLA.dispatch_attn_forward_method(attn, batch) == AttnForwardMethod.MLA
            assert attn.current_attention_backend == BACKEND_NAME
            if mode == ForwardMode.EXTEND:
                fallback = AttentionBackendRegistry.get_handler("no_such_backend")
                assert fallback(attn, batch) == AttnForwardMethod.MHA
