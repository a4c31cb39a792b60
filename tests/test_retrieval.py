"""BM25Retriever: ranking, k and exclude, save/load, input errors and concurrent queries."""

import copy
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from steper_dspy.errors import SteperError
from steper_dspy.retrieval import BM25Retriever, format_passage, passage_title

CORPUS = [
    {"title": "Paris", "text": "Paris is the capital and largest city of France, on the Seine river."},
    {"title": "Berlin", "text": "Berlin is the capital of Germany. The Berlin Wall fell in 1989."},
    {"title": "Apollo 7", "text": "Apollo 7 was the first crewed flight of the Apollo program, launched in 1968."},
    {"title": "Apollo 11", "text": "Apollo 11 landed the first humans on the Moon in 1969."},
    {"title": "Seine", "text": "The Seine is a river in northern France that flows through Paris."},
    {"title": "Malcolm X", "text": "Malcolm X was an American minister and human rights activist."},
    {"title": "Lyon", "text": "Lyon is a city in France, known for its cuisine."},
    {"title": "Marseille", "text": "Marseille is a port city in southern France."},
]
PASSAGES = [format_passage(p["title"], p["text"]) for p in CORPUS]


@pytest.fixture(scope="module")
def retriever() -> BM25Retriever:
    return BM25Retriever(CORPUS, k=3)


@pytest.fixture(scope="module")
def saved_dir(retriever, tmp_path_factory):
    path = tmp_path_factory.mktemp("bm25") / "index"
    retriever.save(path)
    return path


def results(prediction) -> tuple:
    return prediction.passages, prediction.indices, prediction.scores


def test_format_passage_and_title_are_inverse():
    passage = format_passage("Apollo 11", "Apollo 11 landed | on the Moon.")
    assert passage == "Apollo 11 | Apollo 11 landed | on the Moon."
    assert passage_title(passage) == "Apollo 11"
    assert passage_title(format_passage("", "untitled")) == ""
    assert passage_title("no separator here") == ""


def test_format_passage_rejects_separator_in_title():
    with pytest.raises(SteperError, match="title 'A | B' contains the separator"):
        format_passage("A | B", "text")


def test_distinctive_query_ranks_right_passage_first(retriever):
    hits = retriever("Which river flows through northern France?")
    assert hits.indices[0] == 4
    assert hits.passages[0] == PASSAGES[4]
    assert passage_title(hits.passages[0]) == "Seine"


def test_title_is_indexed(retriever):
    # "Marseille" and "Lyon" appear in both title and text; "Seine" appears only in the Seine passage's title.
    assert retriever("Lyon").indices[0] == 6
    assert retriever("Seine").indices[:2] == [4, 0]


def test_one_character_tokens_are_searchable(retriever):
    # bm25s's default tokenizer would drop these, leaving queries with no words at all.
    assert retriever("X").indices == [5]
    assert retriever("7").indices == [2]


def test_string_and_dict_corpora_give_same_results(retriever):
    from_strings = BM25Retriever(PASSAGES, k=3)
    assert from_strings.corpus == retriever.corpus == PASSAGES
    assert len(from_strings) == len(CORPUS)
    for query in ["capital of Germany", "first crewed Apollo flight", "city in France"]:
        assert results(from_strings(query)) == results(retriever(query))


def test_k_is_respected(retriever):
    assert len(retriever("city in France").passages) == 3
    hits = retriever("city in France", k=2)
    assert len(hits.passages) == len(hits.indices) == len(hits.scores) == 2
    assert len(retriever("city in France", k=1).indices) == 1


def test_scores_are_positive_and_descending(retriever):
    hits = retriever("France city capital river Paris", k=8)
    assert len(hits.scores) >= 4
    assert all(s > 0 for s in hits.scores)
    assert hits.scores == sorted(hits.scores, reverse=True)
    assert [retriever.corpus[i] for i in hits.indices] == hits.passages


def test_only_passages_sharing_a_word_are_returned(retriever):
    assert retriever("Germany", k=5).indices == [1]
    assert results(retriever("zeppelin")) == ([], [], [])


def test_exclude_removes_passages_and_still_returns_k(retriever):
    query = "first city in France or Apollo"  # shares a word with 6 passages
    first = retriever(query, k=3)
    second = retriever(query, k=3, exclude=first.indices)
    assert len(second.indices) == 3
    assert not set(first.indices) & set(second.indices)
    assert first.indices + second.indices == retriever(query, k=8).indices


