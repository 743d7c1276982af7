"""Server-argument resolution for ``--attention-backend triton_sparse_mla``.

Installed at plugin load (before ``prepare_server_args`` parses the command
line, in every process that calls ``load_plugins``). What SGLang 0.5.23
already resolves for a DSA model with our backend, and what these hooks add:

* backend: ``_deepseek_family_overrides`` fills ``attention_backend = "dsa"``
  only when no backend is set, so an explicit ``triton_sparse_mla`` is kept;
* page size: the same override sets 64 (``64 * index_kpool``) for every DSA
  model, whatever the backend, over any ``--page-size``; validated here, with a
  warning naming the flag when it overrode the user's value;
* KV cache: ``_dsa_kv_cache_dtype_default`` turns ``auto`` into ``bfloat16``
  (``fp8_e4m3`` on SM100+) and accepts ``bfloat16``/``fp8_e4m3`` only;
* DSA kernel selection: ``_dsa_split_backend_resolution`` would pick SGLang's
  own DSA kernels (``trtllm`` on SM100 switches the FP8 pool to a raw 576-byte
  row without scales). Wrapped here to select none for our backend, which
  keeps the pool in the 576-value bf16 / 656-byte FP8 layouts our kernels read
  (``--dcp-size`` > 1 makes SGLang fill both with ``trtllm``: refused first, by
  its own flag);
* prefill CUDA graphs (breakable by default on CUDA) are turned off: the
  indexer's ragged extend path runs eagerly;
* speculative decoding: EAGLE / NEXTN (the model's MTP layer), EAGLE3 and
  STANDALONE with chain drafts; a draft whose attention runs here must be a
  DSA model, and SGLang's draft-window option is refused (its own draft
  backends honour it, ours does not);
* start-up validation of everything else the backend cannot serve.
"""

from __future__ import annotations

import logging

from ..backend import spec

logger = logging.getLogger(__name__)

_DSA_SPLIT_BACKEND_PASS = "sglang.srt.arg_groups.overrides._dsa_split_backend_resolution"
_installed = False


def _backends(view) -> tuple[str | None, str | None]:
    from sglang.srt.arg_groups.overrides import attention_backends_of

    return attention_backends_of(view)


def _selected(view) -> bool:
    return spec.BACKEND_NAME in _backends(view)


def skip_dsa_kernel_selection(original, view) -> dict:
    """Around ``_dsa_split_backend_resolution``: no SGLang DSA kernel for our backend."""
    if not _selected(view):
        return original(view)
    # SGLang's DCP override fills both fields with "trtllm": refuse the flag the user gave.
    spec.check_parallelism(dcp_size=view.dcp_size)
    for field in ("dsa_prefill_backend", "dsa_decode_backend"):
        if getattr(view, field) is not None:
            raise spec.UnsupportedConfiguration(
                f"--{field.replace('_', '-')} selects SGLang's own DSA kernels and does not "
                f"apply to --attention-backend {spec.BACKEND_NAME}; drop it"
            )
    return {}


def disable_prefill_cuda_graph(server_args, previous) -> None:
    """After SGLang's prefill-graph defaults: run prefill eagerly with our backend."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    previous(server_args)
    cfg = resolving_view(server_args)
    if not _selected(cfg) or cfg.cuda_graph_config.prefill.backend == Backend.DISABLED:
        return
    if (Phase.PREFILL, "backend") in getattr(server_args, "_cuda_graph_config_locked", set()):
        raise spec.UnsupportedConfiguration(
            f"{spec.BACKEND_NAME} runs prefill eagerly; set --cuda-graph-backend-prefill "
            f"disabled (got {cfg.cuda_graph_config.prefill.backend})"
        )
    logger.info("%s: prefill CUDA graph disabled (eager prefill, decode graphs kept)", spec.BACKEND_NAME)
    declare_resolution(
        server_args,
        "triton_sparse_mla.disable_prefill_cuda_graph",
        cuda_graph_config=with_phase(cfg.cuda_graph_config, Phase.PREFILL, backend=Backend.DISABLED),
    )


def validate(server_args, previous) -> None:
    """After SGLang's own validations: fail at start-up on what we cannot serve."""
    from sglang.srt.arg_groups.overrides import model_config_of, resolved_view
    from sglang.srt.configs.model_config import get_dsa_index_kpool, is_deepseek_dsa

    previous(server_args)
    view = resolved_view(server_args)
    if not _selected(view):
        return
    spec.check_attention_backends(*_backends(view))
    hf_config = model_config_of(view).hf_config
    spec.check_hf_config(hf_config, is_dsa=is_deepseek_dsa(hf_config), index_kpool=get_dsa_index_kpool(hf_config))
    spec.check_page_size(view.page_size)
    requested = server_args.page_size  # the command line's value; the view holds the resolved one
    if requested is not None and requested != view.page_size:
        logger.warning(
            "%s: --page-size %s is overridden to %s (DSA models page their KV and index-K caches in %s-token pages)",
            spec.BACKEND_NAME,
            requested,
            view.page_size,
            spec.PAGE_SIZE,
        )
    spec.check_kv_cache_dtype(view.kv_cache_dtype)
    spec.check_parallelism(
        dcp_size=view.dcp_size,
        attn_cp_size=view.attn_cp_size,
        two_batch_overlap=view.enable_two_batch_overlap,
    )
    _check_speculative(view, hf_config)
    if view.enable_hisparse:
        raise spec.UnsupportedConfiguration(f"{spec.BACKEND_NAME} does not support HiSparse; drop --enable-hisparse")


def _check_speculative(view, hf_config) -> None:
    """:func:`spec.check_speculative` on the resolved arguments and the draft checkpoint's config
    (SGLang has set the draft path by now: the model's own for its MTP layer, whose ``hf_config``
    the target's is, read once)."""
    from sglang.srt.configs.model_config import is_deepseek_dsa
    from sglang.srt.utils.hf_transformers_utils import get_config

    algorithm, draft_backend = view.speculative_algorithm, view.speculative_draft_attention_backend
    path, revision = view.speculative_draft_model_path, view.speculative_draft_model_revision
    architecture, is_dsa = None, True
    if algorithm is not None and draft_backend in (None, spec.BACKEND_NAME) and path:
        if (path, revision) == (view.model_path, view.revision):
            draft = hf_config
        else:
            draft = get_config(path, trust_remote_code=view.trust_remote_code, revision=revision)
        architecture, is_dsa = (getattr(draft, "architectures", None) or ["unknown"])[0], is_deepseek_dsa(draft)
    spec.check_speculative(
        algorithm,
        eagle_topk=view.speculative_eagle_topk,
        multi_layer_eagle=view.enable_multi_layer_eagle,
        draft_backend=draft_backend,
        draft_architecture=architecture,
        draft_is_dsa=is_dsa,
        draft_window_size=view.speculative_draft_window_size,
    )


def install() -> None:
    """Register the hooks once per process (cheap: the targets are already imported by SGLang's CLI)."""
    global _installed
    if _installed:
        return
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_DSA_SPLIT_BACKEND_PASS, skip_dsa_kernel_selection, HookType.AROUND)
    register_resolution_hook("disable_prefill_cuda_graph_for_deepseek_trtllm_mla")(disable_prefill_cuda_graph)
    register_resolution_hook("handle_other_validations")(validate)
    _installed = True
