"""The benchmark runner: several test sets, the paper's systems and ablations, one harvest shared by all."""

import gzip
import json
from pathlib import Path

import pytest

import steper_dspy.evals
from steper_dspy import SteperError
from steper_dspy.evals import EvaluationReport
from steper_dspy.evals.experiment import (
    SYSTEMS,
    RunConfig,
    chosen_systems,
    load_task,
    quickstart_config,
    run_experiment,
)
from steper_dspy.evals.experiment import run as experiment_run
from steper_dspy.evals.experiment.report import write_report
from steper_dspy.evals.experiment.systems import make_teleprompter
from tests.test_datasets import HOTPOT_ROW, write_jsonl


def _hotpot_file(path, n):
    return write_jsonl(path, [{**HOTPOT_ROW, "_id": f"{path.stem}-{i}"} for i in range(n)])


def test_each_test_file_is_a_test_set_over_its_own_corpus(tmp_path):
    first, second = _hotpot_file(tmp_path / "first.jsonl", 3), _hotpot_file(tmp_path / "second.jsonl", 5)
    config = RunConfig(data="synthetic", test_data=[str(first), str(second)], test_size=4, train_size=10)
    task = load_task(config)
    assert [t.name for t in task.testsets] == ["first", "second"]
    assert [len(t.examples) for t in task.testsets] == [3, 4]
    assert len(task.trainset) == 10  # every synthetic question may train: the tests come from other files
    assert task.testsets[0].retriever is not task.train_retriever
    assert RunConfig(test_data=str(first)).test_data == [str(first)]
    held_out = load_task(RunConfig(data="synthetic", test_size=5)).testsets
    assert [(t.name, len(t.examples)) for t in held_out] == [("synthetic (held out)", 5)]


def test_shipped_2wiki_config_trains_on_2wiki_and_tests_in_and_out_of_domain():
    config = RunConfig.load(Path(steper_dspy.evals.__file__).parent / "configs" / "2wiki-hotpotqa.yaml")
    assert Path(config.data).name == "2wikimultihopqa_train500.jsonl"
    assert [Path(p).name for p in config.test_data] == ["2wikimultihopqa_dev164.jsonl", "hotpotqa_dev200.jsonl"]
    training = config.training_config()
    assert training.max_length >= 4096  # 2Wiki aggregation prompts run past 2048 tokens
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 8


def test_systems_are_teleprompters_with_their_stages_weighting_and_stage_weights(tmp_path):
    from steper_dspy.compilers import STEPER, StepwiseKD, VanillaKD

    config = RunConfig(training={"learning_rate": 1e-3}, output=str(tmp_path))

    def teleprompter(name):
        return make_teleprompter(config, SYSTEMS[name], tmp_path / name)

    vanilla = teleprompter("vanilla-kd")
    assert type(vanilla) is VanillaKD and (vanilla.training.stages, vanilla.training.weighting) == (
        ("aggregate",),
        "uniform",
    )
    fixed = teleprompter("fixed")
    assert type(fixed) is StepwiseKD and fixed.training.weighting == "fixed"
    assert fixed.training.stage_weights == {"init": 1.0, "expand": 1.0, "aggregate": 1.0}
    assert fixed.training.learning_rate == 1e-3
    ablation = teleprompter("steper-agg-init")
    assert type(ablation) is STEPER and (ablation.training.stages, ablation.training.weighting) == (
        ("init", "aggregate"),
        "adaptive",
    )
    assert teleprompter("steper-grounded").step_filter is not None and teleprompter("steper").step_filter is None
    assert {t.harvest_path for t in map(teleprompter, SYSTEMS)} == {tmp_path / "harvest.jsonl"}  # one harvest
    assert chosen_systems(["steper"], ablations=True)[0] == "steper" and "fixed" in chosen_systems([], ablations=True)


