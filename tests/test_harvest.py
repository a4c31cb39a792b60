import json

import dspy
import pytest

from steper_dspy import SteperError
from steper_dspy.adapter import SharedPrefixAdapter, student_adapter
from steper_dspy.compilers import GroundedStepFilter, HarvestStore, harvest
from steper_dspy.programs import IRCoT
from tests.scripted import PASSAGES, ListRetriever, scripted_teacher

SCRIPT = {
    "Where was Alpha born?": ["Alpha was born in Beta."],
    "Which country is Alpha's city in?": ["Alpha was born in Beta.", "Beta is a city in Gamma."],
    "Which river flows through the capital of the country of Alpha's city?": [
        "Alpha was born in Beta.",
        "Beta is a city in Gamma.",
        "Gamma is a country whose capital is Delta.",
        "Delta lies on the river Epsilon.",
    ],
    "What is wrong?": ["Alpha was born in Beta.", "Beta is a city in Gamma."],
}
ANSWERS = {
    "Where was Alpha born?": "Beta",
    "Which country is Alpha's city in?": "Gamma",
    "Which river flows through the capital of the country of Alpha's city?": "Epsilon",
    "What is wrong?": "Mars",
}


def examples(questions, gold=None):
    gold = gold or ANSWERS
    return [
        dspy.Example(id=f"q{i}", question=q, answer=gold[q]).with_inputs("question") for i, q in enumerate(questions)
    ]


def exact(example, pred, trace=None):
    return float(pred.answer == example.answer)


def run_harvest(path, questions, *, max_steps=5, lm_kwargs=None, gold=None, **kwargs):
    teacher_lm, engine = scripted_teacher(SCRIPT, ANSWERS, **(lm_kwargs or {}))
    student = IRCoT(ListRetriever(PASSAGES), k=1, max_steps=max_steps)
    teacher = student.deepcopy()
    teacher.set_lm(teacher_lm)
    report = harvest(
        student, teacher, examples(questions, gold), HarvestStore(path), metric=exact, progress=False, **kwargs
    )
    return report, engine


def test_stage_tags_follow_predictor_identity_for_0_1_and_3_expansions(tmp_path):
    q1, q3 = (
        "Which country is Alpha's city in?",
        "Which river flows through the capital of the country of Alpha's city?",
    )
    report, _ = run_harvest(tmp_path / "h.jsonl", [q1, q3])
    records = {r.example_id: r for r in HarvestStore(tmp_path / "h.jsonl").records()}
    assert [s["stage"] for s in records["q0"].samples] == ["init", "expand", "aggregate"]
    assert [s["stage"] for s in records["q1"].samples] == ["init", "expand", "expand", "expand", "aggregate"]
    assert [s["step"] for s in records["q1"].samples] == [0, 1, 2, 3, 4]
    assert report.samples_by_stage == {"init": 2, "expand": 4, "aggregate": 2}

    report, _ = run_harvest(tmp_path / "h0.jsonl", ["Where was Alpha born?"], max_steps=2)
    (record,) = HarvestStore(tmp_path / "h0.jsonl").records()
    assert [s["stage"] for s in record.samples] == ["init", "aggregate"]


def test_samples_are_formatted_exactly_like_the_student_prompt(tmp_path):
    run_harvest(tmp_path / "h.jsonl", ["Which country is Alpha's city in?"])
    sample = next(HarvestStore(tmp_path / "h.jsonl").samples())
    program = IRCoT(ListRetriever(PASSAGES), k=1)
    inputs = {"question": "Which country is Alpha's city in?", "passages": [PASSAGES[0]]}
    expected = student_adapter().format(program.initialize.signature, demos=[], inputs=inputs)
    assert sample["messages"][:-1] == expected
    assert sample["messages"][-1] == {
        "role": "assistant",
        "content": "[[ ## rationale ## ]]\nAlpha was born in Beta.\n\n[[ ## completed ## ]]\n",
    }


