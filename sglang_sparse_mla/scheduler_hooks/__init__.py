"""Pure-Python hooks that make SGLang's scheduler and argument resolution use
the ``triton_sparse_mla`` backend (see :mod:`.server_args`; the model-side
hooks live beside the backend, :mod:`sglang_sparse_mla.backend.model_hooks`).
Importing this package imports nothing from SGLang."""

from __future__ import annotations


def install_server_arg_hooks() -> None:
    """Argument-resolution hooks; called from the plugin entry point."""
    from .server_args import install

    install()


__all__ = ["install_server_arg_hooks"]
