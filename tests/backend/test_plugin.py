"""The plugin is discovered by SGLang's own loader and maps the CLI choice to our backend."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest.importorskip("sglang.srt")

from dsa_world import DSAWorld, sglang_config  # noqa: E402,F401

from sglang_sparse_mla import plugin  # noqa: E402
from sglang_sparse_mla.backend.attention_backend import TritonSparseMLABackend  # noqa: E402
from sglang_sparse_mla.backend.spec import BACKEND_NAME  # noqa: E402


def test_entry_point_is_declared():
    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == BACKEND_NAME]
    assert ep.value == "sglang_sparse_mla.plugin:register"
    assert ep.load() is plugin.register


def test_load_plugins_registers_choice_factory_and_hooks():
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
        DRAFT_ATTENTION_BACKEND_CHOICES,
        RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND,
    )
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugins()
    assert BACKEND_NAME in ATTENTION_BACKEND_CHOICES and BACKEND_NAME in DRAFT_ATTENTION_BACKEND_CHOICES
    assert BACKEND_NAME in DETERMINISTIC_ATTENTION_BACKEND_CHOICES
    assert BACKEND_NAME in RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND
    assert ATTENTION_BACKENDS[BACKEND_NAME] is plugin.create_backend
    assert "sglang.srt.arg_groups.overrides._dsa_split_backend_resolution" in HookRegistry._patched


def test_register_is_idempotent():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND
    from sglang.srt.arg_groups.resolution_hooks import _HOOKS

    for _ in range(3):
        plugin.register()
    assert ATTENTION_BACKEND_CHOICES.count(BACKEND_NAME) == 1
    assert RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND.count(BACKEND_NAME) == 1
    for step in ("handle_other_validations", "disable_prefill_cuda_graph_for_deepseek_trtllm_mla"):
        ours = [fn for fn in _HOOKS[step] if fn.__module__.startswith("sglang_sparse_mla")]
        assert len(ours) == 1


def test_cli_choice_builds_our_backend(sglang_config):
    """``--attention-backend triton_sparse_mla`` parses and the registry builds our class."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import prepare_server_args

    plugin.register()
    server_args = prepare_server_args(["--model-path", "dummy", "--attention-backend", BACKEND_NAME])
    assert server_args.attention_backend == BACKEND_NAME
    world = DSAWorld()
    backend = ATTENTION_BACKENDS[server_args.attention_backend](world.runner)
    assert isinstance(backend, TritonSparseMLABackend)


def test_factory_refuses_non_dsa_models(sglang_config):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sglang_sparse_mla.backend.spec import UnsupportedConfiguration

    plugin.register()
    world = DSAWorld()
    del world.runner.model_config.hf_config.index_topk
    world.runner.model_config.hf_config.architectures = ["DeepseekV3ForCausalLM"]
    with pytest.raises(UnsupportedConfiguration, match="--attention-backend"):
        ATTENTION_BACKENDS[BACKEND_NAME](world.runner)
