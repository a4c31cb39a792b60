"""The paper's comparison: teacher, untrained student, Vanilla-KD, uniform step-wise KD and STEPER, all
students trained on the same harvested chains and evaluated on the same held-out questions, plus the paper's
ablations (which stages' data, which weighting)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from steper_dspy.cli.config import RunConfig
from steper_dspy.cli.report import Results, console, print_results, write_report
from steper_dspy.cli.run import (
    Timings,
    evaluate_system,
    load_task,
    make_teleprompter,
    student_lm,
    teacher_lm,
    teacher_program,
)
from steper_dspy.errors import SteperError

ALL_STAGES = ("init", "expand", "aggregate")


@dataclass(frozen=True)
class System:
    """A student system: which stages' samples it trains on and how their losses are weighted."""

    name: str
    weighting: str
    stages: tuple[str, ...]
    stage_weights: dict[str, float] = field(default_factory=dict)


SYSTEMS = {
    "vanilla-kd": System("Vanilla-KD", "uniform", ("aggregate",)),
    "stepwise-kd": System("step-wise KD (uniform)", "uniform", ALL_STAGES),
    "steper": System("STEPER", "adaptive", ALL_STAGES),
    # Ablations: the data of which stages (adaptive weighting) ...
    "steper-agg-init": System("STEPER: aggregate + init data", "adaptive", ("init", "aggregate")),
    "steper-agg-expand": System("STEPER: aggregate + expand data", "adaptive", ("expand", "aggregate")),
    # ... and which weighting on all stages (uniform is stepwise-kd).
    "fixed": System("step-wise KD (fixed 1:1:1 per stage)", "fixed", ALL_STAGES, {s: 1.0 for s in ALL_STAGES}),
}
MAIN_SYSTEMS = ("vanilla-kd", "stepwise-kd", "steper")
ABLATIONS = ("steper-agg-init", "steper-agg-expand", "fixed")


def run_benchmark(
    config: RunConfig,
    *,
    systems: tuple[str, ...] = MAIN_SYSTEMS,
    include_teacher: bool = True,
    include_untrained: bool = True,
) -> Results:
    """Harvest once into ``<output>/harvest.jsonl``, train each system into ``<output>/<system>``, evaluate
    every system on every test set of the run.

    A rerun reuses the harvest, every finished training run and the teacher recording, so only what is
    missing is computed. Writes ``results.json``, ``predictions.jsonl`` (one row per test set, system and
    question), ``report.md`` and plots.

    Raises:
        SteperError: An unknown system name.
    """
    unknown = [key for key in systems if key not in SYSTEMS]
    if unknown:
        raise SteperError(f"Unknown system(s) {unknown}: choose from {sorted(SYSTEMS)}.")
    out = Path(config.output)
    config.save(out / "config.yaml")
    timings = Timings()
    task = load_task(config)
    results: Results = {}
    teacher = teacher_lm(config)
    with timings.track("harvest"):
        harvest = make_teleprompter(config).harvest(
            task.program(config), trainset=task.trainset, teacher=teacher_program(config, task, teacher)
        )
    if include_teacher:
        evaluate_system(results, timings, "teacher", config, task, teacher, student=False)
    if include_untrained:
        evaluate_system(
            results, timings, "untrained student", config, task, student_lm(config, config.student), student=True
        )
    logs = {}
    for key in systems:
        system = SYSTEMS[key]
        with timings.track(f"train {key}"):
            training = make_teleprompter(system_config(config, system), output=out / key).train()
        logs[key] = training.log_path
        evaluate_system(
            results, timings, system.name, config, task, student_lm(config, training.output_dir), student=True
        )
    print_results(results)
    write_predictions(results, out / "predictions.jsonl")
    details = {
        "program": config.program,
        "data": config.data,
        "teacher": config.teacher or f"recording {config.recording}",
        "student": config.student,
        "train questions": str(len(task.trainset)),
        "test sets": ", ".join(f"{t.name} ({len(t.examples)} questions)" for t in task.testsets),
    }
    path = write_report(
        out,
        results,
        title="STEPER benchmark",
        details=details,
        timings=timings.seconds,
        harvest_summary=harvest.summary(),
        training_log=logs.get("steper"),
    )
    console.print(f"report: {path}")
    return results


def system_config(config: RunConfig, system: System) -> RunConfig:
    """The run's settings with the system's weighting, stages and stage weights."""
    training = {**config.training, "stage_weights": system.stage_weights or None}
    return RunConfig(
        **{**config.__dict__, "weighting": system.weighting, "stages": list(system.stages), "training": training}
    )


def write_predictions(results: Results, path: Path) -> None:
    """One JSON line per test set, system and question, for inspection."""
    with open(path, "w") as f:
        for test_set, by_system in results.items():
            for system, report in by_system.items():
                for row in report.rows:
                    f.write(json.dumps({"test_set": test_set, "system": system, **row}, default=str) + "\n")
