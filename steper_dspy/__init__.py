"""steper-dspy: compile multi-step retrieval-augmented reasoning programs into small local models (STEPER).

Everything a user needs is importable from here; names load on first use, so `import steper_dspy` stays fast::

    from steper_dspy import STEPER, IRCoT, BM25Retriever, load_multihop, evaluate_program
"""

from steper_dspy.errors import SteperError
from steper_dspy.lazy import lazy_exports
from steper_dspy.stages import STAGES, Stage

__version__ = "0.1.0"

_EXPORTS = {
    # Teleprompters and what they return
    "STEPER": "steper_dspy.compilers",
    "VanillaKD": "steper_dspy.compilers",
    "StepwiseKD": "steper_dspy.compilers",
    "GroundedStepFilter": "steper_dspy.compilers",
    "load_compiled": "steper_dspy.compilers",
    "TrainingConfig": "steper_dspy.training",
    # Programs and retrieval
    "IRCoT": "steper_dspy.programs",
    "SelfAsk": "steper_dspy.programs",
    "MultiStepRAG": "steper_dspy.programs",
    "BM25Retriever": "steper_dspy.retrieval",
    # Local models
    "local_lm": "steper_dspy.lm",
    "recorded_lm": "steper_dspy.lm",
    # Data and evaluation
    "load_multihop": "steper_dspy.evals",
    "train_test_split": "steper_dspy.evals",
    "evaluate_program": "steper_dspy.evals",
    "answer_exact_match": "steper_dspy.metrics",
    "answer_f1": "steper_dspy.metrics",
}

__all__ = [
    "BM25Retriever",
    "GroundedStepFilter",
    "IRCoT",
    "MultiStepRAG",
    "STAGES",
    "STEPER",
    "SelfAsk",
    "Stage",
    "SteperError",
    "StepwiseKD",
    "TrainingConfig",
    "VanillaKD",
    "answer_exact_match",
    "answer_f1",
    "evaluate_program",
    "load_compiled",
    "load_multihop",
    "local_lm",
    "recorded_lm",
    "train_test_split",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
