"""The three stages of multi-step reasoning that STEPER distils separately."""

from enum import Enum


class Stage(str, Enum):
    """A reasoning stage: which part of a multi-step chain a predictor call produces.

    INIT writes the first rationale from the question and the first passages, EXPAND writes the next
    rationale from everything gathered so far, AGGREGATE writes the final rationale and the answer.
    """

    INIT = "init"
    EXPAND = "expand"
    AGGREGATE = "aggregate"


STAGES: tuple[Stage, ...] = (Stage.INIT, Stage.EXPAND, Stage.AGGREGATE)
