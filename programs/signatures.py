"""The three STEPER stage signatures: instructions short and concrete, so small models can follow them."""

import dspy


class InitializeReasoning(dspy.Signature):
    """Write ONE short sentence with the first fact needed to answer the question, taken from the passages.
    Name the entities exactly as the passages do."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="passages retrieved for the question")
    rationale: str = dspy.OutputField(desc="one sentence with one fact from the passages")


class ExpandReasoning(dspy.Signature):
    """Write ONE short sentence with the NEXT fact needed to answer the question, taken from the passages.
    It must be new: follow the chain from the entity in the last fact. Then say whether the facts so far
    are enough to answer the question."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="all passages retrieved so far")
    rationales: list[str] = dspy.InputField(desc="facts found so far, in order")
    rationale: str = dspy.OutputField(desc="one sentence with the next fact from the passages")
    sufficient: bool = dspy.OutputField(
        desc="True only if the facts so far give exactly what the question asks for (e.g. the country, not the city)"
    )


class AggregateReasoning(dspy.Signature):
    """Answer the question from the facts and the passages: write one short sentence that concludes the
    reasoning, then give the answer as a short span, not a sentence. The answer must be exactly what the
    question asks for: a country for "which country", a year for "what year", a person for "who"."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="all passages retrieved so far")
    rationales: list[str] = dspy.InputField(desc="facts found so far, in order")
    rationale: str = dspy.OutputField(desc="one sentence that concludes the reasoning")
    answer: str = dspy.OutputField(desc="short answer span only")


class AskFirstSubquestion(dspy.Signature):
    """Break the question into simple steps. Read the passages and ask the FIRST simple sub-question
    whose answer is needed to answer the question."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="passages retrieved for the question")
    rationale: str = dspy.OutputField(desc="the first sub-question, one short question")


class AnswerAndAskNext(dspy.Signature):
    """Answer the last sub-question from the passages in one short sentence, then ask the next simple
    sub-question. Say whether the answers so far suffice to answer the main question."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="all passages retrieved so far")
    rationales: list[str] = dspy.InputField(desc="sub-questions and their answers so far, in order")
    rationale: str = dspy.OutputField(desc="'<answer to the last sub-question>. <next sub-question>?'")
    sufficient: bool = dspy.OutputField(desc="True if the answers so far answer the main question")
