"""Prompt prefixes computed once: the in-process engine's cache of recent prompts' keys and values.

The steps of a chain share their prompt up to the step's own instructions (see `steper_dspy.adapter`): the
expansion prompt begins with the initialization prompt's system message, question and passages. On a CPU the
prompt is most of the work, so the engine keeps the keys and values of recent prompts and, for a new request,
computes only the tokens after the longest prefix it already has. Each row of a batch computes its own new
prompt tokens; the rows then decode together, left-padded, the padding masked out and positions counted over
real tokens only, so every row sees what it would see alone.
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
    """Left-padded prompts whose keys and values are computed up to their last token, ready for `generate`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: Any  # a transformers DynamicCache over every prompt but its last token, or None for one-token prompts
    real_columns: list[list[int]]  # per row, the columns holding its prompt's tokens


def prefill_batch(model: Any, prompts: list[list[int]], hits: list[tuple[int, Prefix | None]], pad: int) -> BatchLayout:
    """Compute each prompt's keys and values up to its last token, one row at a time after its cached prefix,
    and lay the rows out as one left-padded batch whose `generate` computes only the last tokens.

    One row at a time because a batched prompt pass costs its longest row times the batch: a chain's first step
    (nothing cached) next to later steps (a few dozen new tokens each) would pad every row to the first's length.
    """
    rows = [_prefill_row(model, prompt, shared, entry) for prompt, (shared, entry) in zip(prompts, hits, strict=True)]
    width = max(len(prompt) for prompt in prompts) - 1
    ids = [[pad] * (width + 1 - len(prompt)) + prompt for prompt in prompts]
    mask = [[0] * (width + 1 - len(prompt)) + [1] * len(prompt) for prompt in prompts]
    columns = [list(range(width + 1 - len(prompt), width + 1)) for prompt in prompts]
    device = model.device
    return BatchLayout(
        torch.tensor(ids, device=device),
        torch.tensor(mask, device=device),
        _right_aligned(rows, width) if width else None,
        columns,
    )


def _prefill_row(
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
    return _layer_tensors(cache)


def _right_aligned(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], width: int) -> Any:
    """One DynamicCache of `width` columns holding each row's keys and values at its right end."""
    from transformers import DynamicCache

    template = next(row for row in rows if row)
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(template):
        block_keys = keys.new_zeros((len(rows), keys.shape[1], width, keys.shape[3]))
        block_values = values.new_zeros((len(rows), values.shape[1], width, values.shape[3]))
        for index, row in enumerate(rows):
            if row:
                length = row[layer][0].shape[2]
                block_keys[index, :, width - length :] = row[layer][0][0]
                block_values[index, :, width - length :] = row[layer][1][0]
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
