"""Teacher demonstrations bootstrapped from the training data: the teacher's own correct chains, kept short.

A small teacher prompted with a hand-written worked example from another world copies its entities and its
shape (three hops, "sufficient" after the second fact) into real questions. `bootstrap_demos` runs DSPy's
`BootstrapFewShot` instead: the teacher (prompted with whatever demos it has) answers training questions until
`max_demos` chains pass the metric, and each predictor gets the steps of those chains as demonstrations. Their
passage lists are cut to the passages the chain needed, so that the demos do not dominate every prompt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import BootstrapFewShot

from steper_dspy.errors import SteperError
from steper_dspy.lm.errors import ServerDiedError

logger = logging.getLogger(__name__)


class _Bootstrap(BootstrapFewShot):
    """`BootstrapFewShot` that tells a question that failed from one that did not pass, and stops when the
    teacher's server is gone (every later question would fail the same way)."""

    def __init__(self, **kwargs: Any):
        super().__init__(max_errors=1, **kwargs)  # DSPy re-raises every error; each is handled below
        self.failures: list[Exception] = []

    def _bootstrap_one_example(self, example: dspy.Example, round_idx: int = 0) -> bool:
        try:
            return super()._bootstrap_one_example(example, round_idx)
        except ServerDiedError:
            raise
        except Exception as err:
            self.failures.append(err)
            logger.warning("Bootstrapping demos: question %r failed: %s", example.get("question"), err)
            return False


def bootstrap_demos(
    program: dspy.Module,
    teacher: dspy.Module,
    trainset: Sequence[dspy.Example],
    *,
    metric: Callable[..., Any],
    threshold: float = 1.0,
    max_demos: int = 2,
    max_passages: int = 4,
) -> dict[str, list[dspy.Example]]:
    """Demonstrations for each predictor of `program`: the steps of the first `max_demos` teacher chains on
    `trainset` that pass `metric`.

    Args:
        program: The staged program (its predictors name the demos).
        teacher: The program that answers, on the teacher LM (e.g. with the built-in demos).
        trainset: Training questions, tried in order.
        metric: ``metric(example, prediction, trace)``; a chain is a demo when its score >= `threshold`.
        threshold: Least score of a demo chain.
        max_demos: Chains to find.
        max_passages: Passages kept per demo: those of the question's supporting titles or named in the
            demo's reasoning first, then the others in retrieval order.

    Returns:
        ``{predictor name: [demos]}``, for :func:`steper_dspy.programs.demos.with_demos`.

    Raises:
        SteperError: No chain passed the metric.
        ServerDiedError: The teacher's server died.
    """
    optimizer = _Bootstrap(
        metric=metric, metric_threshold=threshold, max_bootstrapped_demos=max_demos, max_labeled_demos=0
    )
    compiled = optimizer.compile(program.reset_copy(), teacher=teacher, trainset=list(trainset))
    examples = {str(example.question): example for example in trainset}
    demos = {
        name: [_short(demo, examples.get(str(demo.get("question"))), max_passages) for demo in predictor.demos]
        for name, predictor in compiled.named_predictors()
    }
    if not any(demos.values()):
        failed = optimizer.failures
        why = f" ({len(failed)} failed with an error, the first: {failed[0]})" if failed else ""
        raise SteperError(
            f"No teacher chain passed the metric on the {len(trainset)} questions tried{why}, so there is nothing "
            "to bootstrap demonstrations from: use the built-in demos (teacher_demos: builtin) or a stronger teacher."
        )
    return demos


def _short(demo: dspy.Example, example: dspy.Example | None, max_passages: int) -> dspy.Example:
    passages = demo.get("passages")
    if not isinstance(passages, list) or len(passages) <= max_passages:
        return demo
    supporting = set(getattr(example, "supporting_titles", None) or [])
    reasoning = " ".join(str(demo.get(key) or "") for key in ("rationale", "rationales", "answer"))

    def needed(passage: str) -> bool:
        title = str(passage).split(" | ", 1)[0].strip()
        return title in supporting or (len(title) > 2 and title in reasoning)

    keep = [p for p in passages if needed(p)]
    keep += [p for p in passages if p not in keep][: max(0, max_passages - len(keep))]
    return dspy.Example(**{**demo.toDict(), "passages": [p for p in passages if p in keep]})


def save_demos(demos: dict[str, list[dspy.Example]], path: str | Path) -> Path:
    """Write demos as JSON (``{predictor: [fields]}``), so that a rerun prompts the teacher identically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {
        name: [{k: v for k, v in demo.toDict().items() if k != "augmented"} for demo in items]
        for name, items in demos.items()
    }
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return path


def load_demos(path: str | Path) -> dict[str, list[dspy.Example]]:
    """Read demos written by :func:`save_demos`."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SteperError(f"Cannot read the teacher demos {path}: {err}; delete it to bootstrap them again.") from None
    return {name: [dspy.Example(**fields) for fields in items] for name, items in rows.items()}
