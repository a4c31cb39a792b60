"""IRCoT: interleave BM25 retrieval with one-sentence reasoning steps, in the three STEPER stages."""

from steper_dspy.programs.multistep import MultiStepRAG
from steper_dspy.programs.signatures import AggregateReasoning, ExpandReasoning, InitializeReasoning


class IRCoT(MultiStepRAG):
    """Interleaving retrieval with chain-of-thought (Trivedi et al., 2023), staged for STEPER.

    Each rationale is one fact sentence, and the next retrieval uses it as the query. Returns
    ``dspy.Prediction(answer, rationale, rationales, passages, steps)``. See :class:`MultiStepRAG`.
    """

    init_signature = InitializeReasoning
    expand_signature = ExpandReasoning
    aggregate_signature = AggregateReasoning
