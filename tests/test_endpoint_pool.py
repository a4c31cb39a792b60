"""A harvest over several teacher servers: calls spread over the endpoints, a dead one's calls go to the others,
and the harvest file stays one consistent file. Three stand-in vLLM servers (tests/fake_vllm.py) on loopback."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from steper_dspy.compilers import HarvestStore, harvest
from steper_dspy.lm import make_lm
from steper_dspy.programs import IRCoT
from tests.harvest_driver import exact, questions
from tests.scripted import PASSAGES, ListRetriever

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def servers(tmp_path):
    """Start stand-in servers with the given extra environment each; yields a starter, stops them all."""
    procs = []

    def start(*envs: dict[str, str]) -> list[str]:
        bases = []
        for env in envs:
            port = _free_port()
            log = open(tmp_path / f"server-{port}.log", "wb")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fake_vllm", "--served-model-name", "teacher", "--port", str(port)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
            )  # fmt: skip
            procs.append((proc, log))
            bases.append((port, f"http://127.0.0.1:{port}/v1"))
        deadline = time.monotonic() + 30
        while not all(_healthy(port) for port, _ in bases):
            assert time.monotonic() < deadline, "the stand-in servers did not start"
            time.sleep(0.1)
        return [base for _, base in bases]

    yield start
    for proc, log in procs:
        proc.kill()
        proc.wait()
        log.close()


def _harvest(lm, path, n=12):
    program = IRCoT(ListRetriever(PASSAGES), k=2, max_steps=5)
    teacher = program.deepcopy()
    teacher.set_lm(lm)
    return harvest(program, teacher, questions(n), HarvestStore(path), metric=exact, num_threads=6, progress=False)


def test_calls_spread_over_every_endpoint(servers, tmp_path):
    bases = servers({}, {}, {})
    lm = make_lm("hosted_vllm/teacher", api_base=bases, cache=False)
    report = _harvest(lm, tmp_path / "harvest.jsonl")
    assert report.chains == 12 and report.kept == 12 and report.lm_failures == 0
    assert all(n > 0 for n in lm.engine.served), lm.engine.served


def test_a_dead_endpoints_calls_go_to_the_others_and_the_file_stays_whole(servers, tmp_path):
    bases = servers({"FAKE_VLLM_DIE_AFTER": "5"}, {}, {})
    lm = make_lm("hosted_vllm/teacher", api_base=bases, cache=False, num_retries=0)
    path = tmp_path / "harvest.jsonl"
    report = _harvest(lm, path)
    assert report.chains == 12 and report.kept == 12 and report.lm_failures == 0  # no chain lost to the death
    served = lm.engine.served
    assert served[0] == 5 and served[1] + served[2] > 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({(r["example_id"], r["rollout"]) for r in records}) == len(records) == 12
