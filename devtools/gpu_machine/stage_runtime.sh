#!/usr/bin/env bash
# Stage, on a machine with a package index, the CPython 3.12 / x86_64 wheels that
# serving a DSA model with SGLang 0.5.23 needs on the GPU machine (no index, a
# call carries <= 64 MiB, the image holds torch 2.11 / triton 3.6 / transformers
# 5.17, on which sglang-kernel 0.4.10's .so files do not load).
#
#   bash devtools/gpu_machine/stage_runtime.sh [TIER ...]      (default: core triton baselines)
#
# Tiers (install_runtime.sh installs each one that has fully arrived):
#   core       torch 2.14.1, sglang 0.5.23, sglang-kernel 0.4.10, flashinfer-python 0.7.2,
#              transformers 5.19.0, torchvision 0.29.1 (transformers imports it; the
#              image's 0.26 is built for torch 2.11) and the pure-Python packages the
#              serving path imports that the image lacks. The set was found by importing
#              serving_imports.py's modules here and mapping them to
#              distributions (`python devtools/gpu_machine/serving_imports.py --distributions`),
#              minus the image's packages (device KINDS.md) and minus what SGLang imports
#              only optionally (import succeeds with the package absent): flash-attn-4,
#              nvidia-cutlass-dsl*, cuda-tile, nvidia-cudnn-frontend, sgl-deep-ep,
#              torch_memory_saver, torchcodec, openai-harmony, mistral_common,
#              pydantic-extra-types/pycountry, watchfiles, zstandard.
#   triton     triton 3.8.0, torch 2.14.1's pin (without it the image's triton 3.6 runs
#              the kernels, as in the kernel benchmarks)
#   baselines  SGLang's own DSA kernels for the comparisons: sgl-flash-mla
#              (`--attention-backend dsa` on Hopper; DeepGEMM is in core), tilelang with
#              z3-solver and torch-c-dlpack-ext (SGLang's non-Hopper DSA fallback)
#   cudalibs   (not in the default list) NCCL 2.32.3 and nvshmem 3.4.5: libtorch_cuda.so of
#              torch 2.14.1 links NCCL entry points of NCCL >= 2.30 (ncclCommGrow,
#              ncclCommRevoke, the device API); carry it only when probe_image.py says the
#              image's libraries lack them (or import torch with TORCH_USE_RTLD_GLOBAL=1,
#              which binds lazily, if nothing calls them)
#
# Output under .stage/e2e/ (git-ignored): wheels/TIER/ (as downloaded), lzma/ (recompressed
# wheels, reused when a tier is staged again), parts/TIER.NNN
# (<= 48 MiB each, leaving the rest of a call's 64 MiB to the checkout: the tier's wheels
# recompressed with LZMA, tarred, split),
# MANIFEST.tsv (every part's bytes and SHA-256, and the joined tar's) and SIZES.txt.
# Carry MANIFEST.tsv and a few parts per GPU call (see install_runtime.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
STAGE=.stage/e2e
PLATFORMS=""
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 \
    manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    PLATFORMS="$PLATFORMS --platform ${tag}_x86_64"
done

CORE=(
    torch==2.14.1 sglang==0.5.23 sglang-kernel==0.4.10 flashinfer-python==0.7.2
    transformers==5.19.0 torchvision==0.29.1
    # the DSA Indexer's constructor imports deep_gemm on CUDA (resolve_num_sms), whatever the backend
    sgl-deep-gemm==0.2.3.post2
    # HTTP server and its schema
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    opentelemetry-api==1.45.2 orjson==3.13.0 pybase64==1.5.1
    # scheduler / tokenizer processes
    pyzmq==27.3.0 msgspec==0.22.0 setproctitle==1.3.8 apache-tvm-ffi==0.1.11
    # OpenAI-compatible entrypoints, function-call and grammar modules imported at start-up
    openai==2.8.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 partial-json-parser==0.2.1.1.post7
    xgrammar==0.2.7 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==2026.9.1
    # quantization modules imported by the model loader
    compressed-tensors==0.18.0 loguru==0.7.3 gguf==0.19.0
    # sglang.utils (IPython display helpers, imported by launch_server)
    ipython==9.18.1 ipython_pygments_lexers==1.1.1 jedi==0.20.1 parso==0.8.7
    prompt_toolkit==3.0.53 wcwidth==0.9.4 traitlets==5.16.1 stack-data==0.6.3 executing==2.3.0
    asttokens==3.0.2 pure_eval==0.2.4 pexpect==4.9.0 ptyprocess==0.7.0 matplotlib-inline==0.2.2
    # the OpenAI transcription entrypoint, which http_server imports unconditionally
    soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
    # sglang.bench_serving's dataset loaders
    datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1
)
TRITON=(triton==3.8.0)
BASELINES=(sgl-flash-mla==1.0.0 tilelang==0.1.12 z3-solver==4.15.4.0 torch-c-dlpack-ext==0.1.5)
CUDALIBS=(nvidia-nccl-cu13==2.32.3 nvidia-nvshmem-cu13==3.4.5)

download() {
    local tier=$1
    shift
    rm -rf "$STAGE/wheels/$tier"
    mkdir -p "$STAGE/wheels/$tier"
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $PLATFORMS -d "$STAGE/wheels/$tier" "$@"
}

for tier in ${*:-core triton baselines}; do
    case $tier in
    core) download core "${CORE[@]}" ;;
    triton) download triton "${TRITON[@]}" ;;
    baselines) download baselines "${BASELINES[@]}" ;;
    cudalibs) download cudalibs "${CUDALIBS[@]}" ;;
    *) echo "unknown tier $tier (core, triton, baselines, cudalibs)" >&2; exit 2 ;;
    esac
    $PY devtools/gpu_machine/stage_parts.py pack --tier "$tier" --wheels "$STAGE/wheels/$tier" --out "$STAGE" \
        --jobs "$(nproc)"
done
cat "$STAGE/SIZES.txt"
