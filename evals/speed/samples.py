"""Step samples for the training benchmark, made by the project's own harvest.

The IRCoT program runs over the synthetic multi-hop questions with BM25 retrieval, on a teacher that
follows each question's gold chain (the first sentence of the next supporting passage at every step, the
gold answer at the end). `harvest` turns every call into a stage-tagged chat sample with
`ChatAdapter.format_finetune_data`, exactly as it does for a real teacher, so prompts carry the real
instructions and the passages gathered hop by hop (about 400 to 1,300 SmolLM2 tokens) and targets are
short field-formatted replies (about 30 to 80 tokens). No model and no network are involved.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events

from steper_dspy.adapter import COMPLETED_MARKER
from steper_dspy.errors import SteperError

# About three step samples per question (init, one or two expansions, aggregate); drawn with a margin.
SAMPLES_PER_QUESTION = 2.5
_QUESTION = re.compile(r"\[\[ ## question ## \]\]\n(.*?)\n\n", re.S)
_RATIONALES = re.compile(r"\[\[ ## rationales ## \]\]\n(.*?)\n\n", re.S)


class GoldChainEngine:
    """A DSPy engine that answers every IRCoT step from the question's gold chain.

    Args:
        examples: The questions, with `gold_chain` (supporting titles in hop order) and `answer`.
        corpus: The corpus passages, `{"title": ..., "text": ...}`.
    """

    def __init__(self, examples: list[dspy.Example], corpus: list[dict[str, str]]) -> None:
        self.examples = {str(e.question): e for e in examples}
        self.facts = {p["title"]: p["text"].split(". ")[0].rstrip(".") + "." for p in corpus}
        self._lock = threading.Lock()
        self.calls = 0

    def complete(self, request: Any) -> Response:
        """The reply to one ChatAdapter request of an IRCoT predictor."""
        with self._lock:
            self.calls += 1
        user = request.messages[-1].text
        match = _QUESTION.search(user)
        example = self.examples.get(match.group(1)) if match else None
        if example is None:
            raise SteperError("GoldChainEngine got a request for a question it was not given.")
        chain = list(example.gold_chain)
        done = _RATIONALES.search(user)
        hop = len(json.loads(done.group(1))) if done else 0
        wanted = user.rsplit("Respond with", 1)[-1]
        if "[[ ## answer ## ]]" in wanted:
            text = f"[[ ## rationale ## ]]\nSo the answer is {example.answer}.\n\n[[ ## answer ## ]]\n{example.answer}"
        else:
            fact = self.facts.get(chain[min(hop, len(chain) - 1)], f"{chain[0]} is relevant.")
            text = f"[[ ## rationale ## ]]\n{fact}"
            if "[[ ## sufficient ## ]]" in wanted:
                text += f"\n\n[[ ## sufficient ## ]]\n{hop >= len(chain) - 1}"
        return Response(
            id=None,
            model="gold-chain",
            message=Message.assistant([TextPart(f"{text}\n\n{COMPLETED_MARKER}")]),
            finish_reason="stop",
            usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0),
        )

    def stream(self, request: Any) -> Any:
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def gold_chain_samples(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """At least `n` step samples from a harvest of the IRCoT program on the gold-chain teacher.

    Args:
        n: How many samples are wanted (more questions are drawn for larger `n`).
        seed: Seed of the synthetic questions.

    Returns:
        Harvested samples, `{"messages", "stage", "step", ...}`, in harvest order.
    """
    from steper_dspy.compilers.harvest import harvest
    from steper_dspy.compilers.store import HarvestStore
    from steper_dspy.compilers.student import student_adapter
    from steper_dspy.evals import synthetic_multihop
    from steper_dspy.programs import make_program
    from steper_dspy.retrieval import BM25Retriever

    data = synthetic_multihop(seed=seed, num_questions=max(8, math.ceil(n / SAMPLES_PER_QUESTION) + 4))
    retriever = BM25Retriever(data.corpus)
    student = make_program("ircot", retriever, k=4, max_steps=4)
    teacher = student.deepcopy()
    engine = GoldChainEngine(data.examples, data.corpus)
    teacher.set_lm(dspy.LM("gold-chain/teacher", engine=engine, cache=False, num_retries=0))
    with tempfile.TemporaryDirectory() as tmp:
        store = HarvestStore(Path(tmp) / "harvest.jsonl")
        harvest(
            student,
            teacher,
            data.examples,
            store,
            metric=lambda *_: 1.0,  # every chain is kept: the benchmark needs samples, not a quality filter
            threshold=0.0,
            adapter=student_adapter(),
            progress=False,
        )
        samples = list(store.samples())
    if len(samples) < n:
        raise SteperError(f"The gold-chain harvest gave {len(samples)} samples, fewer than the {n} needed.")
    return samples


def harvest_file_samples(path: str | Path) -> list[dict[str, Any]]:
    """The kept samples of a harvest file (e.g. `runs/quickstart/harvest.jsonl`).

    Raises:
        SteperError: The file holds no kept sample.
    """
    from steper_dspy.compilers.store import HarvestStore

    samples = list(HarvestStore(path).samples())
    if not samples:
        raise SteperError(f"{path} holds no kept step sample.")
    return samples
