"""What one rank's backend sees under pipeline and data-parallel attention (per-rank heads under
attention TP / DP: ``test_head_counts.py``).

* Pipeline parallelism: a rank holds only layers ``[start_layer, end_layer)``; SGLang's pool is
  built for them and takes global layer ids, which the backend passes (latent rows and index
  keys). Two layers of a rank past the first, with different contents at the same slots, each
  write and read their own buffers. The backend reads no PP setting (``--pp-size 2`` is published
  only as the rank's context): the pool's ``start_layer`` is what differs.
* Data-parallel attention: SGLang pads a rank's extend tokens (to a multiple of the attention-TP
  width, or to the largest DP rank) but not its requests, so the indexer gets more rows than the
  batch's metadata covers: those select no slot and leave the real rows as they were.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt")

from utils import relative_error  # noqa: E402
from dsa_world import HEADS, TOPK, DSAWorld, TinyDSALayer, make_indexer, sglang_config  # noqa: E402,F401

from sglang_sparse_mla.backend.dispatch import store_kv  # noqa: E402

START = 5  # the first layer of this pipeline rank


@pytest.mark.parametrize("sglang_config", [{"pp_size": 2}], indirect=True)
@pytest.mark.parametrize("new_tokens", [1, 20], ids=["decode", "extend"])
def test_pipeline_rank_layers_attend_their_own_kv(sglang_config, new_tokens):
    """Layers 5 and 6 hold different latent rows at the same slots; each writes its new rows to
    and attends over its own buffer (matching the reference over its rows), so the same query
    gives different outputs."""
    world = DSAWorld(num_heads=HEADS, index_topk=TOPK, num_layers=2, start_layer=START)
    assert [layer.layer_id for layer in world.layers] == [START, START + 1]
    reqs = [world.new_request() for _ in range(2)]
    cached = [[world.random(n, 576) for n in (50, 9)] for _ in world.layers]  # [layer][request]
    for req, rows in zip(reqs, cached[0], strict=True):
        world.cache(req, rows)
    for req, rows in zip(reqs, cached[1], strict=True):  # the second layer holds other rows
        store_kv(world.pool.get_key_buffer(START + 1), world.tensor(req.slots), rows)
    new = [[world.random(new_tokens, 576) for _ in reqs] for _ in world.layers]
    counts = [new_tokens] * len(reqs)
    fb = (world.decode_batch if new_tokens == 1 else world.extend_batch)(reqs, new[0])
    world.backend.init_forward_metadata(fb)
    positions = world.reference_positions(reqs, counts)
    slots = world.slots_of(reqs, counts, positions)

    q = world.random(sum(counts), HEADS, 576)  # one query for both layers: only the KV differs
    outs = []
    for i in range(len(world.layers)):
        outs.append(world.attend(fb, q, torch.cat(new[i]), slots, layer=i))
        for req, old, rows in zip(reqs, cached[i], new[i], strict=True):
            req.rows = torch.cat([old, rows])  # what layer i holds
        assert relative_error(outs[i], world.reference(reqs, counts, q, positions)) < 1e-2
    assert relative_error(outs[0], outs[1]) > 0.1


@pytest.mark.parametrize("sglang_config", [{"pp_size": 2}], indirect=True)
def test_pipeline_rank_indexers_keep_their_own_index_keys(sglang_config, monkeypatch):
    """Each layer's indexer stores its keys in its own index-K pages (an extend), then scores
    against them (a decode, from the pages)."""
    world = DSAWorld(num_heads=HEADS, index_topk=TOPK, num_layers=2, start_layer=START)
    layers = [TinyDSALayer(world, make_indexer(monkeypatch, seed=i), layer=i) for i in range(2)]
    reqs = [world.new_request() for _ in range(2)]
    for counts, batch in (([24, 3], world.extend_batch), ([1, 1], world.decode_batch)):
        fb = batch(reqs, [world.random(n, 576) for n in counts])
        world.backend.init_forward_metadata(fb)
        for layer in layers:
            inputs = [layer.tokens(r, n) for r, n in zip(reqs, counts, strict=True)]
            slots = layer.select(fb, torch.cat([i[0] for i in inputs]), torch.cat([i[1] for i in inputs]))
            layer.check_topk(reqs, counts, slots)
    pages = [world.pool.get_index_k_with_scale_buffer(START + i)[reqs[0].slots[0] // 64] for i in range(2)]
    assert not torch.equal(*pages)


@pytest.mark.parametrize("sglang_config", [{"tp_size": 8, "attn_dp_size": 2}], indirect=True)
def test_dp_padded_extend_tokens_select_nothing(sglang_config, monkeypatch):
    """35 real tokens padded to 40 by SGLang's own padding (``ForwardBatch._pad_inputs_to_size``,
    as ``prepare_mlp_sync_batch`` calls it for an extend): out_cache_loc 0 (the dummy page),
    positions 0, no request added."""
    world = DSAWorld(num_heads=HEADS, index_topk=TOPK, attn_tp_size=4)
    layer = TinyDSALayer(world, make_indexer(monkeypatch))
    reqs = [world.new_request() for _ in range(2)]
    counts, padded = [30, 5], 40
    inputs = [layer.tokens(r, n) for r, n in zip(reqs, counts, strict=True)]
    rows = [world.random(n, 576) for n in counts]
    fb = world.extend_batch(reqs, rows)
    fb.extend_num_tokens = padded
    fb._pad_inputs_to_size(SimpleNamespace(attn_backend=world.backend), padded, fb.batch_size)
    assert fb.out_cache_loc.shape[0] == padded and fb.batch_size == 2
    world.backend.init_forward_metadata(fb)

    real, pad = sum(counts), padded - sum(counts)
    x = torch.cat([i[0] for i in inputs] + [world.random(pad, inputs[0][0].shape[1])])
    q_lora = torch.cat([i[1] for i in inputs] + [world.random(pad, inputs[0][1].shape[1])])
    q = world.random(padded, HEADS, 576)
    slots, out = layer.forward(fb, x, q_lora, q, torch.cat(rows + [world.random(pad, 576)]))
    assert slots.shape == (padded, TOPK)
    assert (slots[real:] == -1).all()
    positions = layer.check_topk(reqs, counts, slots[:real])
    assert relative_error(out[:real], world.reference(reqs, counts, q[:real], positions)) < 1e-2
    assert torch.isfinite(out[real:]).all()


@pytest.mark.parametrize("sglang_config", [{"tp_size": 4, "dp_size": 4, "enable_dp_attention": True}], indirect=True)
@pytest.mark.parametrize("tokens", [0, 3], ids=["empty", "padded"])
def test_dp_idle_rank_forward(sglang_config, monkeypatch, tokens):
    """An attention-DP rank with no request runs SGLang's IDLE forward beside the others (its
    collectives must be matched), padded to the others' token count or empty: no metadata, the
    indexer's rows all ``-1`` with no index key written, and SGLang's attention layer answering for
    the backend (``AttentionBackend.forward`` returns an uninitialised ``[tokens, H * 512]`` for
    IDLE, with any backend): no cache byte of a real request touched."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    world = DSAWorld(num_heads=HEADS, index_topk=TOPK)
    layer = TinyDSALayer(world, make_indexer(monkeypatch))
    busy = world.new_request()
    world.cache(busy, world.random(70, 576))
    kv_before, index_before = world.kv_bytes(busy.slots), world.pool.get_index_k_with_scale_buffer(0).clone()
    empty = world.tensor([], torch.int32)
    fb = ForwardBatch(
        forward_mode=ForwardMode.IDLE, batch_size=0, input_ids=world.tensor([0] * tokens),
        req_pool_indices=empty, seq_lens=empty, out_cache_loc=world.tensor([0] * tokens), seq_lens_sum=0,
        seq_lens_cpu=torch.tensor([], dtype=torch.int32), positions=world.tensor([0] * tokens),
    )  # fmt: skip
    world.backend.init_forward_metadata(fb)
    assert world.backend.forward_metadata is None
    slots = layer.select(fb, world.random(tokens, 64), world.random(tokens, 32))
    assert slots.shape == (tokens, TOPK) and (slots == -1).all()
    out = world.attend(fb, world.random(tokens, HEADS, 576), world.random(tokens, 576), slots)
    assert out.shape == (tokens, HEADS, 512)
    assert torch.equal(world.kv_bytes(busy.slots), kv_before)
    assert torch.equal(world.pool.get_index_k_with_scale_buffer(0), index_before)
