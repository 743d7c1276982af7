"""Drive ``sglang.launch_server`` end to end: start it, send requests, compare outputs.

:mod:`.server` launches and stops the server process, :mod:`.client` speaks
its native ``/generate`` HTTP API (standard library only), :mod:`.workload`
builds the requests and judges the answers; :mod:`.decode_profile` and
:mod:`.layer_timeline` read SGLang's profiler traces of a served model;
:mod:`.e2e` runs our backend and SGLang's own DSA paths against each other
(configurations, work, comparisons; ``benchmarks/e2e/run_e2e.py`` is its
command line). Used by ``python -m sglang_sparse_mla.demo`` and the e2e runs.
"""
