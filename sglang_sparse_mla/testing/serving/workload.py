"""The requests of the end-to-end checks, and how two sets of answers are compared.

Greedy decoding of a random model meets near-ties: two logits a hair apart,
where the bf16 rounding of a different batch shape (or backend) may pick the
other token. Two greedy runs therefore *agree* when their tokens are equal,
or when they first differ at a step where one of the runs had its best two
log-probabilities within ``tie_margin`` (reported, so that a real bug, which
diverges at a confident step, is not mistaken for one).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..tiny_tokenizer import CORPUS, SPECIAL_TOKENS
from .client import Completion

DEFAULT_TIE_MARGIN = 0.1  # nats between the best and second-best token


def shared_prefix_prompts(count: int = 4) -> list[str]:
    """Prompts sharing a long system prefix (several 64-token pages, more than ``index_topk`` tokens)."""
    prefix = f"System: you answer questions about this text.\n{CORPUS}\n{CORPUS}\n"
    questions = (
        "Question: what does the indexer keep for each query token?",
        "Question: how many values does a latent row hold?",
        "Question: why is a shared prompt computed only once?",
        "Question: what does a CUDA graph record?",
        "Question: which proverb mentions Spain?",
        "Question: how many layers did the small model have?",
        "Question: list the colours of the rainbow.",
        "Question: what comes after Thursday?",
    )
    return [prefix + questions[i % len(questions)] + f" (#{i})\nAnswer:" for i in range(count)]


def unrelated_prompts() -> list[str]:
    """Prompts sharing nothing beyond a few tokens, short to long."""
    words = CORPUS.split()
    return [
        "Hello",
        "The capital of France is",
        " ".join(reversed(words)),
        " ".join(words[i] for i in range(0, len(words), 3)) * 4,
    ]


def token_prompts(
    lengths: list[int], seed: int = 0, low: int = len(SPECIAL_TOKENS), high: int = 800
) -> list[list[int]]:
    """Seeded random token-id prompts of the given lengths (ids below the tokenizer's vocabulary)."""
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(n)] for n in lengths]


@dataclass(frozen=True)
class GreedyMatch:
    """How two greedy completions of one prompt compare."""

    compared: int
    first_difference: int | None
    margin: float | None

    @property
    def identical(self) -> bool:
        return self.first_difference is None

    def agrees(self, tie_margin: float = DEFAULT_TIE_MARGIN) -> bool:
        return self.identical or (self.margin is not None and self.margin < tie_margin)

    def describe(self, tie_margin: float = DEFAULT_TIE_MARGIN) -> str:
        if self.identical:
            return f"identical ({self.compared} tokens)"
        kind = "near-tie" if self.agrees(tie_margin) else "DIVERGED"
        return f"{kind} at token {self.first_difference} of {self.compared} (top-2 gap {self.margin:.3g})"


def compare_greedy(a: Completion, b: Completion) -> GreedyMatch:
    """Token-by-token comparison; at the first difference, the smaller top-2 gap of the two runs."""
    compared = min(len(a.output_ids), len(b.output_ids))
    for i in range(compared):
        if a.output_ids[i] != b.output_ids[i]:
            gaps = [c.top2_margin[i] for c in (a, b) if i < len(c.top2_margin)]
            return GreedyMatch(compared, i, min(gaps) if gaps else None)
    if len(a.output_ids) != len(b.output_ids):
        return GreedyMatch(compared, compared, None)
    return GreedyMatch(compared, None, None)


def bit_identical(a: Completion, b: Completion) -> bool:
    """The same tokens with the same logprobs, bit for bit (what batch-invariant numerics promise)."""
    return a.output_ids == b.output_ids and a.logprobs == b.logprobs


def first_logprob_difference(a: Completion, b: Completion) -> tuple[int, float] | None:
    """The first step whose logprobs differ and by how much; ``None`` if bit-identical where both have one."""
    for step, (x, y) in enumerate(zip(a.logprobs, b.logprobs, strict=False)):
        if x != y:  # NaN included
            return step, abs(x - y)
    return None


def logprob_difference(a: list[float], b: list[float]) -> dict:
    """``max``/``mean`` of ``|a - b|`` over the common positions (``n``), NaN-aware."""
    pairs = list(zip(a, b, strict=False))
    if not pairs:
        return {"n": 0, "max_abs": math.nan, "mean_abs": math.nan}
    diffs = [abs(x - y) for x, y in pairs]
    worst = math.nan if any(math.isnan(d) for d in diffs) else max(diffs)
    return {"n": len(pairs), "max_abs": worst, "mean_abs": sum(diffs) / len(diffs)}