def test_report_has_the_paper_shaped_table_for_several_test_sets(tmp_path):
    def report(acc):
        row = {"id": "q", "em": acc, "f1": acc, "accuracy": acc}
        return EvaluationReport(em=acc, f1=acc, accuracy=acc, failures=0, avg_steps=3.0, recall=50.0, rows=[row])

    results = {"2wiki": {"teacher": report(40.0), "STEPER": report(30.0)}, "hotpot": {"teacher": report(20.0)}}
    path = write_report(tmp_path, results, title="t", details={}, timings={"eval": 1.0})
    text = path.read_text()
    assert "| system | 2wiki accuracy | 2wiki em | 2wiki f1 | hotpot accuracy | hotpot em | hotpot f1 |" in text
    assert "| STEPER | 30.0 | 30.0 | 30.0 | - | - | - |" in text
    assert "## 2wiki" in text and "## hotpot" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert saved["hotpot"]["teacher"]["accuracy"] == 20.0


def test_benchmark_trains_each_system_on_the_shared_harvest(tmp_path, tiny_model_dir, monkeypatch):
    def first_questions(config):  # the quickstart's split (its recording covers it), 3 test questions
        task = load_task(config)
        task.testsets[0].examples = task.testsets[0].examples[:3]
        return task

    monkeypatch.setattr(experiment_run, "load_task", first_questions)
    config = quickstart_config(output=str(tmp_path / "bench"), student=str(tiny_model_dir))
    config.training = {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 8192, "logging_steps": 1}
    config.seeds = [0, 1]
    released = []
    monkeypatch.setattr(experiment_run, "release_lm", lambda lm: released.append(lm.model))
    results = run_experiment(config, systems=["vanilla-kd", "fixed"], include_teacher=True)
    # The teacher once it is done, then each of the 4 trained students after its evaluation: no server piles up.
    assert released[0].startswith("steper-replay/") and len(released) == 1 + 4
    assert all(model != released[0] for model in released[1:])
    (by_system,) = results.values()
    assert list(by_system) == ["teacher", "Vanilla-KD", "step-wise KD (fixed 1:1:1 per stage)"]
    out = tmp_path / "bench"
    made = json.loads((out / "fixed" / "seed-1" / "model" / "steper_training.json").read_text())
    assert made["config"]["weighting"] == "fixed" and made["config"]["seed"] == 1
    made = json.loads((out / "vanilla-kd" / "seed-0" / "model" / "steper_training.json").read_text())
    assert made["config"]["stages"] == ["aggregate"] and made["config"]["seed"] == 0
    saved = json.loads((out / "results.json").read_text())["results"]["synthetic (held out)"]["Vanilla-KD"]
    assert saved["seeds"] == 2 and len(saved["accuracy_per_seed"]) == 2 and saved["n"] == 3
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(r["predicted"], list) for r in rows if r["system"] == "Vanilla-KD")  # one answer a seed
    assert len(rows) == 3 * 3 and {r["test_set"] for r in rows} == {"synthetic (held out)"}
    assert "## synthetic (held out)" in (out / "report.md").read_text()
    assert (out / "vanilla-kd" / "seed-0" / "program" / "steper_program.json").is_file()  # saved by STEPER.compile
    details = json.loads((out / "results.json").read_text())["details"]
    assert details["compiled program"] == str(out / "vanilla-kd" / "seed-0" / "program")  # no STEPER: the first
    assert (out / "training.png").is_file()
    training = json.loads((out / "results.json").read_text())["training"]["Vanilla-KD"]
    assert [run["seed"] for run in training] == [0, 1] and training[0]["num_samples"]["aggregate"] > 0
    assert "## Training runs" in (out / "report.md").read_text()
    with pytest.raises(SteperError, match="Unknown system"):
        chosen_systems(["no-such-system"])

    # A rerun reads every recorded evaluation back: nothing is trained or evaluated again, the figures are equal.
    assert (out / "evaluations" / "fixed" / "seed-1" / "synthetic_held_out_.json.gz").is_file()
    import shutil

    for folder in ("vanilla-kd", "fixed"):
        shutil.rmtree(out / folder)  # the trained models are not needed (e.g. a fresh clone with the records)

    def no_compile(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(experiment_run.STEPER, "compile", no_compile)
    again = run_experiment(config, systems=["vanilla-kd", "fixed"])
    for name, report in again["synthetic (held out)"].items():
        assert report.rows == by_system[name].rows and report.runs == by_system[name].runs
    assert json.loads((out / "results.json").read_text())["training"]["Vanilla-KD"] == training

    # One of the seeds alone, from the command line: its own seed's runs, read back as well.
    from typer.testing import CliRunner

    from steper_dspy.cli.app import app

    config_file = config.save(tmp_path / "config.yaml")
    result = CliRunner().invoke(app, ["benchmark", "-c", str(config_file), "--systems", "fixed", "--seed", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert [run["seed"] for run in saved["training"]["step-wise KD (fixed 1:1:1 per stage)"]] == [1]
    fixed_seed_1 = saved["results"]["synthetic (held out)"]["step-wise KD (fixed 1:1:1 per stage)"]
    assert fixed_seed_1["accuracy"] == by_system["step-wise KD (fixed 1:1:1 per stage)"].runs[1]["accuracy"]
    # The untrained student's evaluation is recorded too: a rerun does not even load the base model.
    assert (out / "evaluations" / "untrained" / "synthetic_held_out_.json.gz").is_file()
    monkeypatch.setattr(experiment_run, "run_student_lm", no_compile)
    result = CliRunner().invoke(app, ["benchmark", "-c", str(config_file), "--systems", "fixed", "--seed", "1"])
    assert result.exit_code == 0, result.output

    def scores(results):
        return {
            system: (r["accuracy"], r["em"], r["f1"], r["n"]) for system, r in results["synthetic (held out)"].items()
        }

    assert scores(json.loads((out / "results.json").read_text())["results"]) == scores(saved["results"])

    # Another seed is another training run: its evaluation is not recorded yet, so it is trained.
    config.seeds = [2]
    with pytest.raises(AssertionError, match="trained again"):
        run_experiment(config, systems=["vanilla-kd"])


def test_an_evaluation_record_is_read_back_only_for_its_own_key(tmp_path, monkeypatch):
    import dspy

    from steper_dspy.evals.evaluate import build_report
    from steper_dspy.evals.experiment.records import EvaluationRecords, evaluation_key
    from steper_dspy.evals.experiment.task import TestSet
    from steper_dspy.lm import vllm as vllm_module

    examples = [dspy.Example(id=f"q{i}", question=f"q{i}?", answer="yes", hops=2) for i in range(4)]
    answers = [type("P", (), {"answer": "yes" if i < 3 else "no", "steps": 2})() for i in range(4)]
    report = build_report(zip(examples, answers, strict=True))
    report.seconds, report.prompt_tokens = 12.5, 400
    config = RunConfig()
    testset = TestSet("dev: 2wiki", examples, retriever=None)
    key = evaluation_key({"data_hash": "a"}, config, testset)
    records = EvaluationRecords(tmp_path)
    path = records.save("steper/seed-0", testset.name, key, report, {"train_seconds": 3.0})
    assert path == tmp_path / "steper" / "seed-0" / "dev_2wiki.json.gz"
    stored = records.load("steper/seed-0", testset.name, key)
    assert stored.training == {"train_seconds": 3.0}
    assert stored.report.summary() == report.summary() and stored.report.by_hops == report.by_hops
    # Other training data, another program setting or other questions: another key, so no record.
    assert evaluation_key({"data_hash": "b"}, config, testset) != key
    assert evaluation_key({"data_hash": "a"}, RunConfig(k=2), testset) != key
    assert evaluation_key({"data_hash": "a"}, config, TestSet("dev: 2wiki", examples[:3], None)) != key
    corrected = [examples[0].copy(answer="no"), *examples[1:]]  # a gold answer fixed in the test file
    assert evaluation_key({"data_hash": "a"}, config, TestSet("dev: 2wiki", corrected, None)) != key
    other_corpus = TestSet("dev: 2wiki", examples, type("R", (), {"corpus": ["Alpha | born in Beta"]})())
    assert evaluation_key({"data_hash": "a"}, config, other_corpus) != key
    monkeypatch.setattr(vllm_module, "vllm_available", lambda: True)  # another machine, with vLLM
    on_vllm = evaluation_key({"data_hash": "a"}, RunConfig(engine="vllm"), testset)
    assert on_vllm != evaluation_key({"data_hash": "a"}, RunConfig(engine="transformers"), testset)
    assert records.load("steper/seed-0", testset.name, "other") is None
    assert records.load("steper/seed-1", testset.name, key) is None
    path.write_bytes(b"not gzip")  # a damaged record is computed again, not trusted
    assert records.load("steper/seed-0", testset.name, key) is None
    with gzip.open(path, "wt") as f:
        json.dump({"key": key, "report": {"rows": "not rows"}}, f)
    assert records.load("steper/seed-0", testset.name, key) is None


def test_benchmark_of_the_baselines_alone_neither_harvests_nor_trains(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from steper_dspy.cli.app import app

    def first_questions(config):  # the quickstart's split (its recording covers it), 2 test questions
        task = load_task(config)
        task.testsets[0].examples = task.testsets[0].examples[:2]
        return task

    monkeypatch.setattr(experiment_run, "load_task", first_questions)
    config = quickstart_config(output=str(tmp_path / "bench"), student=str(tiny_model_dir))
    config_file = config.save(tmp_path / "config.yaml")
    result = CliRunner().invoke(app, ["benchmark", "-c", str(config_file), "--systems", "none"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "bench"
    saved = json.loads((out / "results.json").read_text())["results"]["synthetic (held out)"]
    assert list(saved) == ["teacher", "untrained student"] and saved["teacher"]["n"] == 2
    assert not (out / "harvest.jsonl").exists() and not (out / "model").exists()
    assert "## Harvest" not in (out / "report.md").read_text()


def test_seeds_combine_into_per_question_means_with_intervals_and_paired_tests(tmp_path):
    from steper_dspy.evals.evaluate import build_report, combine_runs
    from steper_dspy.evals.experiment.report import comparisons

    def run(right):  # a report on 40 questions, right on the first `right` of them
        examples = [type("E", (), {"id": f"q{i}", "question": "?", "answer": "yes"})() for i in range(40)]
        answers = [type("P", (), {"answer": "yes" if i < right else "no"})() for i in range(40)]
        return build_report(zip(examples, answers, strict=True))

    steper = combine_runs([run(30), run(34), run(32)])
    assert steper.accuracy == pytest.approx(80.0) and [r["accuracy"] for r in steper.runs] == [75.0, 85.0, 80.0]
    low, high = steper.summary()["accuracy_ci95"]
    assert low < 80.0 < high
    results = {"2wiki": {"STEPER": steper, "Vanilla-KD": combine_runs([run(10)]), "step-wise KD (uniform)": run(31)}}
    tests = comparisons(results)["2wiki"]
    assert list(tests) == ["STEPER vs Vanilla-KD", "STEPER vs step-wise KD (uniform)"]  # only systems that ran
    assert tests["STEPER vs Vanilla-KD"]["difference"] == pytest.approx(55.0)
    assert tests["STEPER vs Vanilla-KD"]["p_value"] < 0.01
    assert tests["STEPER vs step-wise KD (uniform)"]["p_value"] > 0.05  # 1.5 points on 40 questions
    assert "mcnemar_p" not in tests["STEPER vs Vanilla-KD"]  # seed means are not 1/0 answers
    fixed = "step-wise KD (fixed 1:1:1 per stage)"  # the weighting and data ablations are compared too
    fewer = "STEPER: aggregate + expand data"
    against_ablations = comparisons({"2wiki": {"STEPER": steper, fixed: run(20), fewer: run(24)}})["2wiki"]
    assert against_ablations[f"STEPER vs {fixed}"]["difference"] == pytest.approx(30.0)
    assert against_ablations[f"STEPER vs {fewer}"]["difference"] == pytest.approx(20.0)
    text = write_report(tmp_path, results, title="t", details={}, timings={}).read_text()
    assert "| STEPER | 80.0 | " in text and " | 75.0 / 85.0 / 80.0 | " in text  # the mean, then each seed
    shorter = run(1)
    shorter.rows = shorter.rows[:5]
    with pytest.raises(SteperError, match="different questions"):
        combine_runs([run(1), shorter])


def test_a_training_identical_to_a_recorded_run_reuses_its_evaluation_without_training(tmp_path, capsys):
    """E.g. STEPER with a step filter that flagged no step: the same samples and settings, so the same model."""
    import dspy

    from steper_dspy.evals.evaluate import build_report
    from steper_dspy.evals.experiment.records import EvaluationRecords
    from steper_dspy.evals.experiment.report import write_report
    from steper_dspy.evals.experiment.run import Timings, recorded_evaluations, train_and_evaluate
    from steper_dspy.evals.experiment.task import Task, TestSet

    examples = [dspy.Example(id=f"q{i}", question=f"q{i}?", answer="yes", hops=2) for i in range(3)]
    answers = [type("P", (), {"answer": "yes" if i else "no", "steps": 2})() for i in range(3)]
    task = Task([], None, [TestSet("dev", examples, None), TestSet("other", examples[:2], None)])
    config, records = RunConfig(), EvaluationRecords(tmp_path / "records")
    report = build_report(zip(examples, answers, strict=True))
    keys, _ = recorded_evaluations(records, "steper/seed-0", {"data_hash": "a"}, config, task, load=False)
    for name, key in keys.items():
        records.save("steper/seed-0", name, key, report, {"train_seconds": 9.0})

    class Teleprompter:
        def __init__(self, data_hash):
            self.data_hash = data_hash

        def training_identity(self):
            return {"data_hash": self.data_hash}

        def compile(self, *args, **kwargs):
            raise AssertionError("trained again")

    def run(name, data_hash="a"):
        return train_and_evaluate(config, task, Teleprompter(data_hash), None, records, name, name, Timings())

    reports, summary = run("steper-grounded/seed-0")
    assert {name: r.rows for name, r in reports.items()} == {"dev": report.rows, "other": report.rows}
    assert summary == {"train_seconds": 9.0, "same_as": "steper/seed-0"}
    assert "evaluation of the same training (steper/seed-0) on dev, other" in " ".join(capsys.readouterr().out.split())
    copied = records.load("steper-grounded/seed-0", "dev", keys["dev"])  # recorded as its own: a rerun reads it
    assert copied.training["same_as"] == "steper/seed-0"
    write_report(
        tmp_path, {"dev": reports}, title="t", details={}, timings={}, training={"filtered": [{"seed": 0, **summary}]}
    )
    assert "same training as steper/seed-0" in (tmp_path / "report.md").read_text()
    # A copy of a copy still names the run that was trained; a run never names itself.
    (records.folder / "steper" / "seed-0" / "dev.json.gz").unlink()
    assert run("third/seed-0")[1]["same_as"] == "steper/seed-0"
    assert "same_as" not in run("steper/seed-0")[1]
    # Another identity (other samples or settings) finds no record of another run: it is trained.
    with pytest.raises(AssertionError, match="trained again"):
        run("steper-agg-init/seed-0", data_hash="b")
