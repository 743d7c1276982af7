"""End-to-end GPU runs: the tiny DSA model served by SGLang, our backend against SGLang's own.

The logic of ``benchmarks/e2e/run_e2e.py`` (its command line is :func:`main`), here so
that tests import it:

    python benchmarks/e2e/run_e2e.py --out DIR [--configs ours,ours-no-radix,...] [--arch glm-5] [--shape released]
    python benchmarks/e2e/run_e2e.py --out DIR --configs none --merge A.json B.json   (summary only, any machine)

Each configuration is one ``python -m sglang.launch_server`` (CUDA graphs on,
captured up to the work's largest batch, 32) of the tiny model
(:mod:`sglang_sparse_mla.testing.tiny_model`, written once to DIR; ``--shape released``:
the architecture's released attention shapes, 128 heads for DeepSeek-V3.2 and 64 for GLM-5,
index_topk 2048, with long prompts; ``--shape released-tp8``: the same at one TP-8 rank's 16
or 8 heads) that runs
the work its comparisons need, then stops. One DIR holds the results of one model.
Results accumulate in DIR/results.json (so runs can be split over several calls
of a warm machine, run by several processes at once, e.g. one per GPU with CUDA_VISIBLE_DEVICES, or merged from
several files with --merge); DIR/summary.json and the printed summary compare
whatever configurations are there; --work runs only some steps of each (a
configuration's result is replaced whole). Server logs go to DIR/logs/; a
failed start is recorded with its log tail and the next configuration runs.
Each server takes --mem-fraction-static 0.35, so two fit on one GPU.

Configurations (make_configs):
  ours           --attention-backend triton_sparse_mla, BF16 KV
  ours-fp8       the same with --kv-cache-dtype fp8_e4m3
  ours-no-radix  the same with --disable-radix-cache
  ours-det       ours with --enable-deterministic-inference (batch-invariant kernels)
  ours-det-no-radix  the same with --disable-radix-cache
  ours-tp2       ours with --tp 2, FlashInfer all-reduce fusion off (skipped with fewer than 2 GPUs)
  ours-triton    ours with SGLANG_SPARSE_MLA_WARP_SPECIALIZED=0: an SM90 GPU keeps the Triton
                 sparse MLA kernel instead of the warp-specialized Gluon one (throughput, profile)
  ours-sm80      ours with SGLANG_SPARSE_MLA_FORCE_SM80=1: the kernels, configs and dispatch an
                 A100 / RTX / DGX Spark runs (no wgmma, TMA or warp specialization), on this GPU
  ours-sm80-fp8  the same with --kv-cache-dtype fp8_e4m3
  ours-sm80-det  ours-sm80 with --enable-deterministic-inference, and ours-sm80-det-no-radix
  ours-mtp       ours with MTP speculative decoding, SGLang's flags for DSA models (--speculative-algorithm
                 NEXTN, 3 steps, EAGLE top-k 1, 4 draft tokens: the model's own MTP layer drafts a chain);
                 ours-mtp-fp8, ours-sm80-mtp, ours-sm80-mtp-fp8 the same on those paths, and
                 ours-det-mtp / ours-sm80-det-mtp in deterministic mode
  ours-storm     ours in deterministic mode with the storm's server arguments (STORM), and
                 ours-fp8-storm, ours-sm80-storm
  dsa            --attention-backend dsa: SGLang's Hopper path (FlashMLA sparse
                 prefill, FA3 decode, DeepGEMM indexer logits; with the small
                 shape the torch top-k, as sgl-kernel's asserts index_topk 2048)
  dsa-no-radix   the same with --disable-radix-cache
  dsa-fp8        the same with --kv-cache-dtype fp8_e4m3 (FlashMLA FP8 KV)
  dsa-mtp        dsa with the MTP flags of ours-mtp
  fallback       SGLang's path for GPUs without FlashMLA/DeepGEMM: --attention-backend
                 dsa --dsa-{prefill,decode}-backend tilelang, indexer logits in torch
                 (SGLANG_FP8_PAGED_MQA_LOGITS_TORCH=1); decode graphs of batch 1, 8, 32 only
                 (FALLBACK_GRAPH_BATCHES: its kernels compile during capture)

Work (WORK; lengths of the small shape, the released one's in WORKLOADS):
  radix       the shared prefix cached, then a batch of 8 requests sharing it plus 4
              unrelated ones (greedy, top-2 logprobs)
  one_by_one  the same 12 requests one at a time
  teacher     teacher-forced per-token logprobs of 4 fixed token sequences (300..4000)
  greedy      128 greedy tokens (top-2 logprobs) of 4 fixed prompts (100..3000 tokens)
  soak        32 requests x 3000 decode steps (ignore EOS): every logprob finite
  storm       the overload and fault soak of testing/serving/storm.py (about 3 minutes of 192
              clients: shared prefixes, context-limit prompts, aborts, hang-ups, malformed and
              over-long requests against a small KV pool; then drain, health, KV gauge, server
              log and a deterministic control set replayed bit for bit)
  throughput  concurrency 1, 8, 32: 4 x concurrency (>= 8) streamed requests of 1024 + 256
              tokens: output tokens/s, TTFT p50/p90, per-request decode tokens/s
  profile     batches of 1 and 32 throughput-length requests decoding: GPU kernel time of
              20 decode steps, by kernel and by stream, busy time and span, the typical
              layer's timeline (testing/serving/layer_timeline.py); then one
              throughput-length prompt's prefill (SGLang's torch profiler;
              testing/serving/decode_profile.py); traces kept in DIR/traces/CONFIG/

Comparisons (summary): greedy output with MTP vs without (the same backend and path;
pass/fail for ours-det-mtp and ours-sm80-det-mtp, which must be bit-identical to
ours-det / ours-sm80-det), MTP accept lengths (output tokens per verify step);
radix batch vs the same backend's no-radix one by one
(greedy agreement, near-tie rule of sglang_sparse_mla.testing.serving.workload, and the
logprob drift before any difference; pass/fail only for ours-det and ours-sm80-det,
which must be bit-identical); teacher-forced and greedy logprobs of ours and
ours-sm80 vs dsa and vs fallback, ours-fp8 vs dsa-fp8 and ours-tp2 vs ours
(teacher-forced judged against SGLang's own spread, fallback vs dsa: see
LOGPROB_PAIRS), ours-fp8 vs ours, ours-sm80-fp8 vs ours-sm80 and fallback vs dsa
(reported); soak non-finite count; storm pass/fail (storm.storm_ok); throughput and TTFT tables.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from sglang_sparse_mla.testing.serving.client import Completion, flush_cache, generate, stream_generate
from sglang_sparse_mla.testing.serving.decode_profile import profile_decode, profile_prefill, read_trace
from sglang_sparse_mla.testing.serving.layer_timeline import layer_timeline, per_layer_anchor
from sglang_sparse_mla.testing.serving.server import Server, ServerError
from sglang_sparse_mla.testing.serving.storm import StormPlan, run_storm, storm_ok
from sglang_sparse_mla.testing.serving.workload import (
    DEFAULT_TIE_MARGIN,
    bit_identical,
    compare_greedy,
    logprob_difference,
    shared_prefix_prompts,
    token_prompts,
    unrelated_prompts,
)
from sglang_sparse_mla.testing.tiny_model import ARCHITECTURES, SHAPES, tiny_config, write_tiny_model

# Every launch: CUDA graphs for the batch sizes the work reaches (its largest batch is 32),
# and a static memory share that lets two servers run on one GPU.
COMMON = ("--cuda-graph-max-bs-decode", "32", "--mem-fraction-static", "0.35")
OURS = ("--attention-backend", "triton_sparse_mla")
# SGLang's sgl-kernel top-k asserts index_topk == 2048, so with the small shape (256) its
# DSA paths take the torch top-k; prefill CUDA graphs are off as in ours.
SGL_KERNEL_TOPK = 2048


def dsa_launch(index_topk: int) -> tuple[tuple[str, ...], dict[str, str]]:
    """Arguments and environment of SGLang's own DSA backend for a model's ``index_topk``."""
    args = ("--attention-backend", "dsa", "--disable-prefill-cuda-graph")
    if index_topk == SGL_KERNEL_TOPK:
        return args, {}
    return (*args, "--dsa-topk-backend", "torch"), {"SGLANG_DSA_FUSE_TOPK": "false"}


# The fallback's tilelang kernels compile while its decode CUDA graphs are captured: batch 32
# alone took 169 s (H200, 16 layers, 2026-12-07), so a 240 s start timed out mid-capture. It
# captures only the batch sizes its work decodes at (the throughput levels, whose requests all
# end together, and the profiled batches; the greedy batch of 4 pads to 8), not SGLang's 8 sizes
# up to 32. Its compiled kernels go to SGLang's cache (SGLANG_CACHE_DIR, tilelang/), so a start
# cut short by a device call's limit should leave the next call's start less to compile.
FALLBACK_STARTUP_S = 900.0
FALLBACK_GRAPH_BATCHES = (1, 8, 32)
FP8 = ("--kv-cache-dtype", "fp8_e4m3")
# MTP as SGLang documents it for DeepSeek-V3.2 / GLM-5: the checkpoint's NextN layer drafts a
# chain of 3 tokens, verified with the one after it (4 draft tokens a step).
MTP = (
    "--speculative-algorithm", "NEXTN", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
    "--speculative-num-draft-tokens", "4",
)  # fmt: skip
NO_RADIX = ("--disable-radix-cache",)
DETERMINISTIC = ("--enable-deterministic-inference",)
# The storm's server: a KV pool far below its load (the radix cache evicts, decoding requests
# are retracted), small prefill chunks, up to 256 requests running, the KV gauge on /metrics;
# deterministic, so its control set replays bit for bit; a pool leak stops the server.
STORM = (
    *DETERMINISTIC, "--max-total-tokens", "65536", "--chunked-prefill-size", "1024",
    "--max-running-requests", "256", "--enable-metrics",
)  # fmt: skip
STRICT_MEMORY_CHECK = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
# NVLink multicast stays off for multi-GPU runs (the shared test hosts require it; SGLang's
# default leaves it off too): NCCL NVLS, PyTorch symmetric memory, NVSHMEM.
# The path of GPUs without Hopper's instructions, forced on this one.
FORCE_SM80 = {"SGLANG_SPARSE_MLA_FORCE_SM80": "1"}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Config:
    """One server launch: its arguments, environment, work, GPUs and required modules."""

    args: tuple[str, ...]
    work: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 1
    modules: tuple[str, ...] = ()
    min_startup_s: float = 0.0  # at least this long to start, whatever --startup-timeout says


def make_configs(index_topk: int) -> dict[str, Config]:
    """The configurations of the module docstring for a model's ``index_topk``."""
    dsa, dsa_env = dsa_launch(index_topk)
    return {
        "ours": Config(OURS, ("radix", "teacher", "greedy", "soak", "throughput", "profile")),
        "ours-no-radix": Config((*OURS, *NO_RADIX), ("one_by_one",)),
        "ours-det": Config((*OURS, *DETERMINISTIC), ("radix", "greedy")),
        "ours-det-no-radix": Config((*OURS, *DETERMINISTIC, *NO_RADIX), ("one_by_one",)),
        "ours-fp8": Config((*OURS, *FP8), ("teacher", "greedy", "throughput", "profile")),
        # FlashInfer's all-reduce fusion (auto-enabled for DeepSeek at TP > 1, unrelated to attention)
        # is off: the first TP-2 start stalled right after setting up its workspaces.
        "ours-tp2": Config(
            (*OURS, "--tp", "2", "--enforce-disable-flashinfer-allreduce-fusion"),
            ("teacher", "greedy"),
            env=NO_MULTICAST,
            gpus=2,
        ),
        "ours-triton": Config(OURS, ("throughput", "profile"), env={"SGLANG_SPARSE_MLA_WARP_SPECIALIZED": "0"}),
        "ours-sm80": Config(OURS, ("radix", "teacher", "greedy", "soak", "throughput", "profile"), env=FORCE_SM80),
        "ours-sm80-fp8": Config((*OURS, *FP8), ("teacher", "greedy", "throughput", "profile"), env=FORCE_SM80),
        "ours-sm80-det": Config((*OURS, *DETERMINISTIC), ("radix", "greedy"), env=FORCE_SM80),
        "ours-sm80-det-no-radix": Config((*OURS, *DETERMINISTIC, *NO_RADIX), ("one_by_one",), env=FORCE_SM80),
        "ours-mtp": Config((*OURS, *MTP), ("greedy", "throughput")),
        "ours-mtp-fp8": Config((*OURS, *MTP, *FP8), ("greedy", "throughput")),
        "ours-det-mtp": Config((*OURS, *MTP, *DETERMINISTIC), ("greedy",)),
        "ours-sm80-mtp": Config((*OURS, *MTP), ("greedy", "throughput"), env=FORCE_SM80),
        "ours-sm80-mtp-fp8": Config((*OURS, *MTP, *FP8), ("greedy", "throughput"), env=FORCE_SM80),
        "ours-sm80-det-mtp": Config((*OURS, *MTP, *DETERMINISTIC), ("greedy",), env=FORCE_SM80),
        "ours-storm": Config((*OURS, *STORM), ("storm",), env=STRICT_MEMORY_CHECK),
        "ours-fp8-storm": Config((*OURS, *STORM, *FP8), ("storm",), env=STRICT_MEMORY_CHECK),
        "ours-sm80-storm": Config((*OURS, *STORM), ("storm",), env={**FORCE_SM80, **STRICT_MEMORY_CHECK}),
        "dsa": Config(
            dsa, ("radix", "teacher", "greedy", "throughput", "profile"), env=dsa_env, modules=("flash_mla",)
        ),
        "dsa-no-radix": Config((*dsa, *NO_RADIX), ("one_by_one",), env=dsa_env, modules=("flash_mla",)),
        "dsa-fp8": Config((*dsa, *FP8), ("teacher", "greedy"), env=dsa_env, modules=("flash_mla",)),
        "dsa-mtp": Config((*dsa, *MTP), ("greedy", "throughput"), env=dsa_env, modules=("flash_mla",)),
        "fallback": Config(
            (
                *dsa, "--dsa-prefill-backend", "tilelang", "--dsa-decode-backend", "tilelang",
                "--cuda-graph-bs-decode", *map(str, FALLBACK_GRAPH_BATCHES),
            ),  # fmt: skip
            ("teacher", "greedy", "throughput", "profile"),
            env={**dsa_env, "SGLANG_FP8_PAGED_MQA_LOGITS_TORCH": "1"},
            modules=("tilelang",),
            min_startup_s=FALLBACK_STARTUP_S,
        ),
    }


