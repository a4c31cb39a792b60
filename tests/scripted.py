"""A scripted teacher LM for tests: answers each stage of each question from a script, through DSPy's engine protocol."""

import json
import re
import threading

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage

# A tiny corpus for scripted harvests: each passage names the next hop.
PASSAGES = [
    "Alpha | Alpha was born in Beta.",
    "Beta | Beta is a city in Gamma.",
    "Gamma | Gamma is a country whose capital is Delta.",
    "Delta | Delta lies on the river Epsilon.",
    "Filler | Nothing here.",
]


class ScriptedEngine:
    """Plays `script[question]`: a list of rationales; the chain expands until the list is used up.

    For a question with rationales [r0, r1, ..., rn]: init writes r0, expansion i writes r_i with
    ``sufficient`` True only for the last, aggregation writes "so <answer>" and `answers[question]`.
    A question in `fail` raises; a question in `garbage` gets an unparseable reply.
    """

    def __init__(self, script: dict[str, list[str]], answers: dict[str, str], fail=(), garbage=()):
        self.script, self.answers, self.fail, self.garbage = script, answers, set(fail), set(garbage)
        self.calls = 0
        self._lock = threading.Lock()

    def complete(self, request):
        with self._lock:
            self.calls += 1
        return self._response(self.reply(request.messages[-1].text))

    def reply(self, user: str) -> str:
        """The scripted reply to a request whose last user message is `user`."""
        question = re.search(r"\[\[ ## question ## \]\]\n(.*?)\n\n", user, re.S).group(1)
        if question in self.fail:
            raise RuntimeError(f"teacher down for {question}")
        if question in self.garbage:
            return "I cannot follow formats."
        rationales = self.script[question]
        done = re.search(r"\[\[ ## rationales ## \]\]\n(.*?)\n\n", user, re.S)
        n = len(json.loads(done.group(1))) if done else 0
        if "[[ ## answer ## ]]" in user.split("Respond with")[-1]:
            text = f"[[ ## rationale ## ]]\nso {self.answers[question]}\n\n[[ ## answer ## ]]\n{self.answers[question]}"
        elif done is None:
            text = f"[[ ## rationale ## ]]\n{rationales[0]}"
        else:
            last = n >= len(rationales) - 1
            text = f"[[ ## rationale ## ]]\n{rationales[min(n, len(rationales) - 1)]}\n\n[[ ## sufficient ## ]]\n{last}"
        return text + "\n\n[[ ## completed ## ]]"

    @staticmethod
    def _response(text):
        return Response(
            id=None,
            model="scripted",
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0),
        )

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self):
        pass


def scripted_teacher(script, answers, **kwargs) -> tuple[dspy.LM, ScriptedEngine]:
    engine = ScriptedEngine(script, answers, **kwargs)
    return dspy.LM("scripted/teacher", engine=engine, cache=False, num_retries=0), engine


class ListRetriever:
    """Returns passages whose title is the query's first word, then fillers; honours `exclude`."""

    def __init__(self, passages: list[str]):
        self.passages = passages

    def __call__(self, query, k, exclude=()):
        order = sorted(range(len(self.passages)), key=lambda i: (query.split()[0] not in self.passages[i], i))
        hits = [i for i in order if i not in set(exclude)][:k]
        return dspy.Prediction(passages=[self.passages[i] for i in hits], indices=hits)