def test_exclude_accepts_any_collection(retriever):
    expected = retriever("Apollo", k=1, exclude=[3]).indices
    assert expected == [2]
    assert retriever("Apollo", k=1, exclude={3}).indices == expected
    assert retriever("Apollo", k=1, exclude=(3,)).indices == expected
    assert retriever("Apollo", exclude=[2, 3]).indices == []


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(retriever, saved_dir, mmap):
    loaded = BM25Retriever.load(saved_dir, mmap=mmap)
    assert loaded.corpus == retriever.corpus
    assert loaded.k == retriever.k and loaded.stemmer == retriever.stemmer
    for query in ["capital of Germany", "Apollo 7", "city in France", "Moon landing humans", "zeppelin"]:
        assert results(loaded(query)) == results(retriever(query))
        assert results(loaded(query, k=5, exclude=[0, 6])) == results(retriever(query, k=5, exclude=[0, 6]))


def test_save_into_the_folder_it_was_loaded_from(retriever, tmp_path):
    retriever.save(tmp_path)
    loaded = BM25Retriever.load(tmp_path, mmap=True)
    loaded.k = 5
    loaded.save(tmp_path)
    reloaded = BM25Retriever.load(tmp_path, mmap=True)
    assert reloaded.k == 5
    assert results(reloaded("city in France")) == results(retriever("city in France", k=5))


def test_save_writes_no_pickle(saved_dir):
    assert not list(saved_dir.glob("*.pkl")) and not list(saved_dir.glob("*.pickle"))
    settings = json.loads((saved_dir / "steper_bm25.json").read_text())
    assert settings["k"] == 3 and settings["num_passages"] == len(CORPUS)


def test_stemming_matches_word_forms(retriever):
    assert retriever("flowing rivers", k=1).indices == [4]
    unstemmed = BM25Retriever(CORPUS, stemmer=None)
    assert unstemmed("flowing rivers").indices == []
    assert unstemmed("flows river", k=1).indices == [4]


def test_deepcopy_shares_the_index(retriever):
    assert copy.deepcopy(retriever) is retriever


def test_concurrent_queries_match_sequential(retriever):
    queries = ["capital of Germany", "Apollo 7", "city in France", "Moon landing", "river Seine", "Malcolm X"] * 20
    sequential = [results(retriever(q, exclude=[i % 8])) for i, q in enumerate(queries)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda iq: results(retriever(iq[1], exclude=[iq[0] % 8])), enumerate(queries)))
    assert concurrent == sequential


@pytest.mark.parametrize(
    ("corpus", "message"),
    [
        ([], "corpus is empty"),
        ("Paris | Paris is in France.", "must be a list of passages"),
        (["?!", "...", "the of and"], "None of the 3 corpus passages contains a searchable word"),
        ([{"title": "Paris", "text": "ok"}, {"text": "no title"}], "Corpus item 1 has no 'title' key"),
        ([{"title": "Paris"}], "Corpus item 0 has no 'text' key"),
        (["Paris | ok", {"title": "Berlin", "text": ["a", "b"]}], "Corpus item 1 has a non-string"),
        (["Paris | ok", 42], "Corpus item 1 is a int"),
        ([{"title": "A | B", "text": "x"}], "Corpus item 0: The passage title"),
    ],
)
def test_bad_corpus_raises(corpus, message):
    with pytest.raises(SteperError, match=message):
        BM25Retriever(corpus)


@pytest.mark.parametrize("query", ["", "?!", "the of and", "   "])
def test_query_without_tokens_raises(retriever, query):
    with pytest.raises(SteperError, match=re.escape(f"query {query!r} has no searchable words")):
        retriever(query)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_raises(retriever, k):
    with pytest.raises(SteperError, match="k must be a positive integer"):
        retriever("Paris", k=k)
    with pytest.raises(SteperError, match="k must be a positive integer"):
        BM25Retriever(CORPUS, k=k)


@pytest.mark.parametrize("exclude", [[-1], [len(CORPUS)], ["Paris"]])
def test_bad_exclude_raises(retriever, exclude):
    with pytest.raises(SteperError, match="`exclude`"):
        retriever("Paris", exclude=exclude)


def test_unknown_stemmer_raises():
    with pytest.raises(SteperError, match="Unknown stemmer 'klingon'"):
        BM25Retriever(CORPUS, stemmer="klingon")


def test_load_from_folder_that_is_not_an_index_raises(tmp_path):
    with pytest.raises(SteperError, match="is not a saved BM25 index"):
        BM25Retriever.load(tmp_path)
    with pytest.raises(SteperError, match="is not a saved BM25 index"):
        BM25Retriever.load(tmp_path / "missing")


def test_load_from_damaged_index_raises(retriever, tmp_path):
    retriever.save(tmp_path)
    (tmp_path / "data.csc.index.npy").unlink()
    with pytest.raises(SteperError, match="incomplete or damaged"):
        BM25Retriever.load(tmp_path)
