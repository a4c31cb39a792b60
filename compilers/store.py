"""The harvest file: one JSON line per teacher chain, appended as chains finish, resumable after a crash."""

import contextlib
import itertools
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from steper_dspy.adapter import LAYOUT
from steper_dspy.errors import SteperError
from steper_dspy.samples import StepSample

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so two writers are not detected there
    fcntl = None


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
        samples: The chain's step samples (`StepSample`), in call order, each with the step filter's verdict.
        filtered: ``{reason: count}`` of steps the step filter flagged in a kept chain.
    """

    example_id: str
    rollout: int
    kept: bool
    reason: str | None
    score: float
    answer: str | None = None
    samples: list[StepSample] = field(default_factory=list)
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

    Only one writer at a time: writing (:meth:`writing`, which :func:`harvest` holds for its whole run, or a
    single :meth:`append`) takes an exclusive advisory lock on ``<file>.lock`` (``flock``, released by the
    kernel even when the process is killed), and a second writer, in this process or another, gets a
    :class:`SteperError` at once. Reading needs no lock; a reader never cuts the file while a writer holds it.

    Args:
        path: The JSONL file (created with its folder if missing).

    Raises:
        SteperError: A complete line of the file is not a valid chain record.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one append at a time within this process
        self._writer_lock = threading.Lock()  # guards taking and releasing the file lock
        self._writers = 0  # open writing() sessions of this object (threads of one harvest share the lock)
        # The sidecar file a writer locks: it holds the writer's pid, and is removed when the writer is done.
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = None
        self._holder = ""  # the pid found in the lock file when another writer held it
        # Only the keys stay in memory; records are streamed from the file, so memory stays flat as it grows.
        self._keys: set[tuple[str, int]] = set()
        # How far the keys have been read: the file's identity, the end of its last complete line, its lines.
        self._file_id: tuple[int, int] | None = None
        self._end = 0
        self._lines = 0
        try:
            locked = self._lock_file()
        except OSError:  # e.g. a read-only folder: the file can still be read
            locked = False
        try:
            # Cutting a torn tail is safe only under the lock: without it, the tail may be a line another
            # harvest is writing right now.
            self._catch_up(repair=locked)
        finally:
            if locked:
                self._unlock_file()

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @contextlib.contextmanager
    def writing(self) -> Iterator["HarvestStore"]:
        """Hold the file's writer lock for a block of appends (re-entrant; the threads of one harvest share it).

        On entry the store first reads any chains another process wrote since it was opened, so that they
        are not written again.

        Yields:
            This store.

        Raises:
            SteperError: Another harvest (another process, or another `HarvestStore` of this file) is writing.
        """
        with self._writer_lock:
            if self._writers == 0:
                if not self._lock_file():
                    raise SteperError(self._busy_message())
                try:
                    with self._lock:
                        self._catch_up(repair=True)
                except BaseException:
                    self._unlock_file()
                    raise
            self._writers += 1
        try:
            yield self
        finally:
            with self._writer_lock:
                self._writers -= 1
                if self._writers == 0:
                    self._unlock_file()

    def records(self) -> Iterator[ChainRecord]:
        """All chains in the file, in the order they were written (read from the file as they are used)."""
        for _, record in self._records_at():
            yield record

    def _records_at(self) -> Iterator[tuple[int, ChainRecord]]:
        """Each chain in the file with the byte offset of its line."""
        seen: set[tuple[str, int]] = set()
        offset = 0
        with open(self.path, "rb") if self.path.exists() else contextlib.nullcontext([]) as lines:
            for raw in lines:
                if not raw.endswith(b"\n"):
                    break  # a line another harvest is still writing
                if raw.strip():
                    record = _parse_record(raw)
                    if record.key not in seen:
                        seen.add(record.key)
                        yield offset, record
                offset += len(raw)

    def samples(self, *, drop_filtered: bool = False, rollouts: int | None = None) -> Iterator[StepSample]:
        """The step samples of every kept chain (without the steps a step filter flagged, if asked), chain by
        chain in the order of (question id, rollout): a harvest writes chains as they finish, so two harvests
        of the same chains (a replay on another machine) give the same samples in the same order, and train
        the same model.

        Args:
            drop_filtered: Leave out the steps a step filter flagged at harvest.
            rollouts: Only each question's first `rollouts` chains (a file harvested with more rollouts
                than a run asks for trains that run on the chains it asked for).
        """
        # Sorted by key and offset only, then read back line by line: the samples are never all in memory.
        wanted = sorted(
            (record.key, offset)
            for offset, record in self._records_at()
            if record.kept and (rollouts is None or record.rollout < rollouts)
        )
        if not wanted:
            return
        with open(self.path, "rb") as f:
            for _, offset in wanted:
                f.seek(offset)
                record = _parse_record(f.readline())
                yield from (s for s in record.samples if not (drop_filtered and s.get("filtered")))

    def check_layout(self, layout: str) -> None:
        """Check that the file's samples are formatted in the prompt layout `layout` (the student's).

        Raises:
            SteperError: They are of another layout: a student trained on them would learn prompts it is never
                asked, and a harvest resumed into the file would mix two layouts.
        """
        for sample in itertools.islice(self.samples(), 1):  # one harvest writes one layout
            found = sample.get("layout", LAYOUT)
            if found != layout:
                raise SteperError(
                    f"{self.path} holds step samples formatted in the prompt layout {found!r}, but the student is "
                    f"prompted in {layout!r}: move the file away and harvest again (a recorded teacher replays "
                    "its calls at no cost)."
                )

    def append(self, record: ChainRecord) -> None:
        """Write one chain durably; a chain already in the file is not written twice.

        Raises:
            SteperError: Another harvest is writing to the file (see :meth:`writing`).
        """
        fields_ = asdict(record)
        # surrogatepass: lone surrogates in a teacher's text are written as they are and read back unchanged;
        # escaping them as \udxxx would turn two adjacent ones into one combined character on reading.
        line = (json.dumps(fields_, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        with self.writing(), self._lock:
            self._catch_up(repair=True)  # one stat when nothing changed; cuts what a failed write left
            if record.key in self._keys:
                return
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if self._file_id is None:  # this append created the file
                self._file_id = _file_id(self.path)
            self._end += len(line)
            self._lines += 1
            self._keys.add(record.key)

    def _catch_up(self, *, repair: bool) -> None:
        """Read the keys of the lines written since the last read (all of them if the file was replaced).

        With `repair`, a torn last line is cut off, and a whole last record missing its newline gets one.
        """
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        file_id = (stat.st_dev, stat.st_ino) if stat else None
        if file_id != self._file_id or (stat and stat.st_size < self._end):
            self._keys.clear()
            self._file_id, self._end, self._lines = file_id, 0, 0
        if stat is None or stat.st_size == self._end:
            return
        keys: list[tuple[str, int]] = []
        end, lines, tail = self._end, self._lines, b""
        # Binary line iteration splits on b"\n" only: str.splitlines() would also break at U+2028, U+0085 and
        # other characters that json.dumps(ensure_ascii=False) leaves unescaped inside a record. The file is
        # left untouched when a complete line is corrupt.
        with open(self.path, "rb") as f:
            f.seek(end)
            for raw in f:
                if not raw.endswith(b"\n"):
                    tail = raw
                    break
                lines += 1
                end += len(raw)
                if not raw.strip():
                    continue
                try:
                    record = _parse_record(raw)
                except (ValueError, TypeError, RecursionError) as err:  # UnicodeDecodeError, JSONDecodeError included
                    raise SteperError(
                        f"Harvest file {self.path} line {lines} is corrupt ({err}); delete that line "
                        "(its chain is redone) or the file (everything is redone)."
                    ) from None
                keys.append(record.key)
        self._keys.update(keys)
        self._end, self._lines = end, lines
        if not tail or not repair:
            return
        try:
            record = _parse_record(tail) if tail.strip() else None
        except (ValueError, TypeError, RecursionError):
            record = None
        with open(self.path, "r+b") as f:
            if record is None:
                # The last write was cut short by a crash: drop the partial line so its chain is redone.
                f.truncate(end)
            else:
                # A whole record missing only its newline (e.g. a hand-edited file): keep it, end the line.
                f.seek(end + len(tail))
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        if record is not None:
            self._keys.add(record.key)
            self._end, self._lines = end + len(tail) + 1, lines + 1

    def _lock_file(self) -> bool:
        """Take the exclusive lock on the sidecar file without waiting; False if another writer holds it."""
        if fcntl is None:
            return True
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                return False
            # The previous holder removes the file when done; if it did so between our open and our lock, we
            # hold a lock on a removed file, which nobody else sees: try again with the current one.
            if _file_id(self._lock_path) == _fd_id(fd):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def _unlock_file(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        # Removed while still locked, so that no other writer can be holding a lock on it by then.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock_path)
        os.close(fd)

    def _busy_message(self) -> str:
        holder = self._holder
        if holder == str(os.getpid()):
            who = "another HarvestStore of this process"
        elif holder.isdigit():
            who = f"another harvest (pid {holder})"
        else:
            who = "another harvest"
        return (
            f"Harvest file {self.path} is locked: {who} is writing to it. Wait for it to finish, or harvest "
            "into another file."
        )


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def _fd_id(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return (stat.st_dev, stat.st_ino)


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
