"""Settings of one STEPER fine-tuning run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from steper_dspy.errors import SteperError
from steper_dspy.stages import STAGES

WEIGHTING_MODES = ("adaptive", "uniform", "fixed")

# Fields that change how long a run goes or what it reports, not what a given step computes: a checkpoint
# made under other values of these can be resumed (e.g. to train on with a larger `max_steps`).
RESUMABLE_FIELDS = frozenset(
    {"num_train_epochs", "max_steps", "logging_steps", "save_steps", "save_total_limit", "report_to"}
)


@dataclass
class TrainingConfig:
    """How to fine-tune a student on step-wise samples.

    Args:
        weighting: How the per-stage losses are combined. `"adaptive"`: STEPER's difficulty-aware loss,
            `sum_j L_j / (2 sigma_j^2) + log sigma_j` with one learnable log-variance per stage;
            `"uniform"`: the plain mean token cross-entropy over all target tokens (what DSPy's
            BootstrapFinetune does); `"fixed"`: `sum_j w_j L_j` with `stage_weights`.
        stage_weights: The weight of each trained stage, for `weighting="fixed"`.
        stages: Which stages' samples to train on (the paper's ablations drop some).
        use_lora: Train a LoRA adapter (peft) instead of all weights.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: peft target modules; `"all-linear"` is every linear layer but the output head.
        learning_rate: Peak learning rate of the model (or adapter) weights.
        sigma_learning_rate: Learning rate of the stage log-variances (own group, no weight decay).
        num_train_epochs: Passes over the samples (ignored when `max_steps > 0`).
        max_steps: Optimizer steps to run; `-1` derives them from `num_train_epochs`.
        per_device_train_batch_size: Training sequences per forward pass and device (a packed chain is one).
        gradient_accumulation_steps: Forward passes per optimizer step.
        max_length: Longest sample (prompt + target tokens) trained on. Longer samples are dropped and
            counted, never truncated: cutting the prompt would teach a prompt the student never sees at
            inference (it loses the system message or the question). Also the longest packed chain.
        pack_steps: Pack the steps of each chain into one sequence whose shared prompt prefix is computed once
            (each step still sees only its own prompt; the loss is that of the unpacked samples). Needs an
            attention that takes a custom mask (sdpa, eager).
        bf16: bf16 autocast; `None` turns it on where the hardware runs bf16 natively (recent GPUs, CPUs
            with AVX512-BF16 or AMX). With LoRA the frozen base is then held in bf16 too (the adapter stays
            fp32, and a merged model is merged into the base at full precision).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        logging_steps: Log the loss, per-stage losses and sigmas every this many steps.
        save_steps: Write a resumable checkpoint every this many steps.
        save_total_limit: Checkpoints kept on disk.
        seed: Seed of the initialisation (LoRA) and of the data order.
        report_to: Trainer integrations to report to (`"none"`, `"tensorboard"`, `"wandb"`, ...).
        merge: Save merged weights (a plain Hugging Face model folder) instead of the LoRA adapter alone.
        lr_scheduler_type: Learning-rate schedule of the model weights (`"linear"`, `"cosine"`, `"constant"`, ...).
        warmup_ratio: Fraction of the steps spent warming the learning rate up.
        weight_decay: AdamW weight decay of the model weights.
    """

    weighting: Literal["adaptive", "uniform", "fixed"] = "adaptive"
    stage_weights: dict[str, float] | None = None
    stages: tuple[str, ...] = ("init", "expand", "aggregate")
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    learning_rate: float = 2e-4
    sigma_learning_rate: float = 1e-2
    num_train_epochs: float = 2.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    pack_steps: bool = True
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    logging_steps: int = 5
    save_steps: int = 50
    save_total_limit: int = 2
    seed: int = 0
    report_to: str | list[str] = "none"
    merge: bool = True
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self.stages = tuple(str(getattr(s, "value", s)) for s in self.stages)
        known = {s.value for s in STAGES}
        if not self.stages:
            raise SteperError("TrainingConfig.stages is empty: name at least one of 'init', 'expand', 'aggregate'.")
        unknown = [s for s in self.stages if s not in known]
        if unknown or len(set(self.stages)) != len(self.stages):
            raise SteperError(
                f"TrainingConfig.stages={self.stages!r} holds unknown or repeated stages: use distinct names "
                f"from {sorted(known)}."
            )
        if self.weighting not in WEIGHTING_MODES:
            raise SteperError(f"TrainingConfig.weighting={self.weighting!r} is unknown: use one of {WEIGHTING_MODES}.")
        if self.weighting == "fixed":
            weights = self.stage_weights or {}
            missing = [s for s in self.stages if s not in weights]
            if missing:
                raise SteperError(
                    f"weighting='fixed' needs stage_weights for every trained stage; missing {missing}: "
                    "pass e.g. stage_weights={'init': 1.0, 'expand': 1.0, 'aggregate': 2.0}."
                )
            if any(float(w) < 0 for w in weights.values()):
                raise SteperError(f"stage_weights={weights!r} holds a negative weight: use weights >= 0.")
            self.stage_weights = {str(k): float(v) for k, v in weights.items()}
        positive = ("lora_r", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length")
        for name in (*positive, "logging_steps", "save_steps", "save_total_limit"):
            if int(getattr(self, name)) < 1:
                raise SteperError(f"TrainingConfig.{name}={getattr(self, name)!r} must be at least 1.")
        if self.learning_rate <= 0 or self.sigma_learning_rate < 0:
            raise SteperError("TrainingConfig learning rates must be positive (sigma_learning_rate may be 0).")
        if self.max_steps <= 0 and self.max_steps != -1:
            raise SteperError(f"TrainingConfig.max_steps={self.max_steps} must be positive, or -1 to use epochs.")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise SteperError("TrainingConfig.num_train_epochs must be positive when max_steps is -1.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise SteperError(f"TrainingConfig.warmup_ratio={self.warmup_ratio} must lie in [0, 1).")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (what `from_dict` reads back)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["stages"] = list(self.stages)
        if isinstance(self.report_to, (list, tuple)):
            data["report_to"] = list(self.report_to)
        if isinstance(self.lora_target_modules, (list, tuple)):
            data["lora_target_modules"] = list(self.lora_target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build a config from `to_dict` output (or a user's YAML/JSON).

        Raises:
            SteperError: A key is not a TrainingConfig field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SteperError(f"Unknown training settings {unknown}: valid keys are {sorted(names)}.")
        values = dict(data)
        if "stages" in values:
            values["stages"] = tuple(values["stages"])
        return cls(**values)

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share with this config to be resumed under it."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}
