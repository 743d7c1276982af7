"""SGLang's server test kits against a real ``sglang.launch_server`` serving ``triton_sparse_mla`` (GPU only).

SGLang 0.5.23 ships backend-agnostic kits for a running server: mixins of ``test_*`` methods that read
``self.base_url`` and ``self.process`` (``sglang.test.kits.*``), kit functions, and the deterministic-inference
test ``sglang.test.test_deterministic``. Here they run against ``python -m sglang.launch_server
--attention-backend triton_sparse_mla`` serving the tiny random-weight DeepSeek-V3.2 (not GLM-5) of
:mod:`sglang_sparse_mla.testing.tiny_model` (small shape: 4 layers and an MTP layer, index_topk 256, context
8192, a 1024-id vocabulary of which the tokenizer names 873). Each class is a ``CustomTestCase`` (SGLang's base
for the kits) whose ``setUpClass`` starts one server, e2e's ``COMMON`` and ``OURS`` flags plus those its kits
need (:class:`KitServer`), and whose ``tearDownClass`` stops it. The kits' methods and assertions are SGLang's,
unchanged; what a class sets are the knobs the kits leave to their user.

Opt-in (``SGLANG_SPARSE_MLA_SERVER_KITS=1``; ``benchmarks/e2e/run_on_gpu.sh kits`` in the staged runtime);
every class's server arguments are resolved on any machine (``test_server_arguments_resolve``). The servers,
in the order they run (6 starts, about 60-90 s each):

* ``TestServerKits``: scheduler stress, abort-all, KL divergence of cache-hit logprobs, multi-turn cache hits,
  matched stop, streaming sessions. The flags of SGLang's streaming-session fixture and test
  (``--enable-streaming-session --chunked-prefill-size 512``, the pool checked after every busy step, KV page
  ownership checked) and ``--allow-auto-truncate`` (below).
* ``TestAbortLeakReproKit``: the flags of SGLang's ``TestStreamingSessionAbortLeakRepro`` (context 512, so that
  its 600-token turns are refused). SGLang's DSA override keeps pages at 64 tokens over its ``--page-size 256``.
* ``TestWaitingTimeoutKit``, ``TestRunningTimeoutKit``: the servers of SGLang's ``TestAbortWithWaitingTimeout``
  (one running request, ``SGLANG_REQ_WAITING_TIMEOUT=0.001``) and ``TestEagleLlama2RunningTimeout`` (16 running
  requests, ``SGLANG_REQ_RUNNING_TIMEOUT=3``).
* ``TestDeterministicKits``: ``--enable-deterministic-inference``; test_deterministic's modes, and the basic
  decode-correctness kit, whose byte-identical reruns a random-weight model's near-ties would otherwise put at
  the mercy of last-bit differences (cached vs uncached prefill) that a trained model's margins hide.
* ``TestSpecKits``: deterministic with MTP (e2e's NEXTN flags: the model's own MTP layer drafts 3 tokens) and
  ``--enable-return-hidden-states`` (``SpecHiddenStatesKit``); the EAGLE server kits.

Adaptations, none to an assertion:

* The GPU machines have no network. The KL kit's LongBench-v2 prompts are replaced by 48 pieces of SGLang's
  ``long_prompt.txt`` of the kit's lengths, put in the kit's in-memory cache; the cache-hit kit gets a
  ShareGPT-layout file of the same text as its ``dataset_path``.
* The kits ask for up to 16000 (abort-all) and 100000 (streaming mid-abort) new tokens, sized for long-context
  models; SGLang refuses requests past the context unless ``--allow-auto-truncate`` cuts ``max_new_tokens`` to
  fit. Those requests are aborted within seconds either way.
* ``kl_div_thres`` 0.01 (the kit has no default) is a gross-error gate, not measured for this kit yet: e2e
  measured the drift of default numerics between batch compositions at mean |Δ logprob| ≤ 0.03, max 0.09 (the
  kit's K3 = e^Δ − 1 − Δ ≈ Δ²/2, at most 0.004), while attention over wrong KV rows would move a random model's
  logprobs by O(1) (K3 ≳ 0.3).
* test_deterministic's modes run through its ``test_deterministic()`` with the parameters of SGLang's
  ``TestDeterministicBase``, whose methods read ``DEFAULT_URL_FOR_TEST`` and so cannot be mixed in.
* The spec kits use the helpers of SGLang's ``SpecEagleServerBase`` (``send_request``, ``run_decode``...), whose
  launch :class:`KitServer` replaces. ``SpecParityKit``'s reference is the deterministic server's greedy text
  (its own ``setUpClass`` would start a reference at ``--mem-fraction-static 0.8``); e2e requires MTP in
  deterministic mode to be bit-identical to it.

Not applicable, skipped with the reason: whatever asserts a trained model's text or a trained draft's accept
length, sends token ids beyond the 1024-id vocabulary (SGLang does not check input ids against it: they read
past the embedding table), tests prefix caches of hybrid models, or downloads GSM8K.

Only the native path runs here; ``SGLANG_SPARSE_MLA_FORCE_SM80=1 python -m pytest tests/test_server_kits.py``
runs the same servers on the forced SM80 path (they inherit the environment). Estimated, not yet measured:
10-12 minutes on an H100, the 6 starts plus 4-5 minutes of requests (the longest: the KL kit, the spec kit's
concurrent aborts, the multi-turn cache hits). Server logs stay in ``$TMPDIR/sglang-server-kits-*/logs/``. A
server that exits during a test ends the whole pytest run (CustomTestCase's fail-fast watcher).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import tempfile
import unittest
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

pytest.importorskip("sglang.srt", reason="SGLang is not installed")

from sglang.srt.utils.hf_transformers_utils import get_tokenizer  # noqa: E402
from sglang.test import kl_test_utils  # noqa: E402
from sglang.test import test_deterministic as deterministic  # noqa: E402
from sglang.test import test_utils as sglang_test_utils  # noqa: E402
from sglang.test.kits import cache_hit_kit, spec_server_kits  # noqa: E402
from sglang.test.kits.abort_timeout_kit import (  # noqa: E402
    AbortAllMixin,
    RunningTimeoutTwoWaveMixin,
    WaitingTimeoutMixin,
)
from sglang.test.kits.basic_decode_correctness_kit import BasicDecodeCorrectnessMixin  # noqa: E402
from sglang.test.kits.basic_scheduler_stress_kit import BasicSchedulerStressMixin  # noqa: E402
from sglang.test.kits.kl_divergence_kit import KLDivergenceMixin  # noqa: E402
from sglang.test.kits.matched_stop_kit import MatchedStopMixin  # noqa: E402
from sglang.test.kits.prefix_cache_branching_kit import PrefixCacheBranchingMixin  # noqa: E402
from sglang.test.kits.radix_cache_server_kit import run_radix_attention_test  # noqa: E402
from sglang.test.kits.spec_decoding_kit import SpecDecodingMixin  # noqa: E402
from sglang.test.kits.spec_server_kits import (  # noqa: E402
    SpecAccuracyKit,
    SpecCorrectnessKit,
    SpecFeatureKit,
    SpecGrammarKit,
    SpecHiddenStatesKit,
    SpecLogprobKit,
    SpecParityKit,
    SpecPenaltyKit,
    SpecPerfKit,
    SpecSamplingMaskKit,
)
from sglang.test.kits.streaming_session_kit import AbortLeakReproKitMixin, StreamingSessionKitMixin  # noqa: E402
from sglang.test.server_fixtures import spec_eagle_fixture  # noqa: E402
from sglang.test.server_fixtures.streaming_session_fixture import (  # noqa: E402
    ABORT_REPRO_CHUNKED_PREFILL_SIZE,
    ABORT_REPRO_CONTEXT_LEN,
    ABORT_REPRO_PAGE_SIZE,
)

from sglang_sparse_mla.backend.spec import BACKEND_NAME  # noqa: E402
from sglang_sparse_mla.testing.serving.e2e import COMMON, DETERMINISTIC, MTP, OURS  # noqa: E402
from sglang_sparse_mla.testing.serving.server import Server  # noqa: E402
from sglang_sparse_mla.testing.tiny_model import tiny_config, write_tiny_model  # noqa: E402

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    NO_SERVERS = "needs a CUDA GPU (not the Triton interpreter): starts sglang.launch_server with triton_sparse_mla"
elif os.environ.get("SGLANG_SPARSE_MLA_SERVER_KITS") != "1":
    NO_SERVERS = "starts 6 servers (about 10 minutes): opt in with SGLANG_SPARSE_MLA_SERVER_KITS=1"
else:
    NO_SERVERS = None
# On each server class: skipped as a whole, setUpClass included, where no server may start.
with_servers = unittest.skipIf(NO_SERVERS is not None, NO_SERVERS or "")

VOCABULARY = "the tiny model's vocabulary is 1024 ids"
# StreamingSessionServerBase's environment: SGLang checks its KV pool for leaks after every busy step, and that
# no request owns a free page.
STREAMING_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1", "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1"}


def kit_name(obj) -> str:
    """``kits.<module>.<qualified name>`` of a kit object."""
    return f"{obj.__module__.removeprefix('sglang.test.')}.{obj.__qualname__}"


NOT_APPLICABLE = {
    kit_name(run_radix_attention_test): f"sends token ids up to 31999; {VOCABULARY}",
    kit_name(PrefixCacheBranchingMixin): "for caches that keep prefix states at chunk boundaries only (Mamba / "
    "hybrid models): it asserts that the second request misses the shared prefix, which a radix cache hits",
    kit_name(SpecDecodingMixin): "asserts a trained draft's accept length and batch-1 speed",
    kit_name(SpecAccuracyKit): "asserts a trained model's GSM8K score and its draft's accept length",
    kit_name(SpecPerfKit): "its prompts are GSM8K's, which run_eval downloads (the GPU machines have no network)",
    kit_name(SpecGrammarKit): "asserts complete JSON under a JSON schema within 256 tokens; a random-weight model "
    "need not close the object (its string fields are unbounded)",
    "test_deterministic --test-mode radix_cache": f"sends token ids up to 50000; {VOCABULARY}",
}


@pytest.mark.parametrize("kit", list(NOT_APPLICABLE))
def test_not_applicable(kit):
    pytest.skip(f"not applicable: {NOT_APPLICABLE[kit]}")


def skip_kit(kit_test, reason: str):
    """A kit's test method, skipped here for ``reason``."""
    return unittest.skip(reason)(kit_test)


