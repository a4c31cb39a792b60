"""The `steper` command line: harvest, train, compile, eval and quickstart."""

import dataclasses
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from steper_dspy.cli.config import RunConfig
from steper_dspy.cli.quickstart import quickstart_config
from steper_dspy.cli.report import Results, console, print_results, write_report
from steper_dspy.cli.run import (
    Timings,
    evaluate_system,
    load_task,
    make_teleprompter,
    model_lm,
    save_student_program,
    student_lm,
    teacher_lm,
    teacher_program,
)
from steper_dspy.cli.speed import speed_app
from steper_dspy.evals.benchmark import ABLATIONS, MAIN_SYSTEMS, run_benchmark

app = typer.Typer(
    help="Compile multi-step retrieval-augmented reasoning programs into small local models (STEPER on DSPy).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(speed_app, name="speed")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML or YAML file with any of the settings below; options given here win. Example: -c runs/steper/config.yaml",
    ),
]
ProgramOpt = Annotated[
    str | None,
    typer.Option(
        help="Program: ircot, self-ask, or module:Class for your own staged program. Example: --program my_rag:MyRAG"
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        help="Data: 'synthetic' (built in), a HotpotQA / 2Wiki / MuSiQue file, or a hub dataset id. Example: --data ../shared/data/multihop/2wikimultihopqa_train500.jsonl"
    ),
]
TestDataOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Evaluate on this dataset (over its own corpus) instead of held-out questions of --data; repeat for several. Example: --test-data 2wikimultihopqa_dev164.jsonl --test-data hotpotqa_dev200.jsonl"
    ),
]
TrainSizeOpt = Annotated[
    int | None, typer.Option(help="Use at most this many training questions. Example: --train-size 100")
]
TestSizeOpt = Annotated[int | None, typer.Option(help="Held-out questions to evaluate on. Example: --test-size 50")]
TeacherOpt = Annotated[
    str | None,
    typer.Option(
        help="Teacher LM: a litellm string (openai/gpt-4o-mini, hosted_vllm/..., ollama_chat/...), a hub id, a local folder or a GGUF file. Example: --teacher openai/gpt-4o-mini"
    ),
]
ApiBaseOpt = Annotated[
    str | None, typer.Option(help="Endpoint of an API teacher. Example: --api-base http://127.0.0.1:8000/v1")
]
RecordingOpt = Annotated[
    str | None,
    typer.Option(
        help="Teacher recording (JSONL): replayed without a --teacher, extended with one. Example: --recording teacher.jsonl"
    ),
]
StudentOpt = Annotated[
    str | None,
    typer.Option(
        help="Student base model: hub id, local folder or GGUF file. Example: --student HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output folder. Example: -o runs/my-run")]
WeightingOpt = Annotated[
    str | None,
    typer.Option(help="Stage loss weighting: adaptive (STEPER), uniform, or fixed. Example: --weighting uniform"),
]
StagesOpt = Annotated[
    str | None, typer.Option(help="Comma-separated stages to train on. Example: --stages aggregate (Vanilla-KD)")
]
EpochsOpt = Annotated[float | None, typer.Option(help="Training epochs. Example: --epochs 2")]
LrOpt = Annotated[float | None, typer.Option(help="Learning rate. Example: --lr 2e-4")]
MetricOpt = Annotated[
    str | None, typer.Option(help="Metric that keeps teacher chains: em, f1 or accuracy. Example: --metric accuracy")
]
ThresholdOpt = Annotated[
    float | None, typer.Option(help="Least metric score of a kept chain. Example: --threshold 0.5")
]
RolloutsOpt = Annotated[
    int | None, typer.Option(help="Teacher chains per question (extra ones sampled). Example: --rollouts 3")
]
StepFilterOpt = Annotated[
    bool | None, typer.Option("--step-filter/--no-step-filter", help="Drop ungrounded steps of kept chains.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        help="Parallel LM calls; by default what a local model's engine serves at once (1 for an API model). Example: --threads 8"
    ),
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        help="How local models generate: auto (vLLM when installed), vllm (a managed server) or transformers (in process, batched). Example: --engine transformers"
    ),
]


# The command options that are run settings (the rest, e.g. `--model` of eval, are the command's own).
RUN_OPTIONS = {f.name for f in dataclasses.fields(RunConfig)} | {"epochs", "lr"}


def _config(config: Path | None, **options: object) -> RunConfig:
    """The run settings from `config` and a command's options (its `locals()`); other options are left out."""
    options = {key: value for key, value in options.items() if key in RUN_OPTIONS}
    stages = options.pop("stages", None)
    epochs, lr = options.pop("epochs", None), options.pop("lr", None)
    cfg = RunConfig.load(config, stages=stages.split(",") if isinstance(stages, str) else None, **options)
    if epochs is not None or lr is not None:
        training = dict(cfg.training)
        if epochs is not None:
            training["num_train_epochs"] = epochs
        if lr is not None:
            training["learning_rate"] = lr
        cfg = RunConfig.load(None, **{**cfg.__dict__, "training": training})
    return cfg


