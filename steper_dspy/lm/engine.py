"""A DSPy engine that generates with a local transformers model (`complete(Request) -> Response`)."""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dspy.clients.engines.base import validate_request
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events
from transformers import StoppingCriteria, StoppingCriteriaList

from steper_dspy.errors import SteperError
from steper_dspy.lm.chat import chat_prompt_ids
from steper_dspy.lm.errors import engine_error
from steper_dspy.lm.models import default_device, load_model, model_fingerprint
from steper_dspy.lm.threaded import ThreadedAsyncEngine

# DSPy's ChatAdapter ends every answer with this marker; stopping there saves the tokens a model would
# otherwise ramble on for, and the marker is kept in the text so the adapter still sees a complete answer.
COMPLETED_MARKER = "[[ ## completed ## ]]"


class StopOnStrings(StoppingCriteria):
    """Stop generation once the generated text (after the prompt) contains any of the given strings.

    Args:
        tokenizer: The tokenizer that decodes the generated ids.
        stops: Strings that end the generation.
        prompt_length: Number of prompt tokens at the start of `input_ids`, never searched.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_length = prompt_length
        # Every token decodes to at least one character, so a stop string completed by the newest token lies
        # within its last len(stop) tokens (+1 for a token that straddles the string's start).
        self.window = max((len(s) for s in self.stops), default=0) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        done = []
        for row in input_ids:
            tail = row[max(self.prompt_length, row.shape[0] - self.window) :]
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            done.append(any(stop in text for stop in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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
    eos_ids: set[int]
    lock: threading.Lock = field(default_factory=threading.Lock)


# Engines built with the same settings (copies, reloaded programs) share one loaded model while any is alive.
_LOADED: weakref.WeakValueDictionary[tuple, _Loaded] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


class TransformersEngine:
    """Generates with a local Hugging Face causal LM, loaded lazily once and shared by DSPy's threads.

    Honours `Request.config`: greedy decoding when temperature is 0 or None, sampling otherwise (with
    top_p/top_k/seed when given), `max_tokens` (else the engine's default), and `stop` strings. Generation also
    stops at the tokenizer's eos and right after ChatAdapter's `[[ ## completed ## ]]` marker, which is kept.

    Args:
        model: A model folder, `.gguf` file, peft adapter folder or cached hub id (see `resolve_model`).
        adapter: A peft adapter folder loaded on top of `model`.
        dtype: `"auto"` or a torch dtype name (see `default_dtype`).
        device: `"auto"` (cuda if available, else cpu) or a torch device string.
        max_tokens: New-token limit for requests that set none.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        adapter: str | Path | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_tokens: int = 256,
    ):
        self.model = _portable(model)
        self.adapter = None if adapter is None else _portable(adapter)
        self.dtype = str(dtype).removeprefix("torch.")
        self.device = device
        self.max_tokens = max_tokens
        self._loaded: _Loaded | None = None
        self._fingerprint: str | None = None

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

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return `(model, tokenizer)`."""
        loaded = self._ensure_loaded()
        return loaded.model, loaded.tokenizer

    def complete(self, request: Request) -> Response:
        """Generate one completion for a DSPy request."""
        validate_request(request)
        try:
            loaded = self._ensure_loaded()
            prompt = chat_prompt_ids(loaded.tokenizer, request_messages(request))
        except SteperError as exc:
            raise engine_error(exc, request.model) from exc
        config = request.config
        stops = list(config.stop or ())
        max_new = config.max_tokens or self.max_tokens
        new_ids = self._generate(loaded, prompt, stops, max_new, config)
        ended_on_eos = bool(new_ids) and new_ids[-1] in loaded.eos_ids
        text, stopped = cut_at_stop(loaded.tokenizer.decode(new_ids, skip_special_tokens=True), stops)
        finish = "stop" if ended_on_eos or stopped or len(new_ids) < max_new else "length"
        usage = Usage(input_tokens=len(prompt), output_tokens=len(new_ids), total_tokens=len(prompt) + len(new_ids))
        return Response(
            id=None, model=request.model, message=Message.assistant([TextPart(text)]), finish_reason=finish, usage=usage
        )

    def _generate(self, loaded: _Loaded, prompt: list[int], stops: list[str], max_new: int, config: Any) -> list[int]:
        net, tokenizer = loaded.model, loaded.tokenizer
        generation = copy.deepcopy(net.generation_config)
        sample = bool(config.temperature)
        generation.do_sample = sample
        generation.max_new_tokens = max_new
        generation.max_length = None
        generation.eos_token_id = sorted(loaded.eos_ids)
        generation.temperature = config.temperature if sample else None
        generation.top_p = config.top_p if sample else None
        generation.top_k = config.top_k if sample else None
        input_ids = torch.tensor([prompt], device=net.device)
        criteria = StoppingCriteriaList([StopOnStrings(tokenizer, [COMPLETED_MARKER, *stops], len(prompt))])
        with loaded.lock, torch.inference_mode():
            if sample and config.seed is not None:
                torch.manual_seed(config.seed)
            output = net.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=generation,
                stopping_criteria=criteria,
            )
        return output[0, len(prompt) :].tolist()

    def _ensure_loaded(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        key = (self.model, self.adapter, self.dtype, default_device() if self.device == "auto" else self.device)
        with _LOADED_LOCK:
            loaded = _LOADED.get(key)
            if loaded is None:
                model, tokenizer = load_model(self.model, adapter=self.adapter, dtype=self.dtype, device=self.device)
                eos = model.generation_config.eos_token_id
                eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
                eos_ids.add(tokenizer.eos_token_id)
                loaded = _Loaded(model, tokenizer, eos_ids)
                _LOADED[key] = loaded
            self._loaded = loaded
        return loaded

    def stream(self, request: Request) -> Iterator[Any]:
        """Stream events of one completion (generated whole, then emitted)."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Drop this engine's handle on the model; it is freed once no engine uses it."""
        self._loaded = None

    def dump_state(self) -> dict[str, Any]:
        """JSON-able settings that rebuild this engine (used by `program.save`)."""
        return {
            "model": self.model,
            "adapter": self.adapter,
            "dtype": self.dtype,
            "device": self.device,
            "max_tokens": self.max_tokens,
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


class AsyncTransformersEngine(ThreadedAsyncEngine):
    """The async face of a `TransformersEngine` (for `acall`): runs generation in a worker thread."""

    sync_class = TransformersEngine


def _portable(path: str | Path) -> str:
    """An absolute path for local files (so a saved program loads from any directory); hub ids unchanged."""
    candidate = Path(path).expanduser()
    return str(candidate.resolve()) if candidate.exists() else str(path)
