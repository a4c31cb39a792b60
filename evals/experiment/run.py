"""`run_experiment`: harvest once, train each system with its teleprompter, evaluate everything, report.

`steper compile`, `steper quickstart` and `steper benchmark` are this one function with different systems
and comparisons; `steper harvest`, `train` and `eval` run its parts.
"""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from steper_dspy.adapter import student_adapter
from steper_dspy.compilers import STEPER, HarvestReport, run_on_student
from steper_dspy.evals.evaluate import EvaluationReport, combine_runs, evaluate_program
from steper_dspy.evals.experiment.config import RunConfig
from steper_dspy.evals.experiment.lms import run_student_lm, teacher_lm, teacher_program
from steper_dspy.evals.experiment.records import EvaluationRecords, StoredEvaluation, evaluation_key
from steper_dspy.evals.experiment.report import Results, console, print_results, write_report
from steper_dspy.evals.experiment.systems import SYSTEMS, configured_system, make_teleprompter
from steper_dspy.evals.experiment.task import Task, TestSet, load_task
from steper_dspy.lm.local import release_lm
from steper_dspy.lm.models import model_fingerprint
from steper_dspy.training import TrainingResult
from steper_dspy.training.train import LOG_FILE, RESULT_FILE

CONFIG_FILE = "config.yaml"
UNTRAINED, UNTRAINED_NAME = "untrained", "untrained student"  # its records' folder, its name in reports


@dataclass
class Timings:
    """Wall seconds per stage of a run, in the order the stages ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    def track(self, name: str) -> "_Timer":
        """A context manager adding the wall time of its block to stage `name`."""
        return _Timer(self, name)


class _Timer:
    def __init__(self, timings: Timings, name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        elapsed = time.perf_counter() - self.start
        self.timings.seconds[self.name] = self.timings.seconds.get(self.name, 0.0) + elapsed


def start_run(config: RunConfig) -> Path:
    """Write ``<output>/config.yaml`` before the long work, so that the run's record exists if it is stopped
    (and a config edited meanwhile is not overwritten at its end); return the output folder."""
    out = Path(config.output)
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, one process writes it
        config.save(out / CONFIG_FILE)
    return out


def run_harvest(config: RunConfig) -> HarvestReport:
    """`steper harvest`: the teacher's chains on the training questions into ``<output>/harvest.jsonl``."""
    start_run(config)
    task = load_task(config)
    student = task.program(config)  # a bad program is reported before the teacher is built
    teleprompter = make_teleprompter(config, configured_system(config), config.output)
    teacher = teacher_program(config, task, teacher_lm(config))
    return teleprompter.harvest(student, trainset=task.trainset, teacher=teacher)


def run_training(config: RunConfig) -> TrainingResult:
    """`steper train`: the run's student on ``<output>/harvest.jsonl`` into ``<output>/model``."""
    start_run(config)
    return make_teleprompter(config, configured_system(config), config.output).train()


def run_evaluation(config: RunConfig, name: str, lm: dspy.LM, *, student: bool) -> Results:
    """`steper eval`: the run's program on `lm` over every test set; writes report.md and results.json."""
    task, timings, results = load_task(config), Timings(), {}
    evaluate_system(results, timings, name, config, task, lm, student=student)
    print_results(results)
    path = write_report(
        Path(config.output),
        results,
        title="steper eval",
        details={"model": name, "data": config.data},
        timings=timings.seconds,
    )
    console.print(f"report: {path}")
    return results


