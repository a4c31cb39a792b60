"""Loaders for HotpotQA, 2WikiMultiHopQA and MuSiQue: real sample files, layouts, sniffing, errors, splitting."""

import copy
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steper_dspy.errors import SteperError
from steper_dspy.evals.datasets import (
    MultiHopDataset,
    load_2wiki,
    load_hotpotqa,
    load_multihop,
    load_musique,
    synthetic_multihop,
    train_test_split,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multihop"
TWO_WIKI_TYPES = {"compositional", "comparison", "bridge_comparison", "inference"}
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"sample data folder {DATA} is missing")

HOTPOT_ROW = {
    "_id": "h1",
    "question": "Which band had the drummer Neil Peart?",
    "answer": "Rush",
    "type": "bridge",
    "level": "hard",
    "supporting_facts": [["Neil Peart", 0], ["Rush (band)", 1], ["Neil Peart", 2]],
    "context": [
        ["Neil Peart", ["Neil Peart was a drummer.", " He played in Rush."]],
        ["Rush (band)", ["Rush was a Canadian rock band."]],
    ],
}
TWO_WIKI_ROW = {
    "_id": "w1",
    "question": "Which film has the director born later, A or B?",
    "answer": "B",
    "type": "bridge_comparison",
    "supporting_facts": [["A", 0], ["B", 0], ["Dir A", 0], ["Dir B", 0]],
    "evidences": [["A", "director", "Dir A"], ["B", "director", "Dir B"]],
    "context": [["A", ["A is a film by Dir A."]], ["B", ["B is a film by Dir B."]], ["Dir A", ["Born 1950."]]],
}
MUSIQUE_ROWS = [
    {
        "id": "2hop__1_2",
        "question": "Who founded the label of the singer of Song X?",
        "answer": "Jane Roe",
        "answer_aliases": ["J. Roe", ""],
        "answerable": True,
        "paragraphs": [
            {"idx": 0, "title": "Label Y", "paragraph_text": "Label Y was founded by Jane Roe.", "is_supporting": True},
            {"idx": 1, "title": "Noise", "paragraph_text": "Unrelated text.", "is_supporting": False},
            {"idx": 2, "title": "Song X", "paragraph_text": "Song X is sung by Ann on Label Y.", "is_supporting": True},
        ],
        "question_decomposition": [
            {"id": 1, "question": "Song X >> label", "answer": "Label Y", "paragraph_support_idx": 2},
            {"id": 2, "question": "#1 >> founded by", "answer": "Jane Roe", "paragraph_support_idx": 0},
        ],
    },
    {
        "id": "3hop1__5_6_7",
        "question": "In which country is the city where Ann was born?",
        "answer": "Freedonia",
        "answer_aliases": [],
        "answerable": True,
        "paragraphs": [
            {"idx": 0, "title": "Noise", "paragraph_text": "Unrelated text.", "is_supporting": False},
            {"idx": 1, "title": "Ann", "paragraph_text": "Ann was born in Town Z.", "is_supporting": True},
        ],
    },
    {
        "id": "4hop3__8_9_10_11",
        "question": "An unanswerable question?",
        "answer": "Nobody",
        "answer_aliases": [],
        "answerable": False,
        "paragraphs": [{"idx": 0, "title": "Other", "paragraph_text": "Other text.", "is_supporting": False}],
    },
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def to_hub_layout(row: dict) -> dict:
    """HotpotQA as on the hub / in its parquet files: columnar context and supporting facts, `id` not `_id`."""
    hub = {k: v for k, v in row.items() if k not in ("_id", "context", "supporting_facts")}
    hub["id"] = row["_id"]
    hub["context"] = {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]}
    hub["supporting_facts"] = {
        "title": [t for t, _ in row["supporting_facts"]],
        "sent_id": [i for _, i in row["supporting_facts"]],
    }
    return hub


