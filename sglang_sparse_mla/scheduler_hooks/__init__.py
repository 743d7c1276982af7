"""Pure-Python hooks that make SGLang's scheduler, argument resolution and DSA
model use the ``triton_sparse_mla`` backend (see :mod:`.server_args` and
:mod:`.model_hooks`). Importing this package imports nothing from SGLang."""

from __future__ import annotations


def install_server_arg_hooks() -> None:
    """Argument-resolution hooks; called from the plugin entry point."""
    from .server_args import install

    install()


def install_model_hooks() -> None:
    """Model-side routing hooks; called when the backend is first built."""
    from .model_hooks import install

    install()


__all__ = ["install_model_hooks", "install_server_arg_hooks"]
