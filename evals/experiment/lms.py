"""The LMs and programs of a run: the teacher (live, recorded or replayed, with its demonstrations) and students."""

from pathlib import Path
from typing import Any

import dspy

from steper_dspy.adapter import teacher_adapter
from steper_dspy.compilers import bootstrap_demos, load_demos, run_with_adapter, save_demos, student_lm
from steper_dspy.errors import SteperError
from steper_dspy.evals.experiment.config import RunConfig
from steper_dspy.evals.experiment.task import Task, TestSet
from steper_dspy.lm import is_api_model, make_lm, recorded_lm
from steper_dspy.metrics import METRICS
from steper_dspy.programs.demos import ircot_demos, with_demos

TEACHER_DEMOS_FILE = "teacher_demos.json"
BOOTSTRAPPED_CHAINS = 2  # teacher chains whose steps become its demonstrations (teacher_demos: bootstrap)


def teacher_lm(config: RunConfig) -> dspy.LM:
    """The teacher: a live LM, a replayed recording, or a live LM whose calls are recorded."""
    live = None
    if config.teacher:
        live = model_lm(config, config.teacher, student=False, max_tokens=config.teacher_max_tokens)
    if config.recording:
        return recorded_lm(config.recording, live)
    if live is None:
        raise SteperError("No teacher: pass --teacher MODEL (or --recording FILE to replay a recorded teacher).")
    return live


def teacher_program(config: RunConfig, task: Task, lm: dspy.LM, testset: TestSet | None = None) -> dspy.Module:
    """The run's program on the teacher LM over the corpus of `testset` (training corpus when None), with the
    run's teacher demonstrations (see :func:`teacher_demos`)."""
    program = task.program(config, testset)
    demos = teacher_demos(config, task, lm)
    if demos:
        with_demos(program, demos)
    program.set_lm(lm)
    return run_with_adapter(program, teacher_adapter(program))


def teacher_demos(config: RunConfig, task: Task, lm: dspy.LM) -> dict[str, list[dspy.Example]] | None:
    """The teacher's demonstrations: none, the built-in worked example (IRCoT), or bootstrapped from the
    training questions by the teacher prompted with the built-in example. Bootstrapped demos are saved to
    ``<output>/teacher_demos.json`` and read back by a rerun, so that the teacher is prompted identically."""
    builtin = ircot_demos() if config.program == "ircot" else None
    if config.teacher_demos != "bootstrap":
        return builtin if config.teacher_demos == "builtin" else None
    path = Path(config.output) / TEACHER_DEMOS_FILE
    if path.is_file():
        return load_demos(path)
    prompted = task.program(config)
    if builtin:
        with_demos(prompted, builtin)
    prompted.set_lm(lm)
    demos = bootstrap_demos(
        task.program(config),
        run_with_adapter(prompted, teacher_adapter(prompted)),
        task.trainset,
        metric=METRICS[config.metric],
        threshold=config.threshold,
        max_demos=BOOTSTRAPPED_CHAINS,
    )
    save_demos(demos, path)
    return demos


def run_student_lm(config: RunConfig, model: str | Path) -> dspy.LM:
    """A student model of the run as an LM, on the run's engine (a vLLM server logs into the output folder)."""
    return student_lm(model, **student_lm_kwargs(config, model))


def student_lm_kwargs(config: RunConfig, model: str | Path) -> dict[str, Any]:
    """How the run builds a student's LM: its engine, and where a vLLM server for it logs."""
    return {"engine": config.engine, "server_log": _server_log(config, model)}


def model_lm(config: RunConfig, spec: str, *, student: bool, **kwargs: Any) -> dspy.LM:
    """The LM for `spec` (an API model string or a local model) on the run's engine and endpoint; a local
    student stops replies that cannot parse early (see :func:`steper_dspy.compilers.student_lm`)."""
    if is_api_model(spec):  # the run's engine is how local models generate; an API model keeps DSPy's client
        return make_lm(spec, api_base=config.api_base, **kwargs)
    if student:
        return run_student_lm(config, spec)
    return make_lm(spec, api_base=config.api_base, engine=config.engine, server_log=_server_log(config, spec), **kwargs)


def _server_log(config: RunConfig, model: str | Path) -> Path:
    path = Path(str(model))
    return Path(config.output) / f"vllm-{path.stem if path.suffix == '.gguf' else path.name}.log"
