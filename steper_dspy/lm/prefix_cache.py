"""Prompt prefixes computed once: the in-process engine's cache of recent prompts' keys and values.

The steps of a chain share their prompt up to the step's own instructions (see `steper_dspy.adapter`): the
expansion prompt begins with the initialization prompt's system message, question and passages. On a CPU the
prompt is most of the work, so the engine keeps the keys and values of recent prompts and, for a new request,
computes only the tokens after the longest prefix it already has (`prefill_row`), then joins the decode batch
(`steper_dspy.lm.batching`).
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


def prefill_row(
    model: Any, prompt: list[int], shared: int, entry: Prefix | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of `prompt[:-1]`: the cached prefix's, then the rest computed on top of it."""
    from transformers import DynamicCache

    if len(prompt) == 1:
        return []
    cache = DynamicCache()
    if entry is not None and shared:
        for layer, (keys, values) in enumerate(entry.layers):
            cache.update(keys[:, :, :shared], values[:, :, :shared], layer)
    if len(prompt) - 1 > shared:
        fresh = torch.tensor([prompt[shared:-1]], device=model.device)
        model(input_ids=fresh, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return layer_tensors(cache)


def layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the `(keys, values)` tensors of a transformers `DynamicCache`."""
    if hasattr(cache, "layers"):  # transformers 5
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers 4
