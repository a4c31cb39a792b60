import dspy
import pytest

from steper_dspy.compilers import bootstrap_demos
from steper_dspy.errors import SteperError
from steper_dspy.lm.errors import ServerDiedError
from steper_dspy.programs import IRCoT
from tests.scripted import PASSAGES, ListRetriever, ScriptedEngine
from tests.test_harvest import ANSWERS, SCRIPT, exact, examples

ALPHA, COUNTRY, RIVER, WRONG = list(SCRIPT)
DOWN = "Who is down?"  # its every call raises


class DyingEngine(ScriptedEngine):
    """A scripted teacher whose server dies on the questions in `fail`."""

    def reply(self, user: str) -> str:
        if any(f"[[ ## question ## ]]\n{question}\n" in user for question in self.fail):
            raise ServerDiedError("The vLLM server has died (log: vllm.log).")
        return super().reply(user)


def bootstrap(questions, engine_class=ScriptedEngine, **kwargs):
    engine = engine_class({**SCRIPT, DOWN: ["x"]}, {**ANSWERS, DOWN: "x"}, fail=[DOWN])
    program = IRCoT(ListRetriever(PASSAGES), k=1)
    teacher = program.deepcopy()
    teacher.set_lm(dspy.LM("scripted/teacher", engine=engine, cache=False, num_retries=0))
    gold = {**ANSWERS, WRONG: "Venus", DOWN: "x"}  # the teacher's answer to WRONG fails the metric
    return bootstrap_demos(program, teacher, examples(questions, gold), metric=exact, **kwargs), engine


def test_bootstrap_takes_the_first_passing_chains_past_failed_and_wrong_questions():
    demos, engine = bootstrap([DOWN, WRONG, ALPHA, COUNTRY, RIVER], max_demos=2)
    questions = {name: [demo.question for demo in items] for name, items in demos.items()}
    assert questions["initialize"] == [ALPHA, COUNTRY]
    assert questions["aggregate"] == [ALPHA, COUNTRY]
    assert RIVER not in str(demos)  # two chains passed: the rest is not tried
    assert engine.calls == 1 + 3 + 3 + 3  # DOWN fails at its first call; WRONG, ALPHA and COUNTRY run whole


def test_a_dead_teacher_server_stops_the_bootstrap_at_once():
    with pytest.raises(ServerDiedError, match="has died"):
        bootstrap([ALPHA, DOWN, COUNTRY, RIVER], engine_class=DyingEngine, max_demos=3)


def test_no_passing_chain_names_the_failures():
    with pytest.raises(SteperError, match=r"on the 2 questions tried \(1 failed with an error, the first: .*down"):
        bootstrap([WRONG, DOWN])