def assert_well_formed(dataset: MultiHopDataset) -> None:
    pairs = [(p["title"], p["text"]) for p in dataset.corpus]
    assert len(pairs) == len(set(pairs)), "corpus must be deduplicated by (title, text)"
    assert all(set(p) == {"title", "text"} for p in dataset.corpus)
    ids = [e.id for e in dataset.examples]
    for example in dataset.examples:
        assert set(example.inputs().keys()) == {"question"}
        assert isinstance(example.id, str) and example.id
        assert isinstance(example.question, str) and example.question.strip()
        assert isinstance(example.answer, str) and example.answer.strip()
        assert isinstance(example.answer_aliases, list)
        assert isinstance(example.supporting_titles, list) and example.supporting_titles
        assert isinstance(example.type, str)
        assert example.hops is None or isinstance(example.hops, int)
    assert len(ids) == len(set(ids))


# --- the real sample files ----------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    ("file", "rows", "types", "hops"),
    [
        ("hotpotqa_dev200.jsonl", 200, {"bridge", "comparison"}, {2}),
        ("2wikimultihopqa_dev164.jsonl", 164, TWO_WIKI_TYPES, {2, 4}),
        ("2wikimultihopqa_train500.jsonl", 500, TWO_WIKI_TYPES, {2, 4}),
    ],
)
def test_real_files_load_with_counts_fields_and_a_deduplicated_corpus(file, rows, types, hops):
    dataset = load_multihop(DATA / file)
    assert dataset.name == Path(file).stem
    assert len(dataset.examples) == rows
    assert {e.type for e in dataset.examples} == types
    assert {e.hops for e in dataset.examples} == hops
    assert_well_formed(dataset)
    titles = {p["title"] for p in dataset.corpus}
    assert all(t in titles for e in dataset.examples for t in e.supporting_titles)
    raw_paragraphs = sum(len(json.loads(line)["context"]) for line in (DATA / file).open())
    assert len(dataset.corpus) < raw_paragraphs  # the same paragraph recurs across questions
    assert all(p["text"] == p["text"].strip() and p["title"] == p["title"].strip() for p in dataset.corpus)


@needs_data
def test_real_hotpotqa_first_row_and_explicit_loader():
    dataset = load_hotpotqa(DATA / "hotpotqa_dev200.jsonl", limit=3)
    first = dataset.examples[0]
    assert (first.id, first.answer, first.type, first.hops) == ("5a7f6fd75542992e7d278cfa", "Rush", "bridge", 2)
    assert first.supporting_titles == ["Nobody's Hero", "Neil Peart"]
    assert len(dataset.examples) == 3
    assert len(dataset.corpus) <= 30
    # Upstream sentences carry a leading space; the join leaves exactly one between sentences.
    assert "record producer. In a career" in dataset.corpus[0]["text"]


@needs_data
def test_real_2wiki_hops_follow_the_question_type():
    dataset = load_2wiki(DATA / "2wikimultihopqa_dev164.jsonl")
    for example in dataset.examples:
        assert example.hops == (4 if example.type == "bridge_comparison" else 2)


# --- layouts -----------------------------------------------------------------------------------------------------


def test_hotpotqa_row_parses_paragraphs_titles_and_hops(tmp_path):
    dataset = load_multihop(write_jsonl(tmp_path / "h.jsonl", [HOTPOT_ROW]))
    (example,) = dataset.examples
    assert example.toDict() == {
        "id": "h1",
        "question": HOTPOT_ROW["question"],
        "answer": "Rush",
        "answer_aliases": [],
        "supporting_titles": ["Neil Peart", "Rush (band)"],
        "type": "bridge",
        "hops": 2,
    }
    assert dataset.corpus == [
        {"title": "Neil Peart", "text": "Neil Peart was a drummer. He played in Rush."},
        {"title": "Rush (band)", "text": "Rush was a Canadian rock band."},
    ]


def test_hub_layout_gives_the_same_dataset_as_the_upstream_layout(tmp_path):
    upstream = load_hotpotqa(write_jsonl(tmp_path / "a.jsonl", [HOTPOT_ROW]))
    hub = load_hotpotqa(write_jsonl(tmp_path / "b.jsonl", [to_hub_layout(HOTPOT_ROW)]))
    assert [e.toDict() for e in hub.examples] == [e.toDict() for e in upstream.examples]
    assert hub.corpus == upstream.corpus


