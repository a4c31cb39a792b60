"""Programs by name: the built-in staged programs, or a user's as ``module:Class``."""

import importlib

import dspy

from steper_dspy.errors import SteperError
from steper_dspy.programs.ircot import IRCoT
from steper_dspy.programs.multistep import Retriever
from steper_dspy.programs.self_ask import SelfAsk
from steper_dspy.programs.stages import predictor_stages

PROGRAMS = {"ircot": IRCoT, "self-ask": SelfAsk}


def make_program(name: str, retriever: Retriever, *, k: int = 4, max_steps: int = 5) -> dspy.Module:
    """Build a staged program: ``ircot``, ``self-ask`` or ``module:Class`` (called as ``Class(retriever, k=, max_steps=)``)."""
    if name in PROGRAMS:
        cls = PROGRAMS[name]
    elif ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise SteperError(f"Cannot import program {name!r}: {err}.") from None
    else:
        raise SteperError(f"Unknown program {name!r}: use {', '.join(PROGRAMS)} or module:Class.")
    program = cls(retriever, k=k, max_steps=max_steps)
    predictor_stages(program)
    return program
