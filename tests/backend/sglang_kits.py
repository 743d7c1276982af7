"""SGLang's DSA attention test kits, imported and fed to this backend by name.

The kits ship in the sglang wheel (``sglang.test.kits.attention_unittest``);
they build a mock ``ModelRunner`` with SGLang's real pools and take the
backend from ``ATTENTION_BACKENDS[case.backend]``. What this module adds:

* :func:`import_kits`: the kits enter ``get_parallel().override(...)`` when
  imported and never leave it, which would rewrite ``attn_tp_size`` and its
  kin for every other test of the session; they are imported inside an outer
  override and their values are re-entered only around kit tests
  (:func:`kit_context`).
* :class:`KitTestCase`: the ``testcase`` the kits call back. A kit skips when
  the backend fails to build (``AssertionError`` / ``ImportError``); for this
  backend that is a failure, so the skip is turned into one.
* :func:`with_index_heads`: the kits' tiny model declares one index head; the
  backend refuses DSA models whose index heads its indexer kernels do not
  take. The sparse cases hand the attention its top-k and never run the
  indexer, so the model is given DeepSeek-V3.2's 64 index heads.
* :func:`backend_topk`: the kits' ``topk_indices`` are request-local token
  positions (what SGLang's ``dsa`` backend translates through its page table
  when its top-k is not fused); this backend is handed physical KV slots, as
  its indexer returns them (so is ``dsa`` with its default fused top-k). The
  positions are mapped through the fixture's ``req_to_token``; the kit's
  reference keeps reading the positions.
"""

from __future__ import annotations

import importlib
import unittest
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.runtime_context import get_parallel, restore_context, snapshot_context

KIT_MODULES = {
    "dsa": "sglang.test.kits.attention_unittest.attention_methods.dsa_attention",
    "cuda_graph_decode": "sglang.test.kits.attention_unittest.runner_modes.cuda_graph_decode_runner",
    "draft": "sglang.test.kits.attention_unittest.runner_modes.speculative_draft_runner",
}

# DeepSeek-V3.2's index heads (the backend's indexer kernels take 32 or 64).
INDEX_HEADS = 64


def import_kits() -> tuple[SimpleNamespace, dict]:
    """The kit modules and the parallel overrides their imports entered (left again here)."""
    parallel = get_parallel()
    with parallel.override():
        modules = {name: importlib.import_module(path) for name, path in KIT_MODULES.items()}
        entered = dict(parallel._overrides)  # ParallelContext has no public reader of its scoped overrides
    return SimpleNamespace(**modules), entered


@contextmanager
def kit_context(parallel_overrides: dict):
    """The kits' parallel overrides around one test; the server config the kits
    publish (and never withdraw) is withdrawn after it."""
    with get_parallel().override(**parallel_overrides):
        # Snapshot inside the override: it updates the overrides dict in place and
        # the snapshot holds that dict; leaving the override puts back its own copy.
        state = snapshot_context()
        try:
            yield
        finally:
            restore_context(state)


class KitTestCase(unittest.TestCase):
    """The ``testcase`` argument of the kits' runners."""

    def runTest(self):
        """Not run: the kits only call the assertion and skip helpers."""

    def skipTest(self, reason):
        pytest.fail(f"an SGLang kit skipped where this backend must run: {reason}")


def with_index_heads(model_config_cls, index_heads: int = INDEX_HEADS):
    """A subclass of the kits' ``TinyDSAModelConfig`` whose HF config has ``index_heads`` index heads."""

    class WithIndexHeads(model_config_cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hf_config.index_n_heads = index_heads

    return WithIndexHeads


def backend_topk(fixture) -> torch.Tensor:
    """``[T, topk]`` int32 physical KV slots of a sparse fixture's top-k positions, ``-1`` kept."""
    positions = fixture.topk_indices.long()
    input_lens = torch.tensor(fixture.case.input_lens, device=positions.device)
    token_req = fixture.forward_batch.req_pool_indices.long().repeat_interleave(input_lens)
    req_to_token = fixture.runner.req_to_token_pool.req_to_token
    slots = req_to_token[token_req[:, None], positions.clamp(min=0)]
    return torch.where(positions >= 0, slots, -1).to(torch.int32)
