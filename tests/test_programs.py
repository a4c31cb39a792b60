import dspy
import pytest
from dspy.utils import DummyLM

from steper_dspy import Stage, SteperError
from steper_dspy.programs import IRCoT, SelfAsk, predictor_stages, stage_by_predictor_id
from steper_dspy.programs.signatures import InitializeReasoning


class CountingRetriever:
    """Returns k fresh passages per call, named after the query, honouring `exclude`."""

    def __init__(self):
        self.queries: list[str] = []
        self.excluded: list[list[int]] = []

    def __call__(self, query, k, exclude=()):
        self.queries.append(query)
        self.excluded.append(list(exclude))
        start = len(exclude)
        return dspy.Prediction(
            passages=[f"P{i} | about {query}" for i in range(start, start + k)], indices=list(range(start, start + k))
        )


def chain(expansions: int, *, last_sufficient: bool = True) -> list[dict]:
    answers = [{"rationale": "fact 0"}]
    for i in range(expansions):
        done = last_sufficient and i == expansions - 1
        answers.append({"rationale": f"fact {i + 1}", "sufficient": str(done)})
    answers.append({"rationale": "so X", "answer": "X"})
    return answers


@pytest.mark.parametrize("program_cls", [IRCoT, SelfAsk])
@pytest.mark.parametrize("expansions", [1, 3])
def test_loop_expands_until_sufficient(program_cls, expansions):
    retriever = CountingRetriever()
    program = program_cls(retriever, k=2, max_steps=6)
    with dspy.context(lm=DummyLM(chain(expansions))):
        pred = program(question="Q?")
    assert pred.answer == "X"
    assert pred.steps == expansions + 2
    assert pred.rationales == [f"fact {i}" for i in range(expansions + 1)] + ["so X"]
    # one retrieval for the question, then one with each rationale as the query (the last before aggregating)
    assert retriever.queries == ["Q?"] + [f"fact {i}" for i in range(expansions + 1)]
    assert len(pred.passages) == 2 * (expansions + 2)
    assert retriever.excluded[-1] == list(range(2 * (expansions + 1)))


def test_max_steps_caps_expansions_and_zero_expansions_possible():
    retriever = CountingRetriever()
    with dspy.context(lm=DummyLM(chain(3, last_sufficient=False))):
        pred = IRCoT(retriever, k=1, max_steps=5)(question="Q?")
    assert pred.steps == 5 and len(pred.rationales) == 5
    with dspy.context(lm=DummyLM(chain(0))):
        pred = IRCoT(CountingRetriever(), k=1, max_steps=2)(question="Q?")
    assert pred.steps == 2 and pred.rationales == ["fact 0", "so X"]


def test_max_steps_must_allow_init_and_aggregate():
    with pytest.raises(ValueError, match="max_steps"):
        IRCoT(CountingRetriever(), max_steps=1)


def test_builtin_programs_map_every_predictor_to_a_stage():
    assert predictor_stages(IRCoT(CountingRetriever())) == {
        "initialize": Stage.INIT,
        "expand": Stage.EXPAND,
        "aggregate": Stage.AGGREGATE,
    }
    program = SelfAsk(CountingRetriever())
    by_id = stage_by_predictor_id(program)
    assert by_id[id(program.expand)] == ("expand", Stage.EXPAND)
    assert program.expand.signature.__name__ == "AnswerAndAskNext"


class UserProgram(dspy.Module):
    stages = {"first": "init", "more": Stage.EXPAND, "final": Stage.AGGREGATE}

    def __init__(self):
        super().__init__()
        self.first = dspy.ChainOfThought(InitializeReasoning)
        self.more = dspy.Predict("question -> rationale")
        self.final = dspy.Predict("question -> answer")


def test_user_program_with_wrapped_predictors():
    stages = predictor_stages(UserProgram())
    assert stages == {"first.predict": Stage.INIT, "more": Stage.EXPAND, "final": Stage.AGGREGATE}


def test_unstaged_predictor_is_named_in_the_error():
    program = UserProgram()
    program.extra = dspy.Predict("question -> answer")
    with pytest.raises(SteperError, match="'extra'.*UserProgram.stages"):
        predictor_stages(program)


def test_program_without_stages_and_bad_stage_names():
    class Plain(dspy.Module):
        def __init__(self):
            super().__init__()
            self.p = dspy.Predict("question -> answer")

    with pytest.raises(SteperError, match="declares no reasoning stages"):
        predictor_stages(Plain())
    Plain.stages = {"p": "middle"}
    with pytest.raises(SteperError, match="'middle' is not a valid Stage"):
        predictor_stages(Plain())