@functools.cache
def run_dir() -> Path:
    """This session's folder: the tiny model (removed at exit) and the servers' logs (kept)."""
    path = Path(tempfile.mkdtemp(prefix="sglang-server-kits-"))
    atexit.register(shutil.rmtree, path / "model", True)
    return path


@functools.cache
def tiny_model() -> str:
    """The tiny DeepSeek-V3.2 checkpoint (small shape, seed 0), written once per session."""
    return str(write_tiny_model(run_dir() / "model"))


def kit_server(name: str, args: tuple[str, ...], env: dict[str, str] | None = None) -> Server:
    """A server of the tiny model with e2e's common flags, our backend and ``args``; its log is ``logs/{name}.log``."""
    return Server(tiny_model(), (*COMMON, *OURS, *args), log_path=run_dir() / "logs" / f"{name}.log", env=env)


class KitServer(sglang_test_utils.CustomTestCase):
    """One server per test class, with the class's ``server_args`` and ``server_env``, and what the kits read:
    ``base_url``, ``process``, ``model`` (the checkpoint's path, also its served name) and ``tokenizer``.

    It replaces the launch of SGLang's fixtures, so ``setUpClass`` does not chain to theirs.
    """

    server_args: tuple[str, ...] = ()
    server_env: dict[str, str] | None = None

    @classmethod
    def setUpClass(cls):
        cls.model = tiny_model()
        cls.tokenizer = get_tokenizer(cls.model)
        cls.server = kit_server(cls.__name__, cls.server_args, cls.server_env)
        cls.server.start()
        cls.server.wait_ready()  # on an error CustomTestCase calls tearDownClass
        cls.base_url, cls.process = cls.server.url, cls.server.process

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()


