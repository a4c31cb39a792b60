"""Continuous batching for the in-process engine: requests join and leave one running decode batch.

DSPy runs a program over many questions in threads (`dspy.Evaluate`, the harvest's `ParallelExecutor`); each
thread's call blocks in `TransformersEngine.complete`. `ContinuousBatcher` decodes every request in flight in
one batch, one token a step: a new request computes its prompt (after the longest prefix it finds in the
`PrefixCache`) and joins the batch at the next step, and a finished one leaves it at once. A lock-step batch
(one `generate` per group of requests) instead runs every row until its longest one ends, while the requests
that arrive in the meantime wait: on the quickstart's evaluation its batches averaged 4 rows out of 8.

The rows are left-padded to the batch's width, the padding masked out and positions counted over real tokens
only, so every row sees what it would see alone: greedy replies are those of `model.generate` (with the
model's repetition penalty; its other generation-config processors, such as `no_repeat_ngram_size`, are not
applied). Each row keeps its own settings (token limit, stop strings, sampling with its own seeded generator),
so requests of different settings share a batch; a seeded sample is the same in any batch where the batch's
logits equal the row's alone (fp32 on a CPU; bf16 kernels may round differently with the batch shape).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from steper_dspy.adapter import COMPLETED_MARKER
from steper_dspy.lm.prefix_cache import Prefix, PrefixCache, layer_tensors, prefill_row

logger = logging.getLogger(__name__)

# DSPy's ChatAdapter ends every answer with COMPLETED_MARKER; stopping there saves the tokens a model would
# otherwise ramble on for, and the marker is kept in the text so the adapter still sees a complete answer.
# Tokens of a row's end checked for its stop strings (no stop string is longer).
STOP_WINDOW = 256


@dataclass(frozen=True)
class GenerationSettings:
    """How one request generates.

    Attributes:
        max_new_tokens: Most tokens generated.
        stops: Stop strings; generation also stops after `COMPLETED_MARKER`.
        temperature: Sampling temperature; None decodes greedily.
        top_p: Nucleus sampling mass (when sampling).
        top_k: Top-k sampling (when sampling).
        seed: Seed of the request's own sampling generator (when sampling).
        marker_patience: Stop a reply that has not begun a ChatAdapter ``[[ ## field ## ]]`` marker within this
            many tokens (an untrained student answering in prose: its reply would not parse); None never does.
    """

    max_new_tokens: int
    stops: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    marker_patience: int | None = None


@dataclass(eq=False)
class _Job:
    prompt: list[int]
    settings: GenerationSettings
    future: Future = field(default_factory=Future)


@dataclass
class _Row:
    """A request in the batch: the token it feeds next and what it generated so far."""

    job: _Job
    cached: int  # prompt tokens that came from the prefix cache
    next_token: int
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def fed(self) -> int:
        """Tokens whose keys and values the batch holds for this row (its prompt, then all but its last token)."""
        return len(self.job.prompt) - 1 + len(self.generated)


_CLOSE = _Job([], GenerationSettings(0))


# Settings of a generation config for which `generate` adds a logits processor that the batcher does not have
# (it applies the repetition penalty, and each request's own temperature, top-k and top-p).
_UNAPPLIED_SETTINGS = (
    "no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "min_new_tokens",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
)


_NO_OP_VALUES = {"typical_p": 1.0}  # besides unset and zero: values with which `generate` changes nothing


def unapplied_generation_settings(config: Any) -> list[str]:
    """The settings of generation config `config` that change `generate`'s replies and that the batcher ignores
    (a setting left unset, or set to a value that changes nothing such as ``min_p: 0.0``, is not one)."""

    def active(name: str) -> bool:
        value = getattr(config, name, None)
        return value not in (None, 0, 0.0, [], (), {}) and value != _NO_OP_VALUES.get(name)

    return [name for name in _UNAPPLIED_SETTINGS if active(name)]


class ContinuousBatcher:
    """Decodes the requests in flight as one batch in a worker thread; `generate` blocks until its reply ends.

    Args:
        model: A causal LM in eval mode.
        tokenizer: Its tokenizer (for stop strings and the field-marker check).
        eos_ids: Tokens that end a reply (kept in it).
        max_batch_size: Most rows decoded together; further requests wait for a row to end.
        prefix_cache: Keys and values of earlier prompts, reused and fed with every finished prompt; None
            computes every prompt whole.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos_ids: set[int],
        *,
        max_batch_size: int = 8,
        prefix_cache: PrefixCache | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch_size = max_batch_size
        self.prefix_cache = prefix_cache
        penalty = getattr(model.generation_config, "repetition_penalty", None)
        self.repetition_penalty = penalty if penalty not in (None, 1.0) else None
        unapplied = unapplied_generation_settings(model.generation_config)
        if unapplied:
            logger.warning(
                "The model's generation config sets %s, which this engine does not apply (`generate` would): its "
                "replies can differ from `model.generate`'s.",
                ", ".join(unapplied),
            )
        self.forward_passes = 0  # decode steps run, for tests and benchmarks
        self.rows_decoded = 0  # rows summed over those steps
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._rows: list[_Row] = []
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [B, kv heads, width, dim]
        self._mask: torch.Tensor | None = None  # [B, width]: 1 where a column holds a row's token
        self._cache: Any = None
        self._stop_criteria: dict[tuple[str, ...], Any] = {}
        self._closed = False
        self._closing = threading.Lock()  # no request is queued behind the close sentinel
        self._worker = threading.Thread(target=self._run, name="steper-generation", daemon=True)
        self._worker.start()

    def generate(self, prompt: list[int], settings: GenerationSettings) -> tuple[list[int], int]:
        """Generate for one prompt.

        Returns:
            The new token ids (up to and including an eos) and how many prompt tokens came from the prefix cache.
        """
        if not prompt:
            raise ValueError("an empty prompt: give at least one token")
        job = _Job(prompt, settings)
        with self._closing:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        """End the worker thread; requests still queued or decoding fail, later ones raise."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self._queue.put(_CLOSE)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                jobs = self._take_jobs()
                if _CLOSE in jobs:
                    self._fail([row.job for row in self._rows] + [job for job in jobs if job is not _CLOSE])
                    self._rows, self._layers, self._mask, self._cache = [], [], None, None
                    return
                try:
                    for job in jobs:
                        self._join(job)
                    self._step()
                except BaseException as exc:  # the callers re-raise it; the worker lives on with an empty batch
                    self._fail([row.job for row in self._rows] + [job for job in jobs if not job.future.done()], exc)
                    self._rows, self._layers, self._mask, self._cache = [], [], None, None

    def _take_jobs(self) -> list[_Job]:
        """Requests that join at the next step: as many as there is room for, waiting for one when idle."""
        jobs = [] if self._rows else [self._queue.get()]
        while len(self._rows) + len(jobs) < self.max_batch_size and _CLOSE not in jobs:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _fail(self, jobs: list[_Job], exc: BaseException | None = None) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc or RuntimeError("the model was unloaded"))

    def _join(self, job: _Job) -> None:
        """Compute the prompt but its last token (after its cached prefix) and add it as a row, right-aligned."""
        prompt = job.prompt
        shared, entry = self.prefix_cache.longest(prompt) if self.prefix_cache is not None else (0, None)
        try:
            layers = prefill_row(self.model, prompt, shared, entry)
        except Exception as exc:  # this prompt alone (out of memory, too long): the running rows decode on
            job.future.set_exception(exc)
            return
        row = _Row(job, shared, prompt[-1], generator=_generator(job.settings, _logits_device(self.model)))
        length = len(prompt) - 1
        width = 0 if self._mask is None else self._mask.shape[1]
        if self._rows and not self._layers and layers:  # the rows so far hold no columns yet (one-token prompts)
            empty = [k.new_zeros((len(self._rows), k.shape[1], 0, k.shape[3])) for k, _ in layers]
            self._layers = [(e, e) for e in empty]
        if length > width and self._rows:
            self._layers = [(_left_pad(k, length - width), _left_pad(v, length - width)) for k, v in self._layers]
            self._mask = _left_pad(self._mask, length - width)
        width = max(width, length)
        row_mask = torch.tensor([[0] * (width - length) + [1] * length], dtype=torch.long, device=self.model.device)
        if layers:
            layers = [(_left_pad(k, width - length), _left_pad(v, width - length)) for k, v in layers]
        elif width:  # a one-token prompt next to longer rows
            layers = [(k.new_zeros((1, *k.shape[1:])), v.new_zeros((1, *v.shape[1:]))) for k, v in self._layers]
        if self._rows:
            self._layers = [
                (torch.cat([k, rk]), torch.cat([v, rv])) for (k, v), (rk, rv) in zip(self._layers, layers, strict=True)
            ]
            self._mask = torch.cat([self._mask, row_mask])
        else:
            self._layers, self._mask = layers, row_mask
        self._rows.append(row)
        self._cache = None  # rebuilt from `_layers` at the next step

    def _step(self) -> None:
        """Feed every row its next token, pick the token after it and let finished rows leave."""
        device = self.model.device
        if self._cache is None:
            self._cache = _dynamic_cache(self._layers)
        ids = torch.tensor([[row.next_token] for row in self._rows], device=device)
        positions = torch.tensor([[row.fed] for row in self._rows], device=device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        output = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self._cache, use_cache=True
        )
        self.forward_passes += 1
        self.rows_decoded += len(self._rows)
        self._cache, self._mask = output.past_key_values, mask
        self._layers = layer_tensors(self._cache)
        logits = output.logits[:, -1, :].float()
        greedy = logits.argmax(dim=-1).tolist()
        finished = []
        for index, row in enumerate(self._rows):
            plain = row.job.settings.temperature is None and self.repetition_penalty is None
            token = greedy[index] if plain else self._choose(row, logits[index])
            row.generated.append(token)
            row.next_token = token
            if self._ended(row):
                finished.append(index)
        if finished:
            self._leave(finished)

    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        """The row's next token after the model's repetition penalty (as `generate` applies it, greedy or not),
        greedy or sampled with the row's settings."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        settings = row.job.settings
        scores = logits.unsqueeze(0)
        ids = torch.tensor([row.job.prompt + row.generated], device=scores.device)
        if self.repetition_penalty is not None:
            from transformers import RepetitionPenaltyLogitsProcessor

            scores = RepetitionPenaltyLogitsProcessor(self.repetition_penalty)(ids, scores)
        if settings.temperature is None:
            return int(scores.argmax(dim=-1).item())
        scores = TemperatureLogitsWarper(settings.temperature)(ids, scores)
        if settings.top_k:
            scores = TopKLogitsWarper(settings.top_k)(ids, scores)
        if settings.top_p is not None and settings.top_p < 1.0:
            scores = TopPLogitsWarper(settings.top_p)(ids, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator).item())

    def _ended(self, row: _Row) -> bool:
        settings, generated = row.job.settings, row.generated
        if generated[-1] in self.eos_ids or len(generated) >= settings.max_new_tokens:
            return True
        patience = settings.marker_patience
        if patience is not None and len(generated) == patience and "[[" not in self._text(generated):
            return True
        tail = (row.job.prompt + generated)[-STOP_WINDOW:]
        criterion = self._stop_criterion((COMPLETED_MARKER, *settings.stops))
        return bool(criterion(torch.tensor([tail]), None)[0])

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _stop_criterion(self, stops: tuple[str, ...]) -> Any:
        """transformers' stop-string criterion for `stops`, built once (building it walks the whole vocabulary)."""
        if stops not in self._stop_criteria:
            from transformers import StopStringCriteria

            self._stop_criteria[stops] = StopStringCriteria(self.tokenizer, list(stops))
        return self._stop_criteria[stops]

    def _leave(self, finished: list[int]) -> None:
        """Answer the finished rows, keep their prompts' keys and values, and drop them from the batch."""
        layers, width = self._layers, self._mask.shape[1]
        for index in finished:
            row = self._rows[index]
            if self.prefix_cache is not None and row.fed:
                start = width - row.fed
                kept = [
                    (
                        k[index : index + 1, :, start : start + len(row.job.prompt)].clone(),
                        v[index : index + 1, :, start : start + len(row.job.prompt)].clone(),
                    )
                    for k, v in layers
                ]
                self.prefix_cache.add(Prefix(tuple(row.job.prompt), kept))
            row.job.future.set_result((row.generated, row.cached))
        keep = [index for index in range(len(self._rows)) if index not in set(finished)]
        self._rows = [self._rows[index] for index in keep]
        if not self._rows:
            self._layers, self._mask, self._cache = [], None, None
            return
        rows = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[rows]
        first = int(mask.any(dim=0).nonzero()[0])  # columns before it are padding in every row left
        self._mask = mask[:, first:]
        self._layers = [(k[rows, :, first:], v[rows, :, first:]) for k, v in layers]
        self._cache = None


def _logits_device(model: Any) -> torch.device:
    """Where the model computes its logits: its output layer's device (the last one of a sharded model)."""
    head = model.get_output_embeddings()
    return head.weight.device if head is not None else model.device


def _generator(settings: GenerationSettings, device: torch.device) -> torch.Generator | None:
    """A sampling request's own generator, so that its seed gives the same reply whatever else is in the batch."""
    if settings.temperature is None or settings.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(settings.seed)


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """`tensor` with `columns` zero columns before its token dimension (the last for masks, else the third)."""
    if columns <= 0:
        return tensor
    dim = 1 if tensor.dim() == 2 else 2
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _dynamic_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache
