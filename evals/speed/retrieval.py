"""Retrieval speed: `BM25Retriever` (bm25s) against rank_bm25's `BM25Okapi` on synthetic corpora.

Passages are generated from a seeded vocabulary with Zipfian word frequencies (real English stopwords at
the head, pronounceable made-up words after them), topic words repeated within a passage, and Wikipedia
paragraph lengths; queries are short questions built from one passage's words. Both libraries get the same
tokens: rank_bm25 is fed the output of the retriever's own tokenizer (lowercase, stopwords, Snowball stemmer).

For each corpus size, each library builds its index in a fresh process (forked, so the corpus is shared),
which gives its own build time and memory; then the same queries are timed one by one, from query text to
the top-k passage indices. Top-k agreement is checked on identical BM25 settings (bm25s `robertson` against
`BM25Okapi(epsilon=0)`, same k1 and b: the same formula up to a constant factor) and reported for the
configurations as shipped (our retriever's `lucene` idf against `BM25Okapi`'s defaults) as well.

Run it with `steper speed retrieval`.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steper_dspy.errors import SteperError
from steper_dspy.evals.speed.common import (
    Row,
    RssPeak,
    bar_plot,
    comparison_table,
    machine,
    markdown_table,
    ratio,
    require,
    write_json,
)

_SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "or", "an")]
# Scores within this relative distance count as a tie: bm25s scores in float32, rank_bm25 in float64.
TIE_TOLERANCE = 1e-4


@dataclass
class RetrievalBenchmark:
    """Settings of the retrieval comparison.

    Args:
        sizes: Corpus sizes (passages) to index.
        baseline_max_size: Largest corpus rank_bm25 indexes (its build and queries are pure Python).
        queries: Queries timed on our retriever at every size.
        baseline_queries: Queries timed on rank_bm25 (the first ones of ours); they are also the ones whose
            top-k lists are compared.
        k: Passages per query.
        k1: BM25 term-frequency saturation (both libraries).
        b: BM25 length normalisation (both libraries).
        vocab_size: Distinct words the passages are drawn from.
        zipf: Exponent of the Zipfian word frequencies.
        mean_words: Mean passage length in words.
        seed: Seed of the corpus and the queries.
        isolate: Build each index in its own forked process (own memory figures); False runs in this one.
    """

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    baseline_max_size: int = 100_000
    queries: int = 1000
    baseline_queries: int = 100
    k: int = 10
    k1: float = 1.5
    b: float = 0.75
    vocab_size: int = 200_000
    zipf: float = 1.0
    mean_words: int = 80
    seed: int = 0
    isolate: bool = True

    def __post_init__(self) -> None:
        self.sizes = tuple(int(n) for n in self.sizes)
        if not self.sizes or min(self.sizes) < 10:
            raise SteperError("--sizes must name corpus sizes of at least 10 passages.")
        for name in ("queries", "k", "vocab_size", "mean_words"):
            if getattr(self, name) < 1:
                raise SteperError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.baseline_queries < 1 or self.baseline_queries > self.queries:
            raise SteperError("--baseline-queries must lie between 1 and --queries.")


def vocabulary(size: int) -> list[str]:
    """`size` distinct words by frequency rank: bm25s's English stopwords, then made-up words of 1 to 4
    syllables (deterministic, so every run and process builds the same list)."""
    import bm25s

    words = list(dict.fromkeys(bm25s.stopwords.STOPWORDS_EN))[:size]
    n = len(_SYLLABLES)
    rank = 0
    while len(words) < size:
        syllables, r = [], rank
        while True:
            syllables.append(_SYLLABLES[r % n])
            r //= n
            if r == 0:
                break
        words.append("".join(syllables) + ("" if rank % 3 else "s"))
        rank += 1
    return words


def synthetic_passages(settings: RetrievalBenchmark, n: int) -> list[str]:
    """`n` passages `"Title | text"` with Zipfian words, a few topic words each, and lognormal lengths.

    Args:
        settings: Give the vocabulary size, Zipf exponent, mean length and seed.
        n: How many passages.
    """
    from steper_dspy.retrieval.bm25 import format_passage

    rng = np.random.default_rng(settings.seed)
    words = np.array(vocabulary(settings.vocab_size), dtype=object)
    weights = 1.0 / np.arange(1, settings.vocab_size + 1) ** settings.zipf
    cdf = np.cumsum(weights / weights.sum())
    sigma = 0.5
    mu = math.log(settings.mean_words) - sigma**2 / 2
    passages: list[str] = []
    for start in range(0, n, 10_000):
        count = min(10_000, n - start)
        lengths = np.clip(rng.lognormal(mu, sigma, count).astype(int), 12, 400)
        ids = np.searchsorted(cdf, rng.random(int(lengths.sum())))
        # A passage is about something: a tenth of its words are its own few topic words (mid-frequency).
        topics = rng.integers(1_000, max(1_001, settings.vocab_size // 4), size=(count, 5))
        topical = rng.random(ids.size) < 0.1
        owner = np.repeat(np.arange(count), lengths)
        ids[topical] = topics[owner[topical], rng.integers(0, 5, int(topical.sum()))]
        text = words[ids]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i in range(count):
            title = " ".join(w.capitalize() for w in words[topics[i, : 1 + i % 3]])
            passages.append(format_passage(title, " ".join(text[offsets[i] : offsets[i + 1]]) + "."))
    return passages


def synthetic_queries(settings: RetrievalBenchmark, passages: Sequence[str], n: int) -> list[str]:
    """`n` short questions, each from the title and a few words of a random passage."""
    rng = np.random.default_rng(settings.seed + 1)
    openers = ("what is the", "who was the", "where is", "when did the", "which", "how many")
    queries = []
    for index in rng.integers(0, len(passages), n):
        title, _, text = passages[int(index)].partition(" | ")
        words = text.rstrip(".").split()
        picked = [words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 4)))]
        queries.append(f"{openers[int(rng.integers(0, len(openers)))]} {' '.join(picked)} of {title.lower()}?")
    return queries


def tokenizer() -> Callable[[list[str]], list[list[str]]]:
    """The retriever's own tokenizer (pattern, stopwords, stemmer), returning token strings per text."""
    import bm25s

    from steper_dspy.retrieval.bm25 import STOPWORDS, TOKEN_PATTERN, _make_stemmer

    stemmer = _make_stemmer("english")

    def tokenize(texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(
            texts,
            token_pattern=TOKEN_PATTERN,
            stopwords=list(STOPWORDS),
            stemmer=stemmer,
            return_ids=False,
            show_progress=False,
        )

    return tokenize


def run_retrieval_benchmark(settings: RetrievalBenchmark, output: str | Path) -> dict[str, Any]:
    """Index and query every corpus size with both libraries; writes `results.json` and `retrieval_speed.png`.

    Args:
        settings: The comparison's settings.
        output: The output folder.

    Returns:
        The results: `settings`, `machine` and one entry per size with `ours`, `baseline` (when run),
        `agreement` and `ratios`.

    Raises:
        SteperError: rank_bm25 is needed (a size within `baseline_max_size`) and not installed.
    """
    if min(settings.sizes) <= settings.baseline_max_size:
        require("rank_bm25", "rank-bm25")
    out = Path(output)
    sizes: dict[str, Any] = {}
    for n in settings.sizes:
        start = time.perf_counter()
        passages = synthetic_passages(settings, n)
        queries = synthetic_queries(settings, passages, settings.queries)
        entry: dict[str, Any] = {
            "passages": n,
            "generate_seconds": time.perf_counter() - start,
            "mean_passage_words": sum(p.count(" ") for p in passages[:10_000]) / min(n, 10_000),
        }
        with_baseline = n <= settings.baseline_max_size
        load_before = os.getloadavg()[0]
        entry["ours"] = _isolated(_run_ours, settings, passages, queries, with_baseline)
        if with_baseline:
            entry["baseline"] = _isolated(_run_baseline, settings, passages, queries[: settings.baseline_queries])
            entry["agreement"] = {
                "matched": agreement(entry["ours"].pop("topk_robertson"), entry["baseline"].pop("topk_matched")),
                "as_shipped": agreement(
                    entry["ours"]["topk"][: settings.baseline_queries], entry["baseline"].pop("topk_default")
                ),
            }
            entry["ratios"] = {
                key: ratio(entry["ours"][key], entry["baseline"][key])
                for key in ("build_seconds", "index_mb", "build_peak_mb", "query_p50_ms", "query_p99_ms")
            }
        entry["ours"].pop("topk")
        entry["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        sizes[str(n)] = entry
        del passages
        gc.collect()
    results = {
        "benchmark": "retrieval",
        "command": " ".join(sys.argv),
        "settings": dataclasses.asdict(settings),
        "machine": machine(),
        "sizes": sizes,
    }
    import bm25s

    results["libraries"] = {"bm25s": bm25s.__version__, "rank_bm25": _version("rank-bm25")}
    write_json(out / "results.json", results)
    _plot(sizes, out / "retrieval_speed.png")
    return results


def agreement(ours: list[tuple[list[int], list[float]]], theirs: list[tuple[list[int], list[float]]]) -> dict:
    """How many queries got the same top-k sets from both sides.

    Args:
        ours: Per query, `(indices, scores)` best first.
        theirs: The same for the baseline, same queries in the same order.

    Returns:
        `queries`, `same_set` (identical sets), `tie_only` (sets differ only by passages tied with the last
        kept score on their side, which either side may break differently), `differ`, and `share` (same or
        tie-only, as a fraction).
    """
    same = tie = 0
    for (ours_ids, ours_scores), (their_ids, their_scores) in zip(ours, theirs, strict=True):
        if set(ours_ids) == set(their_ids):
            same += 1
        elif _tie_only(ours_ids, ours_scores, their_ids) and _tie_only(their_ids, their_scores, ours_ids):
            tie += 1
    total = len(ours)
    return {
        "queries": total,
        "same_set": same,
        "tie_only": tie,
        "differ": total - same - tie,
        "share": (same + tie) / total if total else None,
    }


def _tie_only(ids: list[int], scores: list[float], other: list[int]) -> bool:
    if not scores:
        return not other
    last, others = scores[-1], set(other)
    extra = [s for i, s in zip(ids, scores, strict=True) if i not in others]
    return all(abs(s - last) <= TIE_TOLERANCE * max(abs(last), 1e-9) for s in extra)


def _run_ours(
    settings: RetrievalBenchmark, passages: list[str], queries: list[str], check: bool = False
) -> dict[str, Any]:
    from steper_dspy.retrieval import BM25Retriever

    with RssPeak() as memory:
        start = time.perf_counter()
        retriever = BM25Retriever(passages, k=settings.k, k1=settings.k1, b=settings.b)
        build = time.perf_counter() - start
        gc.collect()
    latencies, topk = _time_queries(lambda q: _hits(retriever(q)), queries)
    run = {
        "library": "bm25s via steper_dspy.retrieval.BM25Retriever (method lucene)",
        "build_seconds": build,
        "index_mb": memory.end_mb - memory.start_mb,
        "build_peak_mb": memory.peak_mb - memory.start_mb,
        **_latency_stats(latencies),
        "topk": topk,
    }
    if check:
        run["topk_robertson"] = _robertson_topk(settings, passages, queries[: settings.baseline_queries])
    return run


def _hits(prediction: Any) -> tuple[list[int], list[float]]:
    return list(prediction.indices), [float(s) for s in prediction.scores]


def _robertson_topk(settings: RetrievalBenchmark, passages: list[str], queries: list[str]) -> list:
    """Top-k of bm25s with Robertson's idf (negative idf clipped to 0) on the same tokens, for the check."""
    import bm25s

    from steper_dspy.retrieval.bm25 import _top_k

    tokenize = tokenizer()
    tokens = tokenize(passages)
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in doc] for doc in tokens]
    del tokens
    model = bm25s.BM25(method="robertson", k1=settings.k1, b=settings.b)
    model.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), create_empty_token=False, show_progress=False)
    results = []
    for query in queries:
        query_ids = [vocab[t] for t in tokenize([query])[0] if t in vocab]
        scores = model.get_scores_from_ids(query_ids) if query_ids else np.zeros(len(passages), dtype=np.float32)
        top = _top_k(scores, settings.k)
        results.append((top.tolist(), scores[top].tolist()))
    return results


