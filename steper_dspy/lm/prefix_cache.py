"""Prompt prefixes computed once: the in-process engine's cache of recent prompts' keys and values.

The steps of a chain share their prompt up to the step's own instructions (see `steper_dspy.adapter`): the
expansion prompt begins with the initialization prompt's system message, question and passages. On a CPU the
prompt is most of the work, so the engine keeps the keys and values of recent prompts and, for a new request,
computes only the tokens after the longest prefix it already has. A batch mixes rows with and without a cached
prefix: each row is laid out as ``[pad][cached prefix][pad][new tokens]`` over one cached block and one new
block, the padding masked out and positions counted over real tokens only, so every row sees what it would
see alone.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

# Shorter shared prefixes are not worth a lookup and a batch layout of their own.
MIN_PREFIX_TOKENS = 32


@dataclass
class Prefix:
    """Keys and values of one prompt: per layer, `(keys, values)` shaped `[1, kv_heads, tokens, head_dim]`."""

    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    """Recent prompts' keys and values, least recently used dropped first beyond `max_tokens` tokens in all.

    Args:
        max_tokens: Prompt tokens kept in all (memory: tokens x layers x 2 x kv heads x head dim x dtype size).
    """

    def __init__(self, max_tokens: int = 32_768):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    def longest(self, prompt: list[int]) -> tuple[int, Prefix | None]:
        """The longest cached prefix of `prompt` (at least `MIN_PREFIX_TOKENS`, and leaving one token to compute)."""
        best, found = 0, None
        wanted = tuple(prompt)
        with self._lock:
            for ids, entry in self._entries.items():
                shared = len(os.path.commonprefix([ids, wanted]))
                if shared > best:
                    best, found = shared, entry
            best = min(best, len(prompt) - 1)
            if best < MIN_PREFIX_TOKENS or found is None:
                return 0, None
            self._entries.move_to_end(found.ids)
            self.hits += 1
            self.reused_tokens += best
            return best, found

    def add(self, prefix: Prefix) -> None:
        """Keep a prompt's keys and values (the oldest entries go when over `max_tokens`)."""
        with self._lock:
            if prefix.ids in self._entries:
                self._entries.move_to_end(prefix.ids)
                return
            self._entries[prefix.ids] = prefix
            self._tokens += len(prefix.ids)
            while self._tokens > self.max_tokens and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                self._tokens -= len(dropped.ids)


@dataclass
class BatchLayout:
    """Rows of a batch over a cached block (`cached` columns) and a new block, with their attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cached: int
    cache: Any  # a transformers DynamicCache holding the cached block, or None when nothing is cached
    real_columns: list[list[int]]  # per row, the columns holding its prompt's tokens


def batch_layout(prompts: list[list[int]], hits: list[tuple[int, Prefix | None]], pad: int, device: Any) -> BatchLayout:
    """Lay out prompts, some with a cached prefix, as one batch: ``[pad][cached][pad][new]`` per row."""
    cached = max(shared for shared, _ in hits)
    new = max(len(prompt) - shared for prompt, (shared, _) in zip(prompts, hits, strict=True))
    ids, mask, columns = [], [], []
    for prompt, (shared, _) in zip(prompts, hits, strict=True):
        fresh = len(prompt) - shared
        ids.append([pad] * (cached - shared) + prompt[:shared] + [pad] * (new - fresh) + prompt[shared:])
        mask.append([0] * (cached - shared) + [1] * shared + [0] * (new - fresh) + [1] * fresh)
        columns.append([*range(cached - shared, cached), *range(cached + new - fresh, cached + new)])
    cache = _cache_block(hits, cached) if cached else None
    return BatchLayout(torch.tensor(ids, device=device), torch.tensor(mask, device=device), cached, cache, columns)


def _cache_block(hits: list[tuple[int, Prefix | None]], width: int) -> Any:
    from transformers import DynamicCache

    template = next(entry for _, entry in hits if entry is not None).layers
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(template):
        block_keys = keys.new_zeros((len(hits), keys.shape[1], width, keys.shape[3]))
        block_values = values.new_zeros((len(hits), values.shape[1], width, values.shape[3]))
        for row, (shared, entry) in enumerate(hits):
            if entry is not None and shared:
                block_keys[row, :, width - shared :] = entry.layers[layer][0][0, :, :shared]
                block_values[row, :, width - shared :] = entry.layers[layer][1][0, :, :shared]
        cache.update(block_keys, block_values, layer)
    return cache


def prompt_prefixes(cache: Any, prompts: list[list[int]], columns: list[list[int]]) -> list[Prefix]:
    """Each row's prompt keys and values, taken out of the batch's cache after generation."""
    layers = _layer_tensors(cache)
    prefixes = []
    for row, (prompt, cols) in enumerate(zip(prompts, columns, strict=True)):
        index = torch.tensor(cols, device=layers[0][0].device)
        kept = [(k[row : row + 1, :, index].clone(), v[row : row + 1, :, index].clone()) for k, v in layers]
        prefixes.append(Prefix(tuple(prompt), kept))
    return prefixes


def _layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers 5
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers 4
