"""A slow scripted harvest of 12 questions into one file: the process tests/test_crash_resume.py kills with SIGKILL.

Run as ``python -m tests.harvest_driver PATH [--slow-writes]`` from the repository root. It prints ``ready``
just before harvesting, ``write`` before each piece of a slowed write (``--slow-writes`` writes every chain
record in 4 flushed pieces with a pause between them, so a kill can land in the middle of a line), and at the
end one JSON line ``{"chains", "new_chains", "kept", "lm_failures"}``.

The questions and teacher are importable too (:func:`questions`, :func:`script`, :class:`SlowEngine`).
"""

import argparse
import builtins
import importlib.util
import json
import sys
import time

import dspy

from tests.scripted import PASSAGES, ListRetriever, ScriptedEngine

# (question, rationales, answer): 3, 3, 5 and 3 teacher calls per chain
BASE = [
    ("Where was Alpha born?", ["Alpha was born in Beta."], "Beta"),
    ("Which country is Alpha's city in?", ["Alpha was born in Beta.", "Beta is a city in Gamma."], "Gamma"),
    (
        "Which river flows through the capital of the country of Alpha's city?",
        [
            "Alpha was born in Beta.",
            "Beta is a city in Gamma.",
            "Gamma is a country whose capital is Delta.",
            "Delta lies on the river Epsilon.",
        ],
        "Epsilon",
    ),
    ("What is the capital of Gamma?", ["Gamma is a country whose capital is Delta."], "Delta"),
]


def script(n: int = 12) -> tuple[dict[str, list[str]], dict[str, str]]:
    """`n` distinct scripted questions (variants of 4 base questions): their rationales and answers."""
    rationales, answers = {}, {}
    for i in range(n):
        question, steps, answer = BASE[i % len(BASE)]
        question = f"{question} (variant {i // len(BASE)})"
        rationales[question], answers[question] = steps, answer
    return rationales, answers


def questions(n: int = 12) -> list[dspy.Example]:
    """The trainset: example ids ``q0``.. with the question and its gold answer."""
    _, answers = script(n)
    return [
        dspy.Example(id=f"q{i}", question=q, answer=a).with_inputs("question")
        for i, (q, a) in enumerate(answers.items())
    ]


def exact(example, pred, trace=None):
    return float(pred.answer == example.answer)


class SlowEngine(ScriptedEngine):
    """A ScriptedEngine that takes `delay` seconds per call, like a (fast) real teacher."""

    def __init__(self, *args, delay: float = 0.04, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def complete(self, request):
        time.sleep(self.delay)
        return super().complete(request)


class _SlowFile:
    """A file whose writes go to the OS in `pieces` flushed parts with a pause between them (a slow disk)."""

    def __init__(self, file, pieces: int = 4, pause: float = 0.005):
        self._file, self._pieces, self._pause = file, pieces, pause

    def write(self, data):
        step = max(1, -(-len(data) // self._pieces))
        for start in range(0, len(data), step):
            print("write", flush=True)
            self._file.write(data[start : start + step])
            self._file.flush()
            time.sleep(self._pause)
        return len(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _slow_open(file, mode="r", *args, **kwargs):
    handle = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by _SlowFile.__exit__)
    return _SlowFile(handle) if "a" in mode else handle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--slow-writes", action="store_true")
    parser.add_argument("--delay", type=float, default=0.04)
    args = parser.parse_args(argv)

    # steper_dspy.compilers/__init__ imports the trainer (torch, transformers: ~5 s per process); the harvest
    # needs none of it, so this process registers the package without running its __init__.
    if "steper_dspy.compilers" not in sys.modules:
        spec = importlib.util.find_spec("steper_dspy.compilers")
        sys.modules["steper_dspy.compilers"] = importlib.util.module_from_spec(spec)
    from steper_dspy.compilers import store as store_module
    from steper_dspy.compilers.harvest import harvest
    from steper_dspy.programs.ircot import IRCoT

    if args.slow_writes:
        store_module.open = _slow_open  # only HarvestStore's own file opens go through it

    rationales, answers = script()
    engine = SlowEngine(rationales, answers, delay=args.delay)
    student = IRCoT(ListRetriever(PASSAGES), k=1, max_steps=5)
    teacher = student.deepcopy()
    teacher.set_lm(dspy.LM("scripted/teacher", engine=engine, cache=False, num_retries=0))
    store = store_module.HarvestStore(args.path)
    print("ready", flush=True)
    report = harvest(student, teacher, questions(), store, metric=exact, progress=False)
    summary = {k: getattr(report, k) for k in ("chains", "new_chains", "kept", "lm_failures")}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