@app.command()
def harvest(
    config: ConfigOpt = None,
    program: ProgramOpt = None,
    data: DataOpt = None,
    train_size: TrainSizeOpt = None,
    test_size: TestSizeOpt = None,
    teacher: TeacherOpt = None,
    api_base: ApiBaseOpt = None,
    recording: RecordingOpt = None,
    output: OutputOpt = None,
    metric: MetricOpt = None,
    threshold: ThresholdOpt = None,
    rollouts: RolloutsOpt = None,
    step_filter: StepFilterOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
) -> None:
    """Run the teacher program over the training questions and write stage-tagged samples (resumable).

    Example: steper harvest --teacher openai/gpt-4o-mini --data synthetic -o runs/demo --threads 8
    """
    cfg = _config(**locals())
    # Saved before the long run, so the record exists if it is stopped and a config edited meanwhile survives.
    cfg.save(Path(cfg.output) / "config.yaml")
    task = load_task(cfg)
    student = task.program(cfg)
    teacher = teacher_program(cfg, task, teacher_lm(cfg))
    make_teleprompter(cfg).harvest(student, trainset=task.trainset, teacher=teacher)


@app.command()
def train(
    config: ConfigOpt = None,
    output: OutputOpt = None,
    student: StudentOpt = None,
    weighting: WeightingOpt = None,
    stages: StagesOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
) -> None:
    """Train the student on the kept samples of <output>/harvest.jsonl into <output>/model.

    Example: steper train -o runs/demo --student HuggingFaceTB/SmolLM2-135M-Instruct --weighting adaptive
    """
    cfg = _config(**locals())
    cfg.save(Path(cfg.output) / "config.yaml")
    result = make_teleprompter(cfg).train()
    console.print(
        f"trained {result.output_dir}: final loss {result.final_loss:.3f}, sigmas {result.sigmas}, "
        f"{result.tokens_per_second:.0f} tokens/s"
    )


@app.command(name="compile")
def compile_(
    config: ConfigOpt = None,
    program: ProgramOpt = None,
    data: DataOpt = None,
    test_data: TestDataOpt = None,
    train_size: TrainSizeOpt = None,
    test_size: TestSizeOpt = None,
    teacher: TeacherOpt = None,
    api_base: ApiBaseOpt = None,
    recording: RecordingOpt = None,
    student: StudentOpt = None,
    output: OutputOpt = None,
    weighting: WeightingOpt = None,
    stages: StagesOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    metric: MetricOpt = None,
    threshold: ThresholdOpt = None,
    rollouts: RolloutsOpt = None,
    step_filter: StepFilterOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
) -> None:
    """Harvest, train and evaluate: the whole STEPER compile. Writes config.yaml, the compiled program,
    report.md and plots into the output folder.

    Example: steper compile --teacher openai/gpt-4o-mini --student HuggingFaceTB/SmolLM2-135M-Instruct -o runs/demo
    """
    cfg = _config(**locals())
    compile_and_report(cfg, title="steper compile", compare_untrained=False, compare_teacher=False)


@app.command(name="eval")
def eval_(
    model: Annotated[
        str,
        typer.Option(help="The LM to run the program on (same forms as --teacher). Example: --model runs/demo/model"),
    ],
    as_student: Annotated[
        bool,
        typer.Option(
            "--student/--teacher-format",
            help="Run with the student adapter (no JSON fallback), as a compiled student runs.",
        ),
    ] = True,
    config: ConfigOpt = None,
    program: ProgramOpt = None,
    data: DataOpt = None,
    test_data: TestDataOpt = None,
    test_size: TestSizeOpt = None,
    api_base: ApiBaseOpt = None,
    output: OutputOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
) -> None:
    """Evaluate a program on a given LM: EM / F1 / accuracy, broken down by question type and hops.

    Example: steper eval --model runs/demo/model --data synthetic --test-size 30
    """
    cfg = _config(**locals())
    task = load_task(cfg)
    timings, results = Timings(), {}
    lm = model_lm(cfg, model, student=as_student)
    evaluate_system(results, timings, model, cfg, task, lm, student=as_student)
    print_results(results)
    path = write_report(
        Path(cfg.output),
        results,
        title="steper eval",
        details={"model": model, "data": cfg.data},
        timings=timings.seconds,
    )
    console.print(f"report: {path}")


