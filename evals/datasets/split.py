"""A seeded train/test split of a multi-hop dataset's questions."""

import random

import dspy

from steper_dspy.errors import SteperError
from steper_dspy.evals.datasets.types import MultiHopDataset


def train_test_split(
    dataset: MultiHopDataset, *, test_size: int, seed: int = 0
) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """Split the questions into a train and a test list, the same for the same seed.

    Which questions go to test is drawn with `random.Random(seed)`; both lists keep the dataset's order.

    Args:
        dataset: The dataset whose `examples` to split.
        test_size: How many questions go to the test list (0 to `len(dataset.examples)`).
        seed: Seed of the draw.

    Returns:
        `(train, test)`.

    Raises:
        SteperError: `test_size` is not a whole number within the dataset's size.
    """
    total = len(dataset.examples)
    if not isinstance(test_size, int) or isinstance(test_size, bool) or not 0 <= test_size <= total:
        raise SteperError(
            f"test_size must be a whole number from 0 to {total} (the size of '{dataset.name}'), got {test_size!r}."
        )
    test_indices = set(random.Random(seed).sample(range(total), test_size))
    train = [example for i, example in enumerate(dataset.examples) if i not in test_indices]
    test = [example for i, example in enumerate(dataset.examples) if i in test_indices]
    return train, test
