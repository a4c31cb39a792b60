"""Generation speed: the same real requests through the sequential engine, the batched one, and vLLM.

Workloads (the same requests and questions for every engine):

- ``recording``: the chat requests of the shipped quickstart recording (real IRCoT init / expand / aggregate
  prompts with the teacher's demos), sent one per call at the engine's concurrency;
- ``2wiki`` / ``hotpotqa``: whole IRCoT chains on the first dev questions of each file, each over its own
  corpus, run through `evaluate_program` as an evaluation or a harvest runs them (the teacher with its built-in
  demos, the student with its own adapter).

Engines: ``transformers-sequential`` (the in-process engine one request at a time and without its prefix cache,
as before this project's batching), ``transformers-batched`` (concurrent requests decoded in one continuous
batch, prompt prefixes computed before reused) and ``vllm`` (a managed server at each concurrency; its prefix
cache is emptied between runs, so no run reuses another's prompts). Each output is compared with the sequential
engine's: ``greedy_identical`` is the share that is the same (reply text for the recording, the final answer
for chains).

Run it with `steper speed generation -o DIR`.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from steper_dspy.adapter import COMPLETED_MARKER
from steper_dspy.errors import SteperError
from steper_dspy.evals.speed.common import bar_plot, machine, write_json

DATA = Path("../shared/data/multihop")
WORKLOAD_FILES = {"2wiki": "2wikimultihopqa_dev164.jsonl", "hotpotqa": "hotpotqa_dev200.jsonl"}
# transformers-workers: the batched engine in one worker process per core (see steper_dspy.lm.workers).
ENGINES = ("transformers-sequential", "transformers-batched", "transformers-workers", "vllm")


@dataclass
class GenerationBenchmark:
    """Settings of the generation comparison.

    Args:
        teacher: The teacher model (folder, GGUF file or hub id).
        student: The student model.
        models: Which of the two to run: ``teacher``, ``student``.
        engines: Which engines to run (see `ENGINES`).
        workloads: ``recording`` and the chain workloads (``2wiki``, ``hotpotqa``).
        recording_calls: Requests of the recording sent per run.
        questions: Dev questions per chain workload.
        batch_size: Requests per batch (and threads) of the batched in-process engine.
        concurrency: Concurrent requests (DSPy threads) of each vLLM run.
        max_tokens: New-token limit per call.
        data_dir: Where the dev files of the chain workloads are.
        k: Passages retrieved per step.
        max_steps: Most reasoning calls per chain.
    """

    teacher: str = "~/.cache/steper/models/qwen2.5-coder-1.5b.gguf"
    student: str | None = None
    models: tuple[str, ...] = ("teacher", "student")
    engines: tuple[str, ...] = ENGINES
    workloads: tuple[str, ...] = ("recording", "2wiki", "hotpotqa")
    recording_calls: int = 16
    questions: int = 6
    batch_size: int = 8
    concurrency: tuple[int, ...] = (1, 8, 16)
    max_tokens: int = 128
    data_dir: str = str(DATA)
    k: int = 4
    max_steps: int = 4


def run_generation_benchmark(settings: GenerationBenchmark, out: Path) -> dict[str, Any]:
    """Run every (model, engine, concurrency, workload) and write ``results.json`` and ``generation.png``."""
    from steper_dspy.evals.experiment.quickstart import smollm2_student

    unknown = set(settings.engines) - set(ENGINES)
    if unknown:
        raise SteperError(f"Unknown engines {sorted(unknown)}: use {', '.join(ENGINES)}.")
    unknown_models = set(settings.models) - {"teacher", "student"}
    if unknown_models:
        raise SteperError(f"Unknown models {sorted(unknown_models)}: use teacher, student.")
    # The default student is looked up only when it runs: it may not be on this machine.
    paths = {"teacher": lambda: settings.teacher, "student": lambda: settings.student or smollm2_student()}
    models = {role: paths[role]() for role in settings.models}
    models = {
        role: str(Path(path).expanduser()) if Path(path).expanduser().exists() else path
        for role, path in models.items()
    }
    from steper_dspy.evals.experiment.report import console

    workloads = {name: _workload(name, settings) for name in settings.workloads}
    runs = len(settings.models) * len(settings.workloads) * _engine_runs(settings)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache between runs
    rows: list[dict[str, Any]] = []
    results = {"rows": rows, "machine": machine(), "settings": _settings_json(settings)}
    for role in settings.models:
        reference: dict[str, list[Any]] = {}
        for engine, concurrency, lm, reset in _engines(models[role], settings, out):
            for name, workload in workloads.items():
                reset()
                row, outputs = workload.run(lm, role=role, concurrency=concurrency)
                reference.setdefault(name, outputs)  # the first engine run is the sequential one
                same = sum(a == b for a, b in zip(outputs, reference[name], strict=True))
                row.update(engine=engine, model=role, model_path=models[role], concurrency=concurrency,
                           workload=name, greedy_identical=same / len(outputs))  # fmt: skip
                rows.append(row)
                write_json(out / "results.json", results)  # after every run: a long benchmark keeps what it did
                per = (
                    f"{row['seconds_per_question']:.1f} s/question"
                    if row["seconds_per_question"]
                    else f"{row['seconds_per_call']:.2f} s/call"
                )
                console.print(f"[{len(rows)}/{runs}] {role} {engine} x{concurrency} {name}: {per}")
    _add_ratios(rows)
    write_json(out / "results.json", results)
    _plot(rows, out / "generation.png")
    return results


@dataclass
class _Workload:
    name: str
    requests: list[Any] = field(default_factory=list)
    examples: list[Any] = field(default_factory=list)
    retriever: Any = None
    settings: GenerationBenchmark | None = None

    def run(self, lm: Any, *, role: str, concurrency: int) -> tuple[dict[str, Any], list[Any]]:
        return self._calls(lm, concurrency) if self.requests else self._chains(lm, role, concurrency)

    def _calls(self, lm: Any, concurrency: int) -> tuple[dict[str, Any], list[Any]]:
        from steper_dspy.evals.evaluate import usage_counts

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            responses = list(pool.map(lambda request: _call(lm, request), self.requests))
        seconds = time.perf_counter() - start
        counts = [usage_counts(usage) for _, usage in responses]
        generated = sum(c[0] for c in counts)
        row = {
            "calls": len(self.requests),
            "seconds": seconds,
            "seconds_per_call": seconds / len(self.requests),
            "seconds_per_question": None,
            "tokens_per_second": generated / seconds,
            "prompt_tokens": sum(c[1] for c in counts),
            "cached_prompt_tokens": sum(c[2] for c in counts),
        }
        return row, [_normalised(text) for text, _ in responses]

    def _chains(self, lm: Any, role: str, concurrency: int) -> tuple[dict[str, Any], list[Any]]:
        from steper_dspy.adapter import teacher_adapter
        from steper_dspy.compilers.student import run_on_student, run_with_adapter
        from steper_dspy.evals.evaluate import evaluate_program
        from steper_dspy.programs import IRCoT
        from steper_dspy.programs.demos import ircot_demos, with_demos

        program = IRCoT(self.retriever, k=self.settings.k, max_steps=self.settings.max_steps)
        if role == "teacher":
            with_demos(program, ircot_demos())
            program.set_lm(lm)
            run_with_adapter(program, teacher_adapter(program))
        else:
            run_on_student(program, lm)
        report = evaluate_program(program, self.examples, num_threads=concurrency, display_progress=False)
        calls = sum(row["steps"] or 0 for row in report.rows)
        row = {
            "calls": calls,
            "seconds": report.seconds,
            "seconds_per_call": report.seconds / calls if calls else None,
            "seconds_per_question": report.seconds / len(report.rows),
            "tokens_per_second": report.completion_tokens / report.seconds,
            "prompt_tokens": report.prompt_tokens,
            "cached_prompt_tokens": report.cached_prompt_tokens,
            "accuracy": report.accuracy,
        }
        return row, [r["predicted"] for r in report.rows]


def _workload(name: str, settings: GenerationBenchmark) -> _Workload:
    if name == "recording":
        return _Workload(name, requests=_recorded_requests(settings.recording_calls))
    if name not in WORKLOAD_FILES:
        raise SteperError(f"Unknown workload {name!r}: use recording, {', '.join(WORKLOAD_FILES)}.")
    from steper_dspy.evals import load_multihop
    from steper_dspy.retrieval import BM25Retriever

    path = Path(settings.data_dir) / WORKLOAD_FILES[name]
    if not path.is_file():
        raise SteperError(f"The {name} workload needs {path} (../shared/data/multihop); pass --data-dir.")
    data = load_multihop(path)
    return _Workload(
        name, examples=data.examples[: settings.questions], retriever=BM25Retriever(data.corpus), settings=settings
    )


def _recorded_requests(n: int) -> list[Any]:
    """The first `n` requests of the shipped quickstart recording, as DSPy requests (greedy, its max_tokens)."""
    from dspy.lm15 import Config, Message, Request

    from steper_dspy.evals.experiment.quickstart import recorded_teacher_path

    requests = []
    for line in recorded_teacher_path().read_text().splitlines():
        record = json.loads(line)
        if "key" not in record:
            continue
        messages = record["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        turns = tuple(Message.user(m["content"]) if m["role"] == "user" else Message.assistant(m["content"])
                      for m in messages if m["role"] != "system")  # fmt: skip
        settings = record.get("settings", {})
        config = Config(temperature=0.0, max_tokens=settings.get("max_tokens"), stop=tuple(settings.get("stop") or ()))
        requests.append(Request(model="recorded", system=system, messages=turns, config=config))
        if len(requests) == n:
            break
    return requests


def _call(lm: Any, request: Any) -> tuple[str, dict[str, Any]]:
    import dataclasses

    response = lm(dataclasses.replace(request, model=lm.model))
    usage = response.usage
    return response.text, {
        "output_tokens": usage.output_tokens or 0,
        "input_tokens": usage.input_tokens or 0,
        "cache_read_tokens": usage.cache_read_tokens or 0,
    }


def _normalised(text: str) -> str:
    # vLLM may end a reply at the end marker without printing it; the replies are the same otherwise.
    return text.replace(COMPLETED_MARKER, "").strip()


def _engine_runs(settings: GenerationBenchmark) -> int:
    """How many (engine, concurrency) runs `_engines` yields per model."""
    in_process = sum(
        e in settings.engines for e in ("transformers-sequential", "transformers-batched", "transformers-workers")
    )
    return in_process + (len(settings.concurrency) if "vllm" in settings.engines else 0)


def _engines(model: str, settings: GenerationBenchmark, out: Path) -> Any:
    """(engine name, concurrency, LM, reset) for every run of one model, the sequential engine first."""
    from steper_dspy.lm.local import local_lm, vllm_lm

    def no_reset() -> None:
        return None

    if "transformers-sequential" in settings.engines:  # the engine before batching and prefix caching
        lm = local_lm(
            model,
            engine="transformers",
            max_batch_size=1,
            prefix_cache_tokens=0,
            max_tokens=settings.max_tokens,
            cache=False,
            workers=1,
        )
        yield "transformers-sequential", 1, lm, no_reset
        _unload(lm)
    batch = settings.batch_size
    for name, workers in (("transformers-batched", 1), ("transformers-workers", None)):
        if name in settings.engines:
            lm = local_lm(
                model,
                engine="transformers",
                max_batch_size=batch,
                max_tokens=settings.max_tokens,
                cache=False,
                workers=workers,
            )
            yield name, lm.engine.max_concurrency, lm, no_reset
            _unload(lm)
    if "vllm" in settings.engines:
        lm = vllm_lm(model, max_tokens=settings.max_tokens, cache=False, log_path=out / f"vllm-{Path(model).stem}.log")
        base = lm.kwargs["api_base"].removesuffix("/v1")

        def reset() -> None:
            request = urllib.request.Request(f"{base}/reset_prefix_cache", method="POST")
            with urllib.request.urlopen(request, timeout=60):
                pass

        for concurrency in settings.concurrency:
            yield "vllm", concurrency, lm, reset


def _unload(lm: Any) -> None:
    """Free an in-process model once its runs are done: a vLLM server started next needs the memory (a 1.5B
    teacher and a 135M student left loaded got the benchmark OOM-killed on a 24 GB machine)."""
    import gc

    lm.engine.close()
    gc.collect()


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's speed-up over the sequential engine on the same model and workload."""
    for row in rows:
        base = next(
            (r for r in rows if r["engine"] == "transformers-sequential" and r["model"] == row["model"]
             and r["workload"] == row["workload"]),
            None,
        )  # fmt: skip
        key = "seconds_per_call" if row["workload"] == "recording" else "seconds_per_question"
        row["speedup"] = base[key] / row[key] if base and row.get(key) else None