def test_parquet_file_in_hub_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    second = {**HOTPOT_ROW, "_id": "h2"}
    path = tmp_path / "hotpot.parquet"
    pq.write_table(pa.Table.from_pylist([to_hub_layout(HOTPOT_ROW), to_hub_layout(second)]), path)
    dataset = load_multihop(path)
    assert [e.id for e in dataset.examples] == ["h1", "h2"]
    assert len(dataset.corpus) == 2


def test_json_list_file(tmp_path):
    path = tmp_path / "two_wiki.json"
    path.write_text(json.dumps([TWO_WIKI_ROW, {**TWO_WIKI_ROW, "_id": "w2", "type": "compositional"}]))
    dataset = load_multihop(path)
    assert [(e.id, e.type, e.hops) for e in dataset.examples] == [
        ("w1", "bridge_comparison", 4),
        ("w2", "compositional", 2),
    ]
    assert dataset.examples[0].supporting_titles == ["A", "B", "Dir A", "Dir B"]


def test_musique_fixture(tmp_path):
    dataset = load_musique(write_jsonl(tmp_path / "musique.jsonl", MUSIQUE_ROWS))
    first, second = dataset.examples  # the unanswerable row is skipped
    assert (first.id, first.hops, first.type) == ("2hop__1_2", 2, "compositional")
    assert first.supporting_titles == ["Song X", "Label Y"]  # hop order from the decomposition
    assert first.answer_aliases == ["J. Roe"]
    assert (second.hops, second.supporting_titles) == (3, ["Ann"])
    assert [p["title"] for p in dataset.corpus] == ["Label Y", "Noise", "Song X", "Ann"]
    assert_well_formed(dataset)


def test_format_is_sniffed_from_the_fields(tmp_path):
    assert load_multihop(write_jsonl(tmp_path / "m.jsonl", MUSIQUE_ROWS)).examples[0].id == "2hop__1_2"
    assert load_multihop(write_jsonl(tmp_path / "w.jsonl", [TWO_WIKI_ROW])).examples[0].hops == 4
    no_evidences = {k: v for k, v in TWO_WIKI_ROW.items() if k != "evidences"}
    assert load_multihop(write_jsonl(tmp_path / "w2.jsonl", [no_evidences])).examples[0].hops == 4
    with pytest.raises(SteperError, match="format="):
        load_multihop(write_jsonl(tmp_path / "x.jsonl", [{"q": "?", "a": "!"}]))


def test_limit_stops_before_reading_the_rest(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(HOTPOT_ROW) + "\n" + json.dumps({**HOTPOT_ROW, "_id": "h2"}) + "\n{not json\n")
    assert [e.id for e in load_hotpotqa(path, limit=2).examples] == ["h1", "h2"]
    assert load_hotpotqa(path, limit=0).examples == []
    with pytest.raises(SteperError, match="line 3"):
        load_hotpotqa(path)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text("\n" + json.dumps(HOTPOT_ROW) + "\n\n" + json.dumps({**HOTPOT_ROW, "question": " "}) + "\n")
    with pytest.raises(SteperError, match=r"line 4: field 'question' is empty"):
        load_hotpotqa(path)


def test_synthetic_source():
    dataset = load_multihop("synthetic", limit=5, seed=3)
    reference = synthetic_multihop(seed=3)
    assert [e.toDict() for e in dataset.examples] == [e.toDict() for e in reference.examples[:5]]
    assert dataset.corpus == reference.corpus


# --- user errors -------------------------------------------------------------------------------------------------


