"""The in-memory form every multi-hop loader returns: questions plus the closed corpus they are asked over."""

from collections.abc import Iterable
from dataclasses import dataclass, field

import dspy


@dataclass
class MultiHopDataset:
    """Multi-hop questions and the closed retrieval corpus that holds their evidence.

    Attributes:
        name: A short label for reports (the file stem, the hub id, or "synthetic").
        examples: One `dspy.Example` a question, inputs `("question",)`, with the fields `id`, `question`,
            `answer`, `answer_aliases`, `supporting_titles`, `type` and `hops` (synthetic ones also `gold_chain`).
        corpus: Every candidate paragraph of every question as `{"title", "text"}`, deduplicated by
            `(title, text)` in first-seen order.
    """

    name: str
    examples: list[dspy.Example] = field(default_factory=list)
    corpus: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


def make_example(
    *,
    id: str,
    question: str,
    answer: str,
    answer_aliases: list[str],
    supporting_titles: list[str],
    type: str,
    hops: int | None,
    **extra,
) -> dspy.Example:
    """Build a question in the shape all loaders share, with `question` as its only input."""
    return dspy.Example(
        id=id,
        question=question,
        answer=answer,
        answer_aliases=answer_aliases,
        supporting_titles=supporting_titles,
        type=type,
        hops=hops,
        **extra,
    ).with_inputs("question")


class CorpusBuilder:
    """Collects paragraphs from many questions, keeping the first copy of each `(title, text)` pair."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], None] = {}

    def add(self, paragraphs: Iterable[tuple[str, str]]) -> None:
        for title, text in paragraphs:
            self._seen.setdefault((title, text), None)

    def build(self) -> list[dict[str, str]]:
        return [{"title": title, "text": text} for title, text in self._seen]


def unique_in_order(items: Iterable[str]) -> list[str]:
    """Drop repeats and keep first-seen order (never a set: the order must not depend on hashing)."""
    return list(dict.fromkeys(items))
