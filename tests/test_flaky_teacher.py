"""A teacher that fails on purpose: transient errors are retried by DSPy, permanent ones are reported and redone by a
rerun, unparseable replies are dropped as ``parse_error``; none of them stops the harvest."""

import logging
import random
import re
from collections import Counter

import dspy
import pytest
from dspy.clients import execution
from dspy.lm15 import InvalidRequestError, RateLimitError, ServerError, TransportError
from dspy.lm15 import TimeoutError as LMTimeoutError

from steper_dspy.compilers import HarvestReport, HarvestStore, harvest
from steper_dspy.programs import IRCoT
from tests.harvest_driver import PASSAGES, exact, questions, script
from tests.scripted import ListRetriever, ScriptedEngine

# The lm15 errors DSPy retries with backoff (dspy.utils.exceptions.is_retryable_lm_error).
TRANSIENT = (RateLimitError, LMTimeoutError, ServerError, TransportError)
RATIONALES, ANSWERS = script()
IDS = {example.question: example.id for example in questions()}


def question_of(request) -> str:
    return re.search(r"\[\[ ## question ## \]\]\n(.*?)\n\n", request.messages[-1].text, re.S).group(1)


def run(path, engine, *, num_retries=0):
    student = IRCoT(ListRetriever(PASSAGES), k=1, max_steps=5)
    teacher = student.deepcopy()
    teacher.set_lm(dspy.LM("scripted/teacher", engine=engine, cache=False, num_retries=num_retries))
    return harvest(student, teacher, questions(), HarvestStore(path), metric=exact, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The chain records of a run with a healthy teacher, as sorted JSON lines."""
    path = tmp_path_factory.mktemp("reference") / "h.jsonl"
    assert run(path, ScriptedEngine(RATIONALES, ANSWERS)).kept == 12
    return sorted(path.read_text().splitlines())


class TransientEngine(ScriptedEngine):
    """Fails the first `failures` attempts of every request with a transient error (rate limit, timeout,
    server error, transport error in turn), each with a zero `retry_after` hint, then answers."""

    def __init__(self, *args, failures: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures = failures
        self.attempts: Counter[str] = Counter()
        self.raised: Counter[str] = Counter()

    def complete(self, request):
        key = request.messages[-1].text
        with self._lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
        if attempt <= self.failures:
            error = TRANSIENT[(len(self.attempts) + attempt) % len(TRANSIENT)]
            with self._lock:
                self.raised[error.__name__] += 1
            raise error(f"transient {error.__name__} (attempt {attempt})", retry_after=0.0)
        return super().complete(request)


class BrokenEngine(ScriptedEngine):
    """A `share` of the distinct requests (drawn from `seed`) fail on every attempt: alternately with a
    non-retryable InvalidRequestError and a retryable ServerError that outlasts DSPy's retries."""

    def __init__(self, *args, share: float, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.share, self.seed = share, seed
        self.failed: set[str] = set()  # questions whose chain hit a failing request
        self.raised: Counter[str] = Counter()

    def complete(self, request):
        text = request.messages[-1].text
        draw = random.Random(f"{self.seed}:{text}")
        if draw.random() < self.share:
            error = ServerError if draw.random() < 0.5 else InvalidRequestError
            with self._lock:
                self.failed.add(question_of(request))
                self.raised[error.__name__] += 1
            raise error("teacher permanently down for this request", retry_after=0.0)
        return super().complete(request)


class AskedEngine(ScriptedEngine):
    """A healthy teacher that remembers which questions it was asked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()

    def complete(self, request):
        with self._lock:
            self.asked.add(question_of(request))
        return super().complete(request)


def test_transient_errors_are_retried_with_backoff_and_the_harvest_succeeds(tmp_path, monkeypatch, reference):
    delays = []
    backoff = execution._delay

    def recorded_delay(exc, attempt):  # DSPy's own backoff, observed: it honours the 0 s retry_after hint
        delays.append(backoff(exc, attempt))
        return delays[-1]

    monkeypatch.setattr(execution, "_delay", recorded_delay)
    engine = TransientEngine(RATIONALES, ANSWERS, failures=2)
    report = run(tmp_path / "h.jsonl", engine, num_retries=2)

    assert report.lm_failures == 0 and report.kept == 12 and report.dropped == {}
    assert sum(engine.raised.values()) == 2 * len(engine.attempts) == len(delays) == 84  # 42 requests
    assert set(engine.raised) == {e.__name__ for e in TRANSIENT}
    assert set(delays) == {0.0}
    assert sorted((tmp_path / "h.jsonl").read_text().splitlines()) == reference
    print(f"\ntransient: {dict(engine.raised)} retried, 0 chains lost")


def test_transient_errors_beyond_the_retries_are_lm_failures_not_records(tmp_path):
    engine = TransientEngine(RATIONALES, ANSWERS, failures=3)
    report = run(tmp_path / "h.jsonl", engine, num_retries=2)
    assert report.lm_failures == 12 and report.chains == 0
    assert len(HarvestStore(tmp_path / "h.jsonl")) == 0


def test_permanent_failures_are_reported_and_a_rerun_fills_exactly_the_missing_chains(tmp_path, caplog, reference):
    path = tmp_path / "h.jsonl"
    broken = BrokenEngine(RATIONALES, ANSWERS, share=0.15, seed=3)
    with caplog.at_level(logging.WARNING):
        report = run(path, broken, num_retries=1)
    failed = {IDS[q] for q in broken.failed}

    assert 0 < report.lm_failures == len(failed) < 12
    assert set(broken.raised) == {"ServerError", "InvalidRequestError"}
    assert report.chains == report.new_chains == 12 - len(failed)
    assert {r.example_id for r in HarvestStore(path).records()} == set(IDS.values()) - failed
    in_order = sorted(failed, key=lambda eid: int(eid[1:]))
    assert report.failed_chains == [(eid, 0) for eid in in_order]
    assert (
        f"{len(failed)} chains failed on teacher errors and will be retried by a rerun: {', '.join(in_order)}"
        in report.summary().splitlines()
    )
    for eid in failed:  # the log names each failed chain
        assert f"teacher failed on {eid}" in caplog.text

    healthy = AskedEngine(RATIONALES, ANSWERS)
    rerun = run(path, healthy)
    assert {IDS[q] for q in healthy.asked} == failed  # only the missing chains are asked again
    assert (rerun.new_chains, rerun.lm_failures, rerun.chains) == (len(failed), 0, 12)
    assert "failed on teacher errors" not in rerun.summary() and rerun.failed_chains == []
    assert sorted(path.read_text().splitlines()) == reference
    print(
        f"\npermanent: {dict(broken.raised)} -> {len(failed)} of 12 chains failed ({', '.join(in_order)}, named in "
        "the summary), rerun redid exactly those"
    )


GARBAGE = [
    "I cannot follow formats.",
    "",
    "[[ ## rationale ## ]]\nok\n\n[[ ## sufficient ## ]]\nmaybe\n\n[[ ## completed ## ]]",
    '{"rationale": "unterminated',
    "[[ ## answer ## ]]\n\x00\ufffd\udcff\n\n[[ ## completed ## ]]",
]


class GarbageEngine(ScriptedEngine):
    """Answers the questions in `replies` with that unparseable reply, the others from the script."""

    def __init__(self, *args, replies: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = replies

    def complete(self, request):
        question = question_of(request)
        if question in self.replies:
            with self._lock:
                self.calls += 1
            return self._response(self.replies[question])
        return super().complete(request)


def test_unparseable_replies_are_dropped_as_parse_errors_never_fatal(tmp_path, reference):
    questions_ = list(RATIONALES)
    replies = {questions_[i]: reply for i, reply in zip((1, 4, 6, 9, 11), GARBAGE, strict=True)}
    path = tmp_path / "h.jsonl"
    report = run(path, GarbageEngine(RATIONALES, ANSWERS, replies=replies))

    assert report.lm_failures == 0
    assert report.dropped == {"parse_error": len(GARBAGE)} and report.kept == 12 - len(GARBAGE)
    dropped = {r.example_id for r in HarvestStore(path).records() if not r.kept}
    assert dropped == {IDS[q] for q in replies}
    kept = sorted(line for line in path.read_text().splitlines() if '"kept": true' in line)
    assert kept == [line for line in reference if not any(f'"example_id": "{IDS[q]}"' in line for q in replies)]

    again = GarbageEngine(RATIONALES, ANSWERS, replies=replies)
    assert run(path, again).new_chains == 0 and again.calls == 0  # recorded as dropped: not asked again


def test_the_summary_names_the_first_ten_failed_chains_and_counts_the_rest(tmp_path):
    failed = [(f"q{i}", 0) for i in range(12)] + [("q3", 1)]
    report = HarvestReport(path=tmp_path / "h.jsonl", lm_failures=13, failed_chains=failed)
    assert report.summary().splitlines()[-1] == (
        "13 chains failed on teacher errors and will be retried by a rerun: "
        "q0, q1, q2, q3, q4, q5, q6, q7, q8, q9 and 3 more"
    )
    report = HarvestReport(path=tmp_path / "h.jsonl", lm_failures=2, failed_chains=[("q4", 0), ("q4", 2)])
    assert report.summary().endswith("retried by a rerun: q4, q4 (rollout 2)")
