"""Generation in worker processes: the same greedy replies as in process, chains kept on one worker, and a
dead worker or a model that cannot load reported as one clear error."""

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from dspy.lm15 import Config, Message, Request
from dspy.utils.exceptions import ContextWindowExceededError

from steper_dspy.errors import SteperError
from steper_dspy.lm import workers
from steper_dspy.lm.errors import SteperLMError
from steper_dspy.lm.local import local_lm
from steper_dspy.lm.workers import WorkerPool, default_workers

QUESTIONS = [f"Question {i}: who was born in city {i}?" for i in range(6)]


def _ask(lm, text, max_tokens=10):
    request = Request(
        model=lm.model, messages=(Message.user(text),), config=Config(temperature=0.0, max_tokens=max_tokens)
    )
    return lm(request).text


@pytest.fixture(scope="module")
def pooled(tiny_model_dir):
    lm = local_lm(tiny_model_dir, engine="transformers", dtype="float32", cache=False, workers=2, max_batch_size=4)
    yield lm
    lm.engine.close()


def test_workers_give_the_in_process_greedy_replies_and_share_the_requests(pooled, tiny_model_dir):
    alone = local_lm(tiny_model_dir, engine="transformers", dtype="float32", cache=False, max_batch_size=1)
    expected = [_ask(alone, q) for q in QUESTIONS]
    with ThreadPoolExecutor(8) as threads:
        replies = list(threads.map(lambda q: _ask(pooled, q), QUESTIONS))
    assert replies == expected
    pool = pooled.engine._pool
    assert pool.workers == 2 and pooled.engine.max_concurrency == 8
    assert all(recent for recent in pool._recent), "both workers served requests"


def test_a_chain_s_next_step_goes_to_the_worker_that_holds_its_prefix(pooled):
    pool = pooled.engine._pool
    first = "Step one of a long chain about the river " * 4
    _ask(pooled, first)
    holder = next(i for i, recent in enumerate(pool._recent) if any(first in key for key in recent))
    pool._in_flight[holder] += 5  # busier than the other worker
    try:
        assert pool._pick(first + " and step two") == holder  # the shared prefix wins
        assert pool._pick("Step one of another chain") != holder  # a prefix of the template only does not
    finally:
        pool._in_flight[holder] -= 5


def test_a_worker_that_dies_fails_its_requests_with_a_clear_error(tiny_model_dir):
    lm = local_lm(tiny_model_dir, engine="transformers", dtype="float32", cache=False, workers=2, max_tokens=8)
    _ask(lm, QUESTIONS[0])
    pool = lm.engine._pool
    os.kill(pool._processes[0].pid, signal.SIGKILL)
    pool._processes[0].wait()
    time.sleep(0.2)
    with pytest.raises(SteperLMError, match="worker 0 exited"):
        _ask(lm, QUESTIONS[1])
    lm.engine.close()
    pool.close()
    assert all(p.poll() is not None for p in pool._processes), "no worker process is left behind"


def test_a_prompt_beyond_the_context_keeps_its_error_type_through_the_workers(pooled):
    request = Request(model=pooled.model, messages=(Message.user("word " * 9000),), config=Config(max_tokens=8))
    with pytest.raises(ContextWindowExceededError, match="beyond the model's context of 8192 tokens"):
        pooled(request)  # DSPy tells a context overflow by its type (ReAct truncates its trajectory on it)
    assert _ask(pooled, QUESTIONS[0])  # the pool goes on


