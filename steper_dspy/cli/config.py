"""One run's settings: read from a TOML or YAML file, overridden by command-line options, written back."""

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from steper_dspy.errors import SteperError
from steper_dspy.training import TrainingConfig


@dataclass
class RunConfig:
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
        api_base: Endpoint for an API teacher (e.g. a local vLLM or ``transformers serve``).
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
    """

    program: str = "ircot"
    k: int = 4
    max_steps: int = 5
    data: str = "synthetic"
    data_format: str | None = None
    test_data: list[str] | None = None
    train_size: int | None = None
    test_size: int = 30
    seed: int = 0
    teacher: str | None = None
    api_base: str | None = None
    teacher_max_tokens: int = 256
    teacher_demos: str = "builtin"
    recording: str | None = None
    student: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    output: str = "runs/steper"
    weighting: str = "adaptive"
    stages: list[str] = field(default_factory=lambda: ["init", "expand", "aggregate"])
    metric: str = "em"
    threshold: float = 1.0
    rollouts: int = 1
    step_filter: bool = False
    threads: int | None = None
    engine: str = "auto"
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.test_data, str):
            self.test_data = [self.test_data]

    def training_config(self) -> TrainingConfig:
        """The training settings, with `weighting` and `stages` from this run."""
        return TrainingConfig.from_dict({**self.training, "weighting": self.weighting, "stages": tuple(self.stages)})

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> "RunConfig":
        """Read a config file (``.toml``, ``.yaml`` or ``.yml``) and apply the overrides that are not None.

        Raises:
            SteperError: A missing or unreadable file, an unknown key or a bad training key.
        """
        values: dict[str, Any] = {}
        if path is not None:
            values = _read(Path(path))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SteperError(f"Config {path}: unknown key(s) {unknown}; known keys: {sorted(known)}.")
        values.update({key: value for key, value in overrides.items() if value is not None})
        config = cls(**values)
        try:
            config.training_config()
        except (TypeError, ValueError) as err:
            raise SteperError(f"Config {path or ''} [training]: {err}") from None
        return config

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML (readable back with :meth:`load`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))
        return path


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
