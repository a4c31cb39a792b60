"""Harvested step-wise samples to token ids: validation, tokenisation, the data hash and the batch collator."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from steper_dspy.errors import SteperError
from steper_dspy.lm.chat import IGNORE_INDEX, chat_prompt_ids, completion_ids
from steper_dspy.stages import STAGES
from steper_dspy.training.packing import NO_STAGE, ancestor_mask, is_linear, linear_feature, pack_steps

logger = logging.getLogger(__name__)

_STAGE_NAMES = tuple(s.value for s in STAGES)


def validate_samples(samples: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check that every sample has chat messages ending in an assistant reply and a known stage.

    Args:
        samples: Harvested samples, one per teacher predictor call:
            `{"messages": [..., {"role": "assistant", "content": ...}], "stage": "init", ...}`.

    Returns:
        The samples as a list, with `stage` normalised to its string value.

    Raises:
        SteperError: A sample is malformed; the message names its index and the field.
    """
    checked = []
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise SteperError(f"Sample {index} is a {type(sample).__name__}, not a dict with 'messages' and 'stage'.")
        stage = sample.get("stage")
        stage = getattr(stage, "value", stage)
        if stage is None:
            raise SteperError(f"Sample {index} has no 'stage' field: tag it with one of {list(_STAGE_NAMES)}.")
        if stage not in _STAGE_NAMES:
            raise SteperError(f"Sample {index} has unknown 'stage' {stage!r}: use one of {list(_STAGE_NAMES)}.")
        messages = sample.get("messages")
        if not isinstance(messages, list) or not messages:
            raise SteperError(f"Sample {index} has no 'messages' field (a non-empty list of chat messages).")
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise SteperError(
                    f"Sample {index} field 'messages[{position}]' is not a {{'role': ..., 'content': str}} message."
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise SteperError(f"Sample {index} field 'messages' has no assistant message (the target to learn).")
        if messages[-1]["role"] != "assistant":
            raise SteperError(
                f"Sample {index} field 'messages' must end with the assistant message (the target); "
                f"it ends with a {messages[-1]['role']!r} message."
            )
        if len(messages) < 2:
            raise SteperError(f"Sample {index} field 'messages' holds only the assistant reply, no prompt.")
        checked.append({**sample, "stage": stage})
    return checked


def data_hash(samples: Iterable[dict[str, Any]]) -> str:
    """sha256 of the samples written as JSON lines (sorted keys): equal data gives an equal hash."""
    digest = hashlib.sha256()
    for sample in samples:
        line = json.dumps(sample, sort_keys=True, ensure_ascii=False, default=str)
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def tokenize_sample(tokenizer: Any, sample: dict[str, Any]) -> dict[str, list[int]]:
    """Token ids and labels of one sample, templated exactly as the local engine prompts at inference.

    The prompt is the chat template of every message but the last, with the assistant generation prompt;
    the target is the last (assistant) message's text followed by the eos token. Labels are `-100` on the
    prompt so that the loss covers the target only.

    Args:
        tokenizer: The student's tokenizer (with a chat template).
        sample: A validated sample (see `validate_samples`).

    Returns:
        `{"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}`.
    """
    prompt = chat_prompt_ids(tokenizer, sample["messages"][:-1])
    target = completion_ids(tokenizer, sample["messages"][-1]["content"])
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


@dataclass
class TrainingData:
    """Tokenised samples ready for the Trainer, with what was kept and left out per stage.

    Attributes:
        features: One dict per training sequence (see `steper_dspy.training.packing.pack_steps`): the steps
            of one chain packed together, or one sample each when packing is off.
        stages: The trained stages, in the order `label_stages` index.
        num_samples: Kept samples per trained stage.
        dropped: Samples per stage left out for being longer than `max_length` tokens.
        skipped: Samples per stage left out because their stage is not trained.
        num_target_tokens: Target (loss-bearing) tokens per trained stage.
        duplicates: Samples per stage left out because an identical one (same messages) came before, e.g. the
            same step in two rollouts of a question.
    """

    features: list[dict[str, Any]]
    stages: tuple[str, ...]
    num_samples: dict[str, int]
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    num_target_tokens: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)


