"""Evaluation: multi-hop QA datasets, answer metrics and a one-call evaluation report."""

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
from steper_dspy.evals.metrics import METRICS, answer_accuracy, answer_exact_match, answer_f1

__all__ = [
    "METRICS",
    "EvaluationReport",
    "MultiHopDataset",
    "answer_accuracy",
    "answer_exact_match",
    "answer_f1",
    "evaluate_program",
    "load_2wiki",
    "load_hotpotqa",
    "load_multihop",
    "load_musique",
    "synthetic_multihop",
    "train_test_split",
]
