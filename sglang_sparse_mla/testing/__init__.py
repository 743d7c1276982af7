"""The test and benchmark harness (as ``sglang.test`` is SGLang's): not part of the backend.

:mod:`.tiny_model` and :mod:`.tiny_tokenizer` write seeded tiny DSA
checkpoints, :mod:`.chain_check` runs one layer's attention chain against the
float64 references, :mod:`.dsa_layer` holds pure-torch stand-ins for SGLang's
indexer module, and :mod:`.serving` drives ``sglang.launch_server`` end to end
(and profiles it). Used by ``python -m sglang_sparse_mla.demo``, ``tests/``
and ``benchmarks/``.
"""
