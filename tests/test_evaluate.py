"""evaluate_program on hand-written modules that answer from a dict: scores, failures, steps, recall, groups."""

import dspy
import pytest
from dspy.utils.dummies import DummyLM

from steper_dspy.errors import SteperError
from steper_dspy.evals.evaluate import EvaluationReport, evaluate_program


def make(i, question, answer, titles, qtype, hops, aliases=()):
    return dspy.Example(
        id=f"q{i}",
        question=question,
        answer=answer,
        answer_aliases=list(aliases),
        supporting_titles=titles,
        type=qtype,
        hops=hops,
    ).with_inputs("question")


DEVSET = [
    make(0, "Where was A born?", "Quessa", ["A", "Quessa"], "bridge", 2),
    make(1, "Who is older, B or C?", "Varo Meltin", ["B", "C"], "comparison", 2),
    make(2, "Which country hosts D's employer?", "United States", ["D", "E", "F"], "compositional", 3, aliases=["USA"]),
    make(3, "What year was G founded?", "1931", ["G", "H", "I", "J"], "compositional", 4),
]

# Per question: answer, passages (titles only matter), steps.
ANSWERS = {
    "Where was A born?": ("Quessa", ["A | A was born in Quessa.", "Quessa | Quessa is a city."], 2),  # em, recall 1
    "Who is older, B or C?": ("Meltin", ["B | ...", "X | ..."], 3),  # f1 2/3, recall 1/2
    "Which country hosts D's employer?": ("It is the USA", ["D | ...", "E | ...", "F | ..."], 4),  # acc, recall 1
    "What year was G founded?": ("1930", [], 5),  # wrong, recall 0
}


class DictProgram(dspy.Module):
    """Answers from a dict, like a multi-step RAG program would, without any LM."""

    def __init__(self, answers, fail_on=(), omit_answer_on=()):
        super().__init__()
        self.answers, self.fail_on, self.omit_answer_on = answers, set(fail_on), set(omit_answer_on)
        self.seen_lms = []

    def forward(self, question):
        self.seen_lms.append(dspy.settings.lm)
        if question in self.fail_on:
            raise RuntimeError("the student produced unparseable output")
        answer, passages, steps = self.answers[question]
        if question in self.omit_answer_on:
            return dspy.Prediction(rationales=["I am not sure."], passages=passages, steps=steps)
        return dspy.Prediction(answer=answer, rationales=["..."] * steps, passages=passages, steps=steps)


def test_scores_steps_recall_and_groups():
    report = evaluate_program(DictProgram(ANSWERS), DEVSET, display_progress=False)
    assert isinstance(report, EvaluationReport)
    assert report.em == pytest.approx(25.0)
    assert report.f1 == pytest.approx(100 * (1 + 2 / 3 + 0.5) / 4)  # "it is usa" vs "usa": P 1/3, R 1 -> 0.5
    assert report.accuracy == pytest.approx(50.0)
    assert report.failures == 0
    assert report.avg_steps == pytest.approx(3.5)
    assert report.recall == pytest.approx(100 * (1 + 0.5 + 1 + 0) / 4)
    assert report.by_type["compositional"] == pytest.approx({"em": 0.0, "f1": 25.0, "accuracy": 50.0, "count": 2})
    assert report.by_type["bridge"]["em"] == 100.0
    assert list(report.by_hops) == [2, 3, 4]
    assert report.by_hops[2] == pytest.approx({"em": 50.0, "f1": 100 * (1 + 2 / 3) / 2, "accuracy": 50.0, "count": 2})
    first = report.rows[0]
    assert {
        k: first[k] for k in ("id", "question", "gold", "predicted", "em", "f1", "accuracy", "steps", "type", "hops")
    } == {
        "id": "q0",
        "question": "Where was A born?",
        "gold": "Quessa",
        "predicted": "Quessa",
        "em": True,
        "f1": 1.0,
        "accuracy": True,
        "steps": 2,
        "type": "bridge",
        "hops": 2,
    }
    headline = {"em": 25.0, "f1": report.f1, "accuracy": 50.0, "failures": 0, "avg_steps": 3.5, "recall": 62.5, "n": 4}
    assert {key: report.summary()[key] for key in headline} == pytest.approx(headline)
    assert report.summary()["tokens/s"] == 0.0  # no LM was called


