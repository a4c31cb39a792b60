"""Staged multi-step RAG programs: each predictor is one STEPER stage (init, expand, aggregate)."""

from steper_dspy.programs.ircot import IRCoT
from steper_dspy.programs.multistep import Evidence, MultiStepRAG
from steper_dspy.programs.registry import PROGRAMS, make_program
from steper_dspy.programs.self_ask import SelfAsk
from steper_dspy.programs.signatures import (
    AggregateReasoning,
    AnswerAndAskNext,
    AskFirstSubquestion,
    ExpandReasoning,
    InitializeReasoning,
)
from steper_dspy.programs.stages import predictor_stages, stage_by_predictor_id

__all__ = [
    "PROGRAMS",
    "AggregateReasoning",
    "AnswerAndAskNext",
    "AskFirstSubquestion",
    "Evidence",
    "ExpandReasoning",
    "IRCoT",
    "InitializeReasoning",
    "MultiStepRAG",
    "SelfAsk",
    "make_program",
    "predictor_stages",
    "stage_by_predictor_id",
]