def _run_baseline(settings: RetrievalBenchmark, passages: list[str], queries: list[str]) -> dict[str, Any]:
    """rank_bm25's BM25Okapi on the retriever's tokens: build, memory, query latency and top-k lists."""
    rank_bm25 = require("rank_bm25", "rank-bm25")
    from steper_dspy.retrieval.bm25 import _top_k

    tokenize = tokenizer()
    with RssPeak() as memory:
        start = time.perf_counter()
        tokens = tokenize(passages)
        tokenized = time.perf_counter()
        okapi = rank_bm25.BM25Okapi(tokens, k1=settings.k1, b=settings.b)  # library default epsilon=0.25
        build = time.perf_counter() - start
        del tokens
        gc.collect()

    def search(query: str) -> tuple[list[int], list[float]]:
        scores = okapi.get_scores(tokenize([query])[0])
        top = _top_k(scores, settings.k)
        return top.tolist(), scores[top].tolist()

    latencies, topk_default = _time_queries(search, queries)
    # The same index with the idf floor off: BM25Okapi(epsilon=0) sets negative idf to 0, as bm25s's robertson.
    document_frequency = Counter(word for doc in okapi.doc_freqs for word in doc)
    okapi.epsilon, okapi.idf = 0.0, {}
    okapi._calc_idf(document_frequency)
    topk_matched = [search(query) for query in queries]
    return {
        "library": f"rank_bm25 {_version('rank-bm25')} BM25Okapi",
        "build_seconds": build,
        "tokenize_seconds": tokenized - start,
        "index_mb": memory.end_mb - memory.start_mb,
        "build_peak_mb": memory.peak_mb - memory.start_mb,
        **_latency_stats(latencies),
        "topk_default": topk_default,
        "topk_matched": topk_matched,
    }


