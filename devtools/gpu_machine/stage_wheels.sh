#!/usr/bin/env bash
# Stage, on a machine with a package index, the wheels benchmarks/gpu_suite.sh
# installs on the GPU machine (CPython 3.12, x86_64, no index). Output: .stage/
# at the checkout's root (git-ignored; carry it with the GPU call).
#
#   bash devtools/gpu_machine/stage_wheels.sh
# About 36 MB.
#   .stage/tools   pytest and its two small dependencies
#   .stage/sgbase  sglang 0.5.23 minus its Rust extension .so files (not on any
#                  kernel import path) + what `import sglang.kernels.ops...` and
#                  `sglang.srt.layers.attention.dsa.utils` need beyond torch,
#                  triton, numpy and transformers (found by importing them in a
#                  venv holding only those)
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-python3 -m pip}
PLATFORMS="--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64"
get() { $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d "$@"; }

mkdir -p .stage/tools .stage/sgbase
get .stage/tools pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1

for p in orjson==3.13.0 pybase64==1.5.1 starlette==1.10.0 anyio==4.16.0 sniffio msgspec==0.22.0 \
    pyzmq==27.3.0 ipython==9.18.1 decorator jedi==0.20.1 parso==0.8.7 prompt_toolkit==3.0.53 \
    wcwidth==0.9.4 traitlets==5.16.1 stack-data==0.6.3 executing==2.3.0 asttokens==3.0.2 \
    pure_eval==0.2.4 pexpect==4.9.0 ptyprocess==0.7.0 matplotlib-inline==0.2.2 \
    ipython_pygments_lexers==1.1.1 Pygments==2.21.0 aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 \
    propcache==0.5.4 frozenlist==1.8.0 aiosignal==1.4.0 aiohappyeyeballs==2.7.1 attrs==26.1.0 \
    apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 dill==0.4.1; do
    get .stage/sgbase "$p"
done

tmp=$(mktemp -d)
get "$tmp" sglang==0.5.23
(cd "$tmp" && mkdir x && cd x && python3 -m zipfile -e ../sglang-0.5.23-*.whl . &&
    find . -name '*.so' -delete &&
    python3 -c "import shutil; shutil.make_archive('../sglang-trim', 'zip', '.', 'sglang')")
mv -f "$tmp/sglang-trim.zip" .stage/sgbase/
rm -rf "$tmp"
du -sh .stage
