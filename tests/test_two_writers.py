"""Two harvests writing into one file: the second fails at once with a clear error, and the lock never outlives its
writer (it is released on exit, and by the kernel when the writer is killed with SIGKILL).

The two-process test runs tests/harvest_driver.py for real; the others use two `HarvestStore`s in this process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from steper_dspy.compilers import ChainRecord, HarvestStore
from steper_dspy.errors import SteperError
from tests.test_crash_resume import keys, run_to_end, start, wait_for

ROOT = Path(__file__).resolve().parent.parent


def chain(i: int) -> ChainRecord:
    sample = {"messages": [{"role": "assistant", "content": f"answer {i}"}], "stage": "aggregate"}
    return ChainRecord(f"q{i}", 0, True, None, 1.0, answer=f"answer {i}", samples=[sample])


def lock_holder(path: Path) -> str | None:
    try:
        return (path.parent / (path.name + ".lock")).read_text().strip()
    except FileNotFoundError:
        return None


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_second_harvest_process_fails_at_once_and_a_killed_one_leaves_no_lock(tmp_path):
    path = tmp_path / "h.jsonl"
    # The first harvest is slow (0.5 s a teacher call, about 20 s in all): it is still writing when the second
    # one starts, and is killed long before it finishes.
    first = start(path, "--delay", "0.5")
    try:
        assert wait_for(first, b"ready")
        deadline = time.monotonic() + 60
        # harvest() has taken the lock and written its first chain
        while lock_holder(path) != str(first.pid) or not (path.exists() and b"\n" in path.read_bytes()):
            assert first.poll() is None and time.monotonic() < deadline, "the first harvest wrote nothing"
            time.sleep(0.01)

        second = subprocess.run(
            [sys.executable, "-m", "tests.harvest_driver", str(path)],
            cwd=ROOT,
            capture_output=True,
            timeout=120,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert first.poll() is None, "the first harvest finished before the second one tried to write"
        error = second.stderr.decode().strip().splitlines()[-1]
        assert second.returncode == 1
        assert error == (
            f"steper_dspy.errors.SteperError: Harvest file {path} is locked: another harvest (pid {first.pid}) is "
            "writing to it. Wait for it to finish, or harvest into another file."
        )
        assert second.stdout.decode().split() == ["ready"]  # it stopped before asking the teacher anything
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        first.stdout.close()
    assert first.returncode == -signal.SIGKILL
    written = keys(path.read_bytes())
    assert written
    assert lock_holder(path) == str(first.pid)  # the lock file stays behind, but the kernel released the lock

    summary = run_to_end(path)
    assert (summary["chains"], summary["new_chains"], summary["lm_failures"]) == (12, 12 - len(written), 0)
    final = keys(path.read_bytes())
    assert sorted(final) == sorted((f"q{i}", 0) for i in range(12))
    assert not [k for k, n in Counter(final).items() if n > 1]
    assert lock_holder(path) is None  # removed by the harvest that finished
    print(
        f"\ntwo writers: the second harvest failed at once (pid {first.pid} held the lock); the first was killed "
        f"after {len(written)} of 12 chains and its lock did not outlive it; the rerun wrote the other {12 - len(written)}"
    )


def test_a_second_store_cannot_write_while_the_first_is_writing(tmp_path):
    path = tmp_path / "h.jsonl"
    first, second = HarvestStore(path), HarvestStore(path)
    with first.writing():
        first.append(chain(0))
        assert lock_holder(path) == str(os.getpid())
        with pytest.raises(SteperError) as err:
            second.append(chain(1))
        assert str(err.value) == (
            f"Harvest file {path} is locked: another HarvestStore of this process is writing to it. Wait for it to "
            "finish, or harvest into another file."
        )
        with pytest.raises(SteperError, match="is locked"), second.writing():
            pass
        first.append(chain(1))
    assert lock_holder(path) is None

    # Once the first is done, the second writes, and first reads what the other wrote since it was opened.
    second.append(chain(0))  # already written by `first`: not written again
    second.append(chain(2))
    first.append(chain(2))
    assert [r.example_id for r in HarvestStore(path).records()] == ["q0", "q1", "q2"]
    assert path.read_bytes().count(b"\n") == 3
    assert (len(first), len(second)) == (3, 3)


def test_a_reader_never_cuts_the_line_a_writer_is_writing(tmp_path):
    path = tmp_path / "h.jsonl"
    writer = HarvestStore(path)
    line = json.dumps({"example_id": "q1", "rollout": 0, "kept": False, "reason": "metric", "score": 0.0}) + "\n"
    with writer.writing():
        writer.append(chain(0))
        with path.open("ab") as f:  # the writer is half-way through its next line
            f.write(line[:20].encode())
        before = path.read_bytes()

        reader = HarvestStore(path)
        assert path.read_bytes() == before  # not cut: the line is still being written
        assert [r.example_id for r in reader.records()] == ["q0"] and len(reader) == 1

        with path.open("ab") as f:
            f.write(line[20:].encode())
    assert [r.example_id for r in HarvestStore(path).records()] == ["q0", "q1"]


def test_a_torn_line_is_cut_when_no_one_is_writing(tmp_path):
    path = tmp_path / "h.jsonl"
    HarvestStore(path).append(chain(0))
    good = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"example_id": "q1", "rol')
    store = HarvestStore(path)
    assert path.read_bytes() == good and len(store) == 1
    assert lock_holder(path) is None
