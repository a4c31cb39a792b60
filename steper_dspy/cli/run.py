"""The steps of a run, shared by the command line and the benchmarks: data, teacher, compile, evaluate."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from steper_dspy.adapter import teacher_adapter
from steper_dspy.cli.config import RunConfig
from steper_dspy.cli.report import Results
from steper_dspy.cli.specs import is_api_model, make_lm, make_program
from steper_dspy.compilers import STEPER, GroundedStepFilter
from steper_dspy.compilers.demos import bootstrap_demos, load_demos, save_demos
from steper_dspy.compilers.student import run_on_student, run_with_adapter, save_compiled
from steper_dspy.compilers.student import student_lm as make_student_lm
from steper_dspy.errors import SteperError
from steper_dspy.evals import METRICS, EvaluationReport, evaluate_program, load_multihop, train_test_split
from steper_dspy.programs.demos import ircot_demos, with_demos
from steper_dspy.retrieval import BM25Retriever

TEACHER_DEMOS_FILE = "teacher_demos.json"
BOOTSTRAPPED_CHAINS = 2  # teacher chains whose steps become its demonstrations (teacher_demos: bootstrap)


@dataclass
class TestSet:
    """Held-out questions over their own corpus."""

    name: str
    examples: list[dspy.Example]
    retriever: BM25Retriever


@dataclass
class Task:
    """The questions and corpora of a run: training questions over one corpus, test sets over theirs."""

    trainset: list[dspy.Example]
    train_retriever: BM25Retriever
    testsets: list[TestSet]

    def program(self, config: RunConfig, testset: TestSet | None = None) -> dspy.Module:
        """A fresh program of the run's kind over the corpus of `testset` (the training corpus when None)."""
        retriever = testset.retriever if testset else self.train_retriever
        return make_program(config.program, retriever, k=config.k, max_steps=config.max_steps)


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


def load_task(config: RunConfig) -> Task:
    """Load the data of a run and split it; the test sets are the files of `test_data` when given (each over
    its own corpus, at most `test_size` questions), else the held-out part of `data`."""
    dataset = load_multihop(config.data, format=config.data_format, seed=config.seed)
    train_retriever = BM25Retriever(dataset.corpus)
    if config.test_data:
        trainset, testsets = dataset.examples, []
        for path in config.test_data:
            test = load_multihop(path, seed=config.seed)
            testsets.append(TestSet(Path(path).stem, test.examples[: config.test_size], BM25Retriever(test.corpus)))
    else:
        if config.test_size >= len(dataset.examples):
            raise SteperError(
                f"test_size {config.test_size} leaves no training questions in {config.data} "
                f"({len(dataset.examples)} questions): lower --test-size."
            )
        trainset, held_out = train_test_split(dataset, test_size=config.test_size, seed=config.seed)
        testsets = [TestSet(f"{Path(config.data).stem} (held out)", held_out, train_retriever)]
    if config.train_size is not None:
        trainset = trainset[: config.train_size]
    return Task(trainset, train_retriever, testsets)


def teacher_lm(config: RunConfig) -> dspy.LM:
    """The teacher: a live LM, a replayed recording, or a live LM whose calls are recorded."""
    from steper_dspy.lm.recording import recorded_lm

    live = None
    if config.teacher:
        live = model_lm(config, config.teacher, student=False, max_tokens=config.teacher_max_tokens)
    if config.recording:
        return recorded_lm(config.recording, live)
    if live is None:
        raise SteperError("No teacher: pass --teacher MODEL (or --recording FILE to replay a recorded teacher).")
    return live


def teacher_program(config: RunConfig, task: Task, lm: dspy.LM, testset: TestSet | None = None) -> dspy.Module:
    """The run's program on the teacher LM over the corpus of `testset` (training corpus when None), with the
    run's teacher demonstrations (see :func:`teacher_demos`)."""
    program = task.program(config, testset)
    demos = teacher_demos(config, task, lm)
    if demos:
        with_demos(program, demos)
    program.set_lm(lm)
    return run_with_adapter(program, teacher_adapter(program))


