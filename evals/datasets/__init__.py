"""Multi-hop QA data: HotpotQA, 2WikiMultiHopQA and MuSiQue loaders, and the built-in synthetic example."""

from steper_dspy.evals.datasets.load import load_2wiki, load_hotpotqa, load_multihop, load_musique
from steper_dspy.evals.datasets.split import train_test_split
from steper_dspy.evals.datasets.synthetic import synthetic_multihop
from steper_dspy.evals.datasets.types import MultiHopDataset

__all__ = [
    "MultiHopDataset",
    "load_2wiki",
    "load_hotpotqa",
    "load_multihop",
    "load_musique",
    "synthetic_multihop",
    "train_test_split",
]
