"""Step-wise distillation training: tokenised stage samples, stage-weighted loss, and `train_student`.

Names are imported on first use, so that reading a `TrainingConfig` does not load torch and transformers.
"""

from typing import TYPE_CHECKING

from steper_dspy.lazy import lazy_exports

if TYPE_CHECKING:
    from steper_dspy.training.config import TrainingConfig
    from steper_dspy.training.data import (
        StageCollator,
        TrainingData,
        build_training_data,
        data_hash,
        validate_samples,
    )
    from steper_dspy.training.train import TrainingResult, train_student, training_identity
    from steper_dspy.training.trainer import StageTrainer
    from steper_dspy.training.weighting import StageWeighting

_EXPORTS = {
    "TrainingConfig": "steper_dspy.training.config",
    "StageCollator": "steper_dspy.training.data",
    "TrainingData": "steper_dspy.training.data",
    "build_training_data": "steper_dspy.training.data",
    "data_hash": "steper_dspy.training.data",
    "validate_samples": "steper_dspy.training.data",
    "TrainingResult": "steper_dspy.training.train",
    "training_identity": "steper_dspy.training.train",
    "train_student": "steper_dspy.training.train",
    "StageTrainer": "steper_dspy.training.trainer",
    "StageWeighting": "steper_dspy.training.weighting",
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
    "training_identity",
    "validate_samples",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)