def _time_queries(search: Callable[[str], Any], queries: list[str]) -> tuple[list[float], list[Any]]:
    for query in queries[:5]:  # warm-up: first-call allocations, stemmer caches
        search(query)
    latencies, results = [], []
    for query in queries:
        start = time.perf_counter()
        results.append(search(query))
        latencies.append(time.perf_counter() - start)
    return latencies, results


def _latency_stats(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {
        "queries": len(latencies),
        "query_p50_ms": float(np.percentile(ms, 50)),
        "query_p99_ms": float(np.percentile(ms, 99)),
        "query_mean_ms": float(ms.mean()),
    }


def _isolated(fn: Callable[..., dict[str, Any]], settings: RetrievalBenchmark, *args: Any) -> dict[str, Any]:
    """`fn(settings, *args)` in a forked child (which shares the corpus copy-on-write), or here."""
    if not settings.isolate or "fork" not in multiprocessing.get_all_start_methods():
        run = fn(settings, *args)
        run["memory_isolated"] = False
        return run
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, fn, settings, *args))
    child.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = "error", "the benchmark process died (out of memory?)"
    child.join()
    if status == "error":
        raise SteperError(f"{fn.__name__} failed: {value}")
    value["memory_isolated"] = True
    return value


def _child(send: Any, fn: Callable[..., dict[str, Any]], *args: Any) -> None:
    try:
        send.send(("ok", fn(*args)))
    except Exception as err:  # reported by the parent, which names the step
        send.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        send.close()


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def table_rows(entry: dict[str, Any]) -> list[Row]:
    """One corpus size's figures as table rows (ours vs rank_bm25)."""
    ours, base = entry["ours"], entry.get("baseline", {})
    rows: list[Row] = [
        ("index build s (tokenize + index)", ours["build_seconds"], base.get("build_seconds"), ".2f", False),
        ("index memory MiB (RSS kept)", ours["index_mb"], base.get("index_mb"), ".0f", False),
        ("build peak MiB (RSS)", ours["build_peak_mb"], base.get("build_peak_mb"), ".0f", False),
        ("query p50 ms", ours["query_p50_ms"], base.get("query_p50_ms"), ".2f", False),
        ("query p99 ms", ours["query_p99_ms"], base.get("query_p99_ms"), ".2f", False),
    ]
    return rows


