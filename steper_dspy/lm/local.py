"""`local_lm`: a `dspy.LM` backed by a local transformers model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dspy

from steper_dspy.lm.engine import AsyncTransformersEngine, TransformersEngine


def local_lm(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_tokens: int = 256,
    temperature: float = 0.0,
    cache: bool = True,
    **kwargs: Any,
) -> dspy.LM:
    """A `dspy.LM` that generates with a local model through `TransformersEngine`.

    The model loads on the first call and is shared by every LM built with the same settings. The LM's model
    string, `steper-local/<name>@<fingerprint>`, names the exact weights (and adapter), so DSPy's cache never
    returns another checkpoint's answers. Programs using it save to JSON and load back with
    `program.load(path, allow_unsafe_lm_state=True)`.

    Args:
        model: A model folder, `.gguf` file, peft adapter folder or cached hub id.
        adapter: A peft adapter folder loaded on top of `model`.
        dtype: `"auto"` (bf16 where the hardware has it, else fp32/fp16), or a dtype name.
        device: `"auto"` (cuda if available, else cpu) or a torch device string.
        max_tokens: Default limit on new tokens per call.
        temperature: Default sampling temperature; 0 means greedy decoding.
        cache: Whether DSPy caches this LM's answers.
        **kwargs: Further `dspy.LM` arguments (e.g. `num_retries`, `callbacks`, `stop`).

    Returns:
        The configured `dspy.LM`.
    """
    engine = TransformersEngine(model, adapter=adapter, dtype=dtype, device=device, max_tokens=max_tokens)
    return dspy.LM(
        engine.model_string,
        engine=engine,
        async_engine=AsyncTransformersEngine(engine),
        temperature=temperature,
        max_tokens=max_tokens,
        cache=cache,
        **kwargs,
    )
