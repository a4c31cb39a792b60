"""The harvest file: one JSON line per teacher chain, appended as chains finish, resumable after a crash."""

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from steper_dspy.errors import SteperError


@dataclass
class ChainRecord:
    """One teacher chain for one question (and rollout): kept with its step samples, or dropped with a reason.

    Attributes:
        example_id: The question's id.
        rollout: Which teacher sample of the question this is (0 for the first).
        kept: Whether the chain passed the metric (and so trains the student).
        reason: Why a chain was dropped (``"metric"``, ``"parse_error"``, ``"error"``), None when kept.
        score: The metric's score of the chain's final answer.
        answer: The teacher's final answer.
        samples: The chain's step samples, in call order: ``{"messages", "stage", "step", "predictor",
            "example_id", "rollout", "score"}``; steps a step filter dropped are absent.
        filtered: ``{reason: count}`` of steps a step filter dropped from a kept chain.
    """

    example_id: str
    rollout: int
    kept: bool
    reason: str | None
    score: float
    answer: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.example_id, self.rollout)


class HarvestStore:
    """An append-only JSONL file of :class:`ChainRecord` lines.

    Each line is written whole, flushed and fsynced before the next chain is started being counted as
    done, so a crash at any moment loses at most the chains still running. A torn last line (the
    process died mid-write) is cut off when the file is opened, and its chain is simply redone.

    Args:
        path: The JSONL file (created with its folder if missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._records: dict[tuple[str, int], ChainRecord] = {}
        self._load()

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[ChainRecord]:
        """All chains in the file, in the order they were written."""
        return list(self._records.values())

    def samples(self) -> Iterator[dict[str, Any]]:
        """The step samples of every kept chain."""
        for record in self._records.values():
            if record.kept:
                yield from record.samples

    def append(self, record: ChainRecord) -> None:
        """Write one chain durably; a chain already in the file is not written twice."""
        line = json.dumps(asdict(record), ensure_ascii=False) + "\n"
        with self._lock:
            if record.key in self._records:
                return
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._records[record.key] = record

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1
        if good_end < len(data):
            # The last write was cut short by a crash: drop the partial line so its chain is redone.
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        for number, line in enumerate(data[:good_end].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = ChainRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as err:
                raise SteperError(
                    f"Harvest file {self.path} line {number} is corrupt ({err}); delete that line "
                    "(its chain is redone) or the file (everything is redone)."
                ) from None
            self._records.setdefault(record.key, record)