def longbench_stand_in(tokenizer) -> list[list[int]]:
    """Stand-ins for the LongBench-v2 prompts kl_test_utils downloads: as many, as long (its truncation to 0.5-1.5
    times 3000 tokens), each BOS and a piece of SGLang's long_prompt.txt."""
    ids = tokenizer.encode(deterministic.LONG_PROMPT)
    rng = random.Random(0)
    prompts = []
    for _ in range(kl_test_utils.DEFAULT_NUM_SAMPLES):
        n = int(kl_test_utils.DEFAULT_PROMPT_TOKENS * rng.uniform(0.5, 1.5))
        start = rng.randrange(1, len(ids) - n)
        prompts.append(ids[:1] + ids[start : start + n - 1])
    return prompts


def sharegpt_stand_in() -> str:
    """A stand-in for the ShareGPT file cache_hit_kit downloads without a ``dataset_path``: conversations in its
    layout, two overlapping 600-character pieces of SGLang's long_prompt.txt each."""
    text = deterministic.LONG_PROMPT
    pieces = [text[i : i + 600] for i in range(0, len(text) - 600, 300)]
    rows = [
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
        for question, answer in zip(pieces[:-1], pieces[1:], strict=True)
    ]
    path = run_dir() / "sharegpt.json"
    path.write_text(json.dumps(rows))
    return str(path)


