"""Error bars for evaluations on a few hundred questions: bootstrap intervals and paired tests over questions.

Scores are per question (1/0 for accuracy and EM, a fraction for F1). A system trained with several seeds has, per
question, the mean of its seeds' scores; intervals and tests resample the questions, so that they say how much
the figure would move on another sample of questions like these.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    """The mean, 0 for no values."""
    return sum(values) / len(values) if values else 0.0


def bootstrap_interval(
    scores: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean score, resampling questions with replacement.

    Args:
        scores: One score per question.
        level: Coverage of the interval.
        resamples: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        `(low, high)`, in the scores' unit.
    """
    if not scores:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * (resamples - 1))], means[math.ceil((1 - tail) * (resamples - 1))]


def paired_bootstrap_p(a: Sequence[float], b: Sequence[float], *, resamples: int = 5000, seed: int = 0) -> float:
    """Two-sided p-value that systems `a` and `b` have the same mean score on these questions (paired bootstrap).

    The per-question differences are centred on zero (the null) and resampled; p is the share of resampled mean
    differences at least as far from zero as the observed one.

    Args:
        a: One score per question for the first system.
        b: The second system's scores on the same questions, in the same order.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: {len(a)} != {len(b)}")
    if not a:
        return 1.0
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    observed = mean(diffs)
    centred = [d - observed for d in diffs]
    rng = random.Random(seed)
    n = len(diffs)
    extreme = sum(
        abs(sum(centred[rng.randrange(n)] for _ in range(n)) / n) >= abs(observed) - 1e-12 for _ in range(resamples)
    )
    return (extreme + 1) / (resamples + 1)


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for two systems' right/wrong answers on the same questions."""
    if len(a) != len(b):
        raise ValueError(f"paired answers need the same questions: {len(a)} != {len(b)}")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2**discordant
    return min(1.0, 2 * tail)