@app.command()
def quickstart(
    teacher: TeacherOpt = None,
    api_base: ApiBaseOpt = None,
    output: OutputOpt = None,
    student: StudentOpt = None,
    train_size: TrainSizeOpt = None,
    test_size: TestSizeOpt = None,
    epochs: EpochsOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
) -> None:
    """Compile SmolLM2-135M on the built-in synthetic example with a recorded teacher, offline, in minutes;
    prints the untrained student vs the compiled student vs the teacher.

    Example: steper quickstart            (or --teacher openai/gpt-4o-mini for a live teacher)
    """
    cfg = quickstart_config(**locals())
    compile_and_report(cfg, title="steper quickstart", compare_untrained=True, compare_teacher=True)


@app.command()
def benchmark(
    config: ConfigOpt = None,
    program: ProgramOpt = None,
    data: DataOpt = None,
    test_data: TestDataOpt = None,
    train_size: TrainSizeOpt = None,
    test_size: TestSizeOpt = None,
    teacher: TeacherOpt = None,
    api_base: ApiBaseOpt = None,
    recording: RecordingOpt = None,
    student: StudentOpt = None,
    output: OutputOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    metric: MetricOpt = None,
    rollouts: RolloutsOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
    systems: Annotated[
        str,
        typer.Option(
            help="Comma-separated student systems: vanilla-kd, stepwise-kd, steper, and the ablations "
            "steper-agg-init, steper-agg-expand (which stages' data), fixed (weighting). Example: --systems steper,vanilla-kd"
        ),
    ] = ",".join(MAIN_SYSTEMS),
    ablations: Annotated[
        bool, typer.Option("--ablations", help="Add the paper's ablations to --systems (stage data and weighting).")
    ] = False,
) -> None:
    """The paper's comparison: teacher, untrained student, Vanilla-KD, step-wise KD and STEPER on the same
    harvested chains and held-out questions; writes results.json, predictions.jsonl, report.md and plots.
    A rerun reuses the harvest and every finished training run.

    Example: steper benchmark --teacher qwen2.5-coder-1.5b.gguf --data 2wikimultihopqa_train500.jsonl --test-data 2wikimultihopqa_dev164.jsonl --test-data hotpotqa_dev200.jsonl --ablations -o runs/bench
    """
    cfg = _config(**locals())
    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    if ablations:
        chosen += [s for s in ABLATIONS if s not in chosen]
    run_benchmark(cfg, systems=tuple(chosen))


def compile_and_report(cfg: RunConfig, *, title: str, compare_untrained: bool, compare_teacher: bool) -> None:
    """Harvest, train, evaluate the chosen systems, print the table and write report.md and plots."""
    out = Path(cfg.output)
    cfg.save(out / "config.yaml")
    timings = Timings()
    with timings.track("load data"):
        task = load_task(cfg)
    results: Results = {}
    teleprompter = make_teleprompter(cfg)
    teacher = teacher_lm(cfg)
    with timings.track("harvest"):
        harvest_report = teleprompter.harvest(
            task.program(cfg), trainset=task.trainset, teacher=teacher_program(cfg, task, teacher)
        )
    if compare_untrained:
        evaluate_system(results, timings, "untrained student", cfg, task, student_lm(cfg, cfg.student), student=True)
    with timings.track("train"):
        training = teleprompter.train()
    trained = student_lm(cfg, training.output_dir)
    evaluate_system(results, timings, f"STEPER student ({cfg.weighting})", cfg, task, trained, student=True)
    if compare_teacher:
        evaluate_system(results, timings, "teacher", cfg, task, teacher, student=False)
    program_dir = save_student_program(cfg, task, training.output_dir, trained)
    print_results(results)
    details = {
        "program": cfg.program,
        "data": cfg.data,
        "train questions": str(len(task.trainset)),
        "test questions": ", ".join(f"{len(t.examples)} ({t.name})" for t in task.testsets),
        "teacher": cfg.teacher or f"recording {cfg.recording}",
        "student": cfg.student,
        "weighting": cfg.weighting,
        "compiled program": str(program_dir),
        "trained model": str(training.output_dir),
        "training tokens/s": f"{training.tokens_per_second:.0f}",
    }
    path = write_report(
        out,
        results,
        title=title,
        details=details,
        timings=timings.seconds,
        harvest_summary=harvest_report.summary(),
        training_log=training.log_path,
    )
    total = sum(timings.seconds.values())
    console.print(
        f"report: {path}  (plots beside it); total {total / 60:.1f} min: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.seconds.items())
    )


def main() -> None:
    """Entry point: user errors end with one line and exit code 2, never a traceback."""
    from steper_dspy.errors import SteperError

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        app()
    except SteperError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise SystemExit(2) from None
