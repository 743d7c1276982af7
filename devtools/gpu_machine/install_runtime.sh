#!/usr/bin/env bash
# On the GPU machine: collect the staged parts carried by this call, and once a tier
# has fully arrived, install it into a venv under /tmp. Resumable: run it in every
# call that carries parts; the store and the venv live as long as the machine stays
# warm (30 s after a call), so carry the parts in back-to-back calls.
#
#   bash devtools/gpu_machine/install_runtime.sh
#
# Each call carries .stage/e2e/MANIFEST.tsv and up to ~60 MiB of .stage/e2e/parts/*
# (made here by stage_runtime.sh), e.g. carry [".stage/e2e/MANIFEST.tsv",
# ".stage/e2e/parts/core.003"]. Parts are checked against the manifest's SHA-256
# on arrival and the joined tier again before it is unpacked. Once core is
# installed, later calls (the runs) need carry nothing: they only redo the
# editable install of this checkout.
#
# The venv ($E2E_VENV, default /tmp/e2e-venv) sees the image's packages after its
# own (a .pth file), so the staged torch 2.14.1 / sglang / ... shadow the image's
# torch 2.11 while numpy, the CUDA libraries and the rest come from the image. This
# checkout is linked into it with its sglang.srt.plugins entry point (link_checkout.py).
# After each install, serving_imports.py imports the serving path as a
# smoke test.
# Prints the venv's python for the following commands; exit status 0 once core works.
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGE=.stage/e2e
STORE=${E2E_STORE:-/tmp/e2e-store}
VENV=${E2E_VENV:-/tmp/e2e-venv}
BASE_PY=${PYTHON:-python3}

if [ -f "$STAGE/MANIFEST.tsv" ]; then
    $BASE_PY devtools/gpu_machine/stage_parts.py receive --stage "$STAGE" --store "$STORE"
    $BASE_PY devtools/gpu_machine/stage_parts.py status --stage "$STAGE" --store "$STORE" | tee "$STORE/status.txt"
elif [ ! -f "$VENV/.installed-core" ]; then
    echo "carry $STAGE/MANIFEST.tsv (and parts) until the core tier is installed" >&2
    exit 2
fi

complete() { grep -q "^$1: complete" "$STORE/status.txt" 2>/dev/null; }

make_venv() {
    [ -x "$VENV/bin/python" ] && return
    local image_site
    image_site=$($BASE_PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    $BASE_PY -m venv --without-pip "$VENV"
    echo "$image_site" >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_image_site.pth"
}

# Returns 0 when it installed the tier now, 1 when there is nothing to do; exits on a failure
# (errexit does not apply inside a function called from an `if`).
install_tier() {
    local tier=$1 wheels
    [ -f "$VENV/.installed-$tier" ] && return 1
    complete "$tier" || return 1
    wheels=$($BASE_PY devtools/gpu_machine/stage_parts.py assemble --stage "$STAGE" --store "$STORE" --tier "$tier") || exit 1
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --ignore-installed \
        --disable-pip-version-check "$wheels"/*.whl || exit 1
    touch "$VENV/.installed-$tier"
}

if ! complete core && [ ! -f "$VENV/.installed-core" ]; then
    echo "core not complete yet: carry the missing parts"
    exit 3
fi
make_venv
installed=0
for tier in core triton baselines cudalibs; do
    if install_tier "$tier"; then
        echo "installed tier $tier"
        installed=1
    fi
done
# The checkout may sit elsewhere in each call: link it (and its plugin entry point) again.
"$VENV/bin/python" devtools/gpu_machine/link_checkout.py
if [ $installed = 1 ] || [ "${E2E_SMOKE:-0}" = 1 ]; then
    "$VENV/bin/python" devtools/gpu_machine/serving_imports.py
fi
echo "E2E_PYTHON=$VENV/bin/python"
