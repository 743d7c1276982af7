"""Load a tiny checkpoint through SGLang's own model class on the CPU; print a JSON report.

    python sglang_load_check.py MODEL_DIR [MODEL_DIR ...]

Run in a subprocess by ``test_tiny_model.py``: it initialises a one-process
gloo "distributed" group and publishes a server config, both process-wide.
The model class is the one SGLang's registry picks for the config's
architecture, built as the model loader builds it (bf16 default dtype, no
quantization); its rotary embeddings are stubbed (their CPU build needs a
device SGLang cannot find here; they hold no checkpoint weights).
Each model is built twice: with the indexer as SGLang builds it on the CPU,
and as on CUDA ("fused"), where an interleaved-rope indexer (GLM-5) fuses
``wk`` and ``weights_proj`` into one ``wk_weights_proj`` parameter.

A checkpoint with an MTP layer is also built as SGLang's speculative worker
builds its draft (``ModelConfig(..., is_draft_model=True)`` renames the
architecture to the NextN class, which loads ``model.layers.{num_hidden_layers}``
alone; its embedding and head stay unloaded: the worker hands it the target's).

Every parameter is filled with NaN, then ``load_weights`` consumes the
checkpoint. A ``REPORT`` line per build lists parameters left with a NaN (not,
or not fully, loaded), loader warnings, every parameter's shape, and whether
some fused parameters hold the concatenation of their checkpoint tensors.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch


def load_report(path: str, fused: bool, draft: bool, messages: list[str]) -> dict:
    """Build SGLang's model class for ``path`` (its MTP draft's with ``draft``), NaN-fill it,
    load the checkpoint, report."""
    import sglang.srt.layers.attention.dsa.dsa_indexer as dsa_indexer
    from safetensors.torch import load_file
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.models.registry import ModelRegistry

    dsa_indexer._is_cuda = fused
    config = ModelConfig(path, is_draft_model=draft).hf_config
    model_class, _ = ModelRegistry.resolve_model_cls(config.architectures)
    model = model_class(config=config, quant_config=None)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    messages.clear()
    checkpoint = load_file(f"{path}/model.safetensors")
    model.load_weights(iter(checkpoint.items()))

    params = dict(model.named_parameters())
    # The checkpoint's and the model's names of one attention block: the first layer's, or the
    # MTP layer's, which the draft holds as its decoder.
    ckpt_attn = f"model.layers.{config.num_hidden_layers if draft else 0}.self_attn"
    attn = "model.decoder.self_attn" if draft else ckpt_attn
    fused_checks = {
        "fused_qkv_a_proj_with_mqa": torch.equal(
            params[f"{attn}.fused_qkv_a_proj_with_mqa.weight"],
            torch.cat(
                [checkpoint[f"{ckpt_attn}.q_a_proj.weight"], checkpoint[f"{ckpt_attn}.kv_a_proj_with_mqa.weight"]]
            ),
        ),
    }
    if not draft:
        fused_checks["lm_head"] = torch.equal(params["lm_head.weight"], checkpoint["lm_head.weight"])
    if f"{attn}.indexer.wk_weights_proj.weight" in params:
        fused_checks["wk_weights_proj"] = torch.equal(
            params[f"{attn}.indexer.wk_weights_proj.weight"],
            torch.cat(
                [checkpoint[f"{ckpt_attn}.indexer.wk.weight"], checkpoint[f"{ckpt_attn}.indexer.weights_proj.weight"]]
            ),
        )
    return {
        "path": path,
        "fused": fused,
        "draft": draft,
        "mtp_index_share": bool(getattr(config, "index_share_for_mtp_iteration", False)),
        "class": model_class.__name__,
        "unfilled": [name for name, p in params.items() if torch.isnan(p.float()).any()],
        "warnings": [m for m in messages if "not found" in m or "params_dict" in m],
        "shapes": {name: list(p.shape) for name, p in params.items()},
        "fused_checks": fused_checks,
    }


def main() -> None:
    from sglang.srt.runtime_context import get_context
    from sglang.test.layer_ut_utils import init_single_process_dist

    from sglang_sparse_mla.testing.serving.server import free_port

    get_context().override_server_args(device="cpu", page_size=64, kv_cache_dtype="bfloat16").install()
    init_single_process_dist(master_port=free_port())

    import sglang.srt.layers.attention.dsa.dsa_indexer as dsa_indexer
    import sglang.srt.models.deepseek_v2 as deepseek_v2

    for module in (dsa_indexer, deepseek_v2):
        module.get_rope_wrapper = lambda *args, **kwargs: torch.nn.Identity()
    dsa_indexer.resolve_num_sms = lambda: 132  # read by the CUDA build of the indexer
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    torch.set_default_dtype(torch.bfloat16)
    for path in sys.argv[1:]:
        mtp = json.loads(Path(path, "config.json").read_text()).get("num_nextn_predict_layers", 0)
        for draft in (False, True) if mtp else (False,):
            for fused in (False, True):
                print("REPORT " + json.dumps(load_report(path, fused, draft, messages)), flush=True)


if __name__ == "__main__":
    main()
