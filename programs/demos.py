"""Hand-written demonstrations that show a small teacher the expected shape of each stage's output.

They come from a fictional world of their own (no overlap with any dataset). A teacher prompted with them
writes one short fact per step and a short answer span; the student never sees them, because harvested
samples are formatted without demonstrations.
"""

import dspy

_QUESTION = "In which country was the director of the film The Pale Harbor born?"
_FIRST = [
    "The Pale Harbor | The Pale Harbor is a 1979 film directed by Odo Venrik. It was produced by Kalt Pictures.",
    "Pale Harbor Prize | The Pale Harbor Prize was awarded to Mira Tosk in 1990.",
]
_SECOND = [
    "Odo Venrik | Odo Venrik is a director born in 1941 in Lusa. He worked for Kalt Pictures.",
    "Kalt Pictures | Kalt Pictures is a studio founded in 1950 by Ana Brell in Dorva.",
]
_THIRD = ["Lusa | Lusa is a city in Feronia on the river Vell.", "Dorva | Dorva is a city in Samir."]
_FACTS = ["The Pale Harbor was directed by Odo Venrik.", "Odo Venrik was born in Lusa.", "Lusa is a city in Feronia."]


def ircot_demos() -> dict[str, list[dspy.Example]]:
    """One worked 3-hop chain, as demonstrations for the init, expand and aggregate predictors of IRCoT."""
    return {
        "initialize": [dspy.Example(question=_QUESTION, passages=_FIRST, rationale=_FACTS[0])],
        "expand": [
            dspy.Example(
                question=_QUESTION,
                passages=_FIRST + _SECOND,
                rationales=_FACTS[:1],
                rationale=_FACTS[1],
                sufficient=False,
            ),
            dspy.Example(
                question=_QUESTION,
                passages=_FIRST + _SECOND + _THIRD,
                rationales=_FACTS[:2],
                rationale=_FACTS[2],
                sufficient=True,
            ),
        ],
        "aggregate": [
            dspy.Example(
                question=_QUESTION,
                passages=_FIRST + _SECOND + _THIRD,
                rationales=_FACTS,
                rationale="The Pale Harbor was directed by Odo Venrik, who was born in Lusa, a city in Feronia.",
                answer="Feronia",
            )
        ],
    }


def with_demos(program: dspy.Module, demos: dict[str, list[dspy.Example]]) -> dspy.Module:
    """Set the demonstrations of each named predictor of `program` (in place; returns it)."""
    predictors = dict(program.named_predictors())
    for name, examples in demos.items():
        predictors[name].demos = list(examples)
    return program
