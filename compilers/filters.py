"""Step-level filters: drop single steps of a correct chain that reached its answer by an invalid path.

A chain whose final answer passes the metric may still contain a step that is not supported by the
evidence (the paper's first open question). A step filter sees each step sample with the inputs the
teacher saw and the output it wrote, and returns None to keep the step or a short reason to drop it.
"""

import re
from collections.abc import Mapping
from typing import Any, Protocol

from dspy.evaluate.metrics import normalize_text

_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "and",
        "or",
        "but",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "as",
        "so",
        "than",
        "then",
        "there",
        "their",
        "which",
        "who",
        "whom",
        "whose",
        "what",
        "when",
        "where",
        "why",
        "how",
        "not",
        "no",
        "yes",
        "true",
        "false",
    ]
)


class StepFilter(Protocol):
    """Decides whether a step of a kept chain trains the student."""

    def __call__(self, stage: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> str | None:
        """Return None to keep the step, or the reason it is dropped."""
        ...


class GroundedStepFilter:
    """Drops a step whose rationale is not grounded in the evidence the teacher had at that step.

    A rationale is grounded when at least `min_overlap` of its content words (normalised, stopwords
    removed) occur in the question, the passages retrieved so far or the earlier rationales. Steps with
    fewer than `min_words` content words are kept (too short to judge).

    Args:
        min_overlap: Least share of the rationale's content words found in the evidence.
        min_words: Rationales with fewer content words are not judged.
    """

    def __init__(self, min_overlap: float = 0.6, min_words: int = 2):
        self.min_overlap = min_overlap
        self.min_words = min_words

    def __call__(self, stage: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> str | None:
        words = _content_words(str(outputs.get("rationale") or ""))
        if len(words) < self.min_words:
            return None
        evidence = [
            str(inputs.get("question") or ""),
            *_texts(inputs.get("passages")),
            *_texts(inputs.get("rationales")),
        ]
        known = _content_words(" ".join(evidence))
        overlap = len(words & known) / len(words)
        return None if overlap >= self.min_overlap else "ungrounded"


def _texts(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", normalize_text(text)) if w not in _STOPWORDS}
