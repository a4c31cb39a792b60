"""The `steper` command line: harvest, train, compile, eval and quickstart."""

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from steper_dspy.cli.speed import speed_app
from steper_dspy.evals.experiment import (
    MAIN_SYSTEMS,
    RunConfig,
    chosen_systems,
    model_lm,
    quickstart_config,
    run_evaluation,
    run_experiment,
    run_harvest,
    run_training,
)
from steper_dspy.evals.experiment.report import console

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
        help="Teacher LM: a litellm string (openai/gpt-4o-mini, hosted_vllm/..., ollama_chat/...), a hub id, a local folder or a GGUF file; 'none' replays --recording only, overriding a config's teacher (nothing is started or called). Example: --teacher openai/gpt-4o-mini"
    ),
]
ApiBaseOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Endpoint of an API teacher; repeat it for several servers of the same model (each call goes to the least busy live one). Example: --api-base http://127.0.0.1:8000/v1"
    ),
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
SeedsOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--seed",
        help="Train and evaluate each system once per seed (repeat for several; default: the config's seeds). "
        "Example: --seed 0 --seed 1",
    ),
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
RUN_OPTIONS = set(RunConfig.model_fields) | {"epochs", "lr"}


def live_teacher(teacher: str | None) -> str | None:
    """The `--teacher` option as a run's live teacher: None for 'none' (replay the recording only)."""
    return None if teacher is not None and teacher.lower() == "none" else teacher


def _config(config: Path | None, **options: object) -> RunConfig:
    """The run settings from `config` and a command's options (its `locals()`); other options are left out."""
    options = {key: value for key, value in options.items() if key in RUN_OPTIONS}
    stages = options.pop("stages", None)
    epochs, lr = options.pop("epochs", None), options.pop("lr", None)
    cfg = RunConfig.load(config, stages=stages.split(",") if isinstance(stages, str) else None, **options)
    cfg.teacher = live_teacher(cfg.teacher)  # 'none': replay the recording only, also over a config's teacher
    if epochs is not None or lr is not None:
        training = dict(cfg.training)
        if epochs is not None:
            training["num_train_epochs"] = epochs
        if lr is not None:
            training["learning_rate"] = lr
        cfg = cfg.replace(training=training)
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
    run_harvest(_config(**locals()))


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
    result = run_training(_config(**locals()))
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
    run_experiment(_config(**locals()), title="steper compile")


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
    run_evaluation(cfg, model, model_lm(cfg, model, student=as_student), student=as_student)


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
    options = {**locals(), "teacher": live_teacher(teacher)}
    run_experiment(
        quickstart_config(**options), include_teacher=True, include_untrained=True, title="steper quickstart"
    )


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
    seeds: SeedsOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
    systems: Annotated[
        str,
        typer.Option(
            help="Comma-separated student systems: vanilla-kd, stepwise-kd, steper, and the ablations "
            "steper-agg-init, steper-agg-expand (which stages' data), fixed (weighting), steper-grounded (step filter). "
            "'none' evaluates only the teacher and the untrained student, without harvesting or training. "
            "Example: --systems steper,vanilla-kd"
        ),
    ] = ",".join(MAIN_SYSTEMS),
    ablations: Annotated[
        bool,
        typer.Option(
            "--ablations", help="Add the paper's ablations to --systems (stage data, weighting, step filter)."
        ),
    ] = False,
) -> None:
    """The paper's comparison: teacher, untrained student, Vanilla-KD, step-wise KD and STEPER on the same
    harvested chains and held-out questions; writes results.json, predictions.jsonl, report.md and plots.
    A rerun reuses the harvest and every finished training run.

    Example: steper benchmark --teacher qwen2.5-coder-1.5b.gguf --data 2wikimultihopqa_train500.jsonl --test-data 2wikimultihopqa_dev164.jsonl --test-data hotpotqa_dev200.jsonl --ablations -o runs/bench
    """
    names = [name.strip() for name in systems.split(",") if name.strip() and name.strip() != "none"]
    chosen = chosen_systems(names, ablations=ablations)
    run_experiment(
        _config(**locals()), systems=chosen, include_teacher=True, include_untrained=True, title="STEPER benchmark"
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
    except SystemExit as done:
        if done.code == 130:  # typer's exit on Ctrl-C
            from steper_dspy.lm.local import stop_local_generation

            # Before the interpreter joins the threads still waiting on a busy server or worker: they fail now,
            # and quietly (one warning per chain in flight would bury the line below).
            logging.disable(logging.WARNING)
            stop_local_generation()
            console.print("interrupted: what was finished is saved; run the same command again to resume")
        raise