CONFIG_NAMES = tuple(make_configs(SGL_KERNEL_TOPK))
# (a, b, judged): teacher-forced and greedy logprobs compared between configurations.
# A random-weight model amplifies rounding (near-tied top-k index scores and MoE routing),
# so two correct paths drift apart with sequence length and
# their greedy outputs part within a few tokens: SGLang's own Hopper and fallback paths do.
# A judged pair is held to that spread, SPREAD_PAIR measured in the same run, per region
# (dense: positions that see at most index_topk tokens; sparse: the rest), within
# --max-spread-ratio; without SPREAD_PAIR it is reported only.
SPREAD_PAIR = ("fallback", "dsa")
LOGPROB_PAIRS = (
    ("ours", "dsa", True),
    ("ours", "fallback", True),
    ("ours-fp8", "dsa-fp8", True),
    ("ours-tp2", "ours", True),
    ("ours-fp8", "ours", False),
    ("ours-sm80", "dsa", True),
    ("ours-sm80", "fallback", True),
    ("ours-sm80-fp8", "ours-sm80", False),
    (*SPREAD_PAIR, False),
)
# (backend, exact): the radix batch against the same requests one by one with the radix
# cache off. Only batch-invariant numerics (--enable-deterministic-inference) make that
# bit-exact: by default a token's rounding depends on the batch it runs in (split-KV
# counts, GEMM tilings), and with the chaotic random-weight tiny model the
# drift can flip a greedy token; those pairs are reported, not judged.
RADIX_PAIRS = (("ours", False), ("dsa", False), ("ours-det", True), ("ours-sm80-det", True))
# (with MTP, without, exact): greedy output of the same backend and path with speculative
# decoding and without. Speculation must not change what the target model outputs; in
# deterministic mode that is bit for bit (tokens and logprobs), otherwise the verify's batch
# shape changes the rounding like any batch does, and the pair is reported.
MTP_PAIRS = (
    ("ours-det-mtp", "ours-det", True),
    ("ours-sm80-det-mtp", "ours-sm80-det", True),
    ("ours-mtp", "ours", False),
    ("ours-sm80-mtp", "ours-sm80", False),
    ("dsa-mtp", "dsa", False),
)

