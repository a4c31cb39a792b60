"""HotpotQA rows: `_id question answer type level supporting_facts context` (upstream and hub layouts)."""

import dspy

from steper_dspy.evals.datasets.rows import Row
from steper_dspy.evals.datasets.types import make_example, unique_in_order

Paragraph = tuple[str, str]

HOTPOTQA_HOPS = 2


def parse_hotpotqa(row: Row) -> tuple[dspy.Example, list[Paragraph]]:
    """Turn one HotpotQA row into a question and its candidate paragraphs."""
    paragraphs = parse_context(row)
    example = make_example(
        id=row.text("_id", "id"),
        question=row.text("question"),
        answer=row.text("answer"),
        answer_aliases=[],
        supporting_titles=parse_supporting_titles(row),
        type=row.text("type"),
        hops=HOTPOTQA_HOPS,
    )
    return example, paragraphs


def parse_context(row: Row) -> list[Paragraph]:
    """The row's paragraphs as `(title, text)`, text being the sentences joined with a space.

    Accepts the upstream list `[[title, [sentence, ...]], ...]` and the hub's columnar
    `{"title": [...], "sentences": [[...], ...]}`.
    """
    _, context = row.value("context")
    if isinstance(context, dict):
        titles = row.str_list("context.title", row.value_in(context, "context", "title"))
        sentences = row.check_list("context.sentences", row.value_in(context, "context", "sentences"))
        if len(titles) != len(sentences):
            row.fail("context", f"has {len(titles)} titles but {len(sentences)} sentence lists")
        pairs = list(zip(titles, sentences, strict=True))
        names = [f"context.sentences[{i}]" for i in range(len(pairs))]
    else:
        pairs = []
        for i, entry in enumerate(row.check_list("context", context)):
            entry = row.check_list(f"context[{i}]", entry)
            if len(entry) != 2:
                row.fail(f"context[{i}]", f"must be a [title, sentences] pair, got {len(entry)} items")
            pairs.append((row.check_str(f"context[{i}][0]", entry[0]), entry[1]))
        names = [f"context[{i}][1]" for i in range(len(pairs))]
    if not pairs:
        row.fail("context", "is empty (a question needs its candidate paragraphs)")
    return [
        (title.strip(), _join(row.str_list(name, sentences)))
        for (title, sentences), name in zip(pairs, names, strict=True)
    ]


def parse_supporting_titles(row: Row) -> list[str]:
    """The titles named in `supporting_facts`, in first-mention order.

    Accepts `[[title, sentence_index], ...]` and the hub's `{"title": [...], "sent_id": [...]}`.
    """
    _, facts = row.value("supporting_facts")
    if isinstance(facts, dict):
        titles = row.str_list("supporting_facts.title", row.value_in(facts, "supporting_facts", "title"))
    else:
        titles = []
        for i, fact in enumerate(row.check_list("supporting_facts", facts)):
            fact = row.check_list(f"supporting_facts[{i}]", fact)
            if len(fact) != 2:
                row.fail(f"supporting_facts[{i}]", f"must be a [title, sentence_index] pair, got {len(fact)} items")
            titles.append(row.check_str(f"supporting_facts[{i}][0]", fact[0]))
            row.check_int(f"supporting_facts[{i}][1]", fact[1])
    return unique_in_order(title.strip() for title in titles)


def _join(sentences: list[str]) -> str:
    # Upstream HotpotQA sentences carry their own leading space; strip so the join leaves single spaces.
    return " ".join(s.strip() for s in sentences if s.strip())
