"""MuSiQue rows: `id question answer answer_aliases paragraphs question_decomposition answerable`."""

import re

import dspy

from steper_dspy.evals.datasets.hotpotqa import Paragraph
from steper_dspy.evals.datasets.rows import Row
from steper_dspy.evals.datasets.types import make_example, unique_in_order

# MuSiQue ids start with the hop count and the decomposition shape: "2hop__...", "3hop1__...", "4hop3__...".
_HOPS_IN_ID = re.compile(r"^(\d+)hop")


def parse_musique(row: Row) -> tuple[dspy.Example, list[Paragraph]] | None:
    """Turn one MuSiQue row into a question and its paragraphs; `None` for a row marked unanswerable."""
    answerable = row.data.get("answerable")
    answerable = True if answerable is None else row.check_bool("answerable", answerable)
    paragraphs, supporting = _parse_paragraphs(row)
    decomposition = _parse_decomposition(row)
    question_id = row.text("id", "_id")
    example = make_example(
        id=question_id,
        question=row.text("question"),
        answer=row.text("answer"),
        answer_aliases=_parse_aliases(row),
        supporting_titles=_supporting_titles(paragraphs, supporting, decomposition),
        type="compositional",
        hops=_hops(question_id, decomposition, supporting),
    )
    if not answerable:
        return None
    return example, [(title, text) for _, title, text in paragraphs]


def _parse_paragraphs(row: Row) -> tuple[list[tuple[int, str, str]], list[int]]:
    """`(idx, title, text)` per paragraph and the idx of the supporting ones, in paragraph order."""
    _, raw = row.value("paragraphs")
    paragraphs, supporting = [], []
    for i, entry in enumerate(row.check_list("paragraphs", raw)):
        name = f"paragraphs[{i}]"
        entry = row.check_dict(name, entry)
        idx = row.check_int(f"{name}.idx", entry["idx"]) if entry.get("idx") is not None else i
        title = row.check_str(f"{name}.title", row.value_in(entry, name, "title")).strip()
        text = row.check_str(f"{name}.paragraph_text", row.value_in(entry, name, "paragraph_text")).strip()
        if entry.get("is_supporting") is not None and row.check_bool(f"{name}.is_supporting", entry["is_supporting"]):
            supporting.append(idx)
        paragraphs.append((idx, title, text))
    if not paragraphs:
        row.fail("paragraphs", "is empty (a question needs its candidate paragraphs)")
    return paragraphs, supporting


def _parse_decomposition(row: Row) -> list[int | None]:
    """The supporting paragraph idx of each sub-question, in hop order (`None` where a step names none)."""
    if row.data.get("question_decomposition") is None:
        return []
    steps = []
    for i, step in enumerate(row.check_list("question_decomposition", row.data["question_decomposition"])):
        name = f"question_decomposition[{i}]"
        step = row.check_dict(name, step)
        support = step.get("paragraph_support_idx")
        steps.append(None if support is None else row.check_int(f"{name}.paragraph_support_idx", support))
    return steps


def _parse_aliases(row: Row) -> list[str]:
    if row.data.get("answer_aliases") is None:
        return []
    aliases = row.str_list("answer_aliases", row.data["answer_aliases"])
    return unique_in_order(alias.strip() for alias in aliases if alias.strip())


def _supporting_titles(
    paragraphs: list[tuple[int, str, str]], supporting: list[int], decomposition: list[int | None]
) -> list[str]:
    # Hop order comes from the decomposition; supporting paragraphs it does not mention follow in paragraph order.
    title_of = {idx: title for idx, title, _ in paragraphs}
    ordered = [idx for idx in decomposition if idx in title_of] + supporting
    return unique_in_order(title_of[idx] for idx in ordered if idx in title_of)


def _hops(question_id: str, decomposition: list[int | None], supporting: list[int]) -> int | None:
    if match := _HOPS_IN_ID.match(question_id):
        return int(match.group(1))
    return len(decomposition) or len(supporting) or None
