#!/usr/bin/env bash
# On the GPU machine, once install_runtime.sh has installed the core tier: the
# end-to-end jobs in one call, results to $OUT (or benchmarks/results/e2e-run/).
#
#   bash benchmarks/e2e/run_on_gpu.sh JOB ...
#
# JOB: demo (the README main job: serve the tiny models, send requests),
# tests (the GPU test suite under the staged runtime: TESTS, default tests/),
# or a comma-separated list of run_e2e.py configurations (e.g. ours,ours-no-radix).
# run_e2e.py results accumulate in $E2E_WORK (default /tmp/e2e) over calls of a
# warm machine; each call copies results.json, summary.json and the server logs
# (logs.tgz) to the results folder.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${OUT:-$PWD/benchmarks/results/e2e-run}
WORK=${E2E_WORK:-/tmp/e2e}
mkdir -p "$RESULTS" "$WORK"
bash benchmarks/e2e/install_runtime.sh >"$RESULTS/install.txt" 2>&1 || { cat "$RESULTS/install.txt"; exit 1; }
PY=${E2E_VENV:-/tmp/e2e-venv}/bin/python
export PYTHONUNBUFFERED=1
status=0
for job in "$@"; do
    printf '\n=== %s (%s) ===\n' "$job" "$(date +%T)"
    case $job in
    demo) $PY -m sglang_sparse_mla.demo 2>&1 | tee "$RESULTS/demo.txt" || status=1 ;;
    tests) OUT=$RESULTS PYTHON=$PY TESTS=${TESTS:-tests} bash benchmarks/gpu_suite.sh env test || status=1 ;;
    *) $PY benchmarks/e2e/run_e2e.py --out "$WORK" --configs "$job" 2>&1 | tee -a "$RESULTS/e2e.txt" || status=1 ;;
    esac
done
if [ -f "$WORK/results.json" ]; then
    cp "$WORK/results.json" "$WORK/summary.json" "$RESULTS/"
    tar czf "$RESULTS/logs.tgz" -C "$WORK" logs
fi
exit $status
