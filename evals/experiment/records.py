"""Finished evaluations of trained runs, kept per run and test set so that a rerun reuses them.

A benchmark of several systems and seeds is many hours of training and evaluation on a CPU. Each finished
(run, test set) evaluation is written at once, keyed by everything that decides its outcome: the training run's
identity (the samples' hash, the base model's fingerprint, the training settings), the program and the test
questions. A rerun whose key matches reads the record instead of training and evaluating again; any change
(another harvest, seed, setting or question) misses the key and the run is computed afresh. With the folder
committed (the run config's ``evaluations``), a benchmark can be finished over several sessions or machines.
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

RECORD_FORMAT = 1


@dataclasses.dataclass
class StoredEvaluation:
    """A finished evaluation read back: its report and the training run it evaluated."""

    report: EvaluationReport
    training: dict[str, Any]


def evaluation_key(training_identity: dict[str, Any], config: RunConfig, testset: TestSet) -> str:
    """sha256 of what decides a trained run's evaluation on `testset`: the training identity (see
    `STEPER.training_identity`), the program's settings and the test questions."""
    content = {
        "format": RECORD_FORMAT,
        "training": training_identity,
        "program": config.program,
        "k": config.k,
        "max_steps": config.max_steps,
        "test_set": testset.name,
        "questions": [[getattr(e, "id", None), e.question] for e in testset.examples],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


class EvaluationRecords:
    """One gzipped JSON file per run and test set under `folder`: ``<run>/<test set>.json.gz``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, run: str, testset: str) -> Path:
        """Where the record of `run` (e.g. ``steper/seed-0``) on `testset` is kept."""
        return self.folder / run / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', testset)}.json.gz"

    def load(self, run: str, testset: str, key: str) -> StoredEvaluation | None:
        """The record of `run` on `testset` if there is one for `key`, else None (absent, stale or unreadable)."""
        path = self.path(run, testset)
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, EOFError, ValueError):
            return None
        if data.get("key") != key:
            return None
        return StoredEvaluation(EvaluationReport.from_dict(data["report"]), data.get("training", {}))

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
