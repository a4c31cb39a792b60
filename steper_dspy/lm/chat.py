"""The one place where chat messages become token ids, shared by local inference and training.

Training and inference must template prompts identically, or the student learns one prompt format and is
asked another. Both `TransformersEngine` and the trainer call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, ending with the assistant generation prompt.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: `{"role": ..., "content": ...}` dicts (system, user, assistant turns), without the
            completion to be generated.

    Returns:
        The prompt's token ids, exactly as the local engine feeds them to `generate`.
    """
    encoded = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    # transformers 5 returns a BatchEncoding here; older versions a plain list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def completion_ids(tokenizer: Any, completion: str) -> list[int]:
    """Token ids of an assistant completion as the model should generate it: the text, then the eos token.

    Args:
        tokenizer: The tokenizer used for `chat_prompt_ids`.
        completion: The assistant's reply text.

    Returns:
        The completion's token ids followed by `tokenizer.eos_token_id`.
    """
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


def chat_training_ids(
    tokenizer: Any, messages: Sequence[dict[str, str]], completion: str
) -> tuple[list[int], list[int]]:
    """Input ids and labels for supervised fine-tuning on one (prompt messages, completion) pair.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: The prompt messages (as for `chat_prompt_ids`).
        completion: The assistant reply to learn.

    Returns:
        `(input_ids, labels)`: labels equal the ids on the completion (and its eos) and `-100` on the prompt.
    """
    prompt = chat_prompt_ids(tokenizer, messages)
    target = completion_ids(tokenizer, completion)
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target
