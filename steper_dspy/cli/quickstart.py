"""The quickstart: SmolLM2-135M learns multi-step reasoning on the built-in synthetic example, offline, on a CPU."""

from importlib import resources
from pathlib import Path

from steper_dspy.cli.config import RunConfig
from steper_dspy.cli.specs import smollm2_student

RECORDED_TEACHER = "quickstart_teacher.jsonl"
RECORDED_TEACHER_MODEL = "qwen2.5-coder-1.5b"

# Sized for five minutes on two CPU cores (see README); the flags scale it up. The shipped recording covers
# all 120 questions of the synthetic example: 80 to train on and 40 held out.
TRAIN_SIZE = 80
TEST_SIZE = 40
TRAINING = {
    "num_train_epochs": 6.0,
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 8,
    "max_length": 1536,
    "logging_steps": 1,
}


def recorded_teacher_path() -> Path:
    """The shipped recording of the quickstart's teacher on the synthetic example."""
    return Path(str(resources.files("steper_dspy") / "data" / RECORDED_TEACHER))


def quickstart_config(
    *,
    teacher: str | None = None,
    api_base: str | None = None,
    output: str | None = None,
    student: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    epochs: float | None = None,
    threads: int | None = None,
    engine: str | None = None,
) -> RunConfig:
    """The quickstart's run: a replayed teacher unless `teacher` is given (then its calls are recorded in the
    output folder, so a rerun is free)."""
    out = output or "runs/quickstart"
    recording = str(Path(out) / "teacher_recording.jsonl") if teacher else str(recorded_teacher_path())
    training = dict(TRAINING)
    if epochs is not None:
        training["num_train_epochs"] = epochs
    return RunConfig(
        program="ircot",
        max_steps=4,
        data="synthetic",
        seed=0,
        train_size=train_size or TRAIN_SIZE,
        test_size=test_size or TEST_SIZE,
        teacher=teacher,
        api_base=api_base,
        recording=recording,
        student=student or smollm2_student(),
        output=out,
        weighting="adaptive",
        metric="em",
        teacher_max_tokens=128,
        training=training,
        engine=engine or "auto",
        threads=threads,
    )
