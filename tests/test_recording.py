import json

import dspy
import pytest
from dspy.utils import DummyLM

from steper_dspy.errors import SteperError
from steper_dspy.lm.local import local_lm
from steper_dspy.lm.recording import RecordedLM, recorded_lm

QUESTIONS = ["Where was Ada born?", "Who wrote Hamlet?"]


def _live(*answers: str) -> DummyLM:
    lm = DummyLM([{"answer": a} for a in answers])
    lm.kwargs["api_key"] = "sk-do-not-store-me"
    return lm


def _ask(lm, questions):
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        return [predict(question=q).answer for q in questions]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def recording(tmp_path):
    path = tmp_path / "teacher.jsonl"
    assert _ask(recorded_lm(path, _live("London", "Shakespeare")), QUESTIONS) == ["London", "Shakespeare"]
    return path


def test_replay_without_the_live_lm(recording):
    replay = recorded_lm(recording)
    assert isinstance(replay, RecordedLM) and replay.model.startswith("steper-replay/teacher@")
    assert replay.kwargs["max_tokens"] == 1000  # the recorded run's settings, from the file
    assert _ask(replay, QUESTIONS) == ["London", "Shakespeare"]
    assert replay.history[-1]["outputs"][0].endswith("Shakespeare")
    with dspy.track_usage() as usage:  # a replayed answer costs nothing, like a cache hit
        _ask(replay, QUESTIONS)
    assert not any(u.get("completion_tokens") for u in usage.get_total_tokens().values())


def test_unrecorded_request_says_how_to_record(recording):
    with pytest.raises(SteperError, match=r"not recorded.*Who painted the Mona Lisa\?.*mode='record'"):
        _ask(recorded_lm(recording), ["Who painted the Mona Lisa?"])


def test_file_layout_and_no_secrets(recording):
    text = recording.read_text()
    assert "sk-do-not-store-me" not in text and "api_key" not in text
    header, *records = _lines(recording)
    assert header["header"]["model"] == "dummy"
    assert [r["response"]["message"]["parts"][0]["text"].split("\n")[-1] for r in records] == ["London", "Shakespeare"]
    assert records[0]["messages"][-1]["content"].count(QUESTIONS[0]) == 1
    assert records[0]["settings"]["max_tokens"] == 1000 and "output_tokens" in records[0]["response"]["usage"]


def test_resume_appends_only_new_requests(recording):
    live = _live("Leonardo")  # one scripted answer: asking it twice would answer "No more responses"
    answers = _ask(recorded_lm(recording, live), [*QUESTIONS, "Who painted the Mona Lisa?"])
    assert answers == ["London", "Shakespeare", "Leonardo"]
    keys = [r["key"] for r in _lines(recording) if "key" in r]
    assert len(keys) == 3 == len(set(keys))
    assert _ask(recorded_lm(recording), ["Who painted the Mona Lisa?"]) == ["Leonardo"]


def test_torn_last_line_is_ignored_and_repaired(recording):
    with recording.open("a") as f:
        f.write('{"key": "abc", "response": {"mess')  # a crash mid-write
    assert _ask(recorded_lm(recording), QUESTIONS) == ["London", "Shakespeare"]
    assert _ask(recorded_lm(recording, _live("Leonardo")), ["Who painted the Mona Lisa?"]) == ["Leonardo"]
    assert len(_lines(recording)) == 4  # every line parses again: header + 3 answers


def test_a_gzipped_recording_is_replayed_extended_and_repaired(recording, tmp_path):
    import gzip

    packed = tmp_path / "teacher.jsonl.gz"
    packed.write_bytes(gzip.compress(recording.read_bytes()))
    assert _ask(recorded_lm(packed), QUESTIONS) == ["London", "Shakespeare"]
    assert _ask(recorded_lm(packed, _live("Leonardo")), ["Who painted the Mona Lisa?"]) == ["Leonardo"]
    whole = packed.stat().st_size
    with packed.open("ab") as f:
        f.write(gzip.compress(b'{"key": "abc", "response": {}}\n')[:-9])  # an append cut short by a crash
    assert _ask(recorded_lm(packed, _live("Hokusai")), ["Who painted The Great Wave?"]) == ["Hokusai"]
    assert packed.stat().st_size > whole
    text = gzip.decompress(packed.read_bytes()).decode()  # one valid gzip file: the torn member is gone
    assert [json.loads(line).get("key") is not None for line in text.splitlines()] == [False] + [True] * 4
    assert _ask(recorded_lm(packed), [*QUESTIONS, "Who painted the Mona Lisa?", "Who painted The Great Wave?"]) == [
        "London",
        "Shakespeare",
        "Leonardo",
        "Hokusai",
    ]