def print_results(results: dict[str, Any]) -> None:
    """The table: one row per run, with its speed-up over the sequential engine."""
    from steper_dspy.evals.experiment.report import console

    table = Table(title=f"Generation on {results['machine']['cpu']} ({results['machine']['cores']} cores)")
    for header in ("model", "workload", "engine", "concurrency", "s/call", "s/question", "tokens/s", "cached %",
                   "speed-up", "greedy identical"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("model", "workload", "engine") else "right")
    for row in results["rows"]:
        cached = 100 * row["cached_prompt_tokens"] / row["prompt_tokens"] if row["prompt_tokens"] else 0.0
        table.add_row(
            row["model"],
            row["workload"],
            row["engine"],
            str(row["concurrency"]),
            _fmt(row["seconds_per_call"], ".2f"),
            _fmt(row["seconds_per_question"], ".1f"),
            _fmt(row["tokens_per_second"], ".1f"),
            f"{cached:.0f}",
            _fmt(row.get("speedup"), ".2f", "x"),
            f"{100 * row['greedy_identical']:.0f}%",
        )
    console.print(table)


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table, for BENCHMARKS.md."""
    lines = [
        "| model | workload | engine | concurrency | s/call | s/question | tokens/s | cached prompt | speed-up | greedy identical |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        cached = 100 * row["cached_prompt_tokens"] / row["prompt_tokens"] if row["prompt_tokens"] else 0.0
        lines.append(
            f"| {row['model']} | {row['workload']} | {row['engine']} | {row['concurrency']} | "
            f"{_fmt(row['seconds_per_call'], '.2f')} | {_fmt(row['seconds_per_question'], '.1f')} | "
            f"{_fmt(row['tokens_per_second'], '.1f')} | {cached:.0f}% | {_fmt(row.get('speedup'), '.2f', 'x')} | "
            f"{100 * row['greedy_identical']:.0f}% |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    panels = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for workload in dict.fromkeys(r["workload"] for r in rows if r["model"] == model):
            runs = [r for r in rows if r["model"] == model and r["workload"] == workload]
            labels = [f"{r['engine'].replace('transformers-', 'tf-')}\nx{r['concurrency']}" for r in runs]
            panels.append((f"{model}, {workload}: speed-up", labels, {"speed-up": [r.get("speedup") for r in runs]}))
    return bar_plot(path, panels)


def _settings_json(settings: GenerationBenchmark) -> dict[str, Any]:
    return asdict(settings)
