"""Drive ``sglang.launch_server`` end to end: start it, send requests, compare outputs.

:mod:`.server` launches and stops the server process, :mod:`.client` speaks
its native ``/generate`` HTTP API (standard library only), :mod:`.workload`
builds the requests and judges the answers; :mod:`.decode_profile` and
:mod:`.layer_timeline` read SGLang's profiler traces of a served model. Used
by ``python -m sglang_sparse_mla.demo`` and ``benchmarks/e2e/run_e2e.py``.
"""