def test_gzip_members_are_read_across_pieces_and_a_torn_one_is_located():
    import gzip
    import random

    from steper_dspy.lm.recording import _gzip_members

    rng = random.Random(0)
    texts = [b"small\n", rng.randbytes(200_000).hex().encode() + b"\n", b"after the big one\n"]
    members = [gzip.compress(t) for t in texts]
    assert len(members[1]) > 1 << 16  # the big member spans several pieces
    whole = b"".join(members)
    assert _gzip_members(whole) == (b"".join(texts), None)
    torn = gzip.compress(b"cut short\n")[:-5]
    assert _gzip_members(whole + torn) == (b"".join(texts), len(whole))
    assert _gzip_members(members[0] + members[1][:-100]) == (texts[0], len(members[0]))
    assert _gzip_members(b"") == (b"", None)


def test_settings_are_part_of_the_key(recording):
    with pytest.raises(SteperError, match="not recorded"):
        _ask(recorded_lm(recording, max_tokens=50), QUESTIONS[:1])


def test_candidates_and_rollouts_are_recorded_apart(tmp_path):
    path = tmp_path / "samples.jsonl"
    messages = [{"role": "user", "content": "Name a colour."}]
    samples = ["[[ ## answer ## ]]\nred", "[[ ## answer ## ]]\nblue"]
    live = DummyLM([{"answer": c} for c in ["red", "blue", "green"]])
    with pytest.warns(DeprecationWarning):  # n > 1 needs messages=; a typed Request asks for one answer
        assert recorded_lm(path, live, n=2, temperature=1.0)(messages=messages) == samples
        replay = recorded_lm(path)
        assert replay.kwargs["n"] == 2 and replay.kwargs["temperature"] == 1.0
        assert replay(messages=messages) == samples
        with pytest.raises(SteperError, match="not recorded"):
            replay(messages=messages, rollout_id=5)


def test_model_string_follows_the_file_content(recording, tmp_path):
    copy = tmp_path / "copy" / recording.name
    copy.parent.mkdir()
    copy.write_bytes(recording.read_bytes())
    assert recorded_lm(copy).model == recorded_lm(recording).model
    copy.write_bytes(recording.read_bytes() + recording.read_bytes().splitlines(keepends=True)[1])
    assert recorded_lm(copy).model != recorded_lm(recording).model


def test_mode_errors(tmp_path):
    with pytest.raises(SteperError, match="No recording"):
        recorded_lm(tmp_path / "missing.jsonl")
    with pytest.raises(SteperError, match="needs a live LM"):
        recorded_lm(tmp_path / "x.jsonl", mode="record")
    with pytest.raises(SteperError, match="Unknown recording mode"):
        recorded_lm(tmp_path / "x.jsonl", _live(), mode="rewind")


def test_replay_mode_never_calls_the_live_lm(recording):
    live = _live("should not be used")
    with pytest.raises(SteperError, match="not recorded"):
        _ask(recorded_lm(recording, live, mode="replay"), ["Who painted the Mona Lisa?"])


def test_saved_program_replays_after_loading(recording, tmp_path):
    program = dspy.Predict("question -> answer")
    program.set_lm(recorded_lm(recording))
    program.save(tmp_path / "program.json")
    loaded = dspy.Predict("question -> answer")
    loaded.load(tmp_path / "program.json", allow_unsafe_lm_state=True)
    assert isinstance(loaded.lm, RecordedLM)
    assert [loaded(question=q).answer for q in QUESTIONS] == ["London", "Shakespeare"]


def test_records_a_local_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPER_CACHE", str(tmp_path / "steper-cache"))
    path = tmp_path / "local.jsonl"
    live = local_lm(tiny_model_dir, max_tokens=6, cache=False)
    request = [{"role": "user", "content": "Who was born in Paris?"}]
    with pytest.warns(DeprecationWarning):
        recorded = recorded_lm(path, live)(messages=request)
        assert recorded_lm(path)(messages=request) == recorded == live(messages=request)


def test_a_copied_program_records_through_the_same_engine(tmp_path, caplog, tiny_model_dir):
    import copy

    lm = recorded_lm(tmp_path / "teacher.jsonl", _live("London"))
    predict = dspy.Predict("question -> answer")
    predict.lm = lm
    with caplog.at_level("WARNING"):
        copied = predict.deepcopy()
    assert copied.lm is not lm and copied.lm.engine is lm.engine  # one engine appends to the file
    assert "Failed to deep copy" not in caplog.text
    local = local_lm(tiny_model_dir)
    assert copy.deepcopy(local).engine is local.engine  # copies share the loaded model
