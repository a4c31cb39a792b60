"""The shared-prefix prompt layout: the steps of a chain share their longest prefix, demos included."""

import os

import dspy

from steper_dspy.adapter import SYSTEM_MESSAGE, SharedPrefixAdapter, student_adapter, teacher_adapter
from steper_dspy.compilers.student import run_with_adapter
from steper_dspy.programs import IRCoT
from steper_dspy.programs.demos import ircot_demos, with_demos
from tests.harvest_driver import script
from tests.scripted import PASSAGES, ListRetriever, scripted_teacher


def _chain_prompts(program, lm, question):
    before = len(lm.history)
    program(question=question)
    return [_chat_text(entry["messages"]) for entry in lm.history[before:]]


def _chat_text(messages):
    return "".join(f"<{m['role']}>{m['content']}" for m in messages)


def _teacher(with_builtin_demos):
    rationales, answers = script(4)
    lm, _ = scripted_teacher(rationales, answers)
    program = IRCoT(ListRetriever(PASSAGES), k=2, max_steps=5)
    if with_builtin_demos:
        with_demos(program, ircot_demos())
    program.set_lm(lm)
    return run_with_adapter(program, teacher_adapter(program)), lm, list(rationales)


def test_each_step_shares_the_whole_prompt_of_the_one_before_up_to_its_new_passages():
    program, lm, questions = _teacher(with_builtin_demos=True)
    prompts = _chain_prompts(program, lm, questions[2])  # init, three expansions, aggregate
    assert len(prompts) == 5
    for earlier, later in zip(prompts, prompts[1:], strict=False):
        shared = os.path.commonprefix([earlier, later])
        # Everything up to the end of the earlier step's passages is shared: system, demos, question, passages.
        passages_end = earlier.index("[[ ## passages ## ]]")
        passages_end = earlier.index('"]', passages_end) + 1
        assert len(shared) >= passages_end
    assert prompts[0].startswith(f"<system>{SYSTEM_MESSAGE}")


def test_the_demos_of_every_stage_are_in_every_teacher_prompt_in_one_order():
    program, lm, questions = _teacher(with_builtin_demos=True)
    prompts = _chain_prompts(program, lm, questions[1])
    demo_block = prompts[0][: prompts[0].rindex("<user>")]
    assert all(prompt.startswith(demo_block) for prompt in prompts)
    for stage_demos in ircot_demos().values():
        assert stage_demos[0].rationale in demo_block


def test_the_student_prompt_is_the_layout_without_demos_or_instructions_and_parses_like_the_chat_adapter():
    signature = IRCoT(ListRetriever(PASSAGES)).aggregate.signature
    inputs = {"question": "Where?", "passages": ["A | a"], "rationales": ["x."]}
    messages = student_adapter().format(signature, demos=[], inputs=inputs)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == SYSTEM_MESSAGE
    user = messages[1]["content"]
    step = f"Your step: {signature.__name__}"
    assert user.index("[[ ## question ## ]]") < user.index("[[ ## passages ## ]]") < user.index(step)
    assert user.index(step) < user.index("`[[ ## answer ## ]]`")  # the output fields are still named
    assert "Your objective:" not in user and signature.instructions.split(":")[0] not in user
    assert "Your objective:" in SharedPrefixAdapter().format(signature, demos=[], inputs=inputs)[1]["content"]
    assert student_adapter().layout != SharedPrefixAdapter().layout
    reply = "[[ ## rationale ## ]]\nSo Beta.\n\n[[ ## answer ## ]]\nBeta\n\n[[ ## completed ## ]]"
    assert student_adapter().parse(signature, reply) == dspy.ChatAdapter().parse(signature, reply)
    assert SharedPrefixAdapter().format_finetune_data(signature, [], inputs, {"rationale": "r", "answer": "a"})[
        "messages"
    ][:-1] == SharedPrefixAdapter().format(signature, demos=[], inputs=inputs)
