"""Bad input and secrets: a harvest file of any bytes loads or fails with a SteperError naming the file and line,
never damaging complete lines; planted API keys reach no harvest, recording or saved program."""

import json
import re
import threading
from contextlib import contextmanager
from dataclasses import asdict, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import dspy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steper_dspy import SteperError
from steper_dspy.compilers import ChainRecord, HarvestReport, HarvestStore, harvest
from steper_dspy.lm import recorded_lm
from steper_dspy.programs import IRCoT
from tests.harvest_driver import PASSAGES, exact, questions, script
from tests.scripted import ListRetriever, ScriptedEngine

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = [f.name for f in fields(ChainRecord)]


def record(i: int) -> dict:
    sample = {
        "messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}],
        "stage": "init",
        "step": 0,
        "predictor": "initialize",
        "example_id": f"q{i}",
        "rollout": 0,
        "score": 1.0,
    }
    return asdict(ChainRecord(f"q{i}", 0, True, None, 1.0, answer="A", samples=[sample]))


def line(value: dict, ascii_only: bool = False) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8") + b"\n"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def damaged_records(draw) -> bytes:
    """A valid record with 1-3 fields replaced by any JSON value, removed, or added."""
    value = record(draw(st.integers(0, 5)))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "delete", "extra", "sample"]))
        if action == "set":
            value[draw(st.sampled_from(FIELDS))] = draw(json_values)
        elif action == "delete":
            value.pop(draw(st.sampled_from(FIELDS)), None)
        elif action == "extra":
            value[draw(st.text(max_size=8))] = draw(json_values)
        else:
            value["samples"] = [{**record(0)["samples"][0], "stage": draw(json_values)}]
    return json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


any_line = st.one_of(
    st.integers(0, 5).map(lambda i: line(record(i))[:-1]),
    damaged_records(),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.sampled_from(
        [b"", b"   ", b"\r", b"\xef\xbb\xbf{}", b"\xff\xfe", b"[" * 5000, b'{"rollout": 1' + b"0" * 5000 + b"}"]
    ),
)
tails = st.one_of(
    st.just(b""),
    st.integers(0, 5).flatmap(lambda i: st.integers(1, len(line(record(i))) - 1).map(lambda n: line(record(i))[:n])),
    st.binary(max_size=20),
)

outcomes = {"loaded": 0, "error": 0}  # tallied over every example, for RELIABILITY.md


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield
    print(f"\nbad input: {sum(outcomes.values())} files opened, {outcomes}")


def open_checked(path, data: bytes, good_lines: int = 0) -> str:
    """Open `data` as a harvest file and check the contract; returns "loaded" or "error"."""
    path.write_bytes(data)
    complete = data[: data.rfind(b"\n") + 1]
    try:
        store = HarvestStore(path)
    except SteperError as err:
        message = str(err)
        assert str(path) in message
        number = int(re.search(r" line (\d+) ", message).group(1))
        assert good_lines < number <= complete.count(b"\n")
        assert path.read_bytes() == data  # a corrupt file is left exactly as it was
        outcomes["error"] += 1
        return "error"
    after = path.read_bytes()
    assert after in (complete, data + b"\n")  # only a torn last line is cut (or a whole one gets its newline)
    # what loaded is usable downstream
    HarvestReport.from_store(store).summary()
    list(store.samples())
    # appending keeps every line already there and reads back
    fresh = ChainRecord("fresh\u2028id", 0, True, None, 1.0, answer="x\x85y", samples=record(9)["samples"])
    store.append(fresh)
    assert path.read_bytes().startswith(after)
    reopened = HarvestStore(path)
    assert json.dumps([asdict(r) for r in reopened.records()]) == json.dumps([asdict(r) for r in store.records()])
    outcomes["loaded"] += 1
    return "loaded"


@SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_load_or_name_the_file_and_line(tmp_path_factory, data):
    open_checked(tmp_path_factory.mktemp("bytes") / "h.jsonl", data)


@SETTINGS
@given(good=st.integers(0, 3), lines=st.lists(any_line, max_size=5), tail=tails)
def test_arbitrary_json_lines_after_good_ones_load_or_name_the_line(tmp_path_factory, good, lines, tail):
    data = b"".join(line(record(i)) for i in range(good)) + b"".join(raw + b"\n" for raw in lines) + tail
    open_checked(tmp_path_factory.mktemp("lines") / "h.jsonl", data, good_lines=good)


NASTY = [
    "\u2028",
    "\u2029",
    "\x85",
    "\r",
    "\n",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x00",
    "\ufeff",
    "\ud800",
    "\udfff",
    '"',
    "\\",
]
nasty_text = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(NASTY)), max_size=6).map("".join)


@SETTINGS
@given(eid=nasty_text, answer=nasty_text, content=nasty_text)
def test_any_text_a_teacher_writes_reads_back_unchanged(tmp_path_factory, eid, answer, content):
    path = tmp_path_factory.mktemp("text") / "h.jsonl"
    sample = {"messages": [{"role": "assistant", "content": content}], "stage": "aggregate"}
    chain = ChainRecord(eid, 0, True, None, 1.0, answer=answer, samples=[sample])
    HarvestStore(path).append(chain)
    assert path.read_bytes().count(b"\n") == 1
    assert list(HarvestStore(path).records()) == [chain]
    outcomes["loaded"] += 1


