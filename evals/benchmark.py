"""The paper's comparison: teacher, untrained student, Vanilla-KD, uniform step-wise KD and STEPER, all
students trained on the same harvested chains and evaluated on the same held-out questions."""

import json
from dataclasses import dataclass
from pathlib import Path

from steper_dspy.cli.config import RunConfig
from steper_dspy.cli.report import console, results_table, write_report
from steper_dspy.cli.run import Timings, load_task, make_teleprompter, run_eval, teacher_lm, teacher_program
from steper_dspy.cli.specs import make_lm
from steper_dspy.evals.evaluate import EvaluationReport


@dataclass(frozen=True)
class System:
    """A student system: how its training data and loss are chosen."""

    name: str
    weighting: str
    stages: tuple[str, ...]


SYSTEMS = {
    "vanilla-kd": System("Vanilla-KD", "uniform", ("aggregate",)),
    "stepwise-kd": System("step-wise KD (uniform)", "uniform", ("init", "expand", "aggregate")),
    "steper": System("STEPER", "adaptive", ("init", "expand", "aggregate")),
}


def run_benchmark(
    config: RunConfig,
    *,
    systems: tuple[str, ...] = ("vanilla-kd", "stepwise-kd", "steper"),
    include_teacher: bool = True,
    include_untrained: bool = True,
) -> dict[str, EvaluationReport]:
    """Harvest once into ``<output>/harvest.jsonl``, train each system into ``<output>/<system>``, evaluate all.

    Writes ``results.json``, ``predictions.jsonl`` (one row per system and question), ``report.md`` and plots.
    """
    out = Path(config.output)
    config.save(out / "config.yaml")
    timings, results = Timings(), {}
    task = load_task(config)
    teacher = teacher_lm(config)
    with timings.track("harvest"):
        report = make_teleprompter(config).harvest(
            task.program(config, test=False),
            trainset=task.trainset,
            teacher=teacher_program(config, task, teacher, test=False),
        )
    if include_teacher:
        with timings.track("eval teacher"):
            results["teacher"] = run_eval(config, task, teacher, student=False)
    if include_untrained:
        with timings.track("eval untrained student"):
            results["untrained student"] = run_eval(config, task, make_lm(config.student), student=True)
    logs = {}
    for key in systems:
        system = SYSTEMS[key]
        system_config = RunConfig(**{**config.__dict__, "weighting": system.weighting, "stages": list(system.stages)})
        with timings.track(f"train {key}"):
            training = make_teleprompter(system_config, output=out / key).train()
        logs[key] = training.log_path
        with timings.track(f"eval {key}"):
            results[system.name] = run_eval(config, task, make_lm(str(training.output_dir)), student=True)
    console.print(results_table(results))
    with open(out / "predictions.jsonl", "w") as f:
        for name, r in results.items():
            for row in r.rows:
                f.write(json.dumps({"system": name, **row}, default=str) + "\n")
    details = {
        "data": config.data,
        "test data": config.test_data or "held-out part of the data",
        "teacher": config.teacher or f"recording {config.recording}",
        "student": config.student,
        "train questions": str(len(task.trainset)),
        "test questions": str(len(task.testset)),
    }
    path = write_report(
        out,
        results,
        title="STEPER benchmark",
        details=details,
        timings=timings.seconds,
        harvest_summary=report.summary(),
        training_log=logs.get("steper"),
    )
    console.print(f"report: {path}")
    return results