RADIX_TOKENS = 48
SOAK_REQUESTS, SOAK_STEPS = 32, 3000
CONCURRENCY = (1, 8, 32)
PROFILE_BATCHES, PROFILE_STEPS = (1, 32), 20
# Decode tokens per profiled request: the batch must still be whole when the profile starts
# (after the last request's first token) and ends.
PROFILE_DECODE_TOKENS = 2048


@dataclass(frozen=True)
class Workload:
    """Sequence lengths of the teacher, greedy and throughput work for one model shape."""

    teacher_lengths: tuple[int, ...]
    greedy_lengths: tuple[int, ...]
    greedy_tokens: int
    input_tokens: int
    output_tokens: int
    waves: int  # throughput requests per concurrency level: max(min_requests, waves * concurrency)
    min_requests: int

    def requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.waves * concurrency)


# Every shape reaches well past index_topk (256 small, 2048 released: greedy to 6x it); the
# released shapes' prompts are long enough for attention and the indexer to dominate a decode step.
_RELEASED_WORKLOAD = Workload((1000, 4000, 8000), (1000, 4000, 12000), 64, 8192, 256, 1, 4)
WORKLOADS = {
    "small": Workload((300, 1000, 2000, 4000), (100, 600, 1500, 3000), 128, 1024, 256, 4, 8),
    "released": _RELEASED_WORKLOAD,
    "released-tp8": _RELEASED_WORKLOAD,
}