def test_a_harvest_file_of_another_prompt_layout_is_refused_by_a_resumed_harvest(tmp_path):
    path = tmp_path / "h.jsonl"
    run_harvest(path, ["Which country is Alpha's city in?"])
    assert next(HarvestStore(path).samples())["layout"] == student_adapter().layout
    # A file written with the full layout (and one from before layouts were named, which holds that layout).
    full = SharedPrefixAdapter(use_json_adapter_fallback=False)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for unnamed in (False, True):
        for line in lines:
            for sample in line["samples"]:
                sample.pop("layout", None) if unnamed else sample.update(layout=full.layout)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(SteperError, match="prompt layout 'shared-prefix'.*move the file away"):
            run_harvest(path, ["Which country is Alpha's city in?", "Where was Alpha born?"])
        assert len(HarvestStore(path)) == 1, "nothing was appended"
    # The same file resumes with the adapter it was written with.
    report, _ = run_harvest(path, ["Which country is Alpha's city in?", "Where was Alpha born?"], adapter=full)
    assert report.chains == 2


def test_failed_chains_are_dropped_with_their_reason(tmp_path):
    questions = ["Which country is Alpha's city in?", "What is wrong?", "Where was Alpha born?"]
    gold = {**ANSWERS, "What is wrong?": "Venus"}
    report, _ = run_harvest(
        tmp_path / "h.jsonl", questions, lm_kwargs={"garbage": ["Where was Alpha born?"]}, gold=gold
    )
    assert report.kept == 1
    assert report.dropped == {"metric": 1, "parse_error": 1}
    assert {s["example_id"] for s in HarvestStore(tmp_path / "h.jsonl").samples()} == {"q0"}


def test_teacher_errors_are_not_recorded_and_a_rerun_retries_them(tmp_path):
    questions = ["Which country is Alpha's city in?", "Where was Alpha born?"]
    report, _ = run_harvest(tmp_path / "h.jsonl", questions, lm_kwargs={"fail": ["Where was Alpha born?"]})
    assert report.lm_failures == 1 and report.chains == 1
    report, _ = run_harvest(tmp_path / "h.jsonl", questions)
    assert report.chains == 2 and report.new_chains == 1


def test_resume_yields_the_samples_of_an_uninterrupted_run_without_repeating_calls(tmp_path):
    questions = list(SCRIPT)
    run_harvest(tmp_path / "full.jsonl", questions)
    run_harvest(tmp_path / "part.jsonl", questions[:2])
    # a crash mid-write leaves a torn last line: it is dropped and its chain redone
    with open(tmp_path / "part.jsonl", "a") as f:
        f.write('{"example_id": "q2", "rollout": 0, "kept": tr')
    report, engine = run_harvest(tmp_path / "part.jsonl", questions)
    assert report.new_chains == 2
    assert engine.calls == 5 + 3  # only the two chains not yet written: q2 (5 calls), q3 (3 calls)
    full = list(map(json.dumps, HarvestStore(tmp_path / "full.jsonl").samples()))
    assert list(map(json.dumps, HarvestStore(tmp_path / "part.jsonl").samples())) == full

    # Chains finish in any order under threads: the samples come in one order whatever order the file has.
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "reversed.jsonl").write_text("".join(reversed(lines)))
    assert list(map(json.dumps, HarvestStore(tmp_path / "reversed.jsonl").samples())) == full


def test_teacher_demos_never_reach_the_samples(tmp_path):
    teacher_lm, _ = scripted_teacher(SCRIPT, ANSWERS)
    student = IRCoT(ListRetriever(PASSAGES), k=1)
    teacher = student.deepcopy()
    teacher.set_lm(teacher_lm)
    teacher.initialize.demos = [dspy.Example(question="DEMO QUESTION", passages=["x | y"], rationale="DEMO")]
    ex = examples(["Where was Alpha born?"])
    harvest(student, teacher, ex, HarvestStore(tmp_path / "h.jsonl"), metric=exact, progress=False)
    text = json.dumps(list(HarvestStore(tmp_path / "h.jsonl").samples()))
    assert "DEMO" not in text


def test_rollouts_add_chains_per_question(tmp_path):
    report, _ = run_harvest(tmp_path / "h.jsonl", ["Where was Alpha born?"], rollouts=3)
    assert report.chains == 3
    store = HarvestStore(tmp_path / "h.jsonl")
    assert sorted(r.rollout for r in store.records()) == [0, 1, 2]
    greedy = list(store.samples(rollouts=1))  # a run asking for fewer rollouts trains on its own chains only
    assert greedy and len(list(store.samples())) == 3 * len(greedy)
    assert len(list(store.samples(rollouts=2))) == 2 * len(greedy)
    report, _ = run_harvest(tmp_path / "h.jsonl", ["Where was Alpha born?"], rollouts=1)
    assert (report.chains, report.new_chains, report.kept) == (1, 0, 1)  # the run's own chains, as it trains
    from steper_dspy.compilers import STEPER
    from steper_dspy.training import data_hash, validate_samples

    greedy_run = STEPER("no-model", output_dir=tmp_path / "run", harvest_path=tmp_path / "h.jsonl", rollouts=1)
    assert greedy_run.training_identity()["data_hash"] == data_hash(validate_samples(greedy))  # what it trains on


