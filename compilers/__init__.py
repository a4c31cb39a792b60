"""Teleprompters that distil a staged multi-step RAG teacher into a local student."""

from steper_dspy.compilers.demos import bootstrap_demos, load_demos, save_demos
from steper_dspy.compilers.filters import GroundedStepFilter, StepFilter
from steper_dspy.compilers.harvest import HarvestReport, example_id, harvest
from steper_dspy.compilers.steper import STEPER, StepwiseKD, VanillaKD
from steper_dspy.compilers.store import ChainRecord, HarvestStore
from steper_dspy.compilers.student import load_compiled, run_on_student, run_with_adapter, save_compiled, student_lm

__all__ = [
    "STEPER",
    "ChainRecord",
    "GroundedStepFilter",
    "HarvestReport",
    "HarvestStore",
    "StepFilter",
    "StepwiseKD",
    "VanillaKD",
    "bootstrap_demos",
    "example_id",
    "harvest",
    "load_compiled",
    "load_demos",
    "run_on_student",
    "run_with_adapter",
    "save_compiled",
    "save_demos",
    "student_lm",
]
