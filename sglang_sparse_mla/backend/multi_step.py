"""Per-step backends of MTP (EAGLE / NextN) multi-step draft decoding.

SGLang's draft worker runs ``speculative_num_steps - 1`` decode steps of the
draft model, each through its own backend (``attn_backends[i]``), and
captures them in one CUDA graph. The batch keeps the verified ``seq_lens``
through the steps, so with chain drafts (``--speculative-eagle-topk 1``) step
``i`` is a decode of position ``seq_len + i``: a :class:`TritonSparseMLABackend`
told its ``speculative_step_id``.
"""

from __future__ import annotations

from sglang.srt.model_executor.forward_batch_info import ForwardMode, build_inner_fb_view

from .attention_backend import TritonSparseMLABackend


class TritonSparseMLAMultiStepBackend:
    """The container SGLang's draft worker expects of a multi-step draft backend."""

    needs_cpu_seq_lens = False

    def __init__(self, model_runner, topk: int, speculative_num_steps: int):
        self.topk = topk
        self.speculative_num_steps = speculative_num_steps
        self.attn_backends = [
            TritonSparseMLABackend(model_runner, speculative_step_id=step) for step in range(speculative_num_steps - 1)
        ]

    @staticmethod
    def _decode_view(forward_batch):
        return build_inner_fb_view(forward_batch, bs=forward_batch.batch_size, forward_mode=ForwardMode.DECODE)

    def init_forward_metadata(self, forward_batch) -> None:
        view = self._decode_view(forward_batch)
        for backend in self.attn_backends:
            backend.init_forward_metadata(view)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        for backend in self.attn_backends:
            backend.init_cuda_graph_state(max_bs, max_num_tokens)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        view = self._decode_view(forward_batch)
        for backend in self.attn_backends:
            backend.init_forward_metadata_out_graph(view, in_capture=in_capture)

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        view = self._decode_view(forward_batch)
        for backend in self.attn_backends:
            backend.init_forward_metadata_in_graph(view)
