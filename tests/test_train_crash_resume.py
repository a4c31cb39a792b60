"""Training killed with SIGKILL, once mid-run and once in the middle of writing a checkpoint, then rerun, ends with
the result of an uninterrupted run: the same weights, the same stage sigmas, and a log with each step once.

The training runs for real in a subprocess (tests/train_driver.py: the tiny test model, 24 samples, 8 steps, a
checkpoint every 2).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steper_dspy.training import train_student
from tests.train_driver import STAGES, config, samples

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")


@pytest.fixture
def one_thread():
    """Train on one thread: the tiny model gains nothing from more, and on a busy machine they mostly wait for each
    other (8 steps took 15 s on two threads, 1.5 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start(model: Path, output: Path, log: Path, *extra: str) -> subprocess.Popen:
    """Start tests/train_driver.py; its stderr goes to `log`, so that a full pipe never stalls it."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.train_driver", str(model), str(output), *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            # One thread, as in `one_thread` above.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the training ended before it was killed"


def complete_checkpoints(output: Path) -> list[int]:
    """The steps of the checkpoints whose trainer state (the Trainer's last file of one) parses."""
    steps = []
    for state in (output / "checkpoints").glob("checkpoint-*/trainer_state.json"):
        try:
            steps.append(json.loads(state.read_text())["global_step"])
        except ValueError:
            continue  # being written
    return sorted(steps)


def steps_logged(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "stage_log.jsonl").read_text().splitlines()]


def test_sigkilled_training_resumes_to_the_result_of_an_uninterrupted_run(tiny_model_dir, tmp_path, one_thread):
    reference = train_student(samples(), tiny_model_dir, tmp_path / "reference", config(), progress=False)
    output = tmp_path / "killed"

    # 1. Killed mid-run, as soon as a complete checkpoint is on disk (0.2 s a step: 6 steps still to go).
    log = tmp_path / "run1.log"
    proc = start(tiny_model_dir, output, log, "--step-delay", "0.2")
    deadline = time.monotonic() + 120
    while not complete_checkpoints(output):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint was written:\n{log.read_text()}")
        time.sleep(0.01)
    kill(proc)
    first = complete_checkpoints(output)[-1]
    assert first < 8 and not (output / "steper_training.json").exists()

    # 2. The rerun resumes, and is killed while writing its first checkpoint (half its trainer state on disk).
    log = tmp_path / "run2.log"
    proc = start(tiny_model_dir, output, log, "--tear-checkpoint")
    torn = next((Path(line[5:].decode().strip()) for line in proc.stdout if line.startswith(b"torn ")), None)
    if torn is None:
        proc.wait(timeout=60)
        pytest.fail(f"the rerun wrote no checkpoint:\n{log.read_text()}")
    kill(proc)
    with pytest.raises(ValueError):
        json.loads(torn.read_text())
    torn_step = int(torn.parent.name.rsplit("-", 1)[1])
    assert torn_step == first + 2

    # 3. Rerun to the end: it passes over the torn checkpoint and resumes from the last complete one.
    log = tmp_path / "run3.log"
    proc = start(tiny_model_dir, output, log)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log.read_text()
    lines = out.decode().splitlines()
    result = json.loads(lines[-1])
    resumed_from = min(int(line.split()[1]) for line in lines if line.startswith("step ")) - 1
    assert resumed_from == first

    assert result["sigmas"] == pytest.approx(reference.sigmas, abs=1e-5)
    assert result["final_loss"] == pytest.approx(reference.final_loss, abs=1e-4)
    expected, got = (
        load_file(str(reference.output_dir / "model.safetensors")),
        load_file(str(output / "model.safetensors")),
    )
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-5) for k in expected)
    logged = steps_logged(output)
    assert logged == steps_logged(reference.output_dir) == list(range(1, 9))  # no step lost or logged twice
    reference_rows = [json.loads(line) for line in reference.log_path.read_text().splitlines()]
    rows = [json.loads(line) for line in (output / "stage_log.jsonl").read_text().splitlines()]
    for a, b in zip(reference_rows, rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert all(b[f"sigma_{s}"] == pytest.approx(a[f"sigma_{s}"], abs=1e-5) for s in STAGES)
    assert complete_checkpoints(output) == [6, 8]
    print(
        f"\ntraining crash-resume: 2 SIGKILLs survived (after checkpoint {first}; mid-write of checkpoint "
        f"{torn_step}, passed over), resumed from step {resumed_from}; weights and sigmas equal to an uninterrupted "
        f"run, steps logged {len(logged)} of 8: lost 0, duplicated {len(logged) - len(set(logged))}"
    )


def test_training_killed_after_its_last_checkpoint_finishes_from_it(tiny_model_dir, tmp_path, one_thread):
    """Killed after the last checkpoint but before the model and its record were saved: the rerun trains no
    more steps and saves the same model."""
    output = tmp_path / "student"
    whole = train_student(samples(), tiny_model_dir, output, config(), progress=False)
    weights = load_file(str(output / "model.safetensors"))
    for name in ("steper_training.json", "model.safetensors", "config.json"):
        (output / name).unlink()

    again = train_student(samples(), tiny_model_dir, output, config(), progress=False)
    assert again.sigmas == pytest.approx(whole.sigmas, abs=1e-6)
    assert again.final_loss == pytest.approx(whole.final_loss)
    rebuilt = load_file(str(output / "model.safetensors"))
    assert all(torch.allclose(weights[k], rebuilt[k]) for k in weights)
    assert steps_logged(output) == list(range(1, 9))


def test_a_torn_or_foreign_trainer_state_is_not_a_checkpoint(tmp_path):
    from steper_dspy.training.trainer import last_checkpoint

    folder = tmp_path / "checkpoints"
    for step, state in (
        (2, '{"global_step": 2}'),
        (4, '{"global_step": 4, "log_hi'),
        (6, ""),
        (8, '{"global_step": 2}'),
    ):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (folder / "checkpoint-10").mkdir()  # killed before its trainer state was written
    assert last_checkpoint(folder) == str(folder / "checkpoint-2")
