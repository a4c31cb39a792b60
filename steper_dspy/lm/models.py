"""Find, fingerprint and load local models: Hugging Face folders, GGUF files, peft adapters and cached hub ids."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steper_dspy.errors import SteperError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files that decide what a model generates; optimizer and trainer state in checkpoints are left out.
_FINGERPRINT_SUFFIXES = {".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".gguf", ".tiktoken"}
_FINGERPRINT_SKIP = {"trainer_state.json", "training_args.bin", "optimizer.bin", "scheduler.bin"}
_CHUNK = 1 << 22

_file_hashes: dict[tuple[str, int, int, int], str] = {}
_materialize_lock = threading.Lock()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info/warning logs while loading (a library prints nothing)."""
    from transformers.utils import logging

    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def steper_cache_dir() -> Path:
    """The cache root: `$STEPER_CACHE` if set, else `~/.cache/steper`."""
    return Path(os.environ.get("STEPER_CACHE") or Path.home() / ".cache" / "steper").expanduser()


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a folder holding a peft adapter (an `adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def resolve_model(model: str | Path) -> Path | str:
    """Turn a model reference into something `from_pretrained` can load offline.

    Args:
        model: A model folder, a peft adapter folder, a `.gguf` file, or a Hugging Face hub id
            (`"org/name"`) already in the local hub cache.

    Returns:
        The folder itself (model or adapter folder); for a `.gguf` file, a cached safetensors folder
        dequantised from it once; for a cached hub id, the id string.

    Raises:
        SteperError: The path does not exist, or the hub id is not in the local cache while the hub is
            unreachable.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return materialize_gguf(path)
        raise SteperError(
            f"Model {str(model)!r} is a file, not a model folder: pass a Hugging Face model folder "
            "(config.json + weights), a peft adapter folder, a .gguf file, or a hub id 'org/name'."
        )
    text = str(model)
    if isinstance(model, str) and _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        _check_hub_cached(text)
        return text
    raise SteperError(
        f"Model path {text!r} does not exist: pass an existing model folder, adapter folder or .gguf file "
        "(check the path and the working directory)."
    )


def _check_hub_cached(repo_id: str) -> None:
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    if is_offline_mode():
        raise SteperError(
            f"Model {repo_id!r} is neither a local path nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            "and the hub is unreachable (HF_HUB_OFFLINE is set): download it on a connected machine "
            "(`hf download` into the cache), or pass a local model folder or .gguf file."
        )


def hub_snapshot_dir(repo_id: str) -> Path | None:
    """The local snapshot folder of a cached hub model, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def file_sha256(path: str | Path) -> str:
    """Full sha256 of a file, cached on (path, size, mtime, inode) in memory and on disk so repeats are instant."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key in _file_hashes:
        return _file_hashes[key]
    record = steper_cache_dir() / "hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(record.read_text())
        if (saved["size"], saved["mtime_ns"], saved["inode"]) == key[1:]:
            _file_hashes[key] = saved["sha256"]
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    sha = digest.hexdigest()
    _file_hashes[key] = sha
    # Large weights take seconds to hash; remembering the digest on disk keeps the next process fast too.
    if stat.st_size > _CHUNK:
        saved = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "sha256": sha}
        _atomic_write_text(record, json.dumps(saved))
    return sha


def _atomic_write_text(target: Path, text: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    except OSError:
        return  # the hash cache is an optimisation only
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _folder_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in _FINGERPRINT_SUFFIXES
        and p.name not in _FINGERPRINT_SKIP
    )


def model_fingerprint(model: str | Path) -> str:
    """A short content hash of a model's weights, config and tokenizer (and adapter files, with its base).

    Args:
        model: Anything `resolve_model` accepts. A `.gguf` file is hashed as is (no materialisation).

    Returns:
        12 hex characters that change whenever the weights, config, tokenizer or adapter change.
    """
    path = Path(model).expanduser()
    digest = hashlib.sha256()
    if path.is_file() and path.suffix.lower() == ".gguf":
        digest.update(f"gguf:{file_sha256(path)}".encode())
        return digest.hexdigest()[:12]
    resolved = resolve_model(model)
    folder = Path(resolved) if isinstance(resolved, Path) else hub_snapshot_dir(resolved)
    if folder is None:  # a hub id that could not be found offline-and-online-checked; hash the name only
        digest.update(f"hub:{resolved}".encode())
        return digest.hexdigest()[:12]
    files = _folder_files(folder)
    if not files:
        raise SteperError(f"Model folder {str(folder)!r} holds no weights or config: pass a Hugging Face model folder.")
    for file in files:
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    if is_adapter_dir(folder):
        digest.update(f"base:{model_fingerprint(_adapter_base(folder))}".encode())
    return digest.hexdigest()[:12]


def materialize_gguf(gguf_file: str | Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder (model + tokenizer) and return the folder.

    The folder lives under `<cache>/materialized/<stem>-<sha256 prefix>/`; it is written to a temporary
    folder and renamed, so an interrupted run never leaves a half-written model behind.

    Args:
        gguf_file: A `.gguf` file transformers can read (llama, qwen2, ... architectures).

    Returns:
        The materialised model folder.

    Raises:
        SteperError: The file cannot be read as a GGUF model.
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    target = steper_cache_dir() / "materialized" / f"{gguf_file.stem}-{file_sha256(gguf_file)[:16]}"
    if (target / "config.json").is_file():
        return target
    with _materialize_lock:
        if (target / "config.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{gguf_file.stem}-"))
        try:
            _write_dequantized(gguf_file, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():  # not a concurrent writer winning the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_dequantized(gguf_file: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise SteperError(
            f"Cannot read GGUF file {str(gguf_file)!r} ({type(exc).__name__}: {exc}): the file may be truncated or "
            "corrupt, or its architecture unsupported by transformers; re-download it or pass a model folder."
        ) from exc
    # A GGUF-loaded model carries a quantizer that blocks saving and training; its weights are already dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    # fp16 holds dequantised values (a 4-8 bit code times an fp16 scale) almost exactly at half fp32's size;
    # bf16 is the fallback for weights beyond fp16's range.
    largest = max(p.detach().abs().max().item() for p in model.parameters())
    model.to(torch.float16 if largest < 6e4 else torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def default_dtype(device: str) -> torch.dtype:
    """The fastest safe dtype for inference on `device`.

    bf16 on CUDA GPUs with bf16 support and on CPUs with native bf16 (AVX512-BF16 or AMX), fp16 on older
    GPUs, fp32 otherwise.
    """
    import torch

    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if str(device).startswith("mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo (``model name``, ``cpu family``, ``flags``...;
    empty where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 matmuls are emulated."""
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpu_info().get("flags", "")))


def default_device() -> str:
    """`"cuda"` when a GPU is available, else `"cpu"`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _to_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default_dtype(device)
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype):
        raise SteperError(f"Unknown dtype {dtype!r}: use 'auto', 'bfloat16', 'float16' or 'float32'.")
    return value


def _adapter_base(adapter_dir: Path) -> str:
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise SteperError(
            f"Adapter config {str(adapter_dir / ADAPTER_CONFIG)!r} is unreadable ({exc}): re-save the adapter."
        ) from exc
    base = config.get("base_model_name_or_path")
    if not base:
        raise SteperError(
            f"Adapter {str(adapter_dir)!r} does not name its base model (base_model_name_or_path): "
            "pass the base model and this folder as `adapter=`."
        )
    beside = adapter_dir / base  # a relative base saved next to its adapters
    return str(beside) if not Path(base).expanduser().exists() and beside.exists() else base


def _check_adapter(adapter: str | Path) -> Path:
    path = Path(adapter).expanduser()
    if not is_adapter_dir(path):
        raise SteperError(
            f"Adapter {str(adapter)!r} is missing or not a peft adapter folder (no {ADAPTER_CONFIG}): "
            "pass the folder the trainer saved the adapter to."
        )
    return path


def load_model(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trainable: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a folder, GGUF file, adapter folder or cached hub id.

    Args:
        model: Anything `resolve_model` accepts. An adapter folder loads its base model plus the adapter.
        adapter: A peft adapter folder to load on top of `model`.
        dtype: `"auto"` (see `default_dtype`; float32 when `trainable`, for autocast training), a dtype
            name or a `torch.dtype`.
        device: `"auto"` (cuda if available, else cpu) or a torch device string.
        trainable: Leave the model in train mode with its adapter trainable; otherwise eval mode.

    Returns:
        `(model, tokenizer)`; the tokenizer has a pad token and pads on the left, for batched generation.

    Raises:
        SteperError: A path is missing, an adapter folder is invalid, or weights are missing or corrupt.
    """
    resolved = resolve_model(model)
    adapters: list[Path] = []
    if isinstance(resolved, Path) and is_adapter_dir(resolved):
        adapters.append(resolved)
        resolved = resolve_model(_adapter_base(resolved))
    if adapter is not None:
        adapters.append(_check_adapter(adapter))
    device = default_device() if device == "auto" else device
    torch_dtype = _to_dtype("float32" if trainable and dtype == "auto" else dtype, device)

    net = _load_weights(resolved, torch_dtype)
    tokenizer_source = next((a for a in reversed(adapters) if (a / "tokenizer_config.json").is_file()), resolved)
    tokenizer = _load_tokenizer(tokenizer_source)
    for i, adapter_dir in enumerate(adapters):
        net = _apply_adapter(net, adapter_dir, trainable=trainable and i == len(adapters) - 1)
    net.to(device)
    net.train(trainable)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if getattr(net.generation_config, "pad_token_id", None) is None:
        net.generation_config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer


def _load_tokenizer(source: Path | str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SteperError(
            f"Cannot load the tokenizer of {str(source)!r} ({type(exc).__name__}: {exc}): the tokenizer files "
            "are missing or corrupt; copy them from the base model (tokenizer.json, tokenizer_config.json)."
        ) from exc


def _load_weights(source: Path | str, dtype: torch.dtype) -> PreTrainedModel:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise SteperError(
            f"Cannot load model weights from {str(source)!r} ({type(exc).__name__}: {_weights_problem(source, exc)}): "
            "the config or weight files are missing or corrupt; re-save or re-download the model."
        ) from exc


def _weights_problem(source: Path | str, exc: Exception) -> str:
    if isinstance(source, Path):
        weights = sorted(p.name for p in source.glob("*.safetensors")) + sorted(p.name for p in source.glob("*.bin"))
        if not (source / "config.json").is_file():
            return f"no config.json in {source}"
        if not weights:
            return f"no *.safetensors or *.bin weight file in {source}"
        return f"{', '.join(weights)}: {exc}"
    return str(exc)


def _apply_adapter(net: Any, adapter_dir: Path, *, trainable: bool) -> Any:
    from peft import PeftModel
    from safetensors import SafetensorError

    if isinstance(net, PeftModel):
        net = net.merge_and_unload()  # stacking: fold the previous adapter in before adding the next
    try:
        with quiet_transformers():
            return PeftModel.from_pretrained(net, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise SteperError(
            f"Cannot load the peft adapter in {str(adapter_dir)!r} ({type(exc).__name__}: {exc}): its weight file "
            "(adapter_model.safetensors) is missing or corrupt, or it was trained for another base model."
        ) from exc
