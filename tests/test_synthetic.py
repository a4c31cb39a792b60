"""The synthetic multi-hop dataset: determinism, sound gold chains, a mix of questions, and a real need for BM25."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from dspy.evaluate.metrics import normalize_text

from steper_dspy.errors import SteperError
from steper_dspy.evals.datasets import MultiHopDataset, synthetic_multihop


@pytest.fixture(scope="module")
def dataset() -> MultiHopDataset:
    return synthetic_multihop(seed=0)


def fingerprint(dataset: MultiHopDataset) -> str:
    payload = {"examples": [e.toDict() for e in dataset.examples], "corpus": dataset.corpus}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def contains(text: str, answer: str) -> bool:
    return f" {normalize_text(answer)} " in f" {normalize_text(text)} "


def test_same_seed_same_dataset_other_seed_other_dataset(dataset):
    assert fingerprint(synthetic_multihop(seed=0)) == fingerprint(dataset)
    assert fingerprint(synthetic_multihop(seed=1)) != fingerprint(dataset)


def test_identical_across_processes_whatever_the_hash_seed(dataset):
    code = (
        "import hashlib, json; from steper_dspy.evals.datasets import synthetic_multihop as s; d = s(seed=0); "
        "print(hashlib.sha256(json.dumps({'examples': [e.toDict() for e in d.examples], 'corpus': d.corpus}, "
        "sort_keys=True).encode()).hexdigest())"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == fingerprint(dataset)


def test_size_fields_and_ids(dataset):
    assert len(dataset.examples) == 120
    assert 150 <= len(dataset.corpus) <= 600
    assert len({e.id for e in dataset.examples}) == 120
    for e in dataset.examples:
        assert set(e.inputs().keys()) == {"question"}
        assert e.supporting_titles == e.gold_chain
        assert e.hops == len(e.gold_chain)
        assert e.answer_aliases == []


def test_corpus_titles_are_unique_and_passages_short(dataset):
    titles = [p["title"] for p in dataset.corpus]
    assert len(titles) == len(set(titles))
    for passage in dataset.corpus:
        assert passage["text"].startswith(passage["title"])
        assert 2 <= passage["text"].count(". ") + 1 <= 4


def test_gold_chains_exist_and_hold_the_answer(dataset):
    text_of = {p["title"]: p["text"] for p in dataset.corpus}
    for e in dataset.examples:
        assert all(title in text_of for title in e.gold_chain), e.gold_chain
        assert len(set(e.gold_chain)) == len(e.gold_chain)
        if e.type == "comparison":
            assert any(contains(text_of[t], e.answer) for t in e.gold_chain), e.question
        else:
            assert contains(text_of[e.gold_chain[-1]], e.answer), e.question


def test_each_hop_is_linked_from_the_previous_passage(dataset):
    # A bridge or composition can only be followed if passage k names the entity of passage k+1.
    text_of = {p["title"]: p["text"] for p in dataset.corpus}
    for e in dataset.examples:
        if e.type != "comparison":
            for here, nxt in zip(e.gold_chain, e.gold_chain[1:], strict=False):
                assert nxt in text_of[here], (e.question, here, nxt)


def test_questions_never_contain_their_answer(dataset):
    for e in dataset.examples:
        assert not contains(e.question, e.answer), e.question
        assert e.answer.strip() and len(e.answer.split()) <= 4


def test_a_mix_of_types_and_hops(dataset):
    kinds = Counter((e.type, e.hops) for e in dataset.examples)
    assert set(kinds) == {
        ("bridge", 2),
        ("comparison", 2),
        ("comparison", 4),
        ("compositional", 3),
        ("compositional", 4),
    }
    assert min(kinds.values()) >= 10
    assert len({e.question.split(" the ")[0] for e in dataset.examples}) >= 5


def test_bm25_finds_the_first_hop_but_not_the_whole_chain(dataset):
    bm25s = pytest.importorskip("bm25s")
    titles = [p["title"] for p in dataset.corpus]
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([f"{p['title']} | {p['text']}" for p in dataset.corpus], show_progress=False),
        show_progress=False,
    )
    questions = bm25s.tokenize([e.question for e in dataset.examples], show_progress=False)
    hits, _ = retriever.retrieve(questions, k=4, show_progress=False)
    first = whole = 0
    for e, row in zip(dataset.examples, hits, strict=True):
        found = {titles[i] for i in row}
        first += e.gold_chain[0] in found
        whole += all(t in found for t in e.gold_chain)
    assert first >= 0.9 * len(dataset.examples)  # the question leads to the first hop
    assert whole <= 0.3 * len(dataset.examples)  # the rest needs retrieval with what was learnt


@pytest.mark.parametrize("num_questions", [1, 7, 450])
def test_num_questions(num_questions):
    data = synthetic_multihop(seed=2, num_questions=num_questions)
    assert len(data.examples) == num_questions
    assert len({e.question for e in data.examples}) == num_questions


@pytest.mark.parametrize("num_questions", [0, -3, 2.5, True])
def test_bad_num_questions(num_questions):
    with pytest.raises(SteperError, match="num_questions"):
        synthetic_multihop(num_questions=num_questions)
