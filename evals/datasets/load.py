"""One entry point for multi-hop QA data: the synthetic example, a local file, or a hub dataset."""

from collections.abc import Callable, Iterator
from pathlib import Path

import dspy

from steper_dspy.errors import SteperError
from steper_dspy.evals.datasets.hotpotqa import Paragraph, parse_hotpotqa
from steper_dspy.evals.datasets.hub import iter_hub_rows
from steper_dspy.evals.datasets.musique import parse_musique
from steper_dspy.evals.datasets.rows import Row, iter_file_rows
from steper_dspy.evals.datasets.synthetic import synthetic_multihop
from steper_dspy.evals.datasets.two_wiki import TWO_WIKI_HOPS, parse_2wiki
from steper_dspy.evals.datasets.types import CorpusBuilder, MultiHopDataset

Parser = Callable[[Row], tuple[dspy.Example, list[Paragraph]] | None]

PARSERS: dict[str, Parser] = {"hotpotqa": parse_hotpotqa, "2wiki": parse_2wiki, "musique": parse_musique}
SYNTHETIC = "synthetic"
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_TWO_WIKI_ONLY_TYPES = set(TWO_WIKI_HOPS) - {"comparison"}


def load_multihop(
    source: str | Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    format: str | None = None,
    seed: int = 0,
) -> MultiHopDataset:
    """Load multi-hop questions and their closed corpus.

    Args:
        source: `"synthetic"` for the built-in fictional world; a local `.jsonl`, `.json` or `.parquet` file;
            or a Hugging Face Hub dataset id (`"owner/name"`, optionally `"owner/name:config"`).
        split: The hub split to read (default `"validation"`); ignored for local files and the synthetic set.
        limit: Read at most this many questions; the corpus holds only their paragraphs (the synthetic set
            keeps its whole world as the corpus).
        format: `"hotpotqa"`, `"2wiki"` or `"musique"`; by default sniffed from the first row's fields (and,
            for a hub id, guessed from the id first).
        seed: Seed of the synthetic set; unused otherwise.

    Returns:
        The questions (`dspy.Example`s with input `question`) and the deduplicated corpus.

    Raises:
        SteperError: A missing file, a malformed row (naming file, line and field), an unknown format, or a hub
            dataset that cannot be loaded.
    """
    _check_limit(limit)
    if format is not None and format not in PARSERS:
        raise SteperError(f"Unknown dataset format '{format}'. Use one of: {', '.join(PARSERS)}.")
    if str(source) == SYNTHETIC:
        dataset = synthetic_multihop(seed=seed)
        if limit is not None:
            dataset.examples = dataset.examples[:limit]
        return dataset

    path = Path(source).expanduser()
    if path.is_file():
        return _load_rows(iter_file_rows(path), name=path.stem, source=str(path), format=format, limit=limit)
    if path.exists():
        raise SteperError(f"{path} is a folder; pass a .jsonl, .json or .parquet file of questions.")
    if _looks_like_path(str(source)):
        raise SteperError(f"No such file: {path}. Check the path (relative paths start from {Path.cwd()}).")

    dataset_id = str(source)
    split = split or "validation"
    return _load_rows(
        iter_hub_rows(dataset_id, split),
        name=dataset_id,
        source=dataset_id,
        format=format or _guess_format_from_id(dataset_id),
        limit=limit,
    )


def load_hotpotqa(source: str | Path, *, split: str = "validation", limit: int | None = None) -> MultiHopDataset:
    """Load HotpotQA questions (upstream `context` lists or the hub's columnar layout); see `load_multihop`."""
    return load_multihop(source, split=split, limit=limit, format="hotpotqa")


def load_2wiki(source: str | Path, *, split: str = "validation", limit: int | None = None) -> MultiHopDataset:
    """Load 2WikiMultiHopQA questions; see `load_multihop`."""
    return load_multihop(source, split=split, limit=limit, format="2wiki")


def load_musique(source: str | Path, *, split: str = "validation", limit: int | None = None) -> MultiHopDataset:
    """Load MuSiQue questions, skipping rows marked unanswerable; see `load_multihop`."""
    return load_multihop(source, split=split, limit=limit, format="musique")


def _load_rows(
    rows: Iterator[Row], *, name: str, source: str, format: str | None, limit: int | None
) -> MultiHopDataset:
    examples: list[dspy.Example] = []
    corpus = CorpusBuilder()
    parse = PARSERS[format] if format else None
    if limit == 0:
        return MultiHopDataset(name=name)
    for row in rows:
        parse = parse or PARSERS[sniff_format(row)]
        parsed = parse(row)
        if parsed is None:
            continue
        example, paragraphs = parsed
        examples.append(example)
        corpus.add(paragraphs)
        if len(examples) == limit:
            break
    if not examples:
        raise SteperError(f"{source} holds no answerable questions. Check that it is the right file or split.")
    return MultiHopDataset(name=name, examples=examples, corpus=corpus.build())


def sniff_format(row: Row) -> str:
    """Tell the dataset format from one row's fields.

    Raises:
        SteperError: The fields match none of the known layouts.
    """
    if row.has("paragraphs"):
        return "musique"
    if row.has("context") and (row.has("evidences") or row.data.get("type") in _TWO_WIKI_ONLY_TYPES):
        return "2wiki"
    if row.has("context"):
        return "hotpotqa"
    raise SteperError(
        f"{row.source}, {row.location}: cannot tell the dataset format from the fields {sorted(row.data)} "
        "(expected 'context' for HotpotQA/2WikiMultiHopQA or 'paragraphs' for MuSiQue). "
        f"Pass format= one of {', '.join(PARSERS)}."
    )


def _guess_format_from_id(dataset_id: str) -> str | None:
    lowered = dataset_id.lower()
    if "musique" in lowered:
        return "musique"
    if "2wiki" in lowered or "wikimultihop" in lowered:
        return "2wiki"
    if "hotpot" in lowered:
        return "hotpotqa"
    return None


def _looks_like_path(source: str) -> bool:
    return source.lower().endswith(_FILE_SUFFIXES) or source.startswith((".", "/", "~")) or "\\" in source


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise SteperError(f"limit must be a whole number >= 0 or None, got {limit!r}.")