@with_servers
class TestServerKits(
    BasicSchedulerStressMixin,
    AbortAllMixin,
    KLDivergenceMixin,
    MatchedStopMixin,
    StreamingSessionKitMixin,
    KitServer,
):
    server_args = ("--enable-streaming-session", "--chunked-prefill-size", "512", "--allow-auto-truncate")
    server_env = STREAMING_ENV
    kl_div_thres = 0.01

    test_streaming_response = skip_kit(
        BasicSchedulerStressMixin.test_streaming_response, "asserts a trained model's answer ('paris')"
    )
    test_concurrent_requests = skip_kit(
        BasicSchedulerStressMixin.test_concurrent_requests, "asserts trained models' answers (capitals) to 7 of 8"
    )
    test_finish_stop_str = skip_kit(
        MatchedStopMixin.test_finish_stop_str, "needs a trained model's prose: a newline within 1000 tokens"
    )
    test_finish_stop_regex_str = skip_kit(
        MatchedStopMixin.test_finish_stop_regex_str,
        "needs a trained model's prose: 'and' or 'or', and a sentence end, within 1000 tokens",
    )
    test_finish_stop_eos = skip_kit(
        MatchedStopMixin.test_finish_stop_eos, "expects Llama's EOS ids (128000, 128009, 2) and a model that stops"
    )

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The key get_input_ids looks up for up to DEFAULT_NUM_SAMPLES prompts of DEFAULT_PROMPT_TOKENS.
        key = f"{cls.model}_{kl_test_utils.DEFAULT_PROMPT_TOKENS}_{kl_test_utils.DEFAULT_NUM_SAMPLES}"
        kl_test_utils._cached_input_ids[key] = longbench_stand_in(cls.tokenizer)

    def test_multiturn_cache_hit(self):
        """cache_hit_kit with the workload of SGLang's TestRadixCacheHit: 8 clients, 6 rounds."""
        cache_hit_kit.run_multiturn_cache_hit_test(
            base_url=self.base_url,
            model_path=self.model,
            num_clients=8,
            num_rounds=6,
            request_length=289,
            output_length=367,
            dataset_path=sharegpt_stand_in(),
        )


@with_servers
class TestAbortLeakReproKit(AbortLeakReproKitMixin, KitServer):
    server_args = (
        "--enable-streaming-session", "--chunked-prefill-size", str(ABORT_REPRO_CHUNKED_PREFILL_SIZE),
        "--context-length", str(ABORT_REPRO_CONTEXT_LEN), "--page-size", str(ABORT_REPRO_PAGE_SIZE),
        "--max-running-requests", "32",
    )  # fmt: skip
    server_env = STREAMING_ENV


@with_servers
class TestWaitingTimeoutKit(WaitingTimeoutMixin, KitServer):
    server_args = ("--max-running-requests", "1")
    server_env = {"SGLANG_REQ_WAITING_TIMEOUT": "0.001"}


@with_servers
class TestRunningTimeoutKit(RunningTimeoutTwoWaveMixin, KitServer):
    server_args = ("--max-running-requests", "16")
    server_env = {"SGLANG_REQ_RUNNING_TIMEOUT": "3"}


# SpecParityKit's reference: its prompts' greedy text from a deterministic server without MTP.
PARITY_REFERENCE: dict[str, str] = {}


