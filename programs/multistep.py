"""The loop shared by staged multi-step RAG programs: retrieve, initialize, expand until sufficient, aggregate."""

from collections.abc import Callable

import dspy

from steper_dspy.stages import Stage

Retriever = Callable[..., dspy.Prediction]


class MultiStepRAG(dspy.Module):
    """A multi-step RAG program whose three predictors are the STEPER stages.

    Retrieve with the question and run the init predictor; then retrieve with the latest rationale and
    run the expansion predictor until it says the evidence suffices or the step budget is spent; finally
    retrieve once more with the last rationale and run the aggregation predictor over everything gathered.
    Subclasses choose the three signatures.

    Args:
        retriever: Called as ``retriever(query, k, exclude=indices)``, returning a prediction with
            ``passages`` and ``indices`` (e.g. :class:`steper_dspy.retrieval.BM25Retriever`).
        k: Passages retrieved per step.
        max_steps: Most reasoning calls in a chain, init and aggregate included (so at most
            ``max_steps - 2`` expansions).
    """

    init_signature: type[dspy.Signature]
    expand_signature: type[dspy.Signature]
    aggregate_signature: type[dspy.Signature]
    stages = {"initialize": Stage.INIT, "expand": Stage.EXPAND, "aggregate": Stage.AGGREGATE}

    def __init__(self, retriever: Retriever, *, k: int = 4, max_steps: int = 5):
        super().__init__()
        if max_steps < 2:
            raise ValueError("max_steps must be at least 2 (init and aggregate)")
        self.retriever = retriever
        self.k = k
        self.max_steps = max_steps
        self.initialize = dspy.Predict(self.init_signature)
        self.expand = dspy.Predict(self.expand_signature)
        self.aggregate = dspy.Predict(self.aggregate_signature)

    def forward(self, question: str) -> dspy.Prediction:
        evidence = Evidence(self.retriever, self.k)
        evidence.retrieve(question)
        rationales = [self.initialize(question=question, passages=evidence.passages).rationale]
        while len(rationales) < self.max_steps - 1:
            evidence.retrieve(rationales[-1] or question)
            step = self.expand(question=question, passages=evidence.passages, rationales=list(rationales))
            rationales.append(step.rationale)
            if step.sufficient:
                break
        # IRCoT retrieves after every sentence it writes: the last fact's entity (e.g. the city in "X was born
        # in Y") often holds the final hop (Y's country), and this costs no LM call.
        evidence.retrieve(rationales[-1] or question)
        final = self.aggregate(question=question, passages=evidence.passages, rationales=list(rationales))
        return dspy.Prediction(
            answer=final.answer,
            rationale=final.rationale,
            rationales=[*rationales, final.rationale],
            passages=evidence.passages,
            steps=len(rationales) + 1,
        )


class Evidence:
    """The passages a chain has gathered so far, each retrieved at most once."""

    def __init__(self, retriever: Retriever, k: int):
        self.retriever = retriever
        self.k = k
        self.passages: list[str] = []
        self.indices: list[int] = []

    def retrieve(self, query: str) -> None:
        """Add the top-k passages for `query` that the chain has not seen yet."""
        hits = self.retriever(query, self.k, exclude=self.indices)
        self.passages = [*self.passages, *hits.passages]
        self.indices = [*self.indices, *hits.indices]
