"""Local language models for DSPy: loading, fingerprinting, a transformers engine, and record/replay.

Names load on first use, so `import steper_dspy.lm.models` (the trainer's entry) stays free of DSPy imports.
"""

from steper_dspy.lazy import lazy_exports

_EXPORTS = {
    "chat_prompt_ids": "steper_dspy.lm.chat",
    "chat_training_ids": "steper_dspy.lm.chat",
    "completion_ids": "steper_dspy.lm.chat",
    "default_dtype": "steper_dspy.lm.models",
    "is_api_model": "steper_dspy.lm.specs",
    "make_lm": "steper_dspy.lm.specs",
    "load_model": "steper_dspy.lm.models",
    "materialize_gguf": "steper_dspy.lm.models",
    "model_fingerprint": "steper_dspy.lm.models",
    "resolve_model": "steper_dspy.lm.models",
    "TransformersEngine": "steper_dspy.lm.engine",
    "local_lm": "steper_dspy.lm.local",
    "max_concurrency": "steper_dspy.lm.local",
    "program_concurrency": "steper_dspy.lm.local",
    "release_lm": "steper_dspy.lm.local",
    "VLLMServer": "steper_dspy.lm.vllm",
    "RecordedLM": "steper_dspy.lm.recording",
    "RecordingEngine": "steper_dspy.lm.recording",
    "recorded_lm": "steper_dspy.lm.recording",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