def test_a_new_lm_does_not_get_the_pool_of_a_dead_worker_back(tiny_model_dir):
    settings = {"engine": "transformers", "dtype": "float32", "cache": False, "workers": 2, "max_tokens": 9}
    lm = local_lm(tiny_model_dir, **settings)
    expected = _ask(lm, QUESTIONS[0])
    dead = lm.engine._pool
    os.kill(dead._processes[0].pid, signal.SIGKILL)
    dead._processes[0].wait()
    deadline = time.monotonic() + 30
    while not all(p.poll() is not None for p in dead._processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(p.poll() is not None for p in dead._processes), "the surviving worker is stopped with its pool"
    again = local_lm(tiny_model_dir, **settings)
    assert _ask(again, QUESTIONS[0]) == expected and again.engine._pool is not dead
    again.engine._pool.close()


def test_a_worker_that_dies_before_it_connects_is_one_clear_error(monkeypatch):
    popen = workers.subprocess.Popen
    monkeypatch.setattr(
        workers.subprocess, "Popen", lambda command, **kw: popen([sys.executable, "-c", "raise SystemExit(3)"], **kw)
    )
    errors: list[BaseException] = []

    def start() -> None:
        try:
            WorkerPool({"model": "unused"}, workers=2, threads=1)
        except BaseException as exc:
            errors.append(exc)

    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    starting.join(60)
    assert not starting.is_alive(), "the pool waited forever for a worker that had exited"
    assert isinstance(errors[0], SteperError) and "did not start" in str(errors[0]) and "code 3" in str(errors[0])


def test_a_worker_that_hangs_while_loading_is_one_clear_error_after_the_load_timeout(monkeypatch):
    hangs = (
        "import os, sys, time; from multiprocessing.connection import Client; "
        "c = Client((sys.argv[1], int(sys.argv[2])), authkey=bytes.fromhex(os.environ['STEPER_WORKER_AUTHKEY'])); "
        "c.send(int(sys.argv[3])); c.recv(); time.sleep(600)"
    )
    popen = workers.subprocess.Popen
    monkeypatch.setattr(
        workers.subprocess, "Popen", lambda command, **kw: popen([sys.executable, "-c", hangs, *command[3:]], **kw)
    )
    monkeypatch.setattr(workers, "LOAD_TIMEOUT_S", 2.0)
    started = time.monotonic()
    with pytest.raises(SteperError, match="did not load the model within 2 s") as err:
        WorkerPool({"model": "unused"}, workers=2, threads=1)
    assert time.monotonic() - started < 60 and "timed out" in str(err.value)


def test_a_worker_that_cannot_load_is_reported_at_once_while_another_still_loads(monkeypatch):
    fails_or_hangs = (
        "import os, sys, time; from multiprocessing.connection import Client; "
        "c = Client((sys.argv[1], int(sys.argv[2])), authkey=bytes.fromhex(os.environ['STEPER_WORKER_AUTHKEY'])); "
        "c.send(int(sys.argv[3])); c.recv(); "
        "c.send(('error', 'OSError: no model at /nowhere')) if sys.argv[3] == '0' else time.sleep(600)"
    )
    popen = workers.subprocess.Popen
    monkeypatch.setattr(
        workers.subprocess,
        "Popen",
        lambda command, **kw: popen([sys.executable, "-c", fails_or_hangs, *command[3:]], **kw),
    )
    started = time.monotonic()
    with pytest.raises(SteperError, match="no model at /nowhere"):
        WorkerPool({"model": "unused"}, workers=2, threads=1)
    assert time.monotonic() - started < 60  # not after the other worker's LOAD_TIMEOUT_S (30 minutes)


def test_a_model_the_workers_cannot_load_is_one_clear_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(SteperError, match="broken"):
        WorkerPool({"model": str(broken)}, workers=1, threads=1)


def test_default_workers_are_one_per_core_on_a_cpu_as_memory_allows(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("STEPER_WORKERS")
    monkeypatch.setattr(workers, "usable_cores", lambda: 4)
    assert default_workers("cuda") == 1
    assert default_workers("cpu") == 4
    weights = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    monkeypatch.setattr(workers, "_available_memory", lambda: 5 * weights)
    assert default_workers("cpu", tiny_model_dir) == 2  # two copies' worth of memory for each worker
    monkeypatch.setenv("STEPER_WORKERS", "3")
    assert default_workers("cpu", tiny_model_dir) == 3


def test_stopping_local_generation_stops_the_workers_and_fails_their_requests(tiny_model_dir):
    from steper_dspy.lm.local import stop_local_generation

    lm = local_lm(tiny_model_dir, engine="transformers", dtype="float32", cache=False, workers=2, max_tokens=7)
    assert _ask(lm, QUESTIONS[0])
    pool = lm.engine._pool
    stop_local_generation()  # what `steper` does on Ctrl-C
    assert all(p.poll() is not None for p in pool._processes)
    with pytest.raises(SteperLMError, match="stopped"):
        _ask(lm, QUESTIONS[1])