def radix_prompts() -> list[str]:
    return shared_prefix_prompts(8) + unrelated_prompts()


def run_radix(url: str, workload: Workload) -> dict:
    prompts = radix_prompts()
    generate(url, prompts[:1], 1)  # the shared prefix enters the radix cache
    batch = generate(url, prompts, RADIX_TOKENS)
    return {"completions": [c.to_json() for c in batch]}


def run_one_by_one(url: str, workload: Workload) -> dict:
    completions = []
    for prompt in radix_prompts():
        flush_cache(url)
        completions += generate(url, [prompt], RADIX_TOKENS)
    return {"completions": [c.to_json() for c in completions]}


def run_teacher(url: str, workload: Workload) -> dict:
    sequences = token_prompts(list(workload.teacher_lengths), seed=1)
    return {"completions": [generate(url, [s], 1, input_logprobs=True)[0].to_json() for s in sequences]}


def run_greedy(url: str, workload: Workload) -> dict:
    prompts = token_prompts(list(workload.greedy_lengths), seed=2)
    return {"completions": [c.to_json() for c in generate(url, prompts, workload.greedy_tokens)]}


def run_soak(url: str, workload: Workload) -> dict:
    prompts = token_prompts([64 + 14 * i for i in range(SOAK_REQUESTS)], seed=3)
    start = time.perf_counter()
    completions = generate(url, prompts, SOAK_STEPS, top_logprobs=0, ignore_eos=True, timeout=1800)
    values = [v for c in completions for v in c.logprobs]
    return {
        "requests": len(completions),
        "tokens": sum(len(c.output_ids) for c in completions),
        "min_steps": min(len(c.output_ids) for c in completions),
        "non_finite": sum(not math.isfinite(v) for v in values),
        "seconds": time.perf_counter() - start,
    }


