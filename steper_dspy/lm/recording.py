"""Record a live LM's answers to a JSONL file and replay them later without it.

`recorded_lm(path, lm)` wraps any `dspy.LM` (an API model, `local_lm`, a local server): every request it has
not seen is sent to `lm` and its answer appended to `path` as one JSON line, flushed and fsynced at once, so an
interrupted run keeps everything it paid for. `recorded_lm(path)` answers from the file alone, which makes
teacher runs reproducible offline and tests independent of a live model.

A path ending in ``.gz`` is a gzip recording, for committing a large one: it is read whole, and every append
is one more gzip member (a valid gzip file throughout; ``gzip -dc f | gzip -9`` recompresses it as one).
"""

from __future__ import annotations

import contextvars
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import dspy
from dspy._vendor.lm15.serde import part_to_dict, request_to_dict, response_from_dict, response_to_dict
from dspy.clients.engines.base import validate_request
from dspy.lm15 import Request, Response, Usage, response_to_events

from steper_dspy.errors import SteperError
from steper_dspy.lm.errors import SteperLMError
from steper_dspy.lm.threaded import ThreadedAsyncEngine

logger = logging.getLogger(__name__)

Mode = Literal["record", "replay", "auto"]
FORMAT_VERSION = 1
# Generation settings copied from the live LM; anything else in its kwargs (api_base, headers) stays out.
_SETTINGS = (
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "reasoning_effort",
)
# Config fields that do not change what the model answers.
_KEY_EXCLUDED_CONFIG = {"cache", "user_id", "store", "service_tier"}
_GZIP_PIECE = 1 << 16  # bytes fed to the decompressor at a time when reading a .gz recording
_SECRET = re.compile(r"(api_?key|secret|password|authorization|access_?token|bearer)", re.IGNORECASE)


@dataclasses.dataclass
class _CallInfo:
    rollout_id: Any
    n: int
    done: int = 0  # candidates completed so far in this call


# Engines see one Request per candidate and never n or rollout_id; RecordedLM passes them down through this.
_CALL: contextvars.ContextVar[_CallInfo | None] = contextvars.ContextVar("steper_recorded_call", default=None)


