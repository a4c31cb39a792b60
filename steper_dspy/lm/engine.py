"""A DSPy engine that generates with a local transformers model (`complete(Request) -> Response`)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspy.clients.engines.base import validate_request
from dspy.lm15 import ContextLengthError, Message, Request, Response, TextPart, Usage, response_to_events

from steper_dspy.adapter import COMPLETED_MARKER
from steper_dspy.errors import SteperError
from steper_dspy.lm.attention import use_grouped_decode_attention
from steper_dspy.lm.batching import ContinuousBatcher, GenerationSettings
from steper_dspy.lm.chat import chat_prompt_ids
from steper_dspy.lm.errors import engine_error
from steper_dspy.lm.models import default_device, load_model, model_fingerprint
from steper_dspy.lm.prefix_cache import PrefixCache
from steper_dspy.lm.threaded import ThreadedAsyncEngine
from steper_dspy.lm.workers import WorkerPool, default_workers, usable_cores


def cut_at_stop(text: str, stops: Sequence[str], *, keep: Sequence[str] = (COMPLETED_MARKER,)) -> tuple[str, bool]:
    """Cut `text` at the first stop string: before it (OpenAI's rule), or after it for strings in `keep`.

    Returns:
        The cut text and whether a stop string was found.
    """
    hits = [(text.find(s), s) for s in {*stops, *keep} if s and s in text]
    if not hits:
        return text, False
    index, stop = min(hits, key=lambda hit: (hit[0], hit[1] not in keep))
    return (text[: index + len(stop)] if stop in keep else text[:index]), True


def request_messages(request: Request) -> list[dict[str, str]]:
    """The request's system prompt and messages as `{"role", "content"}` dicts for a chat template."""
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        if message.text is None:
            raise SteperError(
                f"A {message.role} message holds no plain text (images, files or tool calls): the local "
                "transformers engine serves text-only chat requests; drop the non-text inputs."
            )
        messages.append({"role": message.role, "content": message.text})
    return messages


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    batcher: ContinuousBatcher


# Engines built with the same settings (copies, reloaded programs) share one loaded model while any is alive.
_LOADED: weakref.WeakValueDictionary[tuple, _Loaded] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()
# Likewise their worker processes.
_POOLS: weakref.WeakValueDictionary[tuple, WorkerPool] = weakref.WeakValueDictionary()


def stop_worker_pools() -> None:
    """Stop every generation worker process of this process; requests in flight fail at once."""
    for pool in list(_POOLS.values()):
        pool.close()


class TransformersEngine:
    """Generates with a local Hugging Face causal LM, loaded lazily once and shared by DSPy's threads.

    Concurrent requests (DSPy's threads) are decoded together, up to `max_batch_size` at once, each joining
    and leaving the running batch on its own (`ContinuousBatcher`); `max_batch_size=1` generates one request
    at a time.

    Honours `Request.config`: greedy decoding when temperature is 0 or None, sampling otherwise (with
    top_p/top_k/seed when given), `max_tokens` (else the engine's default), and `stop` strings. Generation also
    stops at the tokenizer's eos and right after ChatAdapter's `[[ ## completed ## ]]` marker, which is kept.

    Args:
        model: A model folder, `.gguf` file, peft adapter folder or cached hub id (see `resolve_model`).
        adapter: A peft adapter folder loaded on top of `model`.
        dtype: `"auto"` or a torch dtype name (see `default_dtype`).
        device: `"auto"` (cuda if available, else cpu) or a torch device string.
        max_tokens: New-token limit for requests that set none.
        max_batch_size: Most requests generated together.
        prefix_cache_tokens: Prompt tokens whose keys and values are kept, so that a request computes only what
            follows the longest prompt prefix computed before (the steps of a chain share theirs); 0 turns it off.
        marker_patience: Stop a reply that has not begun a ChatAdapter field marker within this many tokens
            (for a student, whose reply is unparseable without one); None never stops early.
        workers: Processes that generate, each with the model and `threads` torch threads (see
            `steper_dspy.lm.workers`); 1 generates in this process, None picks `default_workers`.
        threads: Torch threads per worker process (default: the usable cores shared out among the workers).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        adapter: str | Path | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_tokens: int = 256,
        max_batch_size: int = 8,
        prefix_cache_tokens: int = 16_384,
        marker_patience: int | None = None,
        workers: int | None = 1,
        threads: int | None = None,
    ):
        if workers is not None and workers < 1:
            raise SteperError(f"workers must be at least 1, not {workers}.")
        self.model = _portable(model)
        self.adapter = None if adapter is None else _portable(adapter)
        self.dtype = str(dtype).removeprefix("torch.")
        self.device = device
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self.prefix_cache_tokens = prefix_cache_tokens
        self.marker_patience = marker_patience
        self.workers = workers
        self.threads = threads
        self._loaded: _Loaded | None = None
        self._pool: WorkerPool | None = None
        self._worker_count: int | None = None
        self._fingerprint: str | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> TransformersEngine:
        # Copies of a program share the loaded model (and its batcher), as engines with equal settings do.
        return self

    @property
    def fingerprint(self) -> str:
        """Content hash of the weights, config and tokenizer (and the adapter's files)."""
        if self._fingerprint is None:
            parts = [model_fingerprint(self.model)]
            if self.adapter is not None:
                parts.append(model_fingerprint(self.adapter))
            self._fingerprint = "+".join(parts)
        return self._fingerprint

    @property
    def model_string(self) -> str:
        """`steper-local/<name>@<fingerprint>`: names the exact weights, so DSPy's cache never mixes checkpoints."""
        name = Path(self.model).stem if Path(self.model).suffix.lower() == ".gguf" else Path(self.model).name
        if self.adapter is not None:
            name = f"{name}+{Path(self.adapter).name}"
        return f"steper-local/{name}@{self.fingerprint}"

    @property
    def max_concurrency(self) -> int:
        """How many requests the engine serves at once: DSPy threads beyond it only wait."""
        return self.max_batch_size * self.worker_count

    @property
    def worker_count(self) -> int:
        """The processes that generate: `workers`, or `default_workers` for this device and model."""
        if self._worker_count is None:
            device = default_device() if self.device == "auto" else self.device
            self._worker_count = self.workers or default_workers(device, self.model)
        return self._worker_count

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return `(model, tokenizer)`."""
        loaded = self._ensure_loaded()
        return loaded.model, loaded.tokenizer

    def complete(self, request: Request) -> Response:
        """Generate one completion for a DSPy request."""
        validate_request(request)
        try:
            messages = request_messages(request)
            if self.worker_count > 1:  # a worker generates; the prompt's text routes it (see WorkerPool)
                prompt_text = "\x00".join(message["content"] for message in messages)
            else:
                loaded = self._ensure_loaded()
                prompt = chat_prompt_ids(loaded.tokenizer, messages)
        except SteperError as exc:
            raise engine_error(exc, request.model) from exc
        if self.worker_count > 1:
            return self._ensure_pool().complete(request, prompt_text)
        config = request.config
        stops = tuple(config.stop or ())
        max_new = config.max_tokens or self.max_tokens
        _check_context(loaded.model, len(prompt), max_new, request)
        sample = bool(config.temperature)
        settings = GenerationSettings(
            max_new_tokens=max_new,
            stops=stops,
            temperature=config.temperature if sample else None,
            top_p=config.top_p if sample else None,
            top_k=config.top_k if sample else None,
            seed=config.seed if sample else None,
            marker_patience=self.marker_patience,
        )
        new_ids, cached = loaded.batcher.generate(prompt, settings)
        ended_on_eos = bool(new_ids) and new_ids[-1] in loaded.batcher.eos_ids
        text, stopped = cut_at_stop(loaded.tokenizer.decode(new_ids, skip_special_tokens=True), stops)
        finish = "stop" if ended_on_eos or stopped or len(new_ids) < max_new else "length"
        usage = Usage(
            input_tokens=len(prompt),
            output_tokens=len(new_ids),
            total_tokens=len(prompt) + len(new_ids),
            cache_read_tokens=cached,
        )
        return Response(
            id=None, model=request.model, message=Message.assistant([TextPart(text)]), finish_reason=finish, usage=usage
        )

    def _ensure_loaded(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        device = default_device() if self.device == "auto" else self.device
        key = (self.model, self.adapter, self.dtype, device, self.max_batch_size, self.prefix_cache_tokens)
        with _LOADED_LOCK:
            loaded = _LOADED.get(key)
            if loaded is None:
                model, tokenizer = load_model(self.model, adapter=self.adapter, dtype=self.dtype, device=self.device)
                use_grouped_decode_attention(model)
                eos = model.generation_config.eos_token_id
                eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
                eos_ids.add(tokenizer.eos_token_id)
                prefixes = PrefixCache(self.prefix_cache_tokens) if self.prefix_cache_tokens else None
                batcher = ContinuousBatcher(
                    model, tokenizer, eos_ids, max_batch_size=self.max_batch_size, prefix_cache=prefixes
                )
                loaded = _Loaded(model, tokenizer, batcher)
                # The batcher's thread holds the model, not `loaded`: once no engine holds `loaded`, the thread
                # ends and frees the model.
                weakref.finalize(loaded, batcher.close)
                _LOADED[key] = loaded
            self._loaded = loaded
        return loaded

    def _ensure_pool(self) -> WorkerPool:
        if self._pool is not None:
            return self._pool
        state = self.dump_state()
        key = (*(v for k, v in sorted(state.items()) if k != "fingerprint"),)
        with _LOADED_LOCK:
            pool = _POOLS.get(key)
            if pool is None or pool.failed:  # a pool whose worker died serves its own engines' errors only
                workers = self.worker_count
                threads = self.threads or max(1, usable_cores() // workers)
                engine_state = {k: v for k, v in state.items() if k not in ("workers", "threads")}
                pool = WorkerPool(engine_state, workers=workers, threads=threads)
                _POOLS[key] = pool
            self._pool = pool
        return pool

    def stream(self, request: Request) -> Iterator[Any]:
        """Stream events of one completion (generated whole, then emitted)."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Drop this engine's handle on the model (and its workers); freed once no engine uses them."""
        self._loaded = None
        self._pool = None

    def dump_state(self) -> dict[str, Any]:
        """JSON-able settings that rebuild this engine (used by `program.save`)."""
        return {
            "model": self.model,
            "adapter": self.adapter,
            "dtype": self.dtype,
            "device": self.device,
            "max_tokens": self.max_tokens,
            "max_batch_size": self.max_batch_size,
            "prefix_cache_tokens": self.prefix_cache_tokens,
            "marker_patience": self.marker_patience,
            "workers": self.workers,
            "threads": self.threads,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> TransformersEngine:
        """Rebuild an engine from `dump_state()`, refusing weights that changed since the program was saved."""
        state = dict(state)
        saved = state.pop("fingerprint", None)
        engine = cls(**state)
        if saved is not None and engine.fingerprint != saved:
            raise SteperError(
                f"The model files of {engine.model!r} changed since this program was saved (fingerprint "
                f"{saved} -> {engine.fingerprint}): its saved LM would answer from other weights. Point the program "
                "at the new weights with local_lm(...) and save it again, or restore the original files."
            )
        return engine


def _check_context(model: Any, prompt_length: int, max_new: int, request: Request) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_length + max_new > limit:
        raise ContextLengthError(
            f"The prompt has {prompt_length} tokens and asks for up to {max_new} more, beyond the model's context of "
            f"{limit} tokens: retrieve fewer passages (k, max_steps) or lower max_tokens."
        )


class AsyncTransformersEngine(ThreadedAsyncEngine):
    """The async face of a `TransformersEngine` (for `acall`): runs generation in a worker thread."""

    sync_class = TransformersEngine


def _portable(path: str | Path) -> str:
    """An absolute path for local files (so a saved program loads from any directory); hub ids unchanged."""
    candidate = Path(path).expanduser()
    return str(candidate.resolve()) if candidate.exists() else str(path)