@pytest.mark.parametrize("num_threads", [1, 3])
def test_errors_and_missing_answers_are_counted_not_fatal(num_threads):
    program = DictProgram(ANSWERS, fail_on={DEVSET[0].question}, omit_answer_on={DEVSET[2].question})
    report = evaluate_program(program, DEVSET, num_threads=num_threads, display_progress=False)
    assert report.failures == 2
    assert [row["failed"] for row in report.rows] == [True, False, True, False]
    assert [row["predicted"] for row in report.rows] == [None, "Meltin", None, "1930"]
    assert report.em == 0.0
    assert report.f1 == pytest.approx(100 * (2 / 3) / 4)
    assert report.rows[0]["steps"] is None and report.rows[2]["steps"] == 4
    assert report.recall == pytest.approx(100 * (0 + 0.5 + 1 + 0) / 4)


class ParseFailingProgram(dspy.Module):
    """Fails like a student that cannot write an expansion step's fields, or whose LM is down."""

    def forward(self, question):
        from dspy.utils.exceptions import AdapterParseError

        from steper_dspy.programs.signatures import ExpandReasoning

        if question == DEVSET[0].question:
            raise AdapterParseError("ChatAdapter", ExpandReasoning, "I think the answer is Quessa.")
        if question == DEVSET[1].question:
            raise ValueError(f"The prompt has {4000 + len(question)} tokens, over the model's 4096.\nShorten it.")
        if question == DEVSET[2].question:
            return dspy.Prediction(rationales=["I am not sure."], passages=[], steps=3)
        return dspy.Prediction(answer="1931", passages=[], steps=3)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_each_failure_is_explained_by_its_reason(tmp_path, num_threads):
    from steper_dspy.evals.evaluate import combine_runs
    from steper_dspy.evals.experiment.report import write_report

    report = evaluate_program(ParseFailingProgram(), DEVSET, num_threads=num_threads, display_progress=False)
    too_long = "ValueError: The prompt has N tokens, over the model's N."  # the same reason whatever the counts
    assert [row["failure"] for row in report.rows] == [
        "AdapterParseError in ExpandReasoning",
        too_long,
        "no answer",
        None,
    ]
    assert report.failures == 3 and report.accuracy == 25.0
    assert report.summary()["failure_reasons"] == {
        "AdapterParseError in ExpandReasoning": 1,
        too_long: 1,
        "no answer": 1,
    }
    assert "failure_reasons" not in evaluate_program(DictProgram(ANSWERS), DEVSET, display_progress=False).summary()
    assert EvaluationReport.from_dict(report.to_dict()).failure_reasons() == report.failure_reasons()

    clean = evaluate_program(DictProgram(ANSWERS), DEVSET, display_progress=False)
    seeds = combine_runs([report, clean])  # per run, not summed over seeds
    assert seeds.failure_reasons()["AdapterParseError in ExpandReasoning"] == 0.5
    old = report.to_dict()  # a record written before failures had reasons
    old["rows"] = [{k: v for k, v in row.items() if k != "failure"} for row in old["rows"]]
    old_report = EvaluationReport.from_dict(old)
    assert old_report.failures == 3 and old_report.failure_reasons() == {"reason not recorded": 3}
    mixed = combine_runs([report, old_report])  # the reasons of one run and the other's failures still add up
    assert mixed.failure_reasons()["reason not recorded"] == 1.5 and sum(mixed.failure_reasons().values()) == 3

    text = write_report(tmp_path, {"2wiki": {"student": seeds, "old": old_report}}, title="t", details={}, timings={})
    assert f"- student: 0.5 AdapterParseError in ExpandReasoning, 0.5 {too_long}, 0.5 no answer" in text.read_text()
    assert "- old: 3 reason not recorded" in text.read_text()


def test_a_signature_built_at_run_time_is_named_by_its_outputs():
    from dspy.utils.exceptions import AdapterParseError

    from steper_dspy.evals.evaluate import failure_reason
    from steper_dspy.programs.signatures import ExpandReasoning

    changed = ExpandReasoning.with_instructions("Reason one step further.")
    assert failure_reason(AdapterParseError("ChatAdapter", changed, "...")) == (
        "AdapterParseError in " + "/".join(ExpandReasoning.output_fields)
    )