def _timed_requests(url: str, prompts: list[list[int]], concurrency: int, tokens: int) -> dict:
    """``prompts`` streamed by ``concurrency`` clients: throughput, TTFT and per-request decode rate."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        timings = list(pool.map(lambda p: stream_generate(url, p, tokens), prompts))
    wall = time.perf_counter() - start
    output = sum(t.output_tokens for t in timings)

    def p50_p90(values: list[float]) -> tuple[float, float]:
        ordered = sorted(values)
        return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    ttft = p50_p90([t.ttft_s for t in timings])
    latency = p50_p90([t.total_s for t in timings])
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "seconds": wall,
        "output_tokens": output,
        "output_tok_per_s": output / wall,
        "total_tok_per_s": (output + sum(len(p) for p in prompts)) / wall,
        "ttft_p50_s": ttft[0],
        "ttft_p90_s": ttft[1],
        "decode_tok_per_s_per_request_p50": statistics.median(t.decode_tok_per_s for t in timings),
        "latency_p50_s": latency[0],
        "latency_p90_s": latency[1],
    }


def throughput_prompts(workload: Workload, concurrency: int) -> tuple[list[list[int]], list[list[int]]]:
    """The timed prompts of one concurrency level and its warm-up's, none shared: a warm-up
    prompt left in the radix cache would turn a timed request into a cached-prefix extend,
    whose kernels the warm-up did not compile (JIT inside the timed run)."""
    lengths = [workload.input_tokens] * workload.requests(concurrency)
    return token_prompts(lengths, seed=10 + concurrency), token_prompts(lengths[:concurrency], seed=1000 + concurrency)


def run_throughput(url: str, workload: Workload) -> dict:
    levels = []
    for concurrency in CONCURRENCY:
        prompts, warm_up = throughput_prompts(workload, concurrency)
        _timed_requests(url, warm_up, concurrency, 8)  # compiles this batch size's kernels, caches none of prompts
        levels.append(_timed_requests(url, prompts, concurrency, workload.output_tokens))
    return {"levels": levels}


def typical_layer(trace_path: Path, kernels: list[dict], layers: int) -> dict | None:
    """:func:`layer_timeline` of a kept decode trace, cut at its longest once-a-layer kernel."""
    anchor = per_layer_anchor(kernels, layers)
    if anchor is None:
        return None
    return {"anchor": anchor, **asdict(layer_timeline(read_trace(trace_path), anchor))}


def run_profile(url: str, workload: Workload, trace_dir: Path | None = None, layers: int | None = None) -> dict:
    """Decode steps at each profiled batch (with the typical layer's timeline where the model's
    ``layers`` are known), then one prompt's prefill; the traces go to ``trace_dir``."""
    levels = []
    for batch in PROFILE_BATCHES:
        prompts = token_prompts([workload.input_tokens] * batch, seed=40 + batch)
        flush_cache(url)
        keep = trace_dir / f"decode-b{batch}.trace.json.gz" if trace_dir else None
        level = profile_decode(url, prompts, PROFILE_DECODE_TOKENS, PROFILE_STEPS, keep_trace=keep)
        if keep is not None and layers:
            level["layer"] = typical_layer(keep, level["kernels"], layers)
        levels.append(level)
    flush_cache(url)
    (prompt,) = token_prompts([workload.input_tokens], seed=39)
    keep = trace_dir / "prefill.trace.json.gz" if trace_dir else None
    return {"levels": levels, "prefill": profile_prefill(url, prompt, timeout=180.0, keep_trace=keep)}


def storm_plan(model: Path) -> StormPlan:
    """The storm of the model in ``model`` (its context and ``index_topk``)."""
    config = json.loads((model / "config.json").read_text())
    return StormPlan(config["max_position_embeddings"], config["index_topk"])


def run_storm_step(url: str, workload: Workload, plan: StormPlan, server_log: Path | None = None) -> dict:
    return run_storm(url, plan, server_log)


WORK = {
    "radix": run_radix,
    "one_by_one": run_one_by_one,
    "teacher": run_teacher,
    "greedy": run_greedy,
    "soak": run_soak,
    "throughput": run_throughput,
    "profile": run_profile,
    "storm": run_storm_step,
}


def skip_reason(config: Config) -> str | None:
    if torch.cuda.device_count() < config.gpus:
        return f"needs {config.gpus} GPUs, {torch.cuda.device_count()} present"
    missing = [m for m in config.modules if importlib.util.find_spec(m) is None]
    return f"module(s) {', '.join(missing)} not installed (baselines tier)" if missing else None


