"""Step-wise distillation training: tokenised stage samples, stage-weighted loss, and `train_student`.

Names are imported on first use, so that reading a `TrainingConfig` does not load torch and transformers.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steper_dspy.training.config import TrainingConfig
    from steper_dspy.training.data import (
        StageCollator,
        TrainingData,
        build_training_data,
        data_hash,
        validate_samples,
    )
    from steper_dspy.training.train import TrainingResult, train_student
    from steper_dspy.training.trainer import StageTrainer
    from steper_dspy.training.weighting import StageWeighting

_EXPORTS = {
    "TrainingConfig": "config",
    "StageCollator": "data",
    "TrainingData": "data",
    "build_training_data": "data",
    "data_hash": "data",
    "validate_samples": "data",
    "TrainingResult": "train",
    "train_student": "train",
    "StageTrainer": "trainer",
    "StageWeighting": "weighting",
}

__all__ = [
    "StageCollator",
    "StageTrainer",
    "StageWeighting",
    "TrainingConfig",
    "TrainingData",
    "TrainingResult",
    "build_training_data",
    "data_hash",
    "train_student",
    "validate_samples",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
