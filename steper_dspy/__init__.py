"""steper-dspy: compile multi-step retrieval-augmented reasoning programs into small local models (STEPER)."""

from steper_dspy.errors import SteperError
from steper_dspy.stages import STAGES, Stage

__all__ = ["STAGES", "SteperError", "Stage"]
__version__ = "0.1.0"
