"""Per-rank query heads under attention tensor and data parallelism are served end to end.

Attention data parallelism is published as SGLang 0.5.23 spells it, ``--attn-dp-size``: the
deprecated ``--dp-size N --enable-dp-attention`` becomes ``attn_dp_size = N`` only in SGLang's
full argument resolution (``handle_deprecated_dp_attention``), which the published-config test
hook does not run; :func:`test_dp_attention_flag_is_attn_dp_size` checks that translation.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang.srt")

from utils import relative_error  # noqa: E402
from dsa_world import DSAWorld, sglang_config  # noqa: E402,F401

MODELS = {"deepseek_v3.2": 128, "glm5": 64}

# (tp_size, attn_dp_size): each rank runs the heads of one attention-TP rank, tp / attn_dp of them
# sharing the model's heads (attn_dp 8 of tp 8: every rank all heads).
LAYOUTS = [(1, 1), (2, 1), (4, 1), (8, 1), (8, 8), (8, 4), (8, 2)]
DP_LAYOUTS = [(tp, dp) for tp, dp in LAYOUTS if dp > 1]


def layout_id(params) -> str:
    return f"tp{params['tp_size']}" + (f"-dp{params['attn_dp_size']}" if params["attn_dp_size"] > 1 else "")


@pytest.mark.parametrize(
    "sglang_config", [{"tp_size": tp, "attn_dp_size": dp} for tp, dp in LAYOUTS], ids=layout_id, indirect=True
)
@pytest.mark.parametrize("model", MODELS)
def test_per_rank_heads_accepted(sglang_config, model, request):
    """With --tp-size tp (and --attn-dp-size dp) published, the backend takes H / (tp / dp) heads
    per rank and its decode matches the reference."""
    from sglang.srt.runtime_context import get_parallel

    params = request.node.callspec.params["sglang_config"]
    attn_tp = params["tp_size"] // params["attn_dp_size"]
    assert get_parallel().attn_tp_size == attn_tp
    heads = MODELS[model] // attn_tp
    world = DSAWorld(num_heads=heads, attn_tp_size=attn_tp)
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


@pytest.mark.parametrize(("tp", "dp"), DP_LAYOUTS, ids=[f"tp{tp}-dp{dp}" for tp, dp in DP_LAYOUTS])
def test_dp_attention_flag_is_attn_dp_size(tp, dp):
    """SGLang resolves ``--tp-size tp --dp-size dp --enable-dp-attention`` to the
    ``attn_dp_size`` published above (and one replica)."""
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from sglang.srt.arg_groups.parallel_hook import handle_deprecated_dp_attention
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path="dummy", tp_size=tp, dp_size=dp, enable_dp_attention=True)
    handle_deprecated_dp_attention(server_args)
    resolved = resolving_view(server_args)
    assert (resolved.tp_size, resolved.attn_dp_size, resolved.dp_size) == (tp, dp, 1)
    assert not resolved.enable_dp_attention