def test_the_report_counts_questions_and_can_be_restricted_to_questions_and_first_rollouts(tmp_path):
    from steper_dspy.compilers.harvest import HarvestReport

    questions = ["Where was Alpha born?", "What is wrong?", "Which country is Alpha's city in?"]
    report, _ = run_harvest(tmp_path / "h.jsonl", questions, rollouts=2, gold={**ANSWERS, "What is wrong?": "Venus"})
    assert (report.chains, report.questions, report.kept, report.questions_kept) == (6, 3, 4, 2)
    assert "6 chains of 3 questions" in report.summary() and "(2 questions with a kept chain)" in report.summary()
    store = HarvestStore(tmp_path / "h.jsonl")
    greedy = HarvestReport.from_store(store, rollouts=1)
    assert (greedy.chains, greedy.kept, greedy.questions_kept) == (3, 2, 2)
    one = HarvestReport.from_store(store, example_ids={"q0", "q1"})
    assert (one.chains, one.questions, one.kept, one.questions_kept) == (4, 2, 2, 1)
    assert one.samples_by_stage["init"] == 2


def test_grounded_step_filter():
    check = GroundedStepFilter()
    inputs = {"question": "Where was Alpha born?", "passages": ["Alpha | Alpha was born in Beta."]}
    assert check("init", inputs, {"rationale": "Alpha was born in Beta."}) is None
    assert check("init", inputs, {"rationale": "Zorblat conquered Quinoa Mountains yesterday."}) == "ungrounded"


def test_step_filter_drops_steps_but_keeps_the_chain(tmp_path):
    def drop_expansions(stage, inputs, outputs):
        return "no-expand" if stage == "expand" else None

    report, _ = run_harvest(tmp_path / "h.jsonl", ["Which country is Alpha's city in?"], step_filter=drop_expansions)
    assert report.kept == 1 and report.filtered_steps == {"no-expand": 1}
    # The flagged step stays in the file with its verdict, so harvests can be shared by compilers with and
    # without a step filter; a compiler with one trains without it.
    store = HarvestStore(tmp_path / "h.jsonl")
    assert [s.get("filtered") for s in store.samples()] == [None, "no-expand", None]
    trained = [s["stage"] for s in store.samples(drop_filtered=True)]
    assert trained == ["init", "aggregate"]


def test_corrupt_harvest_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"example_id": "q0", "rollout": 0, "kept": true, "reason": null, "score": 1.0}\n{"oops": 1}\n')
    from steper_dspy import SteperError

    with pytest.raises(SteperError, match="line 2"):
        HarvestStore(path)


def test_a_copy_of_an_adapter_scoped_teacher_runs_its_own_predictors_under_the_adapter():
    import threading

    from steper_dspy.adapter import SharedPrefixAdapter, teacher_adapter
    from steper_dspy.compilers.student import run_with_adapter

    lm, _ = scripted_teacher(SCRIPT, ANSWERS)
    program = IRCoT(ListRetriever(PASSAGES), k=2)
    program.set_lm(lm)
    program.lock = threading.Lock()  # an attribute that cannot be deep-copied, as a recording LM's lock
    run_with_adapter(program, teacher_adapter())
    copy = program.deepcopy()  # what rollouts and DSPy's BootstrapFewShot do
    assert isinstance(copy, IRCoT) and isinstance(copy._run_adapter, SharedPrefixAdapter)
    with dspy.context(trace=[]):
        copy(question="Where was Alpha born?")
        called = {id(predictor) for predictor, _, _ in dspy.settings.trace}
    assert called == {id(p) for p in copy.predictors()}  # not the original's predictors
    request = lm.history[-1]["messages"]
    assert request[0]["content"] == teacher_adapter().format_system_message(None)