GOOD = line(record(0))
REGRESSIONS = {  # inputs that crashed the store with a raw exception before it validated lines
    "invalid UTF-8": (GOOD + b"\xff\xfe\n", "error"),
    "list as example_id (unhashable)": (GOOD + line({**record(1), "example_id": ["q1"]}), "error"),
    "5000-digit number": (GOOD + b'{"x": ' + b"1" * 5000 + b"}\n", "error"),
    "100000 nested brackets": (GOOD + b"[" * 100_000 + b"\n", "error"),
    "samples is a string": (line({**record(0), "samples": "abc"}), "error"),
    "sample without a stage": (line({**record(0), "samples": [{"messages": []}]}), "error"),
    "filtered counts are strings": (line({**record(0), "filtered": {"x": "1"}}), "error"),
    "score 1e400 as an int": (line({**record(0), "score": 10**400}), "error"),
    "JSON array line": (b"[1, 2]\n", "error"),
    "whole record without its newline": (GOOD + line(record(1))[:-1], "loaded"),
    "U+2028 inside a record": (line({**record(0), "answer": "a\u2028b"}), "loaded"),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_known_bad_inputs(tmp_path, name):
    data, expected = REGRESSIONS[name]
    assert open_checked(tmp_path / "h.jsonl", data) == expected


def test_u2028_written_by_the_store_does_not_corrupt_the_file(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028 raw; the store once split lines on it and called the file corrupt
    store = HarvestStore(tmp_path / "h.jsonl")
    store.append(ChainRecord("q0", 0, True, None, 1.0, answer="Beta\u2028Gamma\x85"))
    store.append(ChainRecord("q1", 0, False, "metric", 0.0, answer="lone \ud800 surrogate"))
    assert [r.answer for r in HarvestStore(tmp_path / "h.jsonl").records()] == [
        "Beta\u2028Gamma\x85",
        "lone \ud800 surrogate",
    ]


# ---------------------------------------------------------------- secrets

ENV_KEY, ARG_KEY = "sk-test-PLANTED-123", "sk-test-PLANTED-456"


@contextmanager
def scripted_server(engine: ScriptedEngine):
    """An OpenAI-compatible chat endpoint on localhost answering from `engine`; yields (base url, auth headers)."""
    authorizations: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            authorizations.append(self.headers.get("Authorization", ""))
            content = body["messages"][-1]["content"]
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content)
            text = engine.complete(SimpleNamespace(messages=[SimpleNamespace(text=content)])).text
            reply = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", authorizations
    finally:
        server.shutdown()
        server.server_close()


def harvest_with(lm, path):
    student = IRCoT(ListRetriever(PASSAGES), k=1, max_steps=5)
    teacher = student.deepcopy()
    teacher.set_lm(lm)
    report = harvest(student, teacher, questions()[:4], HarvestStore(path), metric=exact, progress=False)
    assert report.kept == 4
    return teacher


def test_planted_api_keys_reach_no_harvest_recording_or_saved_program(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    with scripted_server(ScriptedEngine(*script(4))) as (url, authorizations):
        explicit = dspy.LM("openai/scripted-teacher", api_key=ARG_KEY, api_base=url, cache=False, num_retries=0)
        from_env = dspy.LM("openai/scripted-teacher", api_base=url, cache=False, num_retries=0)
        recorded = recorded_lm(tmp_path / "recording.jsonl", explicit)
        harvest_with(recorded, tmp_path / "harvest-recorded.jsonl").save(tmp_path / "teacher-recorded.json")
        harvest_with(from_env, tmp_path / "harvest-env.jsonl").save(tmp_path / "teacher-env.json")
    # the keys were really in use: the endpoint received both
    assert {f"Bearer {ARG_KEY}", f"Bearer {ENV_KEY}"} <= set(authorizations)
    # the recording replays the harvest with no endpoint at all
    harvest_with(recorded_lm(tmp_path / "recording.jsonl"), tmp_path / "harvest-replayed.jsonl")
    assert (tmp_path / "harvest-replayed.jsonl").read_bytes() == (tmp_path / "harvest-recorded.jsonl").read_bytes()

    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert {p.name for p in written} >= {
        "recording.jsonl",
        "harvest-recorded.jsonl",
        "harvest-env.jsonl",
        "harvest-replayed.jsonl",
        "teacher-recorded.json",
        "teacher-env.json",
    }
    for path in written:
        data = path.read_bytes()
        assert b"PLANTED" not in data and b"sk-test" not in data, f"a planted key leaked into {path.name}"


def test_reading_a_harvest_keeps_memory_flat_as_it_grows(tmp_path):
    """Peak memory of opening a harvest and streaming its samples, at 100 and 1000 chains of ~8 KB each."""
    import tracemalloc

    sample = {"messages": [{"role": "user", "content": "x" * 8000}], "stage": "init", "step": 0}

    def peak(n: int) -> int:
        path = tmp_path / f"h{n}.jsonl"
        store = HarvestStore(path)
        for i in range(n):
            store.append(ChainRecord(f"q{i}", 0, kept=True, reason=None, score=1.0, samples=[sample]))
        tracemalloc.start()
        reopened = HarvestStore(path)
        count = sum(1 for _ in reopened.samples())
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n
        return top, path.stat().st_size

    (small, small_size), (large, large_size) = peak(100), peak(1000)
    print(
        f"peak memory reading 100 chains ({small_size / 1e6:.1f} MB file): {small / 1e6:.2f} MB; "
        f"1000 chains ({large_size / 1e6:.1f} MB file): {large / 1e6:.2f} MB"
    )
    # Only the (example_id, rollout) keys stay in memory, never the samples: far below the file's size.
    assert large < large_size / 10 and small < small_size / 4
