"""A tiny DSA layer end to end: SGLang's ``Indexer`` routed to our kernels, then attention.

The layer makes the model's two calls: ``Indexer.forward_cuda`` (hooked by
:mod:`sglang_sparse_mla.scheduler_hooks`) returns top-k KV slots, which go to
``RadixAttention`` as ``topk_indices``. Checks: every row selects the top-k of
the fp64 index scores among the positions it may see, as KV slots the request
owns; a radix-cache hit reuses the cached index keys and matches a full
recompute; decode and MTP verify take the paged path.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt")

from utils import relative_error  # noqa: E402
from dsa_world import HEADS, HIDDEN, Q_LORA, TOPK, DSAWorld, TinyDSALayer, make_indexer, sglang_config  # noqa: E402,F401
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from sglang_sparse_mla.backend import dispatch  # noqa: E402


@pytest.fixture
def layer(sglang_config, monkeypatch):
    world = DSAWorld(num_heads=HEADS, index_topk=TOPK)
    return TinyDSALayer(world, make_indexer(monkeypatch))


def extend(layer: TinyDSALayer, reqs, counts, mode=ForwardMode.EXTEND):
    """``counts[i]`` new tokens of request ``i`` through the layer in one batch of extend ``mode``."""
    w = layer.world
    inputs = [layer.tokens(r, n) for r, n in zip(reqs, counts, strict=True)]
    rows = [w.random(n, 576) for n in counts]
    fb = w.extend_batch(reqs, rows)
    fb.forward_mode = mode
    w.backend.init_forward_metadata(fb)
    q = w.random(sum(counts), HEADS, 576)
    x = torch.cat([i[0] for i in inputs])
    q_lora = torch.cat([i[1] for i in inputs])
    slots, out = layer.forward(fb, x, q_lora, q, torch.cat(rows))
    return fb, q, slots, out


@pytest.mark.parametrize("budget_bytes", [None, 4 * 30 * 80], ids=["one_chunk", "chunked"])
def test_extend_selects_topk_and_attends(layer, monkeypatch, budget_bytes):
    if budget_bytes is not None:  # split the 80-token request by rows, the 6-token one apart
        monkeypatch.setattr(dispatch, "RAGGED_LOGITS_BUDGET_BYTES", budget_bytes)
    reqs = [layer.world.new_request() for _ in range(2)]
    fb, q, slots, out = extend(layer, reqs, [80, 6])
    assert len(layer.world.backend.forward_metadata.chunks) == (1 if budget_bytes is None else 4)
    positions = layer.check_topk(reqs, [80, 6], slots)
    assert relative_error(out, layer.world.reference(reqs, [80, 6], q, positions)) < 1e-2


def test_prefix_hit_reuses_index_keys(layer):
    w = layer.world
    donor = w.new_request()
    extend(layer, [donor], [70])
    index_k = w.pool.get_index_k_with_scale_buffer(0)
    donor_page = index_k[donor.slots[0] // 64].clone()

    hit = w.new_request(shared_prefix=donor, prefix_len=64)
    layer.share_prefix(hit, donor, 64)
    tail_x, tail_q_lora = layer.tokens(hit, 10)
    tail_rows, q_tail = w.random(10, 576), w.random(10, HEADS, 576)
    fb = w.extend_batch([hit], [tail_rows])
    w.backend.init_forward_metadata(fb)
    hit_slots, hit_out = layer.forward(fb, tail_x, tail_q_lora, q_tail, tail_rows)
    hit_positions = layer.check_topk([hit], [10], hit_slots)
    assert torch.equal(index_k[donor.slots[0] // 64], donor_page), "the prefix's index keys are reused, not rewritten"

    fresh = w.new_request()
    layer.x[fresh.pool_index] = layer.x[hit.pool_index].clone()
    layer.q_lora[fresh.pool_index] = layer.q_lora[hit.pool_index].clone()
    rows = torch.cat([donor.rows[:64], tail_rows])
    fb = w.extend_batch([fresh], [rows])
    w.backend.init_forward_metadata(fb)
    q = torch.cat([w.random(64, HEADS, 576), q_tail])
    fresh_slots, fresh_out = layer.forward(fb, layer.x[fresh.pool_index], layer.q_lora[fresh.pool_index], q, rows)
    fresh_positions = layer.check_topk([fresh], [74], fresh_slots)[64:]

    assert all(torch.equal(a, b) for a, b in zip(hit_positions, fresh_positions, strict=True))
    assert relative_error(hit_out, fresh_out[64:]) < 1e-2


@pytest.mark.parametrize("sglang_config", [{"speculative_num_draft_tokens": 2}], indirect=True)
@pytest.mark.parametrize("mode", ["decode", "target_verify"])
def test_paged_modes_select_topk(layer, mode):
    w = layer.world
    reqs = [w.new_request() for _ in range(2)]
    extend(layer, reqs, [90, 20])
    n = 1 if mode == "decode" else 2
    inputs = [layer.tokens(r, n) for r in reqs]
    rows = [w.random(n, 576) for _ in reqs]
    fb = (w.decode_batch if mode == "decode" else w.verify_batch)(reqs, rows)
    w.backend.init_forward_metadata(fb)
    assert w.backend.forward_metadata.is_paged
    q = w.random(2 * n, HEADS, 576)
    slots, out = layer.forward(
        fb, torch.cat([i[0] for i in inputs]), torch.cat([i[1] for i in inputs]), q, torch.cat(rows)
    )
    positions = layer.check_topk(reqs, [n, n], slots)
    assert relative_error(out, w.reference(reqs, [n, n], q, positions)) < 1e-2


class RecordingStream:
    """Stands in for SGLang's alternate CUDA stream: records when it is made to wait."""

    def __init__(self, events: list):
        self.events = events

    def wait_stream(self, stream):
        assert stream is not self
        self.events.append("alt stream waits")


