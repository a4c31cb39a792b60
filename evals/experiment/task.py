"""The questions and corpora of a run: training questions over one corpus, test sets over their own."""

from dataclasses import dataclass
from pathlib import Path

import dspy

from steper_dspy.errors import SteperError
from steper_dspy.evals.datasets import load_multihop, train_test_split
from steper_dspy.evals.experiment.config import RunConfig
from steper_dspy.programs import make_program
from steper_dspy.retrieval import BM25Retriever


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