def _num_layers(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["num_hidden_layers"]


def run_config(name: str, config: Config, workload: Workload, model: Path, out: Path, startup_timeout: float) -> dict:
    """Launch one configuration, run its work (each step's failure recorded), stop it."""
    reason = skip_reason(config)
    if reason:
        return {"skipped": reason}
    args = (*COMMON, *config.args)
    result: dict = {"args": list(args), "env": config.env}
    start = time.perf_counter()
    timeout = max(startup_timeout, config.min_startup_s)
    server = Server(model, args, env=config.env, log_path=out / "logs" / f"{name}.log", startup_timeout=timeout)
    try:
        with server:
            result["startup_s"] = time.perf_counter() - start
            for step in config.work:
                try:
                    extra = {}
                    if step == "profile":
                        extra = {"trace_dir": out / "traces" / name, "layers": _num_layers(model)}
                    elif step == "storm":
                        extra = {"plan": storm_plan(model), "server_log": server.log_path}
                    result[step] = WORK[step](server.url, workload, **extra)
                except Exception as err:  # one step's failure must not hide the others' results
                    result[step] = {"error": f"{type(err).__name__}: {err}"}
    except ServerError as err:
        result["error"] = str(err)
    result["log_tail"] = server.log_tail(40)
    return result


@contextlib.contextmanager
def locked(out: Path):
    """Hold DIR/.lock: other run_e2e.py processes on DIR wait (model writing, results updates)."""
    with (out / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_results(store: Path) -> dict:
    return json.loads(store.read_text()) if store.exists() else {}


def _completions(results: dict, config: str, step: str) -> list[Completion] | None:
    data = results.get(config, {}).get(step)
    if not isinstance(data, dict) or "completions" not in data:
        return None
    return [Completion(**c) for c in data["completions"]]


def teacher_regions(a: list[Completion], b: list[Completion], index_topk: int) -> dict:
    """Mean ``|a - b|`` of teacher-forced logprobs over all sequences, by region.

    ``input_logprobs[j]`` scores token ``j + 1`` from a query at position ``j``,
    which sees ``j + 1`` tokens: dense (every one attended) while ``j < index_topk``.
    """
    regions: dict = {}
    for x, y in zip(a, b, strict=True):
        for j, (u, v) in enumerate(zip(x.input_logprobs, y.input_logprobs, strict=False)):
            regions.setdefault("dense" if j < index_topk else "sparse", []).append(abs(u - v))
    return {name: {"n": len(d), "mean_abs": sum(d) / len(d)} for name, d in regions.items()}


def _same_answers(a: list[Completion], b: list[Completion], exact: bool, tie_margin: float) -> dict:
    """Two runs' answers to the same requests: ``ok`` where they must be bit-identical (``exact``: batch
    invariant numerics), else reported (``None``); a non-finite logprob fails either way."""
    matches = [compare_greedy(x, y) for x, y in zip(a, b, strict=True)]
    finite = all(c.finite for c in a + b)
    identical = finite and all(bit_identical(x, y) for x, y in zip(a, b, strict=True))
    return {
        "ok": identical if exact else (None if finite else False),
        "agree_up_to_near_ties": all(m.agrees(tie_margin) for m in matches),
        "matches": [m.describe(tie_margin) for m in matches],
        "first_differences": [m.first_difference for m in matches],
    }


def summarize(results: dict, tie_margin: float, max_spread_ratio: float, index_topk: int) -> dict:
    """The comparisons of the module docstring over whatever results are present."""
    summary: dict = {}
    teacher = {name: _completions(results, name, "teacher") for name in results}
    spread = None
    if teacher.get(SPREAD_PAIR[0]) and teacher.get(SPREAD_PAIR[1]):
        spread = teacher_regions(teacher[SPREAD_PAIR[0]], teacher[SPREAD_PAIR[1]], index_topk)
    for backend, exact in RADIX_PAIRS:
        batch = _completions(results, backend, "radix")
        single = _completions(results, f"{backend}-no-radix", "one_by_one")
        if batch and single:
            entry = _same_answers(batch, single, exact, tie_margin)
            summary[f"radix_vs_no_radix_{backend}"] = {
                **entry,
                "cached_tokens": [c.cached_tokens for c in batch],
                "logprobs_before_difference": [
                    logprob_difference(b.logprobs[:first], s.logprobs[:first])
                    for b, s, first in zip(batch, single, entry["first_differences"], strict=True)
                ],
            }
    for mtp, plain, exact in MTP_PAIRS:
        with_mtp, without = _completions(results, mtp, "greedy"), _completions(results, plain, "greedy")
        if with_mtp and without:
            summary[f"mtp_vs_plain_{mtp}"] = _same_answers(with_mtp, without, exact, tie_margin)
    for a, b, judged in LOGPROB_PAIRS:
        entry = {}
        ta, tb = teacher.get(a), teacher.get(b)
        if ta and tb:
            entry["teacher"] = [
                logprob_difference(x.input_logprobs, y.input_logprobs) for x, y in zip(ta, tb, strict=True)
            ]
            entry["teacher_by_region"] = teacher_regions(ta, tb, index_topk)
            if spread and judged:
                entry["spread_ratio"] = {
                    region: stats["mean_abs"] / spread[region]["mean_abs"]
                    for region, stats in entry["teacher_by_region"].items()
                    if spread.get(region, {}).get("mean_abs")
                }
                ratios = list(entry["spread_ratio"].values())
                entry["ok"] = bool(ratios) and all(r <= max_spread_ratio for r in ratios)  # NaN fails
        ga, gb = _completions(results, a, "greedy"), _completions(results, b, "greedy")
        if ga and gb:
            matches = [compare_greedy(x, y) for x, y in zip(ga, gb, strict=True)]
            entry["greedy"] = [m.describe(tie_margin) for m in matches]
            entry["greedy_logprobs"] = [
                logprob_difference(x.logprobs[: m.first_difference], y.logprobs[: m.first_difference])
                for x, y, m in zip(ga, gb, matches, strict=True)
            ]
        if entry:
            summary[f"{a}_vs_{b}"] = entry
    for name, result in results.items():
        soak = result.get("soak")
        if isinstance(soak, dict) and "non_finite" in soak:
            summary[f"soak_{name}"] = {"ok": soak["non_finite"] == 0 and soak["min_steps"] == SOAK_STEPS, **soak}
        storm = result.get("storm")
        if isinstance(storm, dict) and "control" in storm:
            summary[f"storm_{name}"] = {"ok": storm_ok(storm), **{k: v for k, v in storm.items() if k != "by_kind"}}
        greedy = _completions(results, name, "greedy")
        if greedy and all(c.spec_verify_ct for c in greedy):  # speculative decoding: tokens per verify step
            tokens, steps = sum(len(c.output_ids) for c in greedy), sum(c.spec_verify_ct for c in greedy)
            summary.setdefault("mtp_accept_length", {})[name] = round(tokens / steps, 3)
        levels = (result.get("throughput") or {}).get("levels")
        if levels:
            summary.setdefault("throughput_output_tok_per_s", {})[name] = {
                str(level["concurrency"]): round(level["output_tok_per_s"], 1) for level in levels
            }
            if all("ttft_p50_s" in level for level in levels):  # streamed runs
                summary.setdefault("ttft_p50_ms", {})[name] = {
                    str(level["concurrency"]): round(1e3 * level["ttft_p50_s"], 1) for level in levels
                }
                summary.setdefault("decode_tok_per_s_per_request_p50", {})[name] = {
                    str(level["concurrency"]): round(level["decode_tok_per_s_per_request_p50"], 1) for level in levels
                }
        for level in (result.get("profile") or {}).get("levels", []):
            if level.get("layer"):
                summary.setdefault("decode_layer_us", {}).setdefault(name, {})[str(level["batch"])] = round(
                    level["layer"]["period_us"], 1
                )
            for key in ("device", "busy", "span"):
                if f"{key}_us_per_step" in level:
                    summary.setdefault(f"decode_step_{key}_us", {}).setdefault(name, {})[str(level["batch"])] = round(
                        level[f"{key}_us_per_step"], 1
                    )
        prefill = (result.get("profile") or {}).get("prefill")
        if isinstance(prefill, dict) and "busy_us_per_step" in prefill:
            summary.setdefault("prefill_busy_us", {})[name] = {
                str(prefill["prompt_tokens"]): round(prefill["busy_us_per_step"] * prefill["steps"], 1)
            }
        if "error" in result or "skipped" in result:
            summary.setdefault("not_run", {})[name] = result.get("error", result.get("skipped"))[-400:]
        # A step that raised (its comparisons then silently missing) fails the run.
        broken = {
            step: data["error"][-400:] for step, data in result.items() if isinstance(data, dict) and "error" in data
        }
        if broken:
            summary[f"steps_failed_{name}"] = {"ok": False, **broken}
    return summary


TABLE_TITLES = {
    "throughput_output_tok_per_s": "throughput (output tokens/s, prefill included)",
    "decode_tok_per_s_per_request_p50": "decode rate per request (tokens/s after the first, p50)",
    "ttft_p50_ms": "TTFT p50 (ms)",
    "decode_step_device_us": "GPU time of one decode step (us, profiled; overlapping kernels count in full)",
    "decode_step_busy_us": "time a decode step keeps the GPU busy (us, profiled)",
    "decode_step_span_us": "decode step, first kernel start to last end (us, profiled)",
    "prefill_busy_us": "time one prompt's prefill keeps the GPU busy (us, profiled)",
    "decode_layer_us": "one decode layer, median launch-to-launch of its longest once-a-layer kernel (us, profiled)",
}


def print_summary(summary: dict) -> None:
    for key, value in summary.items():
        if key in TABLE_TITLES:
            by = "prompt tokens" if key.startswith("prefill") else "concurrency"
            print(TABLE_TITLES[key], f"by {by}:")
            for name, levels in value.items():
                print(f"  {name:14s} " + "  ".join(f"{by[0]}={c}: {v:9.1f}" for c, v in levels.items()))
        elif key == "mtp_accept_length":
            print("MTP accept length (greedy output tokens per verify step):")
            for name, length in value.items():
                print(f"  {name:18s} {length:.3f}")
        elif key == "not_run":
            for name, why in value.items():
                print(f"not run: {name}: {why.splitlines()[0] if why else ''}")
        else:
            flag = {True: "ok  ", False: "FAIL"}.get(value.get("ok"), "info")
            if "teacher_by_region" in value:  # a logprob pair: mean |difference| by region, greedy agreement
                regions = "  ".join(
                    f"{region} {stats['mean_abs']:.4f}"
                    + (
                        f" ({value['spread_ratio'][region]:.2f}x spread)"
                        if region in value.get("spread_ratio", {})
                        else ""
                    )
                    for region, stats in value["teacher_by_region"].items()
                )
                print(f"{flag} {key}: teacher mean |dlogprob| {regions}; greedy {value.get('greedy', [])}")
            else:
                print(f"{flag} {key}: {json.dumps({k: v for k, v in value.items() if k != 'ok'})[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", default="ours,ours-no-radix,ours-fp8,dsa,dsa-fp8,fallback,ours-tp2",
                        help="comma-separated names of CONFIG_NAMES, or 'none'")  # fmt: skip
    parser.add_argument("--arch", choices=ARCHITECTURES, default="deepseek-v3.2")
    parser.add_argument("--shape", choices=SHAPES, default="small", help="the tiny model's attention shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="the tiny model's layer count (default: the shape's)")
    parser.add_argument("--work", default=",".join(WORK),
                        help="comma-separated steps of WORK to run (of each configuration's own)")  # fmt: skip
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="more results.json files to include")
    parser.add_argument("--tie-margin", type=float, default=DEFAULT_TIE_MARGIN)
    parser.add_argument("--max-spread-ratio", type=float, default=2.0,
                        help="judged pairs: mean |logprob difference| per region over SGLang's own spread")  # fmt: skip
    parser.add_argument("--startup-timeout", type=float, default=420.0, help="seconds a server may take to start")
    args = parser.parse_args()
    names = [] if args.configs == "none" else args.configs.split(",")
    unknown = [n for n in names if n not in CONFIG_NAMES]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {sorted(CONFIG_NAMES)}")
    steps = args.work.split(",")
    if not set(steps) <= set(WORK):
        parser.error(f"unknown work {sorted(set(steps) - set(WORK))}; choose from {list(WORK)}")

    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    layers = args.layers or tiny_config(args.arch, args.shape)["num_hidden_layers"]
    model_key = {"arch": args.arch, "shape": args.shape, "seed": args.seed, "layers": layers}
    with locked(args.out):
        results = load_results(store)
        for extra in args.merge:
            results.update(json.loads(extra.read_text()))
        if args.merge:
            store.write_text(json.dumps(results, indent=1))
        meta = results.get("_meta", {})
        recorded = {}
        if "arch" in meta:  # results recorded before shapes, seeds and layer counts were: small, seed 0
            old = {"shape": "small", "seed": 0, **meta}
            old.setdefault("layers", tiny_config(old["arch"], old["shape"])["num_hidden_layers"])
            recorded = {k: old[k] for k in model_key}
        if names and recorded and recorded != model_key:
            parser.error(f"{store} holds results of another model {recorded}; use another --out")
        model = args.out / f"model-{args.arch}-{args.shape}-{layers}layers-seed{args.seed}"
        if names and not (model / "model.safetensors").exists():
            write_tiny_model(model, args.arch, args.seed, args.shape, layers)
    identity = recorded or model_key  # the model of every result in DIR
    index_topk = tiny_config(identity["arch"], identity["shape"], identity["layers"])["index_topk"]
    configs, workload = make_configs(index_topk), WORKLOADS[identity["shape"]]
    if names:
        run_meta = {"gpu": torch.cuda.get_device_name(), **model_key, "torch": torch.__version__}
    for name in names:
        print(f"=== {name}", flush=True)
        config = replace(configs[name], work=tuple(w for w in configs[name].work if w in steps))
        result = run_config(name, config, workload, model, args.out, args.startup_timeout)
        result["gpus"] = torch.cuda.device_count()
        with locked(args.out):  # another process may have added its configurations meanwhile
            results = load_results(store)
            results[name] = result
            results["_meta"] = {**results.get("_meta", {}), **run_meta}
            store.write_text(json.dumps(results, indent=1))
    summary = summarize(
        {k: v for k, v in results.items() if not k.startswith("_")}, args.tie_margin, args.max_spread_ratio, index_topk
    )
    (args.out / "summary.json").write_text(json.dumps({"meta": results.get("_meta", {}), **summary}, indent=1))
    print_summary(summary)
    sys.exit(1 if any(isinstance(v, dict) and v.get("ok") is False for v in summary.values()) else 0)


if __name__ == "__main__":
    main()