@pytest.mark.parametrize(
    ("mode", "capture", "waits"),
    [("decode", True, True), ("decode", False, False), ("extend", True, False)],
    ids=["captured-decode", "eager-decode", "extend"],
)
def test_q_b_proj_stream_waits_for_the_index_queries(layer, monkeypatch, mode, capture, waits):
    """Where SGLang queues q_b_proj on its alternate stream beside the indexer (captured decode),
    that stream is made to wait once the index queries are quantized, before the logits."""
    import sglang.srt.model_executor.runner as runner

    w = layer.world
    reqs = [w.new_request() for _ in range(2)]
    extend(layer, reqs, [40, 12])
    events = []
    layer.indexer.alt_stream = RecordingStream(events)
    monkeypatch.setattr(runner, "get_is_capture_mode", lambda: capture)
    if not torch.cuda.is_available():  # the stream the indexer runs on, asked for by the wait
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "current stream")
    for name in ("quantize_index_keys_and_queries", "paged_index_logits", "ragged_index_logits"):
        original = getattr(dispatch, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            events.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(dispatch, name, recorded)
    if mode == "decode":
        inputs = [layer.tokens(r, 1) for r in reqs]
        rows = [w.random(1, 576) for _ in reqs]
        fb = w.decode_batch(reqs, rows)
        w.backend.init_forward_metadata(fb)
        x, q_lora = torch.cat([i[0] for i in inputs]), torch.cat([i[1] for i in inputs])
        slots, _ = layer.forward(fb, x, q_lora, w.random(2, HEADS, 576), torch.cat(rows))
        layer.check_topk(reqs, [1, 1], slots)
        logits = "paged_index_logits"
    else:
        extend(layer, reqs, [30, 3])
        logits = "ragged_index_logits"
    quantize = "quantize_index_keys_and_queries"
    expected = [quantize, "alt stream waits", logits] if waits else [quantize, logits]
    assert events == expected


def test_sglang_queues_q_b_proj_beside_the_indexer_as_the_backend_assumes():
    """``TritonSparseMLABackend._q_b_proj_stream`` relies on SGLang's captured-decode branch
    (pinned version): fork the alternate stream, call the indexer, queue ``q_b_proj`` there, join.
    A new SGLang that reorders it must fail here, not at graph capture."""
    import inspect

    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla import DeepseekMLAForwardMixin

    source = inspect.getsource(DeepseekMLAForwardMixin.forward_absorb_prepare)
    start = source.index("# overlap q_b_proj and indexer during decode")
    condition = source[start : source.index("):", start)]
    for term in ("self.alt_stream is not None", "get_is_capture_mode()", "is_decode_or_idle()"):
        assert term in condition
    steps = (
        "self.alt_stream.wait_stream(current_stream)",
        "self.indexer(",
        "with torch.cuda.stream(self.alt_stream):",
        "self.q_b_proj_forward(q)",
        "current_stream.wait_stream(self.alt_stream)",
    )
    positions = [source.index(step, start) for step in steps]  # first of each after the condition
    assert positions == sorted(positions)


def test_index_share_layer_reuses_previous_topk(sglang_config, monkeypatch):
    """GLM-5.2 IndexShare: a ``shared`` layer has no indexer (nor index-K pages) and attends
    with the previous full layer's slots, carried by SGLang's ``IndexTopKShareState``."""
    from sglang.srt.configs.model_config import dsa_layer_skips_topk
    from sglang.srt.layers.attention.index_topk_share import IndexTopKShareState

    world = DSAWorld(num_heads=HEADS, index_topk=TOPK, num_layers=2, skip_topk_layers=[False, True])
    world.runner.model_config.hf_config.indexer_types = ["full", "shared"]
    assert [dsa_layer_skips_topk(world.runner.model_config.hf_config, i) for i in (0, 1)] == [False, True]
    assert world.pool.get_index_k_with_scale_buffer(1).shape[0] == 0
    layer = TinyDSALayer(world, make_indexer(monkeypatch))

    req = world.new_request()
    x, q_lora = layer.tokens(req, 75)
    rows = [world.random(75, 576) for _ in range(2)]  # each layer caches its own latent rows
    fb = world.extend_batch([req], rows[:1])
    world.backend.init_forward_metadata(fb)
    share = IndexTopKShareState(fb, None)
    q = [world.random(75, HEADS, 576) for _ in range(2)]
    slots, out0 = layer.forward(fb, x, q_lora, q[0], rows[0])
    share.update(slots)
    out1 = world.attend(fb, q[1], rows[1], share.topk_indices, layer=1)

    positions = layer.check_topk([req], [75], slots)
    assert relative_error(out0, world.reference([req], [75], q[0], positions)) < 1e-2
    req.rows = rows[1]  # what layer 1 holds at the same slots
    assert relative_error(out1, world.reference([req], [75], q[1], positions)) < 1e-2


@pytest.mark.parametrize("is_neox_style", [True, False], ids=["deepseek", "glm5-fused-on-cuda"])
def test_projection_matches_sglang_gate_and_keys(sglang_config, monkeypatch, is_neox_style):
    """The gate is SGLang's own (fp32 on CUDA, the fused layer's bf16), the keys are normalized as
    its module's weights say (checked against torch's LayerNorm, not SGLang's CUDA one, which
    misreads strided rows), and the Hadamard rotation is due where SGLang's module applies it,
    so index scores round as in SGLang's paths."""
    from sglang_sparse_mla.backend.indexer import project, sglang_rotates

    indexer = make_indexer(monkeypatch, is_neox_style=is_neox_style)
    world = DSAWorld(num_heads=HEADS, index_topk=TOPK)
    x, q_lora = world.random(24, HIDDEN), world.random(24, Q_LORA)
    _, key, gate = project(indexer, x, q_lora, torch.arange(24, device=world.device))
    if indexer.use_dsa_indexer_fusion:
        sglang_key, sglang_gate = indexer._fused_k_weights(x)
    else:
        sglang_key, sglang_gate = indexer.wk(x)[0], indexer._weights_proj_bf16_in_fp32_out(x)
    assert torch.equal(gate.float(), sglang_gate.float())
    assert sglang_rotates(indexer) == (not indexer.use_dsa_indexer_fusion)
    norm = indexer.k_norm
    normed = torch.nn.functional.layer_norm(sglang_key.float(), (128,), norm.weight, norm.bias, norm.variance_epsilon)
    assert relative_error(key[:, 64:], normed[:, 64:]) < 1e-2  # unrotated: the FP8 kernel rotates


@pytest.mark.parametrize(
    "sglang_config", [{"speculative_num_draft_tokens": 3, "enable_deterministic_inference": True}], indirect=True
)
def test_verify_gives_each_draft_token_its_decode_bits(layer):
    """What MTP's exactness rests on (issue 17: speculative greedy output bit-identical to
    non-speculative): with ``--enable-deterministic-inference``, verifying a request's draft tokens
    in one batch gives every token the top-k (position for position, in order) and attention bits
    it gets when the same tokens are decoded one at a time. Twin requests hold the same context
    in different slots; one verifies, the other decodes, beside an unrelated request each time."""
    w, n = layer.world, 3
    twins, other = [w.new_request() for _ in range(2)], w.new_request()
    x, q_lora, rows = w.random(40, HIDDEN), w.random(40, Q_LORA), w.random(40, 576)
    for twin in twins:
        layer.x[twin.pool_index], layer.q_lora[twin.pool_index] = x.clone(), q_lora.clone()
    ox, oq_lora = layer.tokens(other, 25)
    orows = w.random(25, 576)
    fb = w.extend_batch([*twins, other], [rows, rows, orows])
    w.backend.init_forward_metadata(fb)
    layer.forward(fb, torch.cat([x, x, ox]), torch.cat([q_lora, q_lora, oq_lora]), w.random(105, HEADS, 576),
                  torch.cat([rows, rows, orows]))  # fmt: skip

    dx, dq_lora, drows, dq = w.random(n, HIDDEN), w.random(n, Q_LORA), w.random(n, 576), w.random(n, HEADS, 576)
    for twin in twins:
        layer.x[twin.pool_index] = torch.cat([layer.x[twin.pool_index], dx])
        layer.q_lora[twin.pool_index] = torch.cat([layer.q_lora[twin.pool_index], dq_lora])

    def step(req, count, i):
        """``count`` draft tokens of ``req`` from token ``i`` (verify: all of them), beside ``other``."""
        ox, oq_lora = layer.tokens(other, count)
        orows = w.random(count, 576)
        fb = (w.verify_batch if count > 1 else w.decode_batch)([req, other], [drows[i : i + count], orows])
        w.backend.init_forward_metadata(fb)
        slots, out = layer.forward(
            fb, torch.cat([dx[i : i + count], ox]), torch.cat([dq_lora[i : i + count], oq_lora]),
            torch.cat([dq[i : i + count], w.random(count, HEADS, 576)]), torch.cat([drows[i : i + count], orows]),
        )  # fmt: skip
        layer.check_topk([req, other], [count, count], slots)
        position_of = {s: p for p, s in enumerate(req.slots)}
        return [[position_of.get(s, -1) for s in row] for row in slots[:count].tolist()], out[:count]

    verified = step(twins[0], n, 0)
    decoded = [step(twins[1], 1, i) for i in range(n)]
    assert verified[0] == [row for positions, _ in decoded for row in positions]
    assert torch.equal(verified[1], torch.cat([out for _, out in decoded]))


def test_mtp_index_share_seed_is_the_last_tokens_slots(layer):
    """GLM-5.2's MTP IndexShare (``index_share_for_mtp_iteration``): SGLang seeds the draft's decode
    steps with the draft extend's top-k of each request's last token, through ``write_mtp_seed``,
    which asks the backend to convert it (``prepare_mtp_seed_indices``; ``dsa`` maps ragged prefill
    offsets to slots). Ours selects physical slots in every mode, so the seed is those rows as they
    are, and a decode step attending over them reads the positions the extend's last token chose."""
    from types import SimpleNamespace

    from sglang.srt.layers.attention.index_topk_share import write_mtp_seed
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    w = layer.world
    reqs = [w.new_request() for _ in range(2)]
    fb, _, slots, _ = extend(layer, reqs, [50, 30])
    last = torch.tensor([49, 79], device=w.device)
    fb.spec_info = SimpleNamespace(dsa_seed_topk_select=last)
    seed = torch.full((2, TOPK), -7, dtype=torch.int32, device=w.device)
    with forward_context(ForwardContext(attn_backend=w.backend)):
        write_mtp_seed(fb, seed, slots)
    assert torch.equal(seed, slots[last])

    rows, q = [w.random(1, 576) for _ in reqs], w.random(2, HEADS, 576)
    fb = w.decode_batch(reqs, rows)
    w.backend.init_forward_metadata(fb)
    out = w.attend(fb, q, torch.cat(rows), seed)
    positions = [torch.tensor([r.slots.index(s) for s in row if s >= 0]) for r, row in zip(reqs, seed.tolist())]
    assert relative_error(out, w.reference(reqs, [1, 1], q, positions)) < 1e-2


def test_mixed_chunk_batch(layer):
    """``--enable-mixed-chunk``: SGLang runs a prefill chunk and the running requests' decode steps
    as one MIXED batch, the decoding requests as one-token extends on their cached context. Each
    token selects the top-k of its own request's window and attends over it, as alone."""
    w = layer.world
    decoding = [w.new_request() for _ in range(2)]
    extend(layer, decoding, [60, 25])
    reqs, counts = [w.new_request(), *decoding], [40, 1, 1]
    _, q, slots, out = extend(layer, reqs, counts, ForwardMode.MIXED)
    positions = layer.check_topk(reqs, counts, slots)
    assert relative_error(out, w.reference(reqs, counts, q, positions)) < 1e-2
