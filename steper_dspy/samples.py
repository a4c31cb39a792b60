"""The step sample: one predictor call of a teacher chain, formatted as the student will be prompted.

The harvest writes them, the harvest file stores them, and the trainer reads them: this is their one shape.
"""

from typing import Any, NotRequired, TypedDict


class StepSample(TypedDict):
    """One step of a kept teacher chain.

    Attributes:
        messages: The chat messages, formatted by the student's adapter without demos, ending with the
            assistant's reply (the target).
        stage: The step's stage, a `Stage` value (``"init"``, ``"expand"``, ``"aggregate"``).
        step: The call's index in the chain.
        predictor: The predictor's name in the program.
        example_id: The question's id.
        rollout: Which teacher chain of the question (0 for the first).
        score: The metric's score of the chain's final answer.
        filtered: Why the harvest's step filter flagged this step (absent or None when it did not); a
            teleprompter with a step filter trains without flagged steps.
        layout: The prompt layout of `messages` (`SharedPrefixAdapter.layout`); absent in files written before
            layouts were named, which hold the full ``"shared-prefix"`` layout.
    """

    messages: list[dict[str, Any]]
    stage: str
    step: int
    predictor: str
    example_id: str
    rollout: int
    score: float
    filtered: NotRequired[str | None]
    layout: NotRequired[str]
