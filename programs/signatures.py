"""The three STEPER stage signatures: instructions short and concrete, so small models can follow them."""

import dspy


class InitializeReasoning(dspy.Signature):
    """Read the passages and write ONE short sentence stating the first fact needed to answer the question.
    Use only facts from the passages. Do not answer yet unless one fact answers it."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="passages retrieved for the question")
    rationale: str = dspy.OutputField(desc="one sentence with one fact from the passages")


class ExpandReasoning(dspy.Signature):
    """Given the facts found so far and the passages, write ONE short sentence with the next fact needed to
    answer the question. Use only facts from the passages. Then say whether the facts now suffice to answer."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="all passages retrieved so far")
    rationales: list[str] = dspy.InputField(desc="facts found so far, in order")
    rationale: str = dspy.OutputField(desc="one sentence with the next fact from the passages")
    sufficient: bool = dspy.OutputField(desc="True if the facts so far answer the question")


class AggregateReasoning(dspy.Signature):
    """Combine the facts found so far into one short final sentence, then give the answer as a short span
    (a name, a date, a place, yes or no), not a sentence."""

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
