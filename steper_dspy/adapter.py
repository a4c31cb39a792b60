"""The prompt layout of staged programs: DSPy's ChatAdapter, reordered so that the steps of a chain share a prefix.

DSPy's ChatAdapter opens every prompt with a system message built from the signature (its fields and its
instructions), so the init, expand and aggregate prompts of one chain differ from their first token and every
step recomputes the question and every passage seen so far. `SharedPrefixAdapter` keeps the ChatAdapter's
field markers and parsing but moves everything that depends on the signature behind the inputs:

    system:  one message, the same for every predictor (what the field markers mean)
    demos:   user/assistant pairs, each laid out like the request below: the demos of EVERY predictor of the
             program, in the same order for each (see `shared_demos`), so that they too are the same for all
    user:    [[ ## question ## ]] ... [[ ## passages ## ]] [...] [[ ## rationales ## ]] [...]
             the step's objective, its output fields, the answer-format reminder

Consecutive steps of a chain then share the system message, the demos, the question and the passages of the
earlier step (passages are only ever appended), and a prefix-caching server (vLLM) or a packed training batch
computes them once; the demos, the same for every call, are computed once for the whole run. Training samples
are formatted by the same adapter (`format_finetune_data`), so the student is trained on exactly the prompts
it is asked at inference.

A student is prompted without the signatures' instructions (`step_instructions=False`): fine-tuning teaches it
each step, which it tells apart by the step's name and its input and output fields, and the ~110 tokens of
instructions per step would otherwise be computed again at every step of every chain, in training and at
inference (a quarter of the quickstart's prompt tokens).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import dspy
from dspy.adapters.utils import get_field_description_string
from dspy.signatures.signature import Signature

# ChatAdapter's end marker: generation stops right after it (in process and on vLLM) and keeps it.
COMPLETED_MARKER = "[[ ## completed ## ]]"
SYSTEM_MESSAGE = (
    "You carry out one step of a multi-step question-answering program. Each request gives its input fields, "
    "each after a header of the form [[ ## name ## ]], then the objective of the step and its output fields. "
    "Write every output field after its own [[ ## name ## ]] header, in the order given, and end with "
    f"{COMPLETED_MARKER}."
)


# Names of the layouts (see `SharedPrefixAdapter.layout`); a harvest file's samples must be of the student's.
LAYOUT = "shared-prefix"
COMPACT_LAYOUT = "shared-prefix-compact"


class SharedPrefixAdapter(dspy.ChatAdapter):
    """A `dspy.ChatAdapter` whose system message is the same for every signature, with the step-specific
    instructions after the inputs, so that the prompts of a chain's steps share their longest prefix.

    Parsing, field formatting and the JSON fallback are the ChatAdapter's.

    Args:
        shared_demos: The demos of every predictor of the program, as ``(signature, demos)`` pairs in the
            program's order (see :func:`program_demos`). When given, every prompt shows all of them (each
            formatted for its own signature), whatever the calling predictor's own demos are.
        step_instructions: Show each signature's instructions and output field descriptions after the inputs;
            without them a step is named by its signature's name (for a fine-tuned student).
        **kwargs: `dspy.ChatAdapter` arguments (e.g. ``use_json_adapter_fallback=False``).
    """

    def __init__(
        self,
        shared_demos: Sequence[tuple[type[Signature], list[Any]]] | None = None,
        *,
        step_instructions: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.shared_demos = list(shared_demos) if shared_demos else None
        self.step_instructions = step_instructions
        self._demo_messages: list[dict[str, Any]] | None = None

    @property
    def layout(self) -> str:
        """Names the prompt layout, stored with every harvested sample: samples of another layout would train
        the student on prompts it is never asked."""
        return LAYOUT if self.step_instructions else COMPACT_LAYOUT

    def format_demos(self, signature: type[Signature], demos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.shared_demos is None:
            return super().format_demos(signature, demos)
        if self._demo_messages is None:
            messages = []
            for shared_signature, items in self.shared_demos:
                messages.extend(super().format_demos(shared_signature, items))
            self._demo_messages = messages
        return self._demo_messages

    def format_system_message(self, signature: type[Signature]) -> str:
        return SYSTEM_MESSAGE

    def format_user_message_content(
        self,
        signature: type[Signature],
        inputs: dict[str, Any],
        prefix: str = "",
        suffix: str = "",
        main_request: bool = False,
    ) -> str:
        # The inputs first, without the output-format reminder; the step's own text after them.
        fields = super().format_user_message_content(signature, inputs, prefix=prefix)
        parts = [fields, self.format_step_description(signature)]
        if main_request and (requirements := self.user_message_output_requirements(signature)):
            parts.append(requirements)
        parts.append(suffix)
        return "\n\n".join(part for part in parts if part).strip()

    def format_step_description(self, signature: type[Signature]) -> str:
        """The signature's objective and output fields, which the ChatAdapter puts in the system message (or
        only the step's name, without `step_instructions`)."""
        if not self.step_instructions:
            return f"Your step: {signature.__name__}"
        instructions = textwrap.dedent(signature.instructions).strip()
        return (
            f"Your objective: {instructions}\n\n"
            f"Your output fields are:\n{get_field_description_string(signature.output_fields)}"
        )


def program_demos(program: dspy.Module) -> list[tuple[type[Signature], list[Any]]]:
    """Each predictor's signature and demos, in the program's order (for `SharedPrefixAdapter(shared_demos=)`)."""
    return [
        (predictor.signature, list(predictor.demos)) for _, predictor in program.named_predictors() if predictor.demos
    ]


def teacher_adapter(program: dspy.Module | None = None) -> SharedPrefixAdapter:
    """The adapter a teacher runs with: the shared-prefix layout with the demos of all of `program`'s predictors
    in every prompt, and DSPy's JSON fallback for a reply it cannot parse (a second chance that costs one more
    call, never a sample: samples are formatted anew, without demos)."""
    return SharedPrefixAdapter(shared_demos=program_demos(program) if program is not None else None)


def student_adapter(*, instructions: bool = False) -> SharedPrefixAdapter:
    """The adapter a student runs with: the one its training prompts were formatted with (without the steps'
    instructions), and no JSON fallback, so a parse failure never triggers a second generation in a format it
    never saw.

    Args:
        instructions: Show the steps' instructions, for a student that was not trained on the program (the
            untrained baseline): without them it cannot know what a step asks.
    """
    return SharedPrefixAdapter(step_instructions=instructions, use_json_adapter_fallback=False)
