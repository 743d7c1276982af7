"""End-to-end GPU runs: the tiny DSA model served by SGLang, our backend against SGLang's own.

    python benchmarks/e2e/run_e2e.py --out DIR [--configs ours,ours-no-radix,...] [--arch glm-5] [--shape released]
    python benchmarks/e2e/run_e2e.py --out DIR --configs none --merge A.json B.json   (summary only, any machine)

The configurations, work and comparisons live in :mod:`sglang_sparse_mla.testing.serving.e2e`
(its docstring describes them; the tests import it); this is their command line.
"""

from sglang_sparse_mla.testing.serving.e2e import main

if __name__ == "__main__":
    main()