def test_missing_file_unknown_format_bad_limit_and_empty_file(tmp_path):
    with pytest.raises(SteperError, match="No such file"):
        load_multihop(tmp_path / "absent.jsonl")
    with pytest.raises(SteperError, match="is a folder"):
        load_multihop(tmp_path)
    with pytest.raises(SteperError, match="Unknown dataset format 'squad'"):
        load_multihop("synthetic", format="squad")
    with pytest.raises(SteperError, match="limit"):
        load_multihop("synthetic", limit=-1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SteperError, match="no answerable questions"):
        load_hotpotqa(empty)
    broken_list = tmp_path / "broken.json"
    broken_list.write_text('[{"_id": 1},\n')
    with pytest.raises(SteperError, match="broken.json, line 2: not valid JSON"):
        load_multihop(broken_list)
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2]")
    with pytest.raises(SteperError, match="item 1: expected a JSON object"):
        load_multihop(numbers)


def test_unknown_hub_id_offline_raises_naming_the_id(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SteperError, match="no-such-owner/no-such-multihop-set"):
        load_multihop("no-such-owner/no-such-multihop-set", format="hotpotqa")


def test_bad_row_in_json_list_names_the_item(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([HOTPOT_ROW, {**HOTPOT_ROW, "answer": 7}]))
    with pytest.raises(SteperError, match=r"item 2: field 'answer' must be a string, got int"):
        load_hotpotqa(path)


# --- property: any malformed row raises SteperError naming file, line and field ---------------------------------

VALID_ROWS = {
    "hotpotqa": [HOTPOT_ROW],
    "hotpotqa-hub": [to_hub_layout(HOTPOT_ROW)],
    "2wiki": [TWO_WIKI_ROW],
    "musique": MUSIQUE_ROWS[:2],
}
LOADERS = {"hotpotqa": load_hotpotqa, "hotpotqa-hub": load_hotpotqa, "2wiki": load_2wiki, "musique": load_musique}
REQUIRED = {
    "hotpotqa": {
        "_id": "str",
        "question": "str",
        "answer": "str",
        "type": "str",
        "supporting_facts": "list",
        "context": "list",
    },
    "hotpotqa-hub": {
        "id": "str",
        "question": "str",
        "answer": "str",
        "type": "str",
        "supporting_facts": "list",
        "context": "list",
    },
    "2wiki": {
        "_id": "str",
        "question": "str",
        "answer": "str",
        "type": "str",
        "supporting_facts": "list",
        "context": "list",
    },
    "musique": {"id": "str", "question": "str", "answer": "str", "paragraphs": "list"},
}
# Nested breakages: (format, path into the row, replacement, the field the message must name).
NESTED = [
    ("hotpotqa", ("context", 0), ["only a title"], "context[0]"),
    ("hotpotqa", ("context", 1, 0), 5, "context[1][0]"),
    ("hotpotqa", ("context", 0, 1), "not a list", "context[0][1]"),
    ("hotpotqa", ("context", 0, 1, 0), None, "context[0][1][0]"),
    ("hotpotqa", ("supporting_facts", 0, 1), "zero", "supporting_facts[0][1]"),
    ("hotpotqa", ("supporting_facts", 1), ["Rush (band)"], "supporting_facts[1]"),
    ("hotpotqa-hub", ("context", "title"), "not a list", "context.title"),
    ("hotpotqa-hub", ("context", "title", 1), 3, "context.title[1]"),
    ("hotpotqa-hub", ("context", "sentences"), [["one list for two titles"]], "context"),
    ("hotpotqa-hub", ("context", "sentences", 0), "not a list", "context.sentences[0]"),
    ("hotpotqa-hub", ("supporting_facts", "title"), {"a": 1}, "supporting_facts.title"),
    ("2wiki", ("evidences",), "not a list", "evidences"),
    ("musique", ("paragraphs", 1), "not an object", "paragraphs[1]"),
    ("musique", ("paragraphs", 0, "paragraph_text"), ["x"], "paragraphs[0].paragraph_text"),
    ("musique", ("paragraphs", 0, "is_supporting"), "yes", "paragraphs[0].is_supporting"),
    ("musique", ("question_decomposition", 0, "paragraph_support_idx"), "2", "question_decomposition[0]"),
    ("musique", ("answer_aliases",), "J. Roe", "answer_aliases"),
    ("musique", ("answerable",), "true", "answerable"),
]

