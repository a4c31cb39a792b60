"""Experiments: a run's settings, data, teacher and students, the systems it trains, and its report.

`run_experiment` is the pipeline behind `steper compile`, `steper quickstart` and `steper benchmark`.
"""

from steper_dspy.evals.experiment.config import RunConfig
from steper_dspy.evals.experiment.lms import model_lm, run_student_lm, teacher_lm, teacher_program
from steper_dspy.evals.experiment.quickstart import quickstart_config, recorded_teacher_path, smollm2_student
from steper_dspy.evals.experiment.run import (
    Timings,
    evaluate_system,
    run_evaluation,
    run_experiment,
    run_harvest,
    run_training,
)
from steper_dspy.evals.experiment.systems import ABLATIONS, MAIN_SYSTEMS, SYSTEMS, System, chosen_systems
from steper_dspy.evals.experiment.task import Task, TestSet, load_task

__all__ = [
    "ABLATIONS",
    "MAIN_SYSTEMS",
    "SYSTEMS",
    "RunConfig",
    "System",
    "Task",
    "TestSet",
    "Timings",
    "chosen_systems",
    "evaluate_system",
    "load_task",
    "model_lm",
    "quickstart_config",
    "recorded_teacher_path",
    "run_evaluation",
    "run_experiment",
    "run_harvest",
    "run_student_lm",
    "run_training",
    "smollm2_student",
    "teacher_lm",
    "teacher_program",
]
