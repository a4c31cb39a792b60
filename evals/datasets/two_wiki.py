"""2WikiMultiHopQA rows: `_id question answer type supporting_facts evidences context` (HotpotQA's layout plus
evidence triples)."""

import dspy

from steper_dspy.evals.datasets.hotpotqa import Paragraph, parse_context, parse_supporting_titles
from steper_dspy.evals.datasets.rows import Row
from steper_dspy.evals.datasets.types import make_example

# Comparison questions sometimes list 3-4 evidence triples about the same two entities, so the question type,
# not the evidence count, is the reliable hop count.
TWO_WIKI_HOPS = {"compositional": 2, "comparison": 2, "inference": 2, "bridge_comparison": 4}


def parse_2wiki(row: Row) -> tuple[dspy.Example, list[Paragraph]]:
    """Turn one 2WikiMultiHopQA row into a question and its candidate paragraphs."""
    paragraphs = parse_context(row)
    supporting_titles = parse_supporting_titles(row)
    question_type = row.text("type")
    if row.data.get("evidences") is not None:
        row.check_list("evidences", row.data["evidences"])
    hops = TWO_WIKI_HOPS.get(question_type, len(supporting_titles) or None)
    example = make_example(
        id=row.text("_id", "id"),
        question=row.text("question"),
        answer=row.text("answer"),
        answer_aliases=[],
        supporting_titles=supporting_titles,
        type=question_type,
        hops=hops,
    )
    return example, paragraphs
