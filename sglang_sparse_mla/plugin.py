"""SGLang plugin entry point (``sglang.srt.plugins`` group, name ``triton_sparse_mla``).

SGLang's ``load_plugins()`` calls :func:`register` in every process before it
parses arguments or builds a model (``sglang.launch_server`` / ``sglang serve``
/ ``Engine`` in the main process; ``run_scheduler_process``, the data-parallel
controller and the detokenizer in theirs). Registration is idempotent and
imports only SGLang's argument and registry modules.
"""

from __future__ import annotations

from .backend.spec import BACKEND_NAME


def register() -> None:
    """Add ``--attention-backend triton_sparse_mla`` and its backend factory.

    The backend is also listed among SGLang's deterministic-inference backends,
    with the radix cache kept on: under ``--enable-deterministic-inference`` its
    sparse MLA runs batch-invariant (see :mod:`.backend.attention_backend`).
    """
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
        DRAFT_ATTENTION_BACKEND_CHOICES,
        RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND,
        add_attention_backend_choices,
        add_deterministic_attention_backend_choices,
        add_draft_attention_backend_choices,
        add_radix_supported_deterministic_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    from .scheduler_hooks import install_server_arg_hooks

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in DRAFT_ATTENTION_BACKEND_CHOICES:
        add_draft_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        add_deterministic_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND:
        add_radix_supported_deterministic_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_backend)
    install_server_arg_hooks()


def create_backend(model_runner):
    """The attention-registry factory: hooks the model side, then builds the backend.

    Models whose attention SGLang wraps in a hybrid backend (linear-attention
    hybrids, Dots3) are refused: the indexer is routed by the active backend.
    """
    from sglang.srt.configs.dots3 import Dots3Config
    from sglang.srt.configs.hybrid_arch import mambaish_config

    from .backend.attention_backend import TritonSparseMLABackend
    from .backend.spec import UnsupportedConfiguration
    from .backend import install_model_hooks

    model_config = model_runner.model_config
    if mambaish_config(model_config) is not None or isinstance(model_config.hf_text_config, Dots3Config):
        raise UnsupportedConfiguration(
            f"{BACKEND_NAME} does not serve hybrid-attention models; use --attention-backend dsa"
        )
    install_model_hooks()
    return TritonSparseMLABackend(model_runner)