def record_parity_reference(base_url: str) -> None:
    PARITY_REFERENCE.update({p: spec_server_kits._greedy(base_url, p) for p in SpecParityKit.parity_prompts})


@with_servers
class TestDeterministicKits(BasicDecodeCorrectnessMixin, KitServer):
    server_args = DETERMINISTIC

    test_capital_france = skip_kit(
        BasicDecodeCorrectnessMixin.test_capital_france, "asserts a trained model's answer ('paris')"
    )
    test_basic_math = skip_kit(BasicDecodeCorrectnessMixin.test_basic_math, "asserts a trained model's answer ('391')")
    test_color_completion = skip_kit(
        BasicDecodeCorrectnessMixin.test_color_completion, "asserts a trained model's answer ('yellow')"
    )
    test_ascii_ratio = skip_kit(
        BasicDecodeCorrectnessMixin.test_ascii_ratio,
        "asserts a trained model's English (printable ASCII); random weights pick any byte-level tokens",
    )
    test_no_repetition_blowup = skip_kit(
        BasicDecodeCorrectnessMixin.test_no_repetition_blowup,
        "asserts a trained model's prose does not loop; a random-weight model's greedy text may",
    )

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        record_parity_reference(cls.base_url)

    def run_mode(self, **fields) -> None:
        """test_deterministic() with BenchArgs ``fields``: every result 1 (one distinct output)."""
        url = urlsplit(self.base_url)
        results = deterministic.test_deterministic(deterministic.BenchArgs(host=url.hostname, port=url.port, **fields))
        self.assertTrue(all(result == 1 for result in results), results)

    def test_single(self):
        self.run_mode(test_mode="single", n_start=10, n_trials=20)

    def test_prefix_with_logprobs(self):
        self.run_mode(test_mode="prefix", n_start=10, n_trials=10, temperature=0.5, return_logprob=True)

    def test_prefill_vs_decode(self):
        """Decode logprobs bit-identical to a re-prefill's: more than batch invariance (decode scores the
        index keys with the paged logits kernel, prefill with the ragged one), asked of every backend."""
        self.run_mode(test_mode="p_vs_d", n_trials=8)


@with_servers
class TestSpecKits(
    SpecCorrectnessKit,
    SpecLogprobKit,
    SpecPenaltyKit,
    SpecFeatureKit,
    SpecHiddenStatesKit,
    SpecSamplingMaskKit,
    KitServer,
    SpecParityKit,
    spec_eagle_fixture.SpecEagleServerBase,
):
    server_args = (*DETERMINISTIC, *MTP, "--enable-return-hidden-states")

    test_acc_length = skip_kit(SpecCorrectnessKit.test_acc_length, "asserts a trained draft's accept length (> 3.1)")
    test_batch_generation = skip_kit(
        SpecCorrectnessKit.test_batch_generation, "asserts a trained draft's accept length (> 1.75)"
    )
    test_logprob_mixed = skip_kit(SpecLogprobKit.test_logprob_mixed, f"sends token ids 0 to 1999; {VOCABULARY}")
    test_radix_attention = skip_kit(
        SpecFeatureKit.test_radix_attention, f"radix_cache_server_kit sends token ids up to 31999; {VOCABULARY}"
    )
    test_constrained_decoding = skip_kit(
        SpecFeatureKit.test_constrained_decoding,
        "asserts the reply is a complete JSON object; a random-weight model under a JSON grammar need not close it",
    )

    @classmethod
    def setUpClass(cls):
        if not PARITY_REFERENCE:  # TestDeterministicKits did not run
            with kit_server("ParityReference", DETERMINISTIC) as reference:
                record_parity_reference(reference.url)
        cls.parity_ref_outputs = dict(PARITY_REFERENCE)
        super().setUpClass()


@pytest.mark.parametrize("server", KitServer.__subclasses__(), ids=lambda server: server.__name__)
def test_server_arguments_resolve(server, resolve, tmp_path):
    """Each class's server arguments pass SGLang's parser and resolution with the plugin loaded (CPU
    too), so that a misspelt or refused flag fails in CI rather than in a device call."""
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("deepseek-v3.2")))
    view = resolve(str(tmp_path), *COMMON, *OURS, *server.server_args)
    assert view.attention_backend == BACKEND_NAME
