"""One run's settings: read from a TOML or YAML file, overridden by command-line options, written back.

The settings are a pydantic model with strict types and no unknown keys, so that a typo or a wrong type in a
config file (``k: four``) fails at load with one line naming the key, the value and the type expected.
"""

import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from steper_dspy.errors import SteperError
from steper_dspy.stages import STAGES
from steper_dspy.training import TrainingConfig


class RunConfig(BaseModel):
    """Everything a harvest, training or evaluation run needs, so that a run can be repeated exactly.

    Attributes:
        program: ``ircot``, ``self-ask`` or ``module:Class`` (a user's staged program class).
        k: Passages retrieved per step.
        max_steps: Most reasoning calls per chain.
        data: ``synthetic``, a local HotpotQA / 2Wiki / MuSiQue file, or a hub dataset id.
        data_format: ``hotpotqa``, ``2wiki`` or ``musique`` when it cannot be sniffed.
        test_data: Evaluate on these datasets (each over its own corpus) instead of the held-out part of
            `data`; a single path is taken as a list of one.
        train_size: Training questions (taken from `data` after the test questions are set apart).
        test_size: Held-out questions for evaluation.
        seed: Seed of the split and of the synthetic example.
        teacher: LM spec: litellm/DSPy string (``openai/gpt-4o-mini``), hub id, local folder or GGUF file.
        api_base: Endpoint for an API teacher (e.g. a local vLLM or ``transformers serve``), or a list of
            endpoints serving the same model: each call goes to the least busy live one.
        teacher_max_tokens: Token limit per teacher call.
        teacher_demos: The teacher's demonstrations: ``builtin`` (the program's worked example, IRCoT), which a
            small teacher needs to keep each step to one fact; ``bootstrap`` (two of the teacher's own correct
            chains on the training questions, found with the built-in example; saved as
            ``<output>/teacher_demos.json``); or ``none``. The student's samples never include them.
        recording: A teacher recording (JSONL): replayed when it answers every call, extended when a live
            teacher is given.
        student: Base model of the student: hub id, local folder or GGUF file.
        output: Output folder.
        weighting: ``adaptive`` (STEPER), ``uniform`` or ``fixed``.
        stages: Stages whose samples train the student.
        metric: ``em``, ``f1`` or ``accuracy``: decides which teacher chains are kept.
        threshold: Least metric score for a chain to be kept.
        rollouts: Teacher chains per question.
        step_filter: Drop ungrounded steps of kept chains.
        threads: Parallel LM calls; by default what the LM serves at once (a managed vLLM server's capacity, the
            in-process engine's batch size), 1 for an API model.
        engine: How local models generate: ``auto`` (vLLM when installed), ``vllm`` or ``transformers``.
        training: Training settings (see ``TrainingConfig``).
        seeds: Training seeds: each trained system is trained and evaluated once per seed (into
            ``<output>/<system>/seed-<n>``) and reported by the mean over seeds, with intervals and paired tests
            over the questions; by default once, with ``training.seed``.
        evaluations: Folder of the finished evaluations of the students, trained and untrained (default
            ``<output>/evaluations``): a rerun reads a run's record instead of training and evaluating it again,
            as long as the harvest, settings, seed, engine and questions are the same. Commit it to finish a long
            benchmark over several sessions.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    program: str = "ircot"
    k: int = 4
    max_steps: int = 5
    data: str = "synthetic"
    data_format: Literal["hotpotqa", "2wiki", "musique"] | None = None
    test_data: list[str] | None = None
    train_size: int | None = None
    test_size: int = 30
    seed: int = 0
    teacher: str | None = None
    api_base: str | list[str] | None = None
    teacher_max_tokens: int = 256
    teacher_demos: Literal["builtin", "bootstrap", "none"] = "builtin"
    recording: str | None = None
    student: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    output: str = "runs/steper"
    weighting: Literal["adaptive", "uniform", "fixed"] = "adaptive"
    stages: list[str] = [stage.value for stage in STAGES]
    metric: Literal["em", "f1", "accuracy"] = "em"
    threshold: float = 1.0
    rollouts: int = 1
    step_filter: bool = False
    threads: int | None = None
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    training: dict[str, Any] = {}
    seeds: list[int] | None = None
    evaluations: str | None = None

    @field_validator("test_data", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("api_base", mode="before")
    @classmethod
    def _one_endpoint_is_a_string(cls, value: Any) -> Any:
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    @model_validator(mode="after")
    def _training_settings_are_valid(self) -> "RunConfig":
        try:
            self.training_config()
        except (TypeError, ValueError) as err:
            raise ValueError(f"[training]: {err}") from None
        return self

    def training_config(self) -> TrainingConfig:
        """The training settings, with `weighting` and `stages` from this run."""
        return TrainingConfig.from_dict({**self.training, "weighting": self.weighting, "stages": tuple(self.stages)})

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> "RunConfig":
        """Read a config file (``.toml``, ``.yaml`` or ``.yml``) and apply the overrides that are not None.

        Raises:
            SteperError: A missing or unreadable file, an unknown key, a value of the wrong type or a bad
                training key; the message names the key and the value.
        """
        values = _read(Path(path)) if path is not None else {}
        values.update({key: value for key, value in overrides.items() if value is not None})
        try:
            return cls(**values)
        except ValidationError as err:
            raise SteperError(f"Config {path or '(options)'}: {_first_problem(err)}") from None

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with `changes` applied and validated."""
        return type(self).load(None, **{**self.model_dump(), **changes})

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML (readable back with :meth:`load`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.model_dump(), sort_keys=False))
        return path


def _first_problem(err: ValidationError) -> str:
    problems = err.errors()
    unknown = sorted(str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden")
    if unknown:
        return f"unknown key(s) {unknown}; known keys: {sorted(RunConfig.model_fields)}."
    problem = problems[0]
    key = ".".join(str(part) for part in problem["loc"]) or "config"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{key} = {problem.get('input')!r}: {message}."


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SteperError(f"Config file {path} does not exist.")
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(path.read_text()) or {}
        else:
            raise SteperError(f"Config file {path}: use a .toml, .yaml or .yml file.")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise SteperError(f"Config file {path} is not valid: {err}") from None
    if not isinstance(values, dict):
        raise SteperError(f"Config file {path} must hold a table of settings, not {type(values).__name__}.")
    return values