def request_key(request: Request, *, rollout_id: Any = None, n: int = 1, candidate: int = 0) -> str:
    """A stable hash of what decides an answer: messages, tools, generation settings, rollout id, candidate.

    The model string is left out, so a recording replays under any wrapper name.
    """
    payload = {
        "messages": _messages(request),
        "settings": _settings(request),
        "tools": request_to_dict(request).get("tools") if request.tools else None,
        "rollout_id": rollout_id,
        "n": n,
        "candidate": candidate,
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _messages(request: Request) -> list[dict[str, Any]]:
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else [part_to_dict(p) for p in request.system]
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        content = message.text if message.text is not None else [part_to_dict(p) for p in message.parts]
        messages.append({"role": message.role, "content": content})
    return messages


def _settings(request: Request) -> dict[str, Any]:
    config = dataclasses.asdict(request.config)
    settings = {k: v for k, v in config.items() if v is not None and k not in _KEY_EXCLUDED_CONFIG}
    if isinstance(settings.get("extensions"), dict):
        settings["extensions"] = {k: v for k, v in settings["extensions"].items() if not _SECRET.search(k)}
    return json.loads(json.dumps(settings, default=str))


def _last_user_text(request: Request) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return (message.text or "<non-text content>")[:200]
    return "<no user message>"


class RecordingEngine:
    """A DSPy engine that answers from a JSONL recording and appends the live LM's answers to new requests.

    Args:
        path: The recording file (JSON lines, gzipped when it ends in ``.gz``), created on the first recorded
            answer.
        lm: The live LM to call for requests not in the file; None replays only.
        mode: `"replay"`: answer from the file only. `"record"`: answer recorded requests from the file (a
            resumed run never pays twice) and the others through `lm`, appending them. `"auto"`: record when
            `lm` is given, else replay.
    """

    def __init__(self, path: str | Path, lm: dspy.BaseLM | None = None, *, mode: Mode = "auto"):
        if mode not in ("record", "replay", "auto"):
            raise SteperError(f"Unknown recording mode {mode!r}: use 'record', 'replay' or 'auto'.")
        if mode == "record" and lm is None:
            raise SteperError("mode='record' needs a live LM: pass recorded_lm(path, lm=dspy.LM(...)).")
        self.path = Path(path).expanduser().resolve()
        self.lm = lm
        self.mode = mode
        self.live = lm is not None and mode != "replay"
        if not self.live and not self.path.is_file():
            raise SteperError(
                f"No recording at {str(self.path)!r} to replay: record one first by running with a live teacher "
                "LM, recorded_lm(path, lm=dspy.LM(...), mode='record')."
            )
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._header: dict[str, Any] | None = None
        self._repair: int | None = None  # byte offset to cut a torn last line at before appending
        self._load()
        self.settings = self.default_settings()  # the wrapper's defaults, written to the file's header

    def __deepcopy__(self, memo: dict[int, Any]) -> RecordingEngine:
        # A copied program (rollouts, DSPy's optimizers) records into the same file through the same engine:
        # two engines appending to one file would race, and the live LM is a client, not state to duplicate.
        return self

    @property
    def model_string(self) -> str:
        """`steper-record/<live model>` while recording; `steper-replay/<file>@<content hash>` when replaying."""
        if self.live:
            return f"steper-record/{self.lm.model}"
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        return f"steper-replay/{self.path.stem}@{digest}"

    def default_settings(self) -> dict[str, Any]:
        """Generation settings for the wrapping LM: the live LM's, else those recorded in the file's header.

        The wrapper must send the same settings on replay as when recording, or no request would match.
        """
        if self.lm is not None:
            return _generation_settings(getattr(self.lm, "kwargs", {}))
        return dict((self._header or {}).get("settings", {}))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def gzipped(self) -> bool:
        return self.path.suffix == ".gz"

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if self.gzipped:
            data, whole = _gzip_members(data)
            if whole is not None:  # an interrupted append: its member is dropped and written over next time
                self._repair = whole
        offset = 0
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            end = offset + len(raw)
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                if end == len(data) and not self.gzipped:  # an interrupted write: drop it, write over it next time
                    self._repair = offset
                else:
                    logger.warning("Skipping unreadable line %d of recording %s", number, self.path)
                offset = end
                continue
            if not raw.endswith(b"\n") and not self.gzipped:
                self._repair = end  # complete but unterminated: add the newline before appending
            if "header" in record:
                self._header = record["header"]
            elif "key" in record and "response" in record:
                self._entries.setdefault(record["key"], record["response"])
            offset = end

    def complete(self, request: Request) -> Response:
        """Answer one request from the recording, or through the live LM (recording the answer)."""
        validate_request(request)
        info = _CALL.get()
        rollout_id, n, candidate = (info.rollout_id, info.n, info.done) if info else (None, 1, 0)
        key = request_key(request, rollout_id=rollout_id, n=n, candidate=candidate)
        with self._lock:
            stored = self._entries.get(key)
        if stored is not None:
            # A replayed answer generates nothing, so it reports no usage, as DSPy's cache does for a hit.
            response = dataclasses.replace(response_from_dict(stored), usage=Usage())
        elif self.live:
            response = self._call_live(request, rollout_id, candidate)
            self._record(key, request, rollout_id, n, candidate, response)
        else:
            raise SteperLMError(
                f"This request was not recorded in {str(self.path)!r} (last user message: "
                f"{_last_user_text(request)!r}). Re-record it by running with a live teacher LM, "
                "recorded_lm(path, lm=dspy.LM(...), mode='record'); the program, inputs or generation settings "
                "(temperature, max_tokens, n, rollout_id) must match the recorded run exactly."
            )
        if info is not None:
            info.done += 1
        return response

    def _call_live(self, request: Request, rollout_id: Any, candidate: int) -> Response:
        kwargs: dict[str, Any] = {}
        if rollout_id is not None:
            kwargs["rollout_id"] = rollout_id
        if candidate > 0:
            kwargs["cache"] = False  # the live LM's cache would hand every candidate the first one's answer
        # The wrapper records the call in DSPy's history; the live LM's own entry would count it twice.
        with dspy.settings.context(disable_history=True):
            response = self.lm(dataclasses.replace(request, model=self.lm.model), **kwargs)
        if not isinstance(response, Response):
            raise TypeError(f"{type(self.lm).__name__} answered a Request with {type(response).__name__}")
        return response

    def _record(self, key: str, request: Request, rollout_id: Any, n: int, candidate: int, response: Response):
        stored = response_to_dict(response)
        record = {
            "key": key,
            "messages": _messages(request),
            "settings": _settings(request),
            "rollout_id": rollout_id,
            "n": n,
            "candidate": candidate,
            "response": stored,
        }
        with self._lock:
            if key in self._entries:  # another thread recorded the same request meanwhile
                return
            header = {"model": self.lm.model, "settings": self.settings, "version": FORMAT_VERSION}
            lines = [] if header == self._header else [{"header": header}]
            self._append([*lines, record])
            self._header = header
            self._entries[key] = stored

    def _append(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            if self._repair is not None:
                f.truncate(self._repair)
                if self._repair > 0 and not self.gzipped and _last_byte(self.path, self._repair) != b"\n":
                    f.write(b"\n")
                self._repair = None
            f.write(gzip.compress(text, mtime=0) if self.gzipped else text)
            f.flush()
            os.fsync(f.fileno())

    def stream(self, request: Request) -> Iterator[Any]:
        """Stream events of one (recorded or live) answer, emitted whole."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Nothing to release: every answer is on disk when `complete` returns."""

    def dump_state(self) -> dict[str, Any]:
        """JSON-able settings: the file, the mode and the live LM's own sanitized state (no API keys)."""
        live = None
        if self.lm is not None:
            try:
                live = self.lm.dump_state()
                json.dumps(live)
            except (TypeError, ValueError, NotImplementedError):
                live = None  # an LM that cannot be saved: the reloaded wrapper replays only
        return {"path": str(self.path), "mode": self.mode, "lm": live}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> RecordingEngine:
        """Rebuild from `dump_state()` (the loader already opted into custom LM state)."""
        lm = None
        if state.get("lm"):
            try:
                lm = dspy.BaseLM.load_state(state["lm"], allow_custom_lm_class=True)
            except (TypeError, ValueError, ImportError) as exc:  # e.g. a DummyLM, whose answers are not saved
                logger.warning("Replaying %s only: its live LM cannot be rebuilt (%s)", state["path"], exc)
        mode = state.get("mode", "auto")
        return cls(state["path"], lm, mode="auto" if lm is None and mode == "record" else mode)


def _gzip_members(data: bytes) -> tuple[bytes, int | None]:
    """The text of a gzip file's complete members, and the byte offset where a torn last member starts (None
    when the file ends with a complete member).

    The file is fed in pieces, so that the bytes after each member are never copied whole (a recording that
    grew by one member per call has thousands).
    """
    done: list[bytes] = []
    current: list[bytes] = []
    view, start, pos = memoryview(data), 0, 0
    member = zlib.decompressobj(wbits=31)
    while pos < len(data):
        piece = view[pos : pos + _GZIP_PIECE]
        try:
            current.append(member.decompress(piece))
        except zlib.error:
            return b"".join(done), start
        if member.eof:
            pos += len(piece) - len(member.unused_data)
            done += current
            current, start = [], pos
            member = zlib.decompressobj(wbits=31)
        else:
            pos += len(piece)
    return b"".join(done), None if start == len(data) else start


def _last_byte(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset - 1)
        return f.read(1)


def _generation_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    settings = {}
    for name in _SETTINGS:
        value = kwargs.get(name)
        if value is not None:
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            settings[name] = value
    return settings


class AsyncRecordingEngine(ThreadedAsyncEngine):
    """The async face of a `RecordingEngine` (for `acall`), running it in a worker thread."""

    sync_class = RecordingEngine


@contextmanager
def _call_scope(lm: dspy.LM, kwargs: dict[str, Any]) -> Iterator[None]:
    rollout_id = kwargs.get("rollout_id", lm.kwargs.get("rollout_id"))
    n = kwargs.get("n", lm.kwargs.get("n")) or 1
    token = _CALL.set(_CallInfo(rollout_id, n))
    try:
        yield
    finally:
        _CALL.reset(token)


class RecordedLM(dspy.LM):
    """A `dspy.LM` over a `RecordingEngine` that tells the engine each call's `n` and `rollout_id`.

    DSPy hands an engine one Request per candidate without `n` or `rollout_id`; both are part of a recording's
    key, so this LM passes them down. Build it with `recorded_lm`.
    """

    def __call__(self, prompt=None, *, messages=None, **kwargs):
        with _call_scope(self, kwargs):
            return super().__call__(prompt, messages=messages, **kwargs)

    async def acall(self, prompt=None, *, messages=None, **kwargs):
        with _call_scope(self, kwargs):
            return await super().acall(prompt, messages=messages, **kwargs)


def recorded_lm(path: str | Path, lm: dspy.BaseLM | None = None, *, mode: Mode = "auto", **kwargs: Any) -> RecordedLM:
    """A `dspy.LM` that records `lm`'s answers to a JSONL file, or replays them from it without `lm`.

    Each line holds one answer with its key (a hash of the messages and the settings that change outputs:
    temperature, max_tokens, n, rollout_id, ...), the messages, the settings, the response text and usage;
    never API keys. Lines of an interrupted run are kept and a torn last line is ignored, so rerunning resumes
    where it stopped without asking the live LM twice.

    Args:
        path: The recording file.
        lm: The live LM (any `dspy.LM`); None replays only.
        mode: `"replay"` answers from the file only; `"record"` answers recorded requests from the file and
            new ones through `lm`, appending them; `"auto"` records when `lm` is given, else replays.
        **kwargs: `dspy.LM` settings for the wrapper. Generation settings default to `lm`'s, or on replay to
            those the file was recorded with.

    Returns:
        A `RecordedLM`. Its model string is `steper-replay/<file>@<content hash>` on replay and
        `steper-record/<lm.model>` while recording; DSPy's response cache is off (the file is the cache).

    Raises:
        SteperError: Replaying without a recording, `mode="record"` without `lm`, or (when called) a request
            that was not recorded.
    """
    engine = RecordingEngine(path, lm, mode=mode)
    settings = {**engine.default_settings(), **kwargs}
    engine.settings = _generation_settings(settings)
    settings.setdefault("num_retries", 0)  # the live LM retries its own transient failures
    settings["cache"] = False
    return RecordedLM(engine.model_string, engine=engine, async_engine=AsyncRecordingEngine(engine), **settings)