def teacher_demos(config: RunConfig, task: Task, lm: dspy.LM) -> dict[str, list[dspy.Example]] | None:
    """The teacher's demonstrations: none, the built-in worked example (IRCoT), or bootstrapped from the
    training questions by the teacher prompted with the built-in example. Bootstrapped demos are saved to
    ``<output>/teacher_demos.json`` and read back by a rerun, so that the teacher is prompted identically."""
    builtin = ircot_demos() if config.program == "ircot" else None
    if config.teacher_demos != "bootstrap":
        return builtin if config.teacher_demos == "builtin" else None
    path = Path(config.output) / TEACHER_DEMOS_FILE
    if path.is_file():
        return load_demos(path)
    prompted = task.program(config)
    if builtin:
        with_demos(prompted, builtin)
    prompted.set_lm(lm)
    demos = bootstrap_demos(
        task.program(config),
        run_with_adapter(prompted, teacher_adapter(prompted)),
        task.trainset,
        metric=METRICS[config.metric],
        threshold=config.threshold,
        max_demos=BOOTSTRAPPED_CHAINS,
    )
    save_demos(demos, path)
    return demos


def make_teleprompter(config: RunConfig, *, output: str | Path | None = None, progress: bool = True) -> STEPER:
    """The STEPER teleprompter of a run (uniform weighting or a stage subset give the paper's baselines)."""
    output = Path(output or config.output)
    return STEPER(
        config.student,
        output_dir=output,
        metric=METRICS[config.metric],
        threshold=config.threshold,
        training=config.training_config(),
        weighting=config.weighting,
        stages=config.stages,
        rollouts=config.rollouts,
        step_filter=GroundedStepFilter() if config.step_filter else None,
        harvest_path=Path(config.output) / "harvest.jsonl",
        num_threads=config.threads,
        progress=progress,
    )


def run_eval(
    config: RunConfig, task: Task, lm: dspy.LM, testset: TestSet, *, student: bool, progress: bool = True
) -> EvaluationReport:
    """Evaluate the run's program on `lm` over `testset`; a student runs with its own adapter."""
    program = (
        run_on_student(task.program(config, testset), lm) if student else teacher_program(config, task, lm, testset)
    )
    return evaluate_program(program, testset.examples, num_threads=config.threads, display_progress=progress)


def student_lm(config: RunConfig, model: str | Path) -> dspy.LM:
    """A student model of the run as an LM, on the run's engine (a vLLM server logs into the output folder)."""
    return make_student_lm(model, engine=config.engine, server_log=_server_log(config, model))


def model_lm(config: RunConfig, spec: str, *, student: bool, **kwargs: Any) -> dspy.LM:
    """The LM for `spec` (an API model string or a local model) on the run's engine and endpoint; a local
    student stops replies that cannot parse early (see :func:`steper_dspy.compilers.student.student_lm`)."""
    if student and not is_api_model(spec):
        return student_lm(config, spec)
    engine = None if config.engine == "auto" else config.engine
    return make_lm(spec, api_base=config.api_base, engine=engine, server_log=_server_log(config, spec), **kwargs)


def _server_log(config: RunConfig, model: str | Path) -> Path:
    path = Path(str(model))
    return Path(config.output) / f"vllm-{path.stem if path.suffix == '.gguf' else path.name}.log"


def evaluate_system(
    results: Results,
    timings: Timings,
    system: str,
    config: RunConfig,
    task: Task,
    lm: dspy.LM,
    *,
    student: bool,
    progress: bool = True,
) -> None:
    """Evaluate `system` (the run's program on `lm`) on every test set of the task: its reports go into
    `results` (test set -> system -> report) and its wall time into `timings` as ``eval <system>``."""
    with timings.track(f"eval {system}"):
        for testset in task.testsets:
            report = run_eval(config, task, lm, testset, student=student, progress=progress)
            results.setdefault(testset.name, {})[system] = report


def save_student_program(config: RunConfig, task: Task, model_dir: Path, lm: dspy.LM) -> Path:
    """Save the compiled program (program JSON, first test set's retriever, model reference) to
    ``<output>/program``."""
    program = run_on_student(task.program(config, task.testsets[0]), lm)
    return save_compiled(program, Path(config.output) / "program", model_dir=model_dir)