def run_experiment(
    config: RunConfig,
    *,
    systems: list[str] | None = None,
    include_teacher: bool = False,
    include_untrained: bool = False,
    title: str = "steper compile",
) -> Results:
    """Harvest once into ``<output>/harvest.jsonl``, compile each system with its teleprompter (the run's own
    STEPER settings when `systems` is None, into ``<output>``; each named system into ``<output>/<name>``),
    and evaluate the teacher, the untrained student and every compiled program on every test set. With
    ``systems=[]`` nothing is harvested or trained: only the teacher and the untrained student are evaluated
    (the baselines of a long benchmark, while its harvest is not finished).

    A rerun reuses the teacher recording, the harvest and every finished training. Writes ``results.json``,
    ``predictions.jsonl`` (one row per test set, system and question), ``report.md`` and plots.
    """
    out = start_run(config)
    timings = Timings()
    with timings.track("load data"):
        task = load_task(config)
    runs = [(configured_system(config), out)] if systems is None else [(SYSTEMS[key], out / key) for key in systems]
    results: Results = {}
    student = task.program(config)  # a bad program is reported before the teacher is built
    teacher = teacher_lm(config)
    teacher_prog = teacher_program(config, task, teacher)
    harvest = None
    if runs:
        with timings.track("harvest"):
            harvest = make_teleprompter(config, runs[0][0], runs[0][1]).harvest(
                student, trainset=task.trainset, teacher=teacher_prog
            )
    if include_teacher:
        evaluate_system(results, timings, "teacher", config, task, teacher, student=False)
    if not (harvest and harvest.lm_failures):  # no chain left to harvest: nothing below calls the teacher
        release_lm(teacher)
    records = EvaluationRecords(config.evaluations or out / "evaluations")
    if include_untrained:
        evaluate_untrained(results, timings, config, task, records)
    training: dict[str, list[dict[str, Any]]] = {}
    # The run whose model, program and training curves the report names: STEPER's first seed when it ran.
    main_system = next((s for s, _ in runs if s is SYSTEMS["steper"]), runs[0][0] if runs else None)
    main_folder: Path | None = None
    seeds = config.seeds or [config.training_config().seed]
    per_seed: dict[str, dict[str, list[EvaluationReport]]] = {system.name: {} for system, _ in runs}
    for seed in seeds:  # seed by seed, so that a stopped benchmark has compared every system on the first seeds
        for system, folder in runs:
            seeded = config if config.seeds is None else config.replace(training={**config.training, "seed": seed})
            run_folder = folder if config.seeds is None else folder / f"seed-{seed}"
            teleprompter = make_teleprompter(seeded, system, run_folder)
            reports, summary = train_and_evaluate(
                config,
                task,
                teleprompter,
                teacher_prog,
                records,
                run_folder.relative_to(out).as_posix(),
                system.name,
                timings,
            )
            if system is main_system and main_folder is None:
                main_folder = run_folder
            training.setdefault(system.name, []).append({"seed": seed, **summary})
            for name, report in reports.items():
                per_seed[system.name].setdefault(name, []).append(report)
    for system_name, by_testset in per_seed.items():
        for name, reports in by_testset.items():
            results.setdefault(name, {})[system_name] = combine_runs(reports)
    print_results(results)
    write_predictions(results, out / "predictions.jsonl")
    details = {
        "program": config.program,
        "data": config.data,
        "train questions": str(len(task.trainset)),
        "test sets": ", ".join(f"{t.name} ({len(t.examples)} questions)" for t in task.testsets),
        "teacher": config.teacher or f"recording {config.recording}",
        "student": config.student,
    }
    training_log = None
    if main_folder is not None and (main_folder / "model" / RESULT_FILE).is_file():  # not when read from records
        details["compiled program"] = str(main_folder / "program")
        details["trained model"] = str(main_folder / "model")
        if speed := training[main_system.name][0].get("tokens_per_second"):
            details["training tokens/s"] = f"{speed:.0f}"
        training_log = main_folder / "model" / LOG_FILE
    path = write_report(
        out,
        results,
        title=title,
        details=details,
        timings=timings.seconds,
        harvest_summary=harvest.summary() if harvest else None,
        training=training,
        training_log=training_log,
    )
    total = sum(timings.seconds.values())
    console.print(
        f"report: {path}  (plots beside it); total {total / 60:.1f} min: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.seconds.items())
    )
    return results


def train_and_evaluate(
    config: RunConfig,
    task: Task,
    teleprompter: STEPER,
    teacher: dspy.Module,
    records: EvaluationRecords,
    run: str,
    system: str,
    timings: Timings,
) -> tuple[dict[str, EvaluationReport], dict[str, Any]]:
    """One trained run of the system named `system` (`run`: its folder under the output): its report on every
    test set and its training figures.

    Evaluations recorded for the same training identity and questions are read back; the student is trained
    (or its finished training reused) and evaluated only on the test sets without a record, and each new
    evaluation is recorded as soon as it finishes.
    """
    keys, stored = recorded_evaluations(records, run, teleprompter.training_identity(), config, task)
    reports = {name: found.report for name, found in stored.items()}
    summary = next((found.training for found in stored.values()), {})
    missing = [testset for testset in task.testsets if testset.name not in reports]
    if missing:
        with timings.track(f"train {system}"):
            compiled = teleprompter.compile(task.program(config), trainset=task.trainset, teacher=teacher)
        summary = teleprompter.training_result.figures()
        # compile's harvest may have retried chains that had failed on teacher errors: key what was trained.
        keys, _ = recorded_evaluations(records, run, teleprompter.training_identity(), config, task, load=False)
        with timings.track(f"eval {system}"):
            for testset in missing:
                reports[testset.name] = evaluate_compiled(config, compiled, testset)
                records.save(run, testset.name, keys[testset.name], reports[testset.name], summary)
        release_lm(compiled.predictors()[0].lm)
    return {testset.name: reports[testset.name] for testset in task.testsets}, summary


