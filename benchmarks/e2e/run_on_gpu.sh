#!/usr/bin/env bash
# On the GPU machine, once devtools/gpu_machine/install_runtime.sh has installed the
# core tier: the end-to-end jobs in one call, results to $OUT (or benchmarks/results/e2e-run/).
#
#   bash benchmarks/e2e/run_on_gpu.sh JOB ...
#
# JOB: demo or demo-ARCH (the README main job: serve the tiny model, send requests;
# at --mem-fraction-static 0.35, so it can share a GPU; DEMO_ARGS adds demo options), tests (the GPU test suite
# under the staged runtime: TESTS, default tests/; PYTEST_ARGS, default -x), kits (SGLang's server test
# kits against servers of our backend, tests/test_server_kits.py: 6 servers, about 10 minutes, so split
# over two calls by TESTS node ids, e.g. TESTS="tests/test_server_kits.py::TestServerKits ..."), bench
# (the kernel benchmarks with SGLang's SM90 kernels, FlashMLA and DeepGEMM, beside), indexer
# (bench_indexer.py alone, native then forced SM80, beside DeepGEMM's logits and sgl-kernel's
# top-k, which load only in the staged runtime; INDEXER_ARGS as gpu_suite.sh), or a
# comma-separated list of run_e2e.py configurations (e.g. ours,ours-no-radix;
# E2E_ARGS adds run_e2e.py options, e.g. "--shape released" with its own E2E_WORK).
# Jobs run one after another; gpuN:JOB+JOB... starts a lane at once in the
# background on GPU N alone (CUDA_VISIBLE_DEVICES=N) that runs its jobs in order
# (output in lane-gpuN.txt, its tail printed at the end); the call waits for every
# lane. run_e2e.py results accumulate in $E2E_WORK (default /tmp/e2e) over calls
# of a warm machine and over concurrent jobs; each call copies results.json,
# summary.json, the server logs (logs.tgz) and the profiler traces (traces.tar) to
# the results folder. Servers left
# running by an earlier call that ran out of time are stopped first.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${OUT:-$PWD/benchmarks/results/e2e-run}
WORK=${E2E_WORK:-/tmp/e2e}
mkdir -p "$RESULTS" "$WORK"
bash devtools/gpu_machine/install_runtime.sh >"$RESULTS/install.txt" 2>&1 || { cat "$RESULTS/install.txt"; exit 1; }
PY=${E2E_VENV:-/tmp/e2e-venv}/bin/python
export PYTHONUNBUFFERED=1
pkill -f sglang.launch_server && sleep 5

run_job() {
    case $1 in
    demo | demo-*)
        local arch=${1#demo}
        $PY -m sglang_sparse_mla.demo ${arch:+--arch ${arch#-}} --server-arg=--mem-fraction-static=0.35 \
            --server-log "$RESULTS/$1.server.log" ${DEMO_ARGS:-} 2>&1 |
            tee "$RESULTS/$1.txt" ;;
    tests) OUT=$RESULTS PYTHON=$PY TESTS=${TESTS:-tests} bash benchmarks/gpu_suite.sh env test ;;
    kits)
        SGLANG_SPARSE_MLA_SERVER_KITS=1 OUT=$RESULTS PYTHON=$PY TESTS=${TESTS:-tests/test_server_kits.py} \
            PYTEST_ARGS="${PYTEST_ARGS:--rs}" bash benchmarks/gpu_suite.sh test ;;
    bench) OUT=$RESULTS PYTHON=$PY bash benchmarks/gpu_suite.sh env bench indexer ;;
    indexer)
        OUT=$RESULTS PYTHON=$PY bash benchmarks/gpu_suite.sh env indexer &&
            SGLANG_SPARSE_MLA_FORCE_SM80=1 TAG=_forced_sm80 OUT=$RESULTS PYTHON=$PY bash benchmarks/gpu_suite.sh indexer ;;
    *) $PY benchmarks/e2e/run_e2e.py --out "$WORK" --configs "$1" ${E2E_ARGS:-} 2>&1 | tee -a "$RESULTS/e2e.txt" ;;
    esac
}

# JOB+JOB...: the jobs in order, each under a header; fails if one failed.
run_jobs() {
    local job jobs failed=0
    IFS=+ read -ra jobs <<<"$1"
    for job in "${jobs[@]}"; do
        printf '\n=== %s (%s) ===\n' "$job" "$(date +%T)"
        run_job "$job" || failed=1
    done
    return $failed
}

status=0
lanes=()
for job in "$@"; do
    if [[ $job =~ ^gpu([0-9]+):(.+)$ ]]; then
        gpu=${BASH_REMATCH[1]}
        printf '\n=== %s on GPU %s, in the background (%s) ===\n' "${BASH_REMATCH[2]}" "$gpu" "$(date +%T)"
        (CUDA_VISIBLE_DEVICES=$gpu run_jobs "${BASH_REMATCH[2]}") >"$RESULTS/lane-gpu$gpu.txt" 2>&1 &
        lanes+=("$!:$gpu")
    else
        run_jobs "$job" || status=1
    fi
done
for lane in "${lanes[@]}"; do
    wait "${lane%%:*}" || status=1
    printf '\n=== background job on GPU %s ended (%s) ===\n' "${lane#*:}" "$(date +%T)"
    tail -40 "$RESULTS/lane-gpu${lane#*:}.txt"
done
if [ -f "$WORK/results.json" ]; then
    cp "$WORK/results.json" "$WORK/summary.json" "$RESULTS/"
    tar czf "$RESULTS/logs.tgz" -C "$WORK" logs
    [ -d "$WORK/traces" ] && tar cf "$RESULTS/traces.tar" -C "$WORK" traces # already gzipped
fi
if [ -n "${OUT:-}" ]; then # the device returns at most 8 files: the text outputs travel as one archive
    (cd "$RESULTS" && tar czf text.tgz --remove-files -- *.txt *.log 2>/dev/null)
fi
exit $status
