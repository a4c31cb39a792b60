"""Reading a split of a Hugging Face Hub dataset through `datasets.load_dataset`."""

from collections.abc import Iterator

from steper_dspy.errors import SteperError
from steper_dspy.evals.datasets.rows import Row, iter_records

# The hub's HotpotQA needs a config; the distractor setting is the one with per-question candidate paragraphs.
_DEFAULT_CONFIGS = {"hotpot_qa": "distractor", "hotpotqa/hotpot_qa": "distractor"}


def iter_hub_rows(dataset_id: str, split: str) -> Iterator[Row]:
    """Yield the rows of `split` of the hub dataset `dataset_id` ("owner/name", optionally "owner/name:config").

    Raises:
        SteperError: The dataset or split cannot be loaded (unknown id, offline without a cached copy).
    """
    path, _, config = dataset_id.partition(":")
    config = config or _DEFAULT_CONFIGS.get(path.lower())
    try:
        import datasets

        rows = datasets.load_dataset(path, config, split=split)
    except Exception as e:
        raise SteperError(
            f"Could not load the dataset '{dataset_id}' (split '{split}') from the Hugging Face Hub: "
            f"{type(e).__name__}: {e}. Check the id and split, go online (unset HF_DATASETS_OFFLINE / "
            "HF_HUB_OFFLINE) to download it once, or pass a local .jsonl file instead."
        ) from None
    yield from iter_records(rows, f"{dataset_id} [{split}]")
