"""Packing the steps of one chain into one training sequence, their shared prompt prefix computed once.

The prompts of a chain's steps begin alike: the system message, the question and the passages retrieved so
far (the shared-prefix layout of `steper_dspy.adapter` puts the step-specific text last). Packed, the tokens
form a tree: a prefix that several steps share appears once, and each step's own tokens hang below it. Every
token attends to itself and its ancestors only and keeps its position in its own step, so each step sees
exactly what it would see alone, and the loss is that of the unpacked samples.

Token order within a packed sequence is free (the mask and the positions carry the structure): the tokens that
predict a target (each step's last prompt token and its completion) are placed last, so that the trainer
computes output logits for those positions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steper_dspy.lm.chat import IGNORE_INDEX

NO_STAGE = -1


def linear_feature(input_ids: list[int], labels: list[int], stage: int) -> dict[str, Any]:
    """One unpacked sample in the packed form: a chain of a single step (each token's parent is the one before).

    Args:
        input_ids: Prompt + target ids.
        labels: `-100` on the prompt, the ids on the target (as `chat_training_ids` makes them).
        stage: The sample's stage index.

    Returns:
        ``input_ids``, ``position_ids``, ``parents``, ``labels`` (the id each position predicts, -100 where none),
        ``label_stages``, ``length`` and ``sample_tokens``.
    """
    return pack_steps([(input_ids, labels, stage)], share=False)


def pack_steps(steps: Sequence[tuple[list[int], list[int], int]], *, share: bool = True) -> dict[str, Any]:
    """Pack steps (input ids, labels, stage index) into one tree-shaped sequence.

    A step's prompt, up to but not including its last token, is shared with the steps before it as far as their
    ids agree; its last prompt token and its target tokens are its own (they predict its targets).

    Returns:
        The packed feature (see :func:`linear_feature`); ``parents[i]`` is the index of token i's parent (-1 for
        a root), ``position_ids[i]`` its position in its own step.
    """
    ids: list[int] = []
    parents: list[int] = []
    positions: list[int] = []
    trie: dict[tuple[int, int], int] = {}  # (parent index, token id) -> index of the shared prompt token
    tails = []
    for input_ids, labels, stage in steps:
        first_target = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        shared_until = max(0, first_target - 1)
        parent = -1
        for position in range(shared_until):
            key = (parent, input_ids[position])
            node = trie.get(key) if share else None
            if node is None:
                node = len(ids)
                ids.append(input_ids[position])
                parents.append(parent)
                positions.append(position)
                trie[key] = node
            parent = node
        tails.append((input_ids, labels, stage, shared_until, parent))
    targets = [IGNORE_INDEX] * len(ids)
    stages = [NO_STAGE] * len(ids)
    for input_ids, labels, stage, start, parent in tails:
        for position in range(start, len(input_ids)):
            ids.append(input_ids[position])
            parents.append(parent)
            positions.append(position)
            target = labels[position + 1] if position + 1 < len(labels) else IGNORE_INDEX
            targets.append(target)
            stages.append(stage if target != IGNORE_INDEX else NO_STAGE)
            parent = len(ids) - 1
    return {
        "input_ids": ids,
        "position_ids": positions,
        "parents": parents,
        "labels": targets,
        "label_stages": stages,
        "length": len(ids),
        "sample_tokens": sum(len(input_ids) for input_ids, _, _ in steps),
    }


def is_linear(parents: Sequence[int]) -> bool:
    """Whether a packed feature is a plain sequence (every token's parent is the token before it)."""
    return all(parent == index - 1 for index, parent in enumerate(parents))


def ancestor_mask(parents: Sequence[int]) -> Any:
    """The boolean attention matrix of a packed feature: row i is True at i and at each of its ancestors."""
    import torch

    n = len(parents)
    mask = torch.zeros((n, n), dtype=torch.bool)
    for index, parent in enumerate(parents):
        if parent >= 0:
            mask[index] = mask[parent]
        mask[index, index] = True
    return mask
