"""MTP draft backends: SGLang's draft factory builds ours, and step ``i`` decodes ``seq_len + i``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt")

from dsa_world import DSAWorld, sglang_config  # noqa: E402,F401
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.speculative.draft_utils import DraftBackendFactory  # noqa: E402

from sglang_sparse_mla.backend.attention_backend import TritonSparseMLABackend  # noqa: E402
from sglang_sparse_mla.backend.multi_step import TritonSparseMLAMultiStepBackend  # noqa: E402
from sglang_sparse_mla.backend.spec import BACKEND_NAME  # noqa: E402
from sglang_sparse_mla.backend import install_model_hooks  # noqa: E402

MTP = {"speculative_eagle_topk": 1, "speculative_num_steps": 3, "speculative_num_draft_tokens": 4}


@pytest.fixture
def factory(sglang_config):
    install_model_hooks()
    world = DSAWorld()
    world.runner.draft_attention_backend = None
    return world, DraftBackendFactory(world.runner, topk=1, speculative_num_steps=3)


@pytest.mark.parametrize("sglang_config", [MTP], indirect=True)
def test_draft_factory_builds_our_backends(factory):
    world, draft_factory = factory
    decode = draft_factory.create_decode_backend()
    assert isinstance(decode, TritonSparseMLAMultiStepBackend)
    assert [b.speculative_step_id for b in decode.attn_backends] == [0, 1]
    assert all(b.decode_attention_backend_str == BACKEND_NAME for b in [decode, *decode.attn_backends])
    extend = draft_factory.create_draft_extend_backend()
    assert isinstance(extend, TritonSparseMLABackend) and extend.prefill_attention_backend_str == BACKEND_NAME
    assert extend.num_draft_tokens == 4


@pytest.mark.parametrize("sglang_config", [MTP], indirect=True)
def test_draft_steps_see_their_own_positions_eager_and_graph(factory):
    world, draft_factory = factory
    decode = draft_factory.create_decode_backend()
    reqs = [world.new_request() for _ in range(2)]
    for req, n in zip(reqs, (70, 9), strict=True):
        world.cache(req, world.random(n, 576))
    seq_lens = world.tensor([70, 9], torch.int32)
    batch = SimpleNamespace(
        batch_size=2,
        forward_mode=ForwardMode.DECODE,
        req_pool_indices=world.tensor([r.pool_index for r in reqs]),
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.cpu(),
        seq_lens_sum=79,
        spec_info=None,
    )
    decode.init_forward_metadata(batch)
    eager = [b.forward_metadata for b in decode.attn_backends]
    for step, md in enumerate(eager):
        assert md.kv_total.tolist() == [70 + step + 1, 9 + step + 1]
        assert md.token_kv_len.tolist() == md.kv_total.tolist()

    decode.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    decode.init_forward_metadata_out_graph(batch, in_capture=True)
    decode.init_forward_metadata_in_graph(batch)
    for backend, md in zip(decode.attn_backends, eager, strict=True):
        graph = backend.forward_metadata
        assert graph.kv_total.data_ptr() == backend.graph_buffers.kv_total.data_ptr()
        assert torch.equal(graph.kv_total, md.kv_total) and torch.equal(graph.token_kv_len, md.token_kv_len)
        assert torch.equal(graph.block_table[:, : md.block_table.shape[1]], md.block_table)