def test_a_run_where_every_question_fails_still_reports():
    program = DictProgram(ANSWERS, fail_on=set(ANSWERS))
    report = evaluate_program(program, DEVSET, display_progress=False)
    assert report.failures == len(DEVSET)
    assert report.summary()["em"] == 0.0
    assert report.avg_steps is None


def test_lm_is_set_for_the_run_only():
    lm = DummyLM([{"answer": "unused"}])
    program = DictProgram(ANSWERS)
    evaluate_program(program, DEVSET[:2], lm=lm, num_threads=2, display_progress=False)
    assert program.seen_lms == [lm, lm]
    assert dspy.settings.lm is not lm


def test_examples_without_gold_titles_or_groups():
    devset = [dspy.Example(question="Where was A born?", answer="Quessa").with_inputs("question")]
    report = evaluate_program(DictProgram(ANSWERS), devset, display_progress=False)
    assert report.recall is None
    assert report.by_type == {} and report.by_hops == {}
    assert report.summary()["n"] == 1


def test_empty_devset_is_a_user_error():
    with pytest.raises(SteperError, match="devset is empty"):
        evaluate_program(DictProgram(ANSWERS), [], display_progress=False)


class PassagesProgram(dspy.Module):
    """Answers question i with "answer i" and, like a multi-hop RAG program, 8 new passages (~0.5 KB each) and
    3 rationales: about 6 KB of prediction per question."""

    def forward(self, question):
        i = question.split()[1]
        passages = [f"Title {i}-{j} | " + f"Passage {j} about question {i}. " * 16 for j in range(8)]
        return dspy.Prediction(answer=f"answer {i}", passages=passages, rationales=[f"Step {i}. " * 30] * 3, steps=3)


def test_evaluation_memory_grows_by_a_result_row_per_question_not_a_prediction():
    import gc
    import logging
    import tracemalloc

    def peak(n: int) -> int:
        devset = [
            dspy.Example(
                id=f"q{i}", question=f"question {i} ?", answer=f"answer {i}", supporting_titles=[f"Title {i}-0"]
            ).with_inputs("question")
            for i in range(n)
        ]
        gc.collect()
        tracemalloc.start()
        report = evaluate_program(PassagesProgram(), devset, display_progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert (report.em, report.recall, report.failures, len(report.rows)) == (100.0, 100.0, 0, n)
        return top

    logging.getLogger("dspy.evaluate.evaluate").disabled = True  # its "Average Metric" line
    try:
        peak(10)  # warm up (first-call caches)
        small, large = peak(200), peak(2000)
    finally:
        logging.getLogger("dspy.evaluate.evaluate").disabled = False
    per_question = (large - small) / 1800
    print(
        f"\nevaluation peak memory: 200 questions {small / 1e6:.2f} MB, 2000 questions {large / 1e6:.2f} MB "
        f"({per_question:.0f} B per question; each prediction holds ~6 KB)"
    )
    # A result row (a dict of 12 small fields) is about 0.8 KB; keeping each prediction would add ~6 KB more.
    assert per_question < 2000


@pytest.mark.parametrize("num_threads", [1, 2])
def test_wall_time_and_generated_tokens_are_reported(tiny_model_dir, num_threads):
    from steper_dspy.lm import local_lm

    lm = local_lm(str(tiny_model_dir), max_tokens=6, cache=False)  # a cached reply reports no tokens
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    report = evaluate_program(program, DEVSET, num_threads=num_threads, display_progress=False)
    # The random model never writes the field markers, so every answer fails to parse, yet each question
    # still generated at least one 6-token reply that the report counts.
    assert report.failures == len(DEVSET)
    assert report.completion_tokens >= 6 * len(DEVSET)
    summary = report.summary()
    assert report.seconds > 0 and summary["s/question"] == pytest.approx(report.seconds / len(DEVSET))
    assert summary["tokens/s"] == pytest.approx(report.completion_tokens / report.seconds)


def test_a_report_names_the_five_most_frequent_failure_reasons_and_sums_the_rest():
    from steper_dspy.evals.experiment.report import _reasons

    counts = {f"reason {i}": 10.0 - i for i in range(7)}
    assert _reasons(counts) == "10 reason 0, 9 reason 1, 8 reason 2, 7 reason 3, 6 reason 4, 9 other"
    assert _reasons({"reason": 1 / 3}) == "0.3 reason"  # once in 3 seeds: a mean per run, to one decimal
