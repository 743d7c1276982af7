"""The ``triton_sparse_mla`` SGLang attention backend.

:mod:`.spec`, :mod:`.metadata`, :mod:`.dispatch` and :mod:`.indexer` are pure
torch (no SGLang import); :mod:`.attention_backend` and :mod:`.multi_step`
subclass / use SGLang and need ``pip install sglang-sparse-mla[sglang]``.
"""

from .spec import BACKEND_NAME

__all__ = ["BACKEND_NAME"]
