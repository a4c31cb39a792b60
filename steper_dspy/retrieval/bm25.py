"""BM25 retrieval over a corpus of "Title | text" passages, built on bm25s."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import bm25s
import dspy
import numpy as np
import Stemmer

from steper_dspy.errors import SteperError

PASSAGE_SEPARATOR = " | "

# bm25s's default pattern (\w\w+) drops one-character tokens, which loses "Apollo 7", "Malcolm X" and "Vitamin C";
# keep them, and drop the possessive/contraction leftovers "s" and "t" as stopwords instead.
TOKEN_PATTERN = r"(?u)\b\w+\b"
STOPWORDS = (*bm25s.stopwords.STOPWORDS_EN, "s", "t")

SETTINGS_FILE = "steper_bm25.json"
CORPUS_FILE = "corpus.jsonl"
FORMAT_NAME = "steper-bm25"
FORMAT_VERSION = 1


def format_passage(title: str, text: str) -> str:
    """Format a titled passage the way the retriever, the programs and the prompts expect it.

    Args:
        title: The passage title, e.g. a Wikipedia page title. It must not contain `" | "`.
        text: The passage body.

    Returns:
        The passage string `"{title} | {text}"`.

    Raises:
        SteperError: If the title contains the separator `" | "`, which would make the title ambiguous.
    """
    if PASSAGE_SEPARATOR in title:
        raise SteperError(
            f"The passage title {title!r} contains the separator {PASSAGE_SEPARATOR!r}, so it could not be read back "
            "from the passage; replace it in the title (e.g. with ' / ')."
        )
    return f"{title}{PASSAGE_SEPARATOR}{text}"


def passage_title(passage: str) -> str:
    """Return the title of a passage made by `format_passage`.

    Args:
        passage: A passage string `"{title} | {text}"`.

    Returns:
        The title, or `""` if the passage has no title separator.
    """
    title, separator, _ = passage.partition(PASSAGE_SEPARATOR)
    return title if separator else ""


class BM25Retriever:
    """Sparse BM25 retriever over titled passages, with the call shape of `dspy.retrievers.Embeddings`.

    Title and text are indexed together. Text is lowercased, split into words, stripped of English stopwords and
    stemmed; queries go through the same steps. Queries are thread-safe, so the retriever can be shared by a program
    evaluated with `dspy.Evaluate(num_threads=...)`. It is read-only once built: copies of a program share it.

    Example:
        ```python
        retriever = BM25Retriever([{"title": "Paris", "text": "Paris is the capital of France."}, ...], k=4)
        hits = retriever("capital of France")
        hits.passages, hits.indices, hits.scores
        more = retriever("largest city in France", exclude=hits.indices)
        ```
    """

    def __init__(
        self,
        corpus: Sequence[str | Mapping[str, str]],
        *,
        k: int = 4,
        stemmer: str | None = "english",
        k1: float = 1.5,
        b: float = 0.75,
    ):
        """Index a corpus.

        Args:
            corpus: Passages, each a string made by `format_passage` or a `{"title": ..., "text": ...}` mapping.
                Index `i` of the corpus is passage `i` in results.
            k: How many passages a call returns by default.
            stemmer: A PyStemmer algorithm name (e.g. `"english"`), or `None` to match words unstemmed.
            k1: BM25 term-frequency saturation.
            b: BM25 document-length normalization.

        Raises:
            SteperError: If the corpus is empty, holds an item that is not a passage, or has no searchable words.
        """
        passages = _format_corpus(corpus)
        self._setup(passages, k=k, stemmer=stemmer, token_pattern=TOKEN_PATTERN, stopwords=list(STOPWORDS))
        tokenized = self._tokenize(passages, return_ids=True)
        if not tokenized.vocab:
            raise SteperError(
                f"None of the {len(passages)} corpus passages contains a searchable word (stopwords and punctuation "
                "are ignored); check that the corpus was loaded with its text."
            )
        self._model = bm25s.BM25(k1=k1, b=b)
        # No empty token: bm25s 0.3.16 gives it an id past the end of the score matrix, and empty queries are
        # rejected before scoring anyway.
        self._model.index(tokenized, create_empty_token=False, show_progress=False)

    def _setup(self, corpus: list[str], *, k: int, stemmer: str | None, token_pattern: str, stopwords: list[str]):
        self.corpus = corpus
        self.k = _check_k(k)
        self.stemmer = stemmer
        self._token_pattern = token_pattern
        self._stopwords = stopwords
        self._stemmer = _make_stemmer(stemmer)
        self._loaded_from: Path | None = None
        # PyStemmer objects must not be used by two threads at once; scoring itself only reads the index.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.corpus)

    def __repr__(self) -> str:
        return f"BM25Retriever({len(self)} passages, k={self.k}, stemmer={self.stemmer!r})"

    def __deepcopy__(self, memo: dict) -> BM25Retriever:
        # Read-only after construction, so dspy's Module.deepcopy (run by every optimizer) can share it instead of
        # copying a large index.
        return self

    def __call__(self, query: str, k: int | None = None, *, exclude: Collection[int] = ()) -> dspy.Prediction:
        """Retrieve the passages that best match a query.

        Args:
            query: A search query in natural language.
            k: How many passages to return; defaults to the retriever's `k`.
            exclude: Corpus indices never to return, e.g. passages retrieved in earlier hops.

        Returns:
            A `dspy.Prediction` with `passages`, `indices` and `scores`, best first (ties by corpus index). It holds
            up to `k` passages, only ones sharing a word with the query; none if no passage does.

        Raises:
            SteperError: If the query has no searchable words, `k` is not a positive integer, or `exclude` holds
                something that is not a corpus index.
        """
        k = self.k if k is None else _check_k(k)
        token_ids = self._query_token_ids(query)
        if not token_ids:
            return dspy.Prediction(passages=[], indices=[], scores=[])
        scores = self._model.get_scores_from_ids(token_ids)  # a fresh array per call, safe to edit
        if len(exclude):
            scores[self._exclude_indices(exclude)] = 0.0
        top = _top_k(scores, k)
        return dspy.Prediction(
            passages=[self.corpus[i] for i in top.tolist()], indices=top.tolist(), scores=scores[top].tolist()
        )

    def save(self, path: str | Path) -> None:
        """Save the index, the corpus and the settings to a folder, without pickle.

        Args:
            path: The folder to write; created if missing. Files of an older index there are overwritten.
        """
        path = Path(path)
        # Rewriting the arrays of a memory-mapped index in place would truncate files still mapped (a crash); the
        # index is read-only, so only the settings can have changed.
        if self._loaded_from is None or path.resolve() != self._loaded_from:
            self._model.save(path, corpus=self.corpus, show_progress=False)  # corpus.jsonl holds {"id", "text"}
        settings = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_passages": len(self.corpus),
            "k": self.k,
            "stemmer": self.stemmer,
            "token_pattern": self._token_pattern,
            "stopwords": self._stopwords,
        }
        # Written last: a folder whose save was interrupted has no settings and is refused by `load`.
        (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False) -> BM25Retriever:
        """Load a retriever written by `save`.

        Args:
            path: The folder given to `save`.
            mmap: Memory-map the index arrays instead of reading them into memory, for corpora too large for RAM.

        Returns:
            The retriever, giving the same results as the one saved.

        Raises:
            SteperError: If the folder does not hold a complete saved BM25Retriever.
        """
        path = Path(path)
        settings_path = path / SETTINGS_FILE
        fix = "build one with BM25Retriever(corpus).save(path) or pass the folder it was saved to"
        if not settings_path.is_file():
            raise SteperError(f"{path} is not a saved BM25 index (no {SETTINGS_FILE} in it); {fix}.")
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
            if settings.get("format") != FORMAT_NAME or settings.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format {settings.get('format')!r} version {settings.get('version')!r}")
            model = bm25s.BM25.load(path, mmap=mmap, show_progress=False)
            with open(path / CORPUS_FILE, encoding="utf-8") as f:
                corpus = [json.loads(line)["text"] for line in f]
            if not len(corpus) == settings["num_passages"] == model.scores["num_docs"]:
                raise ValueError(
                    f"{len(corpus)} passages in {CORPUS_FILE}, {settings['num_passages']} in {SETTINGS_FILE} "
                    f"and {model.scores['num_docs']} in the index"
                )
            retriever = cls.__new__(cls)
            retriever._setup(
                corpus,
                k=settings["k"],
                stemmer=settings["stemmer"],
                token_pattern=settings["token_pattern"],
                stopwords=settings["stopwords"],
            )
        except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise SteperError(f"The BM25 index in {path} is incomplete or damaged ({e}); {fix}.") from e
        retriever._model = model
        retriever._loaded_from = path.resolve()
        return retriever

    def _tokenize(self, texts: list[str], *, return_ids: bool):
        with self._lock:
            return bm25s.tokenize(
                texts,
                token_pattern=self._token_pattern,
                stopwords=self._stopwords,
                stemmer=self._stemmer,
                return_ids=return_ids,
                show_progress=False,
            )

    def _query_token_ids(self, query: str) -> list[int]:
        if not isinstance(query, str):
            raise SteperError(f"The query must be a string, got {type(query).__name__}: {query!r}.")
        tokens = self._tokenize([query], return_ids=False)[0]
        if not tokens:
            raise SteperError(
                f"The query {query!r} has no searchable words (stopwords and punctuation are ignored); "
                "ask with at least one content word, e.g. a name or a topic."
            )
        return self._model.get_tokens_ids(tokens)  # words not in the corpus vocabulary are dropped

    def _exclude_indices(self, exclude: Collection[int]) -> np.ndarray:
        try:
            indices = np.asarray(list(exclude), dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise SteperError(f"`exclude` must hold corpus indices (integers), got {exclude!r}.") from e
        if indices.ndim != 1 or indices.min() < 0 or indices.max() >= len(self.corpus):
            raise SteperError(
                f"`exclude` holds {exclude!r}, but corpus indices run from 0 to {len(self.corpus) - 1}; pass the "
                "`indices` of earlier results from this same retriever."
            )
        return indices


def _format_corpus(corpus: Sequence[str | Mapping[str, str]]) -> list[str]:
    if isinstance(corpus, (str, bytes, Mapping)) or not isinstance(corpus, Iterable):
        raise SteperError(
            f"The corpus must be a list of passages, got {type(corpus).__name__}; wrap a single passage in a list."
        )
    corpus = list(corpus)
    if not corpus:
        raise SteperError("The corpus is empty; pass at least one passage to index.")
    passages = []
    for i, item in enumerate(corpus):
        if isinstance(item, str):
            passages.append(item)
            continue
        if not isinstance(item, Mapping):
            raise SteperError(
                f"Corpus item {i} is a {type(item).__name__}; each item must be a passage string "
                'or a {"title": ..., "text": ...} mapping.'
            )
        missing = [key for key in ("title", "text") if key not in item]
        if missing:
            raise SteperError(
                f"Corpus item {i} has no {' or '.join(repr(key) for key in missing)} key (its keys: {sorted(item)}); "
                'each mapping needs both "title" and "text".'
            )
        title, text = item["title"], item["text"]
        if not isinstance(title, str) or not isinstance(text, str):
            raise SteperError(
                f'Corpus item {i} has a non-string "title" or "text" ({type(title).__name__}, '
                f"{type(text).__name__}); join sentence lists into one string first."
            )
        try:
            passages.append(format_passage(title, text))
        except SteperError as e:
            raise SteperError(f"Corpus item {i}: {e}") from None
    return passages


def _make_stemmer(stemmer: str | None) -> Stemmer.Stemmer | None:
    if stemmer is None:
        return None
    try:
        return Stemmer.Stemmer(stemmer)
    except (KeyError, TypeError, AttributeError) as e:
        raise SteperError(
            f"Unknown stemmer {stemmer!r}; use one of {', '.join(Stemmer.algorithms())}, or None for no stemming."
        ) from e


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SteperError(f"k must be a positive integer (how many passages to return), got {k!r}.")
    return int(k)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the up to `k` highest positive scores, best first, ties broken by lower index."""
    n = len(scores)
    candidates = np.argpartition(scores, n - k)[-k:] if k < n else np.arange(n)  # O(n), unlike a full sort
    candidates = candidates[scores[candidates] > 0]
    return candidates[np.lexsort((candidates, -scores[candidates]))]
