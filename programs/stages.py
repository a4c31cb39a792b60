"""How a compiler learns which STEPER stage each predictor of a program belongs to.

A program declares its stages once, as a class attribute mapping the attribute name of each predictor
(or of the module that wraps it, such as a ``dspy.ChainOfThought``) to a :class:`~steper_dspy.Stage`::

    class MyRAG(dspy.Module):
        stages = {"first": Stage.INIT, "more": Stage.EXPAND, "answer": Stage.AGGREGATE}

        def __init__(self, retriever):
            super().__init__()
            self.first = dspy.Predict(InitializeReasoning)
            self.more = dspy.ChainOfThought(ExpandReasoning)
            self.answer = dspy.Predict(AggregateReasoning)

Every predictor must have a stage; a program whose predictor has none is rejected with the name of the
predictor and the fix. Trace entries are matched to stages by predictor identity, never by position, so
chains with any number of expansion steps are tagged right.
"""

import dspy

from steper_dspy.errors import SteperError
from steper_dspy.stages import Stage


def predictor_stages(program: dspy.Module) -> dict[str, Stage]:
    """Map each predictor name of `program` (as in ``program.named_predictors()``) to its stage.

    Args:
        program: A DSPy module with a ``stages`` class attribute.

    Returns:
        ``{predictor_name: Stage}`` for every predictor of the program.

    Raises:
        SteperError: The program declares no stages, names an unknown stage, or has a predictor with no stage.
    """
    declared = getattr(program, "stages", None)
    name = type(program).__name__
    if not isinstance(declared, dict) or not declared:
        raise SteperError(
            f"Program {name} declares no reasoning stages: add a class attribute like "
            "`stages = {'initialize': Stage.INIT, 'expand': Stage.EXPAND, 'aggregate': Stage.AGGREGATE}` "
            "mapping each predictor's attribute name to its stage."
        )
    try:
        declared = {prefix: Stage(stage) for prefix, stage in declared.items()}
    except ValueError as err:
        raise SteperError(f"Program {name}.stages: {err}; stages are {[s.value for s in Stage]}.") from None

    mapping: dict[str, Stage] = {}
    for predictor_name, _ in program.named_predictors():
        stage = _stage_for(predictor_name, declared)
        if stage is None:
            raise SteperError(
                f"Predictor '{predictor_name}' of program {name} has no stage: add it to {name}.stages "
                f"(known: {sorted(declared)})."
            )
        mapping[predictor_name] = stage
    if not mapping:
        raise SteperError(f"Program {name} has no predictors to distil.")
    return mapping


def stage_by_predictor_id(program: dspy.Module) -> dict[int, tuple[str, Stage]]:
    """Map ``id(predictor)`` to ``(predictor_name, stage)``, for tagging the entries of a trace."""
    stages = predictor_stages(program)
    return {id(predictor): (pname, stages[pname]) for pname, predictor in program.named_predictors()}


def _stage_for(predictor_name: str, declared: dict[str, Stage]) -> Stage | None:
    # The longest declared prefix that ends on a name boundary wins: "expand" covers "expand.predict".
    matches = [p for p in declared if predictor_name == p or predictor_name.startswith(p + ".")]
    return declared[max(matches, key=len)] if matches else None
