"""The ``triton_sparse_mla`` SGLang attention backend.

:mod:`.spec`, :mod:`.metadata`, :mod:`.dispatch` and :mod:`.indexer` are pure
torch (no SGLang import); :mod:`.attention_backend`, :mod:`.multi_step` and
:mod:`.model_hooks` (the model-side routing hooks) subclass / use / patch SGLang and need ``pip install sglang-sparse-mla[sglang]``.
"""

from .spec import BACKEND_NAME


def install_model_hooks() -> None:
    """Route the DSA model's forward to this backend (:mod:`.model_hooks`, which imports SGLang);
    called when the backend is first built."""
    from .model_hooks import install

    install()


__all__ = ["BACKEND_NAME", "install_model_hooks"]
