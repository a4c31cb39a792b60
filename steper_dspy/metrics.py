"""Answer metrics for multi-hop QA: exact match, token F1 and accuracy (the gold answer contained in the prediction).

Each compares `pred.answer` with `example.answer` and every `example.answer_aliases` entry and keeps the best score.
They follow DSPy's metric protocol, `metric(example, pred, trace=None)`, and never raise: a prediction without an
answer (a failed or unparseable call) scores 0.
"""

from collections.abc import Callable
from typing import Any

from dspy.evaluate.metrics import em_score, f1_score, normalize_text


def answer_exact_match(example: Any, pred: Any, trace: Any = None) -> bool:
    """Whether the normalised prediction equals a normalised gold answer or alias."""
    prediction = predicted_answer(pred)
    return prediction is not None and any(em_score(prediction, gold) for gold in gold_answers(example))


def answer_f1(example: Any, pred: Any, trace: Any = None) -> float:
    """The best token-level F1 between the prediction and a gold answer or alias, in [0, 1]."""
    prediction = predicted_answer(pred)
    # An empty prediction scores 0 here, before f1_score would print its empty-vs-empty diagnostic.
    if prediction is None or not normalize_text(prediction):
        return 0.0
    return max((float(f1_score(prediction, gold)) for gold in gold_answers(example)), default=0.0)


def answer_accuracy(example: Any, pred: Any, trace: Any = None) -> bool:
    """Whether a normalised gold answer or alias occurs in the normalised prediction.

    Containment is checked on whole tokens, so "no" does not match inside "not known" and "1962" not inside
    "19621"; otherwise it is the usual "answer contained" accuracy of multi-hop QA papers.
    """
    prediction = predicted_answer(pred)
    if prediction is None:
        return False
    padded = f" {normalize_text(prediction)} "
    return any(f" {gold} " in padded for gold in map(normalize_text, gold_answers(example)) if gold)


def predicted_answer(pred: Any) -> str | None:
    """`pred.answer` as a string, or `None` when the prediction has no answer."""
    answer = getattr(pred, "answer", None) if pred is not None else None
    if answer is None:
        return None
    return answer if isinstance(answer, str) else str(answer)


def gold_answers(example: Any) -> list[str]:
    """The example's answer followed by its aliases, skipping empty ones."""
    answer = getattr(example, "answer", None)
    answers = list(answer) if isinstance(answer, list | tuple) else [answer]
    answers += list(getattr(example, "answer_aliases", None) or [])
    return [str(a) for a in answers if a is not None and str(a).strip()]


METRICS: dict[str, Callable[..., float | bool]] = {
    "em": answer_exact_match,
    "f1": answer_f1,
    "accuracy": answer_accuracy,
}
