"""Finished evaluations of students, kept per run and test set so that a rerun reuses them.

A benchmark of several systems and seeds is many hours of training and evaluation on a CPU. Each finished
(run, test set) evaluation is written at once (trained runs and the untrained student), keyed by what decides
its outcome and can change between runs: the student's identity (for a trained run the samples' hash, the base
model's fingerprint and the training settings), the engine that generates, the program's settings, and the test
questions with their answers and corpus. A rerun whose key matches reads the record instead of training and
evaluating again; any such change misses the key and the run is computed afresh. With the folder committed (the
run config's ``evaluations``), a benchmark can be finished over several sessions or machines.

What the key cannot see is the code: bump `RECORD_FORMAT` when a change to the programs, the student's prompts or
generation settings, or the metrics changes what an evaluation gives.
"""

import dataclasses
import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from steper_dspy.evals.evaluate import EvaluationReport
from steper_dspy.evals.experiment.config import RunConfig
from steper_dspy.evals.experiment.task import TestSet
from steper_dspy.lm.local import resolve_engine

RECORD_FORMAT = 1


@dataclasses.dataclass
class StoredEvaluation:
    """A finished evaluation read back: its report and the training run it evaluated."""

    report: EvaluationReport
    training: dict[str, Any]


def evaluation_key(student: dict[str, Any], config: RunConfig, testset: TestSet) -> str:
    """sha256 of what decides a student's evaluation on `testset`: the student's identity (for a trained run
    `STEPER.training_identity`), the engine, the program's settings, and the test questions (every field:
    answers, aliases, supporting titles) with their corpus."""
    digest = hashlib.sha256()
    content = {
        "format": RECORD_FORMAT,
        "student": student,
        "engine": resolve_engine(config.engine, config.student),
        "program": config.program,
        "k": config.k,
        "max_steps": config.max_steps,
        "test_set": testset.name,
        "questions": [example.toDict() for example in testset.examples],
    }
    digest.update(json.dumps(content, sort_keys=True, default=str).encode())
    for passage in getattr(testset.retriever, "corpus", None) or []:
        digest.update(passage.encode() + b"\n")
    return digest.hexdigest()


class EvaluationRecords:
    """One gzipped JSON file per run and test set under `folder`: ``<run>/<test set>.json.gz``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, run: str, testset: str) -> Path:
        """Where the record of `run` (e.g. ``steper/seed-0``) on `testset` is kept."""
        return self.folder / run / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', testset)}.json.gz"

    def load(self, run: str, testset: str, key: str) -> StoredEvaluation | None:
        """The record of `run` on `testset` if there is one for `key`, else None (absent, stale or unreadable)."""
        return _read(self.path(run, testset), key)

    def find(self, testset: str, key: str) -> tuple[str, StoredEvaluation] | None:
        """The record of any run on `testset` for `key`, with the run's name, or None.

        Two systems whose trainings are identical (the same samples and settings: e.g. a step filter that
        flagged no step) make the same model, so one's evaluation is the other's.
        """
        for path in sorted(self.folder.rglob(self.path("", testset).name)):
            found = _read(path, key)
            if found is not None:
                return path.parent.relative_to(self.folder).as_posix(), found
        return None

    def save(self, run: str, testset: str, key: str, report: EvaluationReport, training: dict[str, Any]) -> Path:
        """Write the record of `run` on `testset` (atomically: a stopped run leaves no half-written record)."""
        path = self.path(run, testset)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "test_set": testset, "training": training, "report": report.to_dict()}
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as f:
            json.dump(record, f, default=str)
        tmp.replace(path)
        return path


def _read(path: Path, key: str) -> StoredEvaluation | None:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        if data.get("key") != key:
            return None
        return StoredEvaluation(EvaluationReport.from_dict(data["report"]), data.get("training", {}))
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        return None