def evaluate_untrained(
    results: Results, timings: Timings, config: RunConfig, task: Task, records: EvaluationRecords
) -> None:
    """Evaluate the untrained student (the base model with the steps' instructions) on every test set, or read
    its recorded evaluations back (keyed by the base model's fingerprint, the program and the questions)."""
    identity = {"untrained": model_fingerprint(config.student), "layout": student_adapter(instructions=True).layout}
    keys, stored = recorded_evaluations(records, UNTRAINED, identity, config, task)
    if len(stored) < len(task.testsets):
        untrained = run_student_lm(config, config.student)
        evaluate_system(results, timings, UNTRAINED_NAME, config, task, untrained, student=True, instructions=True)
        release_lm(untrained)  # frees its memory before training
        for testset in task.testsets:
            records.save(UNTRAINED, testset.name, keys[testset.name], results[testset.name][UNTRAINED_NAME], {})
    else:
        for testset in task.testsets:
            results.setdefault(testset.name, {})[UNTRAINED_NAME] = stored[testset.name].report


def recorded_evaluations(
    records: EvaluationRecords, run: str, identity: dict[str, Any], config: RunConfig, task: Task, *, load: bool = True
) -> tuple[dict[str, str], dict[str, StoredEvaluation]]:
    """The record keys of `run` (whose model `identity` describes) per test set, and the records found for them
    (none looked up when not `load`).

    A test set without a record of `run` takes another run's record for the same key (an identical training:
    the same samples and settings make the same model), saved as `run`'s with ``same_as`` naming the run that
    was trained. So re-evaluating a run takes deleting its copies too (or bumping `RECORD_FORMAT`).
    """
    keys = {testset.name: evaluation_key(identity, config, testset) for testset in task.testsets}
    if not load:
        return keys, {}
    found = {name: records.load(run, name, key) for name, key in keys.items()}
    stored = {name: record for name, record in found.items() if record is not None}
    if stored:
        console.print(f"{run}: reusing the recorded evaluation on {', '.join(stored)}")
    copied: dict[str, str] = {}
    for name in [name for name in keys if name not in stored]:
        same = records.find(name, keys[name])
        if same is None:
            continue
        other, record = same
        source = record.training.get("same_as") or other  # the run that was trained, when `other` is a copy too
        record.training = {k: v for k, v in record.training.items() if k != "same_as"}
        if source != run:
            record.training["same_as"] = source
        records.save(run, name, keys[name], record.report, record.training)
        stored[name], copied[name] = record, source
    for source in dict.fromkeys(copied.values()):
        names = ", ".join(name for name, s in copied.items() if s == source)
        console.print(f"{run}: reusing the recorded evaluation of the same training ({source}) on {names}")
    return keys, stored


def evaluate_system(
    results: Results,
    timings: Timings,
    system: str,
    config: RunConfig,
    task: Task,
    lm: dspy.LM,
    *,
    student: bool,
    instructions: bool = False,
    progress: bool = True,
) -> None:
    """Evaluate `system` (the run's program on `lm`) on every test set of the task: its reports go into
    `results` (test set -> system -> report) and its wall time into `timings` as ``eval <system>``.

    `student` runs it with the student adapter, with the steps' instructions when `instructions` (an untrained
    student); otherwise with the teacher's adapter and demos."""
    with timings.track(f"eval {system}"):
        for testset in task.testsets:
            if student:
                program = run_on_student(task.program(config, testset), lm, student_adapter(instructions=instructions))
            else:
                program = teacher_program(config, task, lm, testset)
            results.setdefault(testset.name, {})[system] = _evaluate(config, program, testset, progress)


def evaluate_compiled(config: RunConfig, compiled: dspy.Module, testset: TestSet) -> EvaluationReport:
    """Evaluate a compiled program on a test set, over the test set's own corpus."""
    program = compiled.deepcopy()
    program.retriever = testset.retriever
    return _evaluate(config, program, testset, True)


def _evaluate(config: RunConfig, program: dspy.Module, testset: TestSet, progress: bool) -> EvaluationReport:
    return evaluate_program(program, testset.examples, num_threads=config.threads, display_progress=progress)


def write_predictions(results: Results, path: Path) -> None:
    """One JSON line per test set, system and question, for inspection."""
    with open(path, "w") as f:
        for test_set, by_system in results.items():
            for system, report in by_system.items():
                for row in report.rows:
                    f.write(json.dumps({"test_set": test_set, "system": system, **row}, default=str) + "\n")
