"""The managed vLLM server: start, health wait, concurrency, failures named with the log, death mid-harvest,
context overflow, no orphan. A stand-in server (tests/fake_vllm.py) takes vLLM's place, so no vLLM is needed."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dspy
import pytest

from steper_dspy.compilers import HarvestStore, harvest
from steper_dspy.errors import SteperError
from steper_dspy.lm import max_concurrency
from steper_dspy.lm import vllm as vllm_module
from steper_dspy.lm.local import local_lm, resolve_engine
from steper_dspy.lm.vllm import VLLMServer, running_servers, server_environment, stop_all
from steper_dspy.programs import IRCoT
from tests.harvest_driver import exact, questions
from tests.scripted import PASSAGES, ListRetriever

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch, tmp_path):
    """vLLM's server module replaced by the stand-in; vLLM counts as installed; servers stopped afterwards."""
    monkeypatch.setattr(vllm_module, "SERVER_MODULE", "tests.fake_vllm")
    monkeypatch.setattr(vllm_module, "vllm_available", lambda: True)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("STEPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vllm_module, "_SERVERS", [])
    yield
    stop_all()


def _server(model_dir, tmp_path, **kwargs):
    return VLLMServer(model_dir, log_path=tmp_path / "server.log", progress=False, startup_timeout=60, **kwargs)


def test_a_server_starts_answers_and_stops(tiny_model_dir, tmp_path):
    server = _server(tiny_model_dir, tmp_path).start()
    assert server.healthy() and server in running_servers()
    assert server.max_concurrency == 5  # the "Maximum concurrency" vLLM logs, not the max_num_seqs asked for
    assert server.name.startswith("tiny-llama@") and server.api_base.startswith("http://127.0.0.1:")
    assert "--enable-prefix-caching" in (tmp_path / "server.log").read_text()
    pid = server.process.pid
    server.stop()
    assert not server.alive() and server not in running_servers()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_local_lm_on_the_vllm_engine_calls_the_server(tiny_model_dir, tmp_path):
    lm = local_lm(tiny_model_dir, engine="vllm", server_log=tmp_path / "server.log", cache=False)
    assert lm.model.startswith("hosted_vllm/tiny-llama@")
    assert lm.kwargs["stop"] == ["[[ ## completed ## ]]"]  # stops at ChatAdapter's end marker, like in process
    assert max_concurrency(lm) == 5
    program = IRCoT(ListRetriever(PASSAGES), k=2, max_steps=3)
    program.set_lm(lm)
    question = questions(1)[0]
    assert program(question=question.question).answer == question.answer
    again = local_lm(tiny_model_dir, engine="vllm", cache=False)
    assert again.kwargs["api_base"] == lm.kwargs["api_base"]  # one server per model and process


def test_releasing_an_lm_stops_its_server_and_a_recording_releases_its_live_lm(tiny_model_dir, tmp_path):
    from steper_dspy.lm import recorded_lm, release_lm
    from steper_dspy.lm.errors import ServerDiedError

    lm = local_lm(tiny_model_dir, engine="vllm", server_log=tmp_path / "server.log", cache=False)
    recording = recorded_lm(tmp_path / "teacher.jsonl", lm)
    (server,) = running_servers()
    release_lm(recording)
    assert not server.alive() and running_servers() == []
    with pytest.raises(ServerDiedError):
        lm("a call after the release")
    fresh = local_lm(tiny_model_dir, engine="vllm", server_log=tmp_path / "server.log", cache=False)
    assert len(running_servers()) == 1  # a new LM starts a new server
    release_lm(fresh)
    assert running_servers() == []
    release_lm(dspy.LM("openai/gpt-4o-mini", api_key="unused"))  # an API model: nothing to release, no error


def test_calls_to_a_managed_server_wait_for_a_slow_reply_longer_than_dspy_s_default(
    tiny_model_dir, tmp_path, monkeypatch
):
    from steper_dspy.lm import local

    assert local.SERVER_TIMEOUT_S > 600  # DSPy's read timeout, which a harvest's first burst on one core exceeds
    monkeypatch.setenv("FAKE_VLLM_REPLY_S", "2")
    monkeypatch.setattr(local, "SERVER_TIMEOUT_S", 1.0)
    impatient = local_lm(tiny_model_dir, engine="vllm", cache=False, num_retries=0)
    with pytest.raises(Exception, match="timed out"):
        impatient("hello")
    monkeypatch.setattr(local, "SERVER_TIMEOUT_S", 10.0)
    patient = local_lm(tiny_model_dir, engine="vllm", cache=False, num_retries=0)
    assert "unknown" in patient("hello")[0]


def test_auto_picks_vllm_when_installed_unless_told_otherwise(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("STEPER_ENGINE", raising=False)
    assert resolve_engine("auto", tiny_model_dir) == "vllm"
    assert resolve_engine("auto", tiny_model_dir, adapter=tiny_model_dir) == "transformers"
    monkeypatch.setenv("STEPER_ENGINE", "transformers")
    assert resolve_engine("auto", tiny_model_dir) == "transformers"
    monkeypatch.setattr(vllm_module, "vllm_available", lambda: False)
    with pytest.raises(SteperError, match=r"pip install -e \.\[vllm\]"):
        resolve_engine("vllm", tiny_model_dir)
    with pytest.raises(SteperError, match="Unknown engine 'fast'"):
        resolve_engine("fast", tiny_model_dir)


@pytest.mark.parametrize(
    ("log_text", "cause"),
    [
        ("RuntimeError: Cannot allocate memory for the KV cache", "not enough memory"),
        ("ValueError: Available memory on node 0 (3.1 GiB) is less than requested memory for kv", "not enough memory"),
        ("RuntimeError: operator torchvision::nms does not exist", "pip uninstall -y torchvision"),
    ],
)
def test_a_failed_start_names_the_cause_and_the_log(tiny_model_dir, tmp_path, monkeypatch, log_text, cause):
    monkeypatch.setenv("FAKE_VLLM_FAIL", log_text)
    with pytest.raises(SteperError, match=cause) as err:
        _server(tiny_model_dir, tmp_path).start()
    assert str(tmp_path / "server.log") in str(err.value) and "exited with code 1" in str(err.value)
    assert running_servers() == []


def test_a_failed_start_is_explained_by_its_own_run_of_the_log_not_an_earlier_one(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "OSError: [Errno 98] Address already in use")
    with pytest.raises(SteperError, match="already in use"):
        _server(tiny_model_dir, tmp_path).start()
    monkeypatch.setenv("FAKE_VLLM_FAIL", "RuntimeError: some failure the log does not explain")
    with pytest.raises(SteperError) as err:
        _server(tiny_model_dir, tmp_path).start()  # the same log file, appended to
    assert "exited with code 1." in str(err.value) and "already in use" not in str(err.value)


def test_stopping_a_server_that_died_stops_its_engine_processes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_ENGINE", "1")
    server = _server(tiny_model_dir, tmp_path).start()
    engine = int(re.search(r"engine pid (\d+)", (tmp_path / "server.log").read_text()).group(1))
    os.kill(server.process.pid, signal.SIGKILL)  # the API process dies; its engine process lives on
    server.process.wait()
    assert Path(f"/proc/{engine}").exists() and not server.alive()
    stop_all()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{engine}").exists() and "zombie" not in _state(engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{engine}").exists() or "zombie" in _state(engine), "the engine process is left running"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"


def test_a_taken_port_is_refused_before_starting(tiny_model_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SteperError, match=f"port {busy.getsockname()[1]} is already in use"):
            _server(tiny_model_dir, tmp_path, port=busy.getsockname()[1]).start()


def test_a_free_port_taken_before_vllm_binds_it_is_retried_on_another(tiny_model_dir, tmp_path, monkeypatch):
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        thief.listen()
        stolen = thief.getsockname()[1]
        ports = iter([stolen])
        free_port = vllm_module._free_port
        monkeypatch.setattr(vllm_module, "_free_port", lambda: next(ports, None) or free_port())
        monkeypatch.setattr(vllm_module, "_port_is_free", lambda port: True)  # it was free when it was checked
        server = _server(tiny_model_dir, tmp_path).start()
    assert server.healthy() and server.port != stolen
    assert "Address already in use" in (tmp_path / "server.log").read_text()  # the first attempt did fail on it


def test_another_server_answering_on_a_stolen_port_is_not_taken_for_ours(tiny_model_dir, tmp_path, monkeypatch):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class OtherServer(BaseHTTPRequestHandler):  # another run's server: healthy, serving another model
        def log_message(self, *_):
            pass

        def do_GET(self):
            body = b'{"object": "list", "data": [{"id": "another-model"}]}' if "models" in self.path else b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    thief = ThreadingHTTPServer(("127.0.0.1", 0), OtherServer)
    threading.Thread(target=thief.serve_forever, daemon=True).start()
    stolen = thief.server_address[1]
    try:
        ports = iter([stolen])
        free_port = vllm_module._free_port
        monkeypatch.setattr(vllm_module, "_free_port", lambda: next(ports, None) or free_port())
        monkeypatch.setattr(vllm_module, "_port_is_free", lambda port: True)  # it was free when it was checked
        server = _server(tiny_model_dir, tmp_path).start()
    finally:
        thief.shutdown()
        thief.server_close()
    assert server.port != stolen and server.healthy()


def test_a_server_is_shared_only_with_the_same_dtype_and_enough_context(tiny_model_dir, tmp_path):
    from steper_dspy.lm.vllm import shared_server

    first = shared_server(tiny_model_dir, dtype="float32", max_model_len=4096, progress=False)
    assert shared_server(tiny_model_dir, dtype="float32", max_model_len=2048) is first
    longer = shared_server(tiny_model_dir, dtype="float32", max_model_len=8192, progress=False)
    other_dtype = shared_server(tiny_model_dir, dtype="bfloat16", max_model_len=2048, progress=False)
    assert len({id(first), id(longer), id(other_dtype)}) == 3
    assert longer.max_model_len == 8192 and other_dtype.dtype == "bfloat16"


def test_a_folder_that_is_not_a_model_is_refused_before_starting(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    with pytest.raises(SteperError, match="holds no config.json"):
        _server(tmp_path / "notes", tmp_path)


def test_the_cli_exits_2_with_one_line_when_the_server_cannot_start(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from steper_dspy.cli import main

    monkeypatch.setenv("FAKE_VLLM_FAIL", "torch.OutOfMemoryError: out of memory")
    monkeypatch.setattr(sys, "argv", ["steper", "eval", "--model", str(tiny_model_dir), "--engine", "vllm",
                                      "--test-size", "2", "-o", str(tmp_path / "out")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert "error: The vLLM server for" in printed and "not enough memory" in printed and "Traceback" not in printed


def _harvest(lm, store, n=8):
    program = IRCoT(ListRetriever(PASSAGES), k=2, max_steps=5)
    teacher = program.deepcopy()
    teacher.set_lm(lm)
    return harvest(program, teacher, questions(n), store, metric=exact, num_threads=2, progress=False)


def test_a_server_dying_mid_harvest_stops_it_and_a_rerun_resumes(tiny_model_dir, tmp_path, monkeypatch):
    store = HarvestStore(tmp_path / "harvest.jsonl")
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "7")
    lm = local_lm(tiny_model_dir, engine="vllm", server_log=tmp_path / "server.log", cache=False, num_retries=0)
    with pytest.raises(SteperError, match=r"died.*The harvest stopped: \d+ chains are saved") as err:
        _harvest(lm, store)
    assert str(tmp_path / "server.log") in str(err.value)
    saved = list(store.records())
    assert 0 < len(saved) < 8
    for line in store.path.read_text().splitlines():
        json.loads(line)  # every line is a whole chain record
    monkeypatch.delenv("FAKE_VLLM_DIE_AFTER")
    lm = local_lm(tiny_model_dir, engine="vllm", server_log=tmp_path / "server.log", cache=False)  # a new server
    report = _harvest(lm, store)
    assert report.chains == 8 and report.new_chains == 8 - len(saved) and report.kept == 8


def test_a_prompt_over_the_context_drops_its_chain_and_the_harvest_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    # Chains whose prompts grow past the limit (the long 5-step ones) are dropped; the others are kept.
    monkeypatch.setenv("FAKE_VLLM_MAX_PROMPT", "1420")
    lm = local_lm(tiny_model_dir, engine="vllm", server_log=tmp_path / "server.log", cache=False, num_retries=0)
    report = _harvest(lm, HarvestStore(tmp_path / "harvest.jsonl"))
    assert report.chains == 8 and report.lm_failures == 0
    assert report.dropped.get("context_length", 0) >= 1 and report.kept >= 1


def test_ctrl_c_during_a_harvest_stops_the_server_at_once_and_exits_130(tiny_model_dir, tmp_path):
    driver = textwrap.dedent(f"""
        import sys
        from steper_dspy.lm import vllm
        vllm.SERVER_MODULE = "tests.fake_vllm"
        vllm.vllm_available = lambda: True
        from steper_dspy.cli import main
        sys.argv = ["steper", "harvest", "--data", "synthetic", "--train-size", "4", "--teacher",
                    {str(tiny_model_dir)!r}, "--engine", "vllm", "-o", {str(tmp_path / "out")!r}]
        main()
    """)
    env = {**os.environ, "FAKE_VLLM_REPLY_S": "120", "PYTHONPATH": str(ROOT), "STEPER_CACHE": str(tmp_path / "c")}
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any("Maximum concurrency" in p.read_text() for p in (tmp_path / "out").glob("vllm-*.log")):
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.2)
        time.sleep(3)  # the teacher's first calls are waiting on the (slow) server
        tasks = Path(f"/proc/{proc.pid}/task").glob("*/children")  # the server's parent is a spawning thread
        children = [int(pid) for task in tasks for pid in task.read_text().split()]
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)  # not the 120 s the server would take to answer
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in output and "Traceback" not in output, output
    assert "teacher failed" not in output, output  # the chains cut short by the stop are not warned about one by one
    assert children and all(not Path(f"/proc/{pid}").exists() for pid in children), "the server is left running"


def test_the_server_goes_when_its_parent_is_killed(tiny_model_dir, tmp_path):
    parent = textwrap.dedent(f"""
        import sys, time
        from steper_dspy.lm import vllm
        vllm.SERVER_MODULE = "tests.fake_vllm"
        server = vllm.VLLMServer({str(tiny_model_dir)!r}, log_path={str(tmp_path / "s.log")!r}, progress=False).start()
        print(server.process.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    server_pid = int(proc.stdout.readline())
    assert _running(server_pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while _running(server_pid):
        if time.monotonic() > deadline:
            pytest.fail(f"the server (pid {server_pid}) outlived its killed parent")
        time.sleep(0.2)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped by its new parent, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_cpu_servers_get_every_core_and_a_kv_cache(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(vllm_module, "_has_cuda", lambda: False)
    env = server_environment()
    cores = sorted(os.sched_getaffinity(0))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == (f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0]))
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and 1 <= int(env["VLLM_CPU_KVCACHE_SPACE"]) <= 8
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert server_environment()["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_dspy_threads_default_to_the_servers_capacity(tiny_model_dir, tmp_path):
    lm = local_lm(tiny_model_dir, engine="vllm", server_log=tmp_path / "server.log", cache=False)
    program = IRCoT(ListRetriever(PASSAGES))
    program.set_lm(lm)
    from steper_dspy.lm import program_concurrency

    assert program_concurrency(program) == 5
    with dspy.context(lm=local_lm(tiny_model_dir, engine="transformers", max_batch_size=3)):
        assert program_concurrency(IRCoT(ListRetriever(PASSAGES))) == 3