def build_training_data(
    samples: Sequence[dict[str, Any]], tokenizer: Any, stages: Sequence[str], max_length: int, *, pack: bool = True
) -> TrainingData:
    """Tokenise the samples of the trained stages; leave out (and count) those over `max_length` tokens.

    Over-long samples are dropped rather than truncated: a truncated prompt is one the student never sees
    at inference, and a truncated target teaches it to stop mid-field. A sample identical to an earlier one
    (the same step of two rollouts that agree) is trained on once.

    Args:
        samples: Validated samples (see `validate_samples`).
        tokenizer: The student's tokenizer.
        stages: The stages to train on; samples of other stages are skipped.
        max_length: The longest prompt + target length kept, in tokens (also the longest packed sequence).
        pack: Pack the steps of each chain (samples with the same `example_id` and `rollout`) into one
            sequence that computes their shared prompt prefix once (see `steper_dspy.training.packing`).

    Returns:
        The tokenised features and per-stage counts.

    Raises:
        SteperError: The tokenizer has no chat template, or no sample of the trained stages fits in `max_length`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SteperError(
            f"The tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: train an instruct "
            "(chat) model, or set tokenizer.chat_template to the template the student will be prompted with."
        )
    stages = tuple(str(getattr(s, "value", s)) for s in stages)
    num_samples = dict.fromkeys(stages, 0)
    tokens = dict.fromkeys(stages, 0)
    dropped: dict[str, int] = {}
    skipped: dict[str, int] = {}
    duplicates: dict[str, int] = {}
    seen: set[str] = set()
    chains: dict[Any, list[tuple[list[int], list[int], int]]] = {}
    for index, sample in enumerate(samples):
        stage = sample["stage"]
        if stage not in stages:
            skipped[stage] = skipped.get(stage, 0) + 1
            continue
        content = json.dumps([stage, sample["messages"]], sort_keys=True, ensure_ascii=False)
        if content in seen:
            duplicates[stage] = duplicates.get(stage, 0) + 1
            continue
        seen.add(content)
        encoded = tokenize_sample(tokenizer, sample)
        if len(encoded["input_ids"]) > max_length:
            dropped[stage] = dropped.get(stage, 0) + 1
            continue
        num_samples[stage] += 1
        tokens[stage] += sum(label != IGNORE_INDEX for label in encoded["labels"])
        key = _chain_key(sample, index) if pack else index
        chains.setdefault(key, []).append((encoded["input_ids"], encoded["labels"], stages.index(stage)))
    if dropped:
        logger.warning(
            "Left out %d samples longer than max_length=%d tokens (%s); raise max_length to keep them.",
            sum(dropped.values()),
            max_length,
            ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())),
        )
    if not chains:
        reason = f"all {sum(dropped.values())} are longer than max_length={max_length}" if dropped else "there are none"
        raise SteperError(
            f"No training samples for stages {list(stages)}: {reason}. Check the harvest's stages, "
            "TrainingConfig.stages and TrainingConfig.max_length."
        )
    features = [feature for steps in chains.values() for feature in _packs(steps, max_length)]
    return TrainingData(features, stages, num_samples, dropped, skipped, tokens, duplicates)


def _chain_key(sample: dict[str, Any], index: int) -> Any:
    """Samples of one chain share their example and rollout; a sample without them is a chain of its own."""
    if sample.get("example_id") is None:
        return ("sample", index)
    return ("chain", str(sample["example_id"]), sample.get("rollout", 0))


def _packs(steps: list[tuple[list[int], list[int], int]], max_length: int) -> list[dict[str, Any]]:
    """The steps of one chain as few packed sequences of at most `max_length` tokens each, in step order."""
    if len(steps) == 1:
        return [linear_feature(*steps[0])]
    packs, current, packed = [], [], None
    for step in steps:
        candidate = pack_steps([*current, step])
        if current and candidate["length"] > max_length:
            packs.append(packed)
            current, candidate = [step], pack_steps([step])
        else:
            current.append(step)
        packed = candidate
    packs.append(packed)
    return packs


@dataclass
class StageCollator:
    """Left-pad a batch of (packed) training sequences, with their attention structure and per-token stages.

    Padding goes on the left, so that the tokens that predict targets (last in every sequence) share the
    batch's trailing columns and the trainer computes output logits for those columns only. A batch of plain
    sequences gets a 2D padding mask; one with packed chains a 4D boolean mask (each token sees itself and its
    ancestors; a padding token only itself).

    Args:
        pad_token_id: The id to pad `input_ids` with (labels pad with -100).
        pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8 on GPUs).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = len(features)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((rows, width), dtype=torch.long)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        label_stages = torch.full((rows, width), NO_STAGE, dtype=torch.long)
        packed = not all(is_linear(f["parents"]) for f in features)
        if packed:
            attention_mask = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1, 1)
        else:
            attention_mask = torch.zeros((rows, width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            cols = slice(width - n, width)
            input_ids[row, cols] = torch.tensor(feature["input_ids"], dtype=torch.long)
            position_ids[row, cols] = torch.tensor(feature["position_ids"], dtype=torch.long)
            labels[row, cols] = torch.tensor(feature["labels"], dtype=torch.long)
            label_stages[row, cols] = torch.tensor(feature["label_stages"], dtype=torch.long)
            if packed:
                attention_mask[row, 0, cols, cols] = ancestor_mask(feature["parents"])
            else:
                attention_mask[row, cols] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
            "label_stages": label_stages,
            "num_tokens": torch.tensor(sum(f["sample_tokens"] for f in features)),
        }
