"""Per-rank query heads under attention tensor parallelism are served end to end."""

from __future__ import annotations

import pytest

pytest.importorskip("sglang.srt")

from utils import relative_error  # noqa: E402
from dsa_world import DSAWorld, sglang_config  # noqa: E402,F401

MODELS = {"deepseek_v3.2": 128, "glm5": 64}


TP_CONFIGS = [{"tp_size": tp} for tp in (1, 2, 4, 8)]


@pytest.mark.parametrize("sglang_config", TP_CONFIGS, ids=lambda p: f"tp{p['tp_size']}", indirect=True)
@pytest.mark.parametrize("model", MODELS)
def test_per_rank_heads_accepted(sglang_config, model, request):
    """With --tp-size tp published, the backend takes H / tp heads per rank and its decode matches the reference."""
    from sglang.srt.runtime_context import get_parallel

    tp = request.node.callspec.params["sglang_config"]["tp_size"]
    assert get_parallel().attn_tp_size == tp
    heads = MODELS[model] // tp
    world = DSAWorld(num_heads=heads, attn_tp_size=tp)
    assert world.backend.num_q_heads == heads

    req = world.new_request()
    world.cache(req, world.random(40, 576))
    rows = [world.random(1, 576)]
    fb = world.decode_batch([req], rows)
    world.backend.init_forward_metadata(fb)
    positions = world.reference_positions([req], [1])
    q = world.random(1, heads, 576)
    out = world.attend(fb, q, rows[0], world.slots_of([req], [1], positions))
    assert out.shape == (1, heads, 512)
    assert relative_error(out, world.reference([req], [1], q, positions)) < 1e-2