not_str = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), min_size=1),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
not_list = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))
printable = st.characters(blacklist_categories=("Cs",))  # lone surrogates cannot be written as UTF-8
blank = st.sampled_from(["", " ", "\t", "\n ", "   "])


@st.composite
def malformed_file(draw):
    """`(format, rows, bad_row_index, field)`: valid rows with one broken at a random position."""
    fmt = draw(st.sampled_from(sorted(VALID_ROWS)))
    rows = [copy.deepcopy(draw(st.sampled_from(VALID_ROWS[fmt]))) for _ in range(draw(st.integers(1, 4)))]
    bad = draw(st.integers(0, len(rows) - 1))
    row = rows[bad]
    kind = draw(st.sampled_from(["missing", "wrong_type", "empty_question", "nested"]))
    if kind == "missing":
        field = draw(st.sampled_from(sorted(REQUIRED[fmt])))
        del row[field]
    elif kind == "wrong_type":
        field = draw(st.sampled_from(sorted(REQUIRED[fmt])))
        row[field] = draw(not_str if REQUIRED[fmt][field] == "str" else not_list)
    elif kind == "empty_question":
        field = "question"
        row[field] = draw(blank)
    else:
        candidates = [n for n in NESTED if n[0] == fmt and _reachable(row, n[1])]
        _, path, value, field = draw(st.sampled_from(candidates))
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return fmt, rows, bad, field


def _reachable(row, path) -> bool:
    target = row
    for key in path[:-1]:
        try:
            target = target[key]
        except (KeyError, IndexError, TypeError):
            return False
    return isinstance(target, dict | list)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=malformed_file(), blank_lines=st.lists(st.integers(0, 2), min_size=5, max_size=5), sniff=st.booleans())
def test_malformed_rows_always_raise_steper_error_naming_file_line_and_field(case, blank_lines, sniff):
    fmt, rows, bad, field = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        lines, bad_line = [], None
        for i, row in enumerate(rows):
            lines += [""] * blank_lines[i]
            lines.append(json.dumps(row))
            if i == bad:
                bad_line = len(lines)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        # Sniffing needs a readable first row; explicit loaders must name the field whatever row breaks.
        load = load_multihop if sniff and bad > 0 else LOADERS[fmt]
        with pytest.raises(SteperError) as error:
            load(path)
    message = str(error.value)
    assert str(path) in message
    assert f"line {bad_line}:" in message
    assert f"'{field}" in message


@settings(max_examples=80, deadline=None)
@given(junk=st.lists(st.text(printable, max_size=20), min_size=1, max_size=4), fmt=st.sampled_from(sorted(LOADERS)))
def test_arbitrary_text_never_raises_anything_but_steper_error(junk, fmt):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "junk.jsonl"
        path.write_text("\n".join(junk) + "\n", encoding="utf-8")
        with pytest.raises(SteperError) as error:
            LOADERS[fmt](path)
    assert str(path) in str(error.value)


# --- train/test split --------------------------------------------------------------------------------------------


def test_train_test_split_is_deterministic_disjoint_and_complete():
    dataset = synthetic_multihop(seed=1, num_questions=40)
    train, test = train_test_split(dataset, test_size=10, seed=7)
    again_train, again_test = train_test_split(dataset, test_size=10, seed=7)
    assert [e.id for e in test] == [e.id for e in again_test] and [e.id for e in train] == [e.id for e in again_train]
    assert len(test) == 10 and len(train) == 30
    assert not {e.id for e in train} & {e.id for e in test}
    order = [e.id for e in dataset.examples]
    assert sorted(e.id for e in train + test) == sorted(order)
    assert [e.id for e in test] == [i for i in order if i in {e.id for e in test}]  # dataset order kept
    assert [e.id for e in train_test_split(dataset, test_size=10, seed=8)[1]] != [e.id for e in test]
    assert train_test_split(dataset, test_size=0)[1] == []


@pytest.mark.parametrize("test_size", [-1, 41, 2.5, True])
def test_train_test_split_rejects_bad_sizes(test_size):
    with pytest.raises(SteperError, match="test_size"):
        train_test_split(synthetic_multihop(num_questions=40), test_size=test_size)
