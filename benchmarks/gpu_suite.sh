#!/usr/bin/env bash
# The whole GPU check in one go, for a CUDA machine with torch + triton and no
# package index (the project's H100 test machine):
#
#   bash benchmarks/gpu_suite.sh [STEP ...]      STEP: env baselines test sweep sweep-gluon bench bench-before
#                                                      indexer-sweep indexer indexer-before profile
#
# (no STEP = env baselines test bench indexer profile). SWEEP_ARGS adds bench_sparse_mla.py options to
# sweep and sweep-gluon (the Gluon SM80-class candidates, e.g. "--kv fp8,bf16 --heads 16,128"). INDEXER_ARGS adds bench_indexer.py options
# (e.g. "--sections paged,topk --graph-only"), BENCH_ARGS bench_sparse_mla.py's (e.g. "--kv fp8
# --heads 16,128 --tokens 32,128 --no-baselines"), and TAG suffixes the output names (e.g. _forced_sm80
# for a run under SGLANG_SPARSE_MLA_FORCE_SM80=1; the profile's too). indexer-before and bench-before time
# the same benchmark against an earlier state of the package in the same call: BEFORE_TAR, a
# `git archive REV sglang_sparse_mla` tar carried with the call (outputs indexer_before$TAG.*,
# sparse_mla_before$TAG.*). Wheels it needs come from .stage/ in the
# checkout (made by `bash devtools/gpu_machine/stage_wheels.sh`, carried to the
# machine): pytest if missing, and SGLang 0.5.23's kernels for the baselines
# (the sglang wheel without its Rust .so files, plus the pure-Python packages
# its import chain needs). Results go to $OUT (or benchmarks/results/run/),
# the short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${OUT:-$ROOT/benchmarks/results/run}
mkdir -p "$RESULTS"
STEPS=${*:-env baselines test bench indexer profile}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SGBASE=/tmp/sglang-baseline
status=0

log() { printf '\n=== %s ===\n' "$*"; }

# before SCRIPT NAME ARGS...: benchmarks/SCRIPT run on the package in $BEFORE_TAR, results to NAME_before$TAG.*
before() {
    local script=$1 name=$2 tree=/tmp/before-tree
    shift 2
    log "$name benchmark, earlier package ($BEFORE_TAR)"
    ensure_sglang_baseline && export PYTHONPATH=$PYTHONPATH:$SGBASE
    rm -rf $tree && mkdir -p $tree && tar -xf "$BEFORE_TAR" -C $tree && cp -r benchmarks $tree/ &&
        PYTHONPATH=$tree:$PYTHONPATH $PY $tree/benchmarks/$script "$@" --out "$RESULTS/${name}_before${TAG:-}.json" \
            > "$RESULTS/${name}_before${TAG:-}.txt" 2>&1 || status=1
}

ensure_pytest() {
    $PY -c "import pytest" 2>/dev/null && return
    $PY -m pip install -q --no-index --no-deps --target /tmp/test-tools .stage/tools/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/test-tools
}

ensure_sglang_baseline() {
    [ -d "$SGBASE/sglang" ] && return 0
    [ -f .stage/sgbase/sglang-trim.zip ] || { echo "no .stage/sgbase: SGLang baselines unavailable"; return 1; }
    $PY -m pip install -q --no-index --no-deps --target "$SGBASE" .stage/sgbase/*.whl &&
        $PY -c "import zipfile,sys; zipfile.ZipFile('.stage/sgbase/sglang-trim.zip').extractall(sys.argv[1])" "$SGBASE"
}

for step in $STEPS; do
    case $step in
    env)
        log env
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
        $PY -c "import torch, triton; p=torch.cuda.get_device_properties(0); print('torch', torch.__version__, 'triton', triton.__version__, p.name, 'sm%d%d'%(p.major,p.minor), p.multi_processor_count, 'SMs', p.L2_cache_size>>20, 'MB L2')"
        ;;
    test)
        log "GPU tests (native, then the forced SM80 path)"
        ensure_pytest
        $PY -m pytest -q ${PYTEST_ARGS:--x} ${TESTS:-tests/kernels} -p no:cacheprovider 2>&1 | tee "$RESULTS/pytest_gpu.log" | tail -15 || status=1
        ;;
    baselines)
        log "SGLang baseline imports"
        ensure_sglang_baseline &&
            PYTHONPATH=$PYTHONPATH:$SGBASE $PY -c "
import sys; sys.path.insert(0, 'benchmarks'); import sglang_baselines as b
missing = [why for fn, why in (b.sparse_mla_decode(), b.sparse_mla_prefill(), b.fp8_mqa_logits_torch(), b.fp8_paged_mqa_logits_torch()) if fn is None]
print('sglang', b.sglang_version(), 'baselines:', 'all importable' if not missing else missing)
sys.exit(1 if missing else 0)" || status=1
        ;;
    sweep)
        log "sparse MLA config sweep"
        $PY benchmarks/bench_sparse_mla.py --sweep ${SWEEP_ARGS:-} --out "$RESULTS/sparse_mla_sweep.json" > "$RESULTS/sparse_mla_sweep.txt" 2>&1 || status=1
        cat "$RESULTS/sparse_mla_sweep.txt"
        ;;
    sweep-gluon)
        log "Gluon SM80-class sparse MLA candidates"
        $PY benchmarks/bench_sparse_mla.py --sweep-gluon ${SWEEP_ARGS:-} --out "$RESULTS/sweep_gluon${TAG:-}.json" \
            > "$RESULTS/sweep_gluon${TAG:-}.txt" 2>&1 || status=1
        cat "$RESULTS/sweep_gluon${TAG:-}.txt"
        ;;
    bench)
        log "sparse MLA benchmark"
        ensure_sglang_baseline && export PYTHONPATH=$PYTHONPATH:$SGBASE
        $PY benchmarks/bench_sparse_mla.py ${BENCH_ARGS:-} --out "$RESULTS/sparse_mla${TAG:-}.json" \
            > "$RESULTS/sparse_mla${TAG:-}.txt" 2>&1 || status=1
        ;;
    bench-before) before bench_sparse_mla.py sparse_mla ${BENCH_ARGS:-} ;;
    indexer-sweep)
        log "indexer config sweep"
        $PY benchmarks/bench_indexer.py --sweep --out "$RESULTS/indexer_sweep.json" > "$RESULTS/indexer_sweep.txt" 2>&1 || status=1
        cat "$RESULTS/indexer_sweep.txt"
        ;;
    profile)
        log "one layer's decode step, by kernel"
        $PY benchmarks/profile_decode_layer.py --out "$RESULTS/profile_decode_layer${TAG:-}.json" \
            > "$RESULTS/profile_decode_layer${TAG:-}.txt" 2>&1 || status=1
        tail -4 "$RESULTS/profile_decode_layer${TAG:-}.txt"
        ;;
    indexer)
        log "indexer benchmark"
        ensure_sglang_baseline && export PYTHONPATH=$PYTHONPATH:$SGBASE
        $PY benchmarks/bench_indexer.py ${INDEXER_ARGS:-} --out "$RESULTS/indexer${TAG:-}.json" \
            > "$RESULTS/indexer${TAG:-}.txt" 2>&1 || status=1
        ;;
    indexer-before) before bench_indexer.py indexer ${INDEXER_ARGS:-} ;;
    *) echo "unknown step $step"; exit 2 ;;
    esac
done

log "summary"
for f in "$RESULTS"/sparse_mla${TAG:-}.txt "$RESULTS"/indexer${TAG:-}.txt; do
    [ -f "$f" ] && cat "$f"
done
exit $status
