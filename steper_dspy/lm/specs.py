"""An LM from the name a user already uses: a litellm/DSPy model string, a hub id, a local folder or a GGUF file."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dspy

from steper_dspy.errors import SteperError
from steper_dspy.lm.vllm import request_settings


def is_api_model(spec: str) -> bool:
    """Whether `spec` names a model served through litellm (``provider/model``) rather than local weights."""
    if Path(spec).expanduser().exists() or "/" not in spec:
        return False
    import litellm

    provider = spec.split("/", 1)[0]
    return provider in {str(getattr(p, "value", p)) for p in litellm.provider_list}


def make_lm(
    spec: str,
    *,
    api_base: str | Sequence[str] | None = None,
    max_tokens: int = 256,
    engine: str | None = None,
    server_log: str | Path | None = None,
    **kwargs: Any,
) -> dspy.LM:
    """Build a DSPy LM from a spec: a litellm/DSPy model string, a hub id, a local folder or a GGUF file.

    Args:
        spec: ``openai/gpt-4o-mini``, ``hosted_vllm/Qwen/Qwen2.5-7B-Instruct`` (with `api_base`),
            ``ollama_chat/llama3``, ``HuggingFaceTB/SmolLM2-135M-Instruct``, ``./my-model`` or ``model.gguf``.
        api_base: The endpoint of an API model served locally or remotely; several endpoints of the same model
            give one LM whose calls go to the least busy live one (see :func:`steper_dspy.lm.pool.pooled_lm`).
        max_tokens: Token limit per call.
        engine: For an API model, DSPy's client engine (``litellm``, ``auto``); for a local one, how it
            generates: ``auto``, ``vllm`` or ``transformers`` (see :func:`steper_dspy.lm.local_lm`).
        server_log: Where a vLLM server started for a local model writes its log.
        **kwargs: Passed on to ``dspy.LM`` or :func:`steper_dspy.lm.local_lm`.

    Raises:
        SteperError: An API model whose key is missing from the environment (naming the variable).
    """
    if not isinstance(api_base, str | None):
        bases = list(api_base)
        if len(bases) > 1:
            from steper_dspy.lm.pool import pooled_lm

            endpoints = [make_lm(spec, api_base=base, max_tokens=max_tokens, engine=engine, **kwargs) for base in bases]
            return pooled_lm(endpoints, cache=kwargs.get("cache", True))
        api_base = bases[0] if bases else None
    if is_api_model(spec):
        if api_base is None:
            _check_api_key(spec)
        elif _missing_keys(spec):
            # A local server (vLLM, transformers serve, ...) needs no key, but the clients refuse to send none.
            kwargs.setdefault("api_key", "EMPTY")
        if engine is not None:
            kwargs["engine"] = engine
        if spec.startswith("hosted_vllm/"):
            kwargs = {**request_settings(), **kwargs}  # a small model rambles on after ChatAdapter's end marker
        return dspy.LM(spec, api_base=api_base, max_tokens=max_tokens, temperature=0.0, **kwargs)
    if api_base is not None:
        raise SteperError(
            f"--api-base was given but {spec!r} is not a litellm model string: name the provider, e.g. "
            f"'hosted_vllm/{spec}' or 'openai/{spec}'."
        )
    from steper_dspy.lm import local_lm

    return local_lm(spec, max_tokens=max_tokens, engine=engine or "auto", server_log=server_log, **kwargs)


def _missing_keys(spec: str) -> list[str]:
    import litellm

    try:
        env = litellm.validate_environment(model=spec)
    except Exception:  # litellm could not tell: let the first call report it
        return []
    return [] if env.get("keys_in_environment", True) else list(env.get("missing_keys") or [])


def _check_api_key(spec: str) -> None:
    missing = _missing_keys(spec)
    if missing:
        raise SteperError(
            f"No API key for {spec}: set {' or '.join(missing)} in the environment (or pass --api-base for a "
            "server that needs none)."
        )
