"""Self-Ask: the same three STEPER stages over decomposed sub-questions."""

from steper_dspy.programs.multistep import MultiStepRAG
from steper_dspy.programs.signatures import AggregateReasoning, AnswerAndAskNext, AskFirstSubquestion


class SelfAsk(MultiStepRAG):
    """Self-Ask with retrieval (Press et al., 2023), staged for STEPER.

    Init asks the first sub-question; each expansion answers the last sub-question from the passages and
    asks the next (the next retrieval uses that text); aggregation answers the question. Same loop and
    output as :class:`IRCoT`, different reasoning format: STEPER is not tied to one framework.
    """

    init_signature = AskFirstSubquestion
    expand_signature = AnswerAndAskNext
    aggregate_signature = AggregateReasoning
