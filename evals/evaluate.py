"""Evaluate a multi-hop program once with `dspy.Evaluate` and report EM, F1, accuracy, failures, steps and recall."""

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from steper_dspy.errors import SteperError
from steper_dspy.evals.stats import bootstrap_interval
from steper_dspy.lm.local import program_concurrency
from steper_dspy.metrics import answer_accuracy, answer_exact_match, answer_f1, predicted_answer
from steper_dspy.retrieval import passage_title

UNRECORDED = "reason not recorded"  # a failure read from a record written before failures had reasons


@dataclass
class EvaluationReport:
    """Scores of one evaluation run; `em`, `f1`, `accuracy` and `recall` are percentages (0-100).

    Attributes:
        em: Exact match over all questions (failures count as 0).
        f1: Token F1 over all questions.
        accuracy: Share of predictions that contain a gold answer.
        failures: Predictions that raised or came back without an answer (e.g. a student's unparseable output).
        avg_steps: Mean `pred.steps` over the predictions that report it, else `None`.
        recall: Mean share of an example's `supporting_titles` found among `pred.passages` ("Title | text"),
            over the examples that have supporting titles, else `None`.
        by_type: Per `example.type`: `em`, `f1`, `accuracy` (percentages) and `count`.
        by_hops: The same per `example.hops`.
        rows: One dict a question: `id`, `question`, `gold`, `predicted`, `em`, `f1`, `accuracy`, `steps`, `type`,
            `hops`, `recall`, `failed`, and `failure`: why it failed (e.g. "AdapterParseError in ExpandReasoning",
            "no answer"), else `None`.
        seconds: Wall time of the evaluation.
        completion_tokens: Tokens the LMs generated during the evaluation (as their responses report them).
        prompt_tokens: Prompt tokens the LMs were sent.
        cached_prompt_tokens: Those of them a prefix cache served (as a vLLM server reports them; 0 in process).
        runs: For a system trained with several seeds (see `combine_runs`): each run's accuracy, EM and F1;
            the report's own figures are their means, and its rows score each question by the mean over runs.
    """

    em: float
    f1: float
    accuracy: float
    failures: int
    avg_steps: float | None
    recall: float | None
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)
    by_hops: dict[int, dict[str, float]] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    runs: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The headline numbers as one flat dict: em, f1, accuracy (with its 95% bootstrap interval over the
        questions, `accuracy_ci95`), failures (and `failure_reasons` when any failed), avg_steps, recall, n,
        seconds per question, generated tokens per second of evaluation wall time, prompt tokens per question
        computed and served from a prefix cache, and for several seeds `seeds` and `accuracy_per_seed`."""
        n = len(self.rows)
        low, high = bootstrap_interval([float(row["accuracy"]) for row in self.rows])
        return {
            "em": self.em,
            "f1": self.f1,
            "accuracy": self.accuracy,
            "accuracy_ci95": [100 * low, 100 * high],
            "failures": self.failures,
            "avg_steps": self.avg_steps,
            "recall": self.recall,
            "n": len(self.rows),
            "s/question": self.seconds / len(self.rows) if self.rows else None,
            "tokens/s": self.completion_tokens / self.seconds if self.seconds else None,
            "prompt tokens/question": (self.prompt_tokens - self.cached_prompt_tokens) / n if n else None,
            "cached prompt tokens/question": self.cached_prompt_tokens / n if n else None,
            **({"failure_reasons": self.failure_reasons()} if self.failures else {}),
            **(
                {"seeds": len(self.runs), "accuracy_per_seed": [run["accuracy"] for run in self.runs]}
                if self.runs
                else {}
            ),
        }

    def failure_reasons(self) -> dict[str, float]:
        """Failed questions per reason, most frequent first; for a report that combines seeds, the mean per run."""
        counts: Counter[str] = Counter()
        for row in self.rows:
            reasons = row.get("failure")
            for reason in reasons if isinstance(reasons, list) else [reasons]:
                if reason:
                    counts[reason] += 1
        runs = max(1, len(self.runs))
        return {reason: count / runs for reason, count in counts.most_common()}

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: its rows, time and token counts (the rest is derived from the rows)."""
        return {
            "rows": self.rows,
            "seconds": self.seconds,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "runs": self.runs,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvaluationReport":
        """The report `to_dict` wrote, its figures recomputed from the rows (a failed row of a record written
        before failures had reasons gets the reason `UNRECORDED`, so that reasons still add up to failures)."""
        report = _report(
            [row if "failure" in row or not row["failed"] else {**row, "failure": UNRECORDED} for row in data["rows"]]
        )
        report.seconds = data["seconds"]
        report.completion_tokens = data["completion_tokens"]
        report.prompt_tokens = data["prompt_tokens"]
        report.cached_prompt_tokens = data["cached_prompt_tokens"]
        report.runs = data.get("runs", [])
        return report


def evaluate_program(
    program: dspy.Module,
    devset: list[dspy.Example],
    *,
    num_threads: int | None = None,
    display_progress: bool = True,
    lm: dspy.LM | None = None,
) -> EvaluationReport:
    """Run `program` on every question once and score its answers.

    The run goes through `dspy.Evaluate` (metric: answer F1) with room for every question to fail: errors are
    scored 0 and counted, never a reason to cancel the run. Each prediction is scored into its result row as soon
    as it is made and then let go, so memory does not grow with the passages and traces of answered questions.

    Args:
        program: A module called as `program(question=...)`, returning a prediction with `answer` and optionally
            `passages` (strings "Title | text") and `steps`.
        devset: The questions (`dspy.Example`s with `answer`, optionally `answer_aliases`, `supporting_titles`,
            `type`, `hops`).
        num_threads: Parallel threads for `dspy.Evaluate`; by default what the program's LM serves at once (see
            :func:`steper_dspy.lm.program_concurrency`).
        display_progress: Show DSPy's progress bar.
        lm: Run under `dspy.context(lm=lm)`; by default the configured LM (or the program's own) is used.

    Returns:
        The report.

    Raises:
        SteperError: The devset is empty.
    """
    if not devset:
        raise SteperError("The devset is empty: pass at least one question to evaluate.")
    if num_threads is None:
        with dspy.context(lm=lm) if lm is not None else contextlib.nullcontext():
            num_threads = program_concurrency(program)
    evaluator = dspy.Evaluate(
        devset=devset,
        metric=_score,
        num_threads=num_threads,
        display_progress=display_progress,
        # Evaluate cancels once errors reach max_errors; one more than the devset size means never.
        max_errors=len(devset) + 1,
        failure_score=0.0,
        provide_traceback=False,
    )
    scoring, start = _Scoring(program), time.perf_counter()
    with dspy.context(lm=lm) if lm is not None else contextlib.nullcontext():
        result = evaluator(scoring)
    report = _report([_row(example, scored) for example, scored, _ in result.results])
    report.seconds = time.perf_counter() - start
    report.completion_tokens, report.prompt_tokens, report.cached_prompt_tokens = scoring.tokens
    return report


class _Scored:
    """One question's prediction until the metric has scored it, then only its result row."""

    __slots__ = ("failure", "prediction", "row")

    def __init__(self, prediction: Any, failure: str | None = None) -> None:
        self.prediction: Any = prediction
        self.failure = failure
        self.row: dict | None = None


class _Scoring:
    """Calls `program`, wrapping its prediction (or why it raised) in a `_Scored` for `_score`, and counts the
    tokens of its LM calls, failed calls included (each worker thread gets its own usage tracker, so count per call):
    `tokens` is (generated, prompt, prompt served from cache)."""

    def __init__(self, program: dspy.Module) -> None:
        self.program = program
        self.tokens = (0, 0, 0)
        self._lock = threading.Lock()

    def __call__(self, **inputs: Any) -> _Scored:
        with dspy.track_usage() as usage:
            try:
                return _Scored(self.program(**inputs))
            except Exception as err:  # scored 0 and counted, like dspy.Evaluate's own failure_score, but explained
                return _Scored(None, failure=failure_reason(err))
            finally:
                counts = [usage_counts(u) for u in usage.get_total_tokens().values()]
                with self._lock:
                    self.tokens = tuple(map(sum, zip(self.tokens, *counts, strict=True)))


def usage_counts(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(generated, prompt, prompt served from cache) tokens of a DSPy usage entry, as litellm (completion/prompt
    tokens, prompt_tokens_details.cached_tokens) or DSPy's own engines (output/input, cache_read) report them."""
    details = usage.get("prompt_tokens_details") or {}
    generated = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    prompt = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    cached = details.get("cached_tokens") or usage.get("cache_read_tokens") or 0
    return int(generated), int(prompt), int(cached)


def failure_reason(err: Exception) -> str:
    """A short reason a program raised, the same for every question that failed alike: the signature whose
    outputs could not be parsed, else the error's first line with its numbers (token counts, ids) as N."""
    if isinstance(err, AdapterParseError):
        name = getattr(err.signature, "__name__", "StringSignature")
        if name == "StringSignature":  # a signature built at run time: name it by its outputs
            name = "/".join(getattr(err.signature, "output_fields", None) or ["?"])
        return f"{type(err).__name__} in {name}"
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {re.sub(r'[0-9]+', 'N', message[0])[:120]}" if message else type(err).__name__


def _score(example: dspy.Example, scored: Any, trace: Any = None) -> float:
    """The answer F1, as `dspy.Evaluate`'s metric; it keeps the result row and drops the prediction, which
    `dspy.Evaluate` would otherwise hold (passages, rationales and all) until every question is answered."""
    if not isinstance(scored, _Scored):
        return answer_f1(example, scored)
    scored.row = _score_row(example, scored.prediction, scored.failure)
    scored.prediction = None
    return scored.row["f1"]


def _row(example: dspy.Example, scored: Any) -> dict:
    if not isinstance(scored, _Scored):  # the metric raised, and dspy.Evaluate put an empty prediction in place
        return _score_row(example, scored, "not scored: the metric raised")
    return scored.row if scored.row is not None else _score_row(example, scored.prediction, scored.failure)


def combine_runs(reports: list[EvaluationReport]) -> EvaluationReport:
    """One report for a system evaluated once per training seed on the same questions: each question scored by
    the mean of its runs' scores (so intervals and paired tests resample questions), and each run's headline
    figures kept in `runs`.

    Raises:
        SteperError: The runs were not on the same questions.
    """
    if len(reports) == 1:
        return reports[0]
    ids = [[row["id"] for row in report.rows] for report in reports]
    if any(other != ids[0] for other in ids[1:]):
        raise SteperError("The runs to combine were evaluated on different questions.")
    rows = []
    for question_rows in zip(*(report.rows for report in reports), strict=True):
        row = dict(question_rows[0])
        for metric in ("em", "f1", "accuracy", "failed"):
            row[metric] = sum(float(r[metric]) for r in question_rows) / len(question_rows)
        row["predicted"] = [r["predicted"] for r in question_rows]
        row["failure"] = [r.get("failure") for r in question_rows]
        rows.append(row)
    combined = _report(rows)
    # Failures, time and tokens are those of one run (their mean), so that per-question figures stay per run.
    runs = len(reports)
    combined.failures = round(sum(r.failures for r in reports) / runs)
    combined.seconds = sum(r.seconds for r in reports) / runs
    combined.completion_tokens = sum(r.completion_tokens for r in reports) // runs
    combined.prompt_tokens = sum(r.prompt_tokens for r in reports) // runs
    combined.cached_prompt_tokens = sum(r.cached_prompt_tokens for r in reports) // runs
    combined.runs = [{"accuracy": r.accuracy, "em": r.em, "f1": r.f1} for r in reports]
    return combined


def build_report(results: Iterable[tuple[dspy.Example, Any]]) -> EvaluationReport:
    """Score `(example, prediction)` pairs into a report (a prediction of `None` counts as a failure)."""
    return _report([_score_row(example, prediction) for example, prediction in results])


def _report(rows: list[dict]) -> EvaluationReport:
    steps = [row["steps"] for row in rows if row["steps"] is not None]
    recalls = [row["recall"] for row in rows if row["recall"] is not None]
    totals = _aggregate(rows)
    return EvaluationReport(
        em=totals["em"],
        f1=totals["f1"],
        accuracy=totals["accuracy"],
        failures=sum(row["failed"] for row in rows),
        avg_steps=sum(steps) / len(steps) if steps else None,
        recall=100 * sum(recalls) / len(recalls) if recalls else None,
        by_type=_group(rows, "type"),
        by_hops=_group(rows, "hops"),
        rows=rows,
    )


def _score_row(example: dspy.Example, prediction: Any, failure: str | None = None) -> dict:
    predicted = predicted_answer(prediction)
    gold_titles = list(getattr(example, "supporting_titles", None) or [])
    return {
        "id": getattr(example, "id", None),
        "question": getattr(example, "question", None),
        "gold": getattr(example, "answer", None),
        "predicted": predicted,
        "em": answer_exact_match(example, prediction),
        "f1": answer_f1(example, prediction),
        "accuracy": answer_accuracy(example, prediction),
        "steps": _steps(prediction),
        "type": getattr(example, "type", None),
        "hops": getattr(example, "hops", None),
        "recall": _title_recall(gold_titles, getattr(prediction, "passages", None)) if gold_titles else None,
        "failed": predicted is None,
        "failure": (failure or "no answer") if predicted is None else None,
    }


def _steps(prediction: Any) -> int | float | None:
    steps = getattr(prediction, "steps", None)
    return steps if isinstance(steps, int | float) and not isinstance(steps, bool) else None


def _title_recall(gold_titles: list[str], passages: Any) -> float:
    retrieved = {passage_title(str(p)) for p in passages or []}
    return sum(title in retrieved for title in gold_titles) / len(gold_titles)


def _aggregate(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    return {
        "em": 100 * sum(row["em"] for row in rows) / n,
        "f1": 100 * sum(row["f1"] for row in rows) / n,
        "accuracy": 100 * sum(row["accuracy"] for row in rows) / n,
        "count": n,
    }


def _group(rows: list[dict], key: str) -> dict:
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        if row[key] is not None:
            groups.setdefault(row[key], []).append(row)
    ordered = sorted(groups.items(), key=lambda item: (isinstance(item[0], str), item[0]))
    return {value: _aggregate(members) for value, members in ordered}
