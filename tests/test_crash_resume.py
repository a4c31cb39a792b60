"""A harvest killed with SIGKILL at random moments, then rerun, ends with exactly the chains of an uninterrupted run.

The harvest runs for real in a subprocess (tests/harvest_driver.py: 12 scripted questions, 40 ms per teacher
call, chain records written in 4 flushed pieces 5 ms apart), so the kills land mid-chain and mid-write.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KILLS = 5
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")


def start(path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.harvest_driver", str(path), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def run_to_end(path: Path, *extra: str) -> dict:
    proc = start(path, *extra)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode(errors="replace")
    return json.loads(out.decode().strip().splitlines()[-1])


def wait_for(proc: subprocess.Popen, marker: bytes, count: int = 1) -> bool:
    """Read the driver's stdout up to the `count`-th `marker` line; False if it exited first."""
    seen = 0
    while seen < count:
        line = proc.stdout.readline()
        if not line:
            return False
        seen += line.strip() == marker
    return True


def keys(data: bytes) -> list[tuple[str, int]]:
    """The (example_id, rollout) of every complete line; each must be a whole JSON record."""
    complete = data[: data.rfind(b"\n") + 1]
    records = [json.loads(line) for line in complete.splitlines()]
    return [(r["example_id"], r["rollout"]) for r in records]


def test_sigkilled_harvest_resumes_to_the_exact_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference.jsonl"
    assert run_to_end(reference)["chains"] == 12

    path = tmp_path / "killed.jsonl"
    rng = random.Random(20240611)
    killed, torn, done_before, progress = 0, 0, set(), []
    for attempt in range(KILLS):
        proc = start(path, "--slow-writes")
        try:
            if attempt % 2:  # in the middle of writing the 1st or 2nd chain record (4 pieces each)
                alive = wait_for(proc, b"ready") and wait_for(proc, b"write", rng.randint(1, 8))
                delay = rng.uniform(0.0, 0.004)
            else:  # anywhere: mostly mid-chain, between teacher calls
                alive = wait_for(proc, b"ready")
                delay = rng.uniform(0.1, 0.5)
            if alive:  # (the driver's few later markers fit in the pipe: it never blocks on them)
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
            proc.stdout.close()
        killed += proc.returncode == -signal.SIGKILL
        data = path.read_bytes() if path.exists() else b""
        torn += bool(data) and not data.endswith(b"\n")
        done = keys(data)  # every complete line parses: a torn line can only be the last one
        assert len(done) == len(set(done)), "a chain was written twice"
        assert done_before <= set(done), "a chain written before a kill was lost"
        done_before = set(done)
        progress.append(len(done))

    summary = run_to_end(path, "--slow-writes")
    assert summary["chains"] == 12 and summary["lm_failures"] == 0

    final, expected = path.read_bytes(), reference.read_bytes()
    assert final.endswith(b"\n")
    final_keys = keys(final)
    duplicates = sum(n - 1 for n in Counter(final_keys).values())
    lost = len(set(keys(expected)) - set(final_keys))
    assert (duplicates, lost) == (0, 0)
    # the same chain records, byte for byte, and so the same step samples
    assert sorted(final.splitlines()) == sorted(expected.splitlines())
    samples = sorted(json.dumps(s) for line in final.splitlines() for s in json.loads(line)["samples"])
    reference_samples = sorted(json.dumps(s) for line in expected.splitlines() for s in json.loads(line)["samples"])
    assert samples == reference_samples
    assert killed >= KILLS - 1, f"only {killed} of {KILLS} runs were killed mid-harvest"
    print(
        f"\ncrash-resume: {killed} SIGKILLs survived ({torn} left a torn last line), chains on file after each kill "
        f"{progress} of 12, samples {len(samples)}, lost {lost}, duplicated {duplicates}"
    )
