"""The harvest file: one JSON line per teacher chain, appended as chains finish, resumable after a crash."""

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
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
    process died mid-write) is cut off when the file is opened, and its chain is simply redone; a whole
    record missing only its newline is kept. Every complete line must be a valid record: any other line
    (not UTF-8, not JSON, a missing or mistyped field) raises :class:`SteperError` naming the file and the
    line, and the file is left as it was.

    Args:
        path: The JSONL file (created with its folder if missing).

    Raises:
        SteperError: A complete line of the file is not a valid chain record.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Only the keys stay in memory; records are streamed from the file, so memory stays flat as it grows.
        self._keys: set[tuple[str, int]] = set()
        self._load()

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def records(self) -> Iterator[ChainRecord]:
        """All chains in the file, in the order they were written (read from the file as they are used)."""
        seen: set[tuple[str, int]] = set()
        with open(self.path, "rb") if self.path.exists() else contextlib.nullcontext([]) as lines:
            for raw in lines:
                if raw.strip():
                    record = _parse_record(raw)
                    if record.key not in seen:
                        seen.add(record.key)
                        yield record

    def samples(self) -> Iterator[dict[str, Any]]:
        """The step samples of every kept chain."""
        for record in self.records():
            if record.kept:
                yield from record.samples

    def append(self, record: ChainRecord) -> None:
        """Write one chain durably; a chain already in the file is not written twice."""
        fields_ = asdict(record)
        # surrogatepass: lone surrogates in a teacher's text are written as they are and read back unchanged;
        # escaping them as \udxxx would turn two adjacent ones into one combined character on reading.
        line = (json.dumps(fields_, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        with self._lock:
            if record.key in self._keys:
                return
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._keys.add(record.key)

    def _load(self) -> None:
        if not self.path.exists():
            return
        good_end, tail = 0, b""
        # Binary line iteration splits on b"\n" only: str.splitlines() would also break at U+2028, U+0085 and
        # other characters that json.dumps(ensure_ascii=False) leaves unescaped inside a record. The file is
        # left untouched when a complete line is corrupt.
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    tail = raw
                    break
                good_end += len(raw)
                if not raw.strip():
                    continue
                try:
                    record = _parse_record(raw)
                except (ValueError, TypeError, RecursionError) as err:  # UnicodeDecodeError, JSONDecodeError included
                    raise SteperError(
                        f"Harvest file {self.path} line {number} is corrupt ({err}); delete that line "
                        "(its chain is redone) or the file (everything is redone)."
                    ) from None
                self._keys.add(record.key)
        if not tail:
            return
        try:
            record = _parse_record(tail) if tail.strip() else None
        except (ValueError, TypeError, RecursionError):
            record = None
        with open(self.path, "r+b") as f:
            if record is None:
                # The last write was cut short by a crash: drop the partial line so its chain is redone.
                f.truncate(good_end)
            else:
                # A whole record missing only its newline (e.g. a hand-edited file): keep it, end the line.
                f.seek(good_end + len(tail))
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        if record is not None:
            self._keys.add(record.key)


_REQUIRED = {f.name for f in fields(ChainRecord) if f.default is MISSING and f.default_factory is MISSING}
_KNOWN = {f.name for f in fields(ChainRecord)}


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_record(raw: bytes) -> ChainRecord:
    """One line of the file as a ChainRecord; ValueError naming what is wrong with it."""
    value = json.loads(raw.decode("utf-8", "surrogatepass"))
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {_kind(value)}, not an object")
    if missing := sorted(_REQUIRED - value.keys()):
        raise ValueError(f"missing field(s) {missing}")
    if unknown := sorted(value.keys() - _KNOWN):
        raise ValueError(f"unknown field(s) {unknown}")

    def check(name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"field {name!r} is {_shown(value[name])}, not {expected}")

    number = (int, float)
    check("example_id", isinstance(value["example_id"], str), "a string")
    rollout = value["rollout"]
    check("rollout", isinstance(rollout, int) and not isinstance(rollout, bool) and rollout >= 0, "an int >= 0")
    check("kept", isinstance(value["kept"], bool), "true or false")
    check("reason", value["reason"] is None or isinstance(value["reason"], str), "a string or null")
    check("score", isinstance(value["score"], number) and not isinstance(value["score"], bool), "a number")
    samples = value.setdefault("samples", [])
    check("samples", isinstance(samples, list), "a list")
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict) or not isinstance(sample.get("stage"), str):
            raise ValueError(f"samples[{index}] is not an object with a string 'stage'")
    filtered = value.setdefault("filtered", {})
    check(
        "filtered",
        isinstance(filtered, dict) and all(isinstance(n, int) and not isinstance(n, bool) for n in filtered.values()),
        "an object of counts",
    )
    try:
        score = float(value["score"])
    except OverflowError:
        raise ValueError("field 'score' is too large for a float") from None
    return ChainRecord(**{**value, "score": score})
