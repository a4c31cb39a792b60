"""Evaluation: multi-hop QA datasets, a one-call evaluation report, experiments and speed benchmarks."""

from steper_dspy.evals.datasets import (
    MultiHopDataset,
    load_2wiki,
    load_hotpotqa,
    load_multihop,
    load_musique,
    synthetic_multihop,
    train_test_split,
)
from steper_dspy.evals.evaluate import EvaluationReport, evaluate_program

__all__ = [
    "EvaluationReport",
    "MultiHopDataset",
    "evaluate_program",
    "load_2wiki",
    "load_hotpotqa",
    "load_multihop",
    "load_musique",
    "synthetic_multihop",
    "train_test_split",
]