def agreement_line(entry: dict[str, Any]) -> str:
    """The top-k agreement of one size in words."""
    if "agreement" not in entry:
        return "top-k agreement: not checked (rank_bm25 not run at this size)"
    matched, shipped = entry["agreement"]["matched"], entry["agreement"]["as_shipped"]
    return (
        f"top-k agreement on {matched['queries']} queries: identical BM25 (bm25s robertson vs BM25Okapi epsilon=0) "
        f"{100 * matched['share']:.1f}% ({matched['same_set']} same set, {matched['tie_only']} tie-only, "
        f"{matched['differ']} differ); as shipped (lucene idf vs BM25Okapi defaults) {100 * shipped['share']:.1f}% "
        f"({shipped['differ']} differ)"
    )


def print_results(results: dict[str, Any]) -> None:
    """Print one comparison table per corpus size, with its agreement line."""
    from steper_dspy.evals.experiment.report import console

    settings = results["settings"]
    for n, entry in results["sizes"].items():
        queries = entry["ours"]["queries"], entry.get("baseline", {}).get("queries")
        title = (
            f"Retrieval, {int(n):,} passages (~{entry['mean_passage_words']:.0f} words), top-{settings['k']}: "
            f"{queries[0]} queries ours, {queries[1] or 0} rank_bm25"
        )
        console.print(comparison_table(title, table_rows(entry), ours="bm25s (ours)", baseline="rank_bm25"))
        console.print(agreement_line(entry))


def markdown(results: dict[str, Any]) -> str:
    """All sizes as one Markdown table (a column block per size) plus the agreement lines."""
    parts = []
    for n, entry in results["sizes"].items():
        parts.append(f"**{int(n):,} passages**\n")
        parts.append(markdown_table(table_rows(entry), ours="bm25s (ours)", baseline="rank_bm25"))
        parts.append(f"\n{agreement_line(entry)}\n")
    return "\n".join(parts)


def _plot(sizes: dict[str, Any], out: Path) -> Path:
    groups = [f"{int(n):,}" for n in sizes]

    def series(key: str) -> dict[str, list[float | None]]:
        return {
            "bm25s (ours)": [entry["ours"][key] for entry in sizes.values()],
            "rank_bm25": [entry.get("baseline", {}).get(key) for entry in sizes.values()],
        }

    panels = [
        ("index build s", groups, series("build_seconds")),
        ("query p50 ms", groups, series("query_p50_ms")),
        ("index memory MiB", groups, series("index_mb")),
    ]
    return bar_plot(out, panels, log=True)
