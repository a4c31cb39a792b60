"""A managed vLLM server for a local model: started on loopback, waited for, logged, and stopped with the run.

`VLLMServer(model).start()` launches vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`)
on a free port of 127.0.0.1 with prefix caching on, shows a progress line until `/health` answers, and writes the
server's output to a log file. The server is stopped when the run ends: by `stop()`, at interpreter exit, on
Ctrl-C, and (Linux) by the kernel when this process dies, so no orphan is left behind. `vllm_lm` returns a
`dspy.LM` (``hosted_vllm/<name>@<fingerprint>``) that calls it.

On a CPU machine the server gets every core of this process (`VLLM_CPU_OMP_THREADS_BIND`, no reserved core) and a
KV cache sized to the free memory (`VLLM_CPU_KVCACHE_SPACE`); set those variables to override.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from steper_dspy.errors import SteperError
from steper_dspy.lm.models import is_adapter_dir, model_fingerprint, resolve_model, steper_cache_dir

HOST = "127.0.0.1"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_MAX_MODEL_LEN = 8192
PORT_ATTEMPTS = 3  # starts on a fresh free port when vLLM finds the one it was given taken
_CONCURRENCY = re.compile(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x")
# Lines of a failed start that name its cause, most specific first.
_PORT_TAKEN = re.compile(r"address already in use|Errno 98", re.I)
_CAUSES = (
    (_PORT_TAKEN, "port {port} is already in use"),
    (
        re.compile(
            r"out of memory|Cannot allocate memory|MemoryError|insufficient memory|not enough (KV|memory)|"
            r"requested memory for kv|available KV cache memory|No available memory for the cache",
            re.I,
        ),
        "not enough memory for the model and its KV cache (lower VLLM_CPU_KVCACHE_SPACE or max_model_len, or free memory)",
    ),
    (
        re.compile(r"operator torchvision::nms does not exist", re.I),
        "torchvision does not match torch: `pip uninstall -y torchvision torchaudio torchcodec` (vllm-cpu pulls them in)",
    ),
    (
        re.compile(
            r"(No such file or directory|does not appear to have a file|Invalid repository ID|not a valid model)", re.I
        ),
        "the model folder cannot be loaded",
    ),
)
# Every server this process started, stopped ones too (so that a call to a dead one can say what happened).
_SERVERS: list[VLLMServer] = []
_SERVERS_LOCK = threading.Lock()
_STARTING = threading.Lock()  # one start at a time, so two LMs of one model share one server
# Servers are spawned from one long-lived thread: the kernel's parent-death signal follows the spawning thread.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steper-vllm-spawn")


def vllm_available() -> bool:
    """Whether vLLM is installed in this environment (`pip install steper-dspy[vllm]`)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMServer:
    """One vLLM OpenAI-compatible server for one local model.

    Args:
        model: A model folder with merged weights (a trained `model/`), a `.gguf` file (dequantised once into a
            cached folder) or a cached hub id.
        name: The served model name (default ``<folder name>@<fingerprint>``, so that DSPy's cache never mixes
            two checkpoints).
        port: The port; by default a free one.
        log_path: Where the server's output goes (default ``<steper cache>/logs/vllm-<name>.log``).
        max_model_len: The context length the server allows (prompt + reply).
        dtype: vLLM's ``--dtype``; ``auto`` is the fastest safe one of the device (bf16 where the hardware has
            it: a GGUF materialises to fp16, which CPUs compute slowly).
        max_num_seqs: Most requests the server runs at once.
        startup_timeout: Seconds to wait for `/health` before giving up.
        extra_args: Further command-line arguments for vLLM.
        progress: Show a progress line while the server starts.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        name: str | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        dtype: str = "auto",
        max_num_seqs: int = 32,
        startup_timeout: float = 1200.0,
        extra_args: tuple[str, ...] = (),
        progress: bool = True,
    ):
        self.model = str(model)
        self.folder = _servable_folder(model)
        self.name = name or f"{_model_name(model)}@{model_fingerprint(model)}"
        self.port = port
        self.log_path = (
            Path(log_path) if log_path else steper_cache_dir() / "logs" / f"vllm-{_file_safe(self.name)}.log"
        )
        self.max_model_len = max_model_len
        self.dtype = _server_dtype(dtype)
        self.max_num_seqs = max_num_seqs
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.progress = progress
        self.process: subprocess.Popen | None = None
        self.stopped = False
        self._log_start = 0  # where this run's part of the (appended) log begins
        self.max_concurrency = max_num_seqs

    @property
    def api_base(self) -> str:
        """The OpenAI-compatible endpoint, ``http://127.0.0.1:<port>/v1``."""
        return f"http://{HOST}:{self.port}/v1"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            sys.executable, "-m", SERVER_MODULE,
            "--model", self.folder,
            "--served-model-name", self.name,
            "--host", HOST,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--disable-uvicorn-access-log",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> VLLMServer:
        """Start the server and wait until it serves the model.

        Raises:
            SteperError: The server exited or did not answer in time; the message names the cause (port taken,
                not enough memory, a model folder it cannot load, ...) and the log's path.
        """
        if self.process is not None:
            return self
        chosen_port = self.port is None
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = _free_port() if chosen_port else self.port
            if not _port_is_free(self.port):
                if chosen_port and attempt < PORT_ATTEMPTS:  # taken since it was chosen: choose another
                    continue
                raise SteperError(f"Cannot start vLLM for {self.model}: port {self.port} is already in use.")
            try:
                self._launch()
                break
            except SteperError:
                # Another process can take a free port between our check and vLLM's bind: try another one.
                if not (chosen_port and attempt < PORT_ATTEMPTS and self._port_was_taken()):
                    raise
                self.process, self.stopped = None, False
        self.max_concurrency = self._logged_concurrency() or self.max_num_seqs
        return self

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = _SPAWNER.submit(self._spawn).result()
        with _SERVERS_LOCK:
            if self not in _SERVERS:
                _SERVERS.append(self)
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise

    def _port_was_taken(self) -> bool:
        return bool(_PORT_TAKEN.search(_log_tail(self.log_path, start=self._log_start)))

    def serves(self, folder: str, *, dtype: str, max_model_len: int) -> bool:
        """Whether this running server can take the place of one started for `folder` with these settings."""
        return self.folder == folder and self.dtype == dtype and self.max_model_len >= max_model_len and self.alive()

    def _spawn(self) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()  # the log is shared by every run of the model: causes are read from here
            log.write(f"\n$ {' '.join(self.command())}\n".encode())
            log.flush()
            return subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(),
                start_new_session=True,  # its own process group: stop() reaches vLLM's engine processes too
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    def _wait_until_healthy(self) -> None:
        from tqdm.auto import tqdm

        start = time.monotonic()
        desc = f"starting vLLM for {self.name} (log: {self.log_path})"
        with tqdm(desc=desc, unit="s", disable=not self.progress, bar_format="{desc}: {elapsed}") as bar:
            while not self.healthy():
                if self.process.poll() is not None:
                    raise SteperError(self.failure(f"exited with code {self.process.returncode}"))
                if time.monotonic() - start > self.startup_timeout:
                    raise SteperError(self.failure(f"did not answer within {self.startup_timeout:.0f} s"))
                time.sleep(0.5)
                bar.update()

    def healthy(self) -> bool:
        """Whether this server's process runs and its port serves this server's model now.

        Asking for the model, not only `/health`, tells our server from another one that took the port first
        (another run's vLLM answers `/health` as well; our process then fails to bind and exits).
        """
        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/v1/models", timeout=2) as response:
                models = json.loads(response.read()).get("data") or []
        except (OSError, ValueError, AttributeError, http.client.HTTPException):  # something else on the port
            return False
        return any(isinstance(m, dict) and m.get("id") == self.name for m in models)

    def exit_note(self) -> str:
        """How the server ended, for an error message: "was stopped" or "died (exit code N)"."""
        if self.stopped:
            return "was stopped"
        code = self.process.poll() if self.process is not None else None
        return "died" if code is None else f"died (exit code {code})"

    def alive(self) -> bool:
        """Whether the server process is running (and was not stopped)."""
        return self.process is not None and not self.stopped and self.process.poll() is None

    def failure(self, what: str) -> str:
        """One line for a person: this server `what` (e.g. "died"), the cause found in its log, and the log."""
        tail = _log_tail(self.log_path, start=self._log_start)
        cause = next((text.format(port=self.port) for pattern, text in _CAUSES if pattern.search(tail)), None)
        because = f": {cause}" if cause else ""
        return f"The vLLM server for {self.model} {what}{because}. Its log: {self.log_path}"

    def _logged_concurrency(self) -> int | None:
        found = _CONCURRENCY.findall(_log_tail(self.log_path, 200_000, start=self._log_start))
        return max(1, min(self.max_num_seqs, math.floor(float(found[-1])))) if found else None

    def stop(self) -> None:
        """Stop the server and its engine processes (SIGTERM, then SIGKILL after 30 s)."""
        process = self.process
        if process is None or self.stopped:
            return
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        # The API process can be gone (it died, or left on SIGTERM) while vLLM's engine processes of its group live.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self.stopped = True  # only now: an interrupted stop() is done again by stop_all at exit

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def server_environment() -> dict[str, str]:
    """The server's environment: this one, plus on a CPU machine all of this process's cores and a KV cache
    sized to the free memory (each left as set where the user set it)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not _has_cuda():
        cores = (
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        )
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _core_ranges(cores))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(_kv_cache_gib()))
    return env


def _server_dtype(dtype: str) -> str:
    from steper_dspy.lm.models import default_dtype

    if dtype != "auto":
        return dtype
    return str(default_dtype("cuda" if _has_cuda() else "cpu")).removeprefix("torch.")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _kv_cache_gib() -> int:
    """A quarter of the available memory, between 1 and 8 GiB (4 GiB served 18 chains of 8k tokens here)."""
    import psutil

    return int(min(8, max(1, psutil.virtual_memory().available / 2**30 // 4)))


def _core_ranges(cores: list[int]) -> str:
    ranges, start = [], cores[0]
    for previous, core in zip(cores, [*cores[1:], None], strict=True):
        if core != previous + 1:
            ranges.append(f"{start}-{previous}" if previous != start else str(start))
            start = core
    return ",".join(ranges)


def _servable_folder(model: str | Path) -> str:
    resolved = resolve_model(model)
    if isinstance(resolved, Path):
        if is_adapter_dir(resolved):
            raise SteperError(
                f"{model} is a LoRA adapter folder: vLLM serves merged weights. Train with merge on (the default) "
                "or use engine='transformers'."
            )
        if not (resolved / "config.json").is_file():
            raise SteperError(f"Cannot serve {model} with vLLM: {resolved} holds no config.json (not a model folder).")
        return str(resolved)
    return resolved  # a cached hub id: vLLM loads it from the cache


def _model_name(model: str | Path) -> str:
    path = Path(str(model))
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w.@-]+", "_", name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as vLLM binds: a port in TIME_WAIT is free
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, size: int = 20_000, *, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# Looked up here, not in the forked child: loading a library there can deadlock on a lock another thread held.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the server when this process dies, even by SIGKILL.
    _PRCTL(1, signal.SIGTERM)


def running_servers() -> list[VLLMServer]:
    """The servers this process started that are running."""
    with _SERVERS_LOCK:
        return [server for server in _SERVERS if server.alive()]


def shared_server(model: str | Path, **settings: Any) -> VLLMServer:
    """The running server of this process for `model`, started (with `settings`) if none serves it with the same
    dtype and at least the context length asked for."""
    with _STARTING:
        wanted = _servable_folder(model)
        dtype = _server_dtype(settings.get("dtype", "auto"))
        max_model_len = settings.get("max_model_len", DEFAULT_MAX_MODEL_LEN)
        with _SERVERS_LOCK:
            found = next((s for s in _SERVERS if s.serves(wanted, dtype=dtype, max_model_len=max_model_len)), None)
            dead = [s for s in _SERVERS if s.folder == wanted and not s.alive()]
        for server in dead:  # its engine processes may have outlived it: they would hold a second copy of the model
            server.stop()
        return found or VLLMServer(model, **settings).start()


def server_at(api_base: str | None) -> VLLMServer | None:
    """The server this process started at `api_base` (the latest, running or not), or None."""
    with _SERVERS_LOCK:
        return next((s for s in reversed(_SERVERS) if s.api_base == api_base), None)


def stop_all() -> None:
    """Stop every server this process started (also run at interpreter exit), dead ones' engine processes too."""
    with _SERVERS_LOCK:
        servers = list(_SERVERS)
    for server in servers:
        server.stop()


atexit.register(stop_all)


def request_settings() -> dict[str, Any]:
    """`dspy.LM` settings that make vLLM stop after ChatAdapter's end marker and keep it, as the in-process
    engine does (the same text for the same greedy generation)."""
    from steper_dspy.adapter import COMPLETED_MARKER  # the adapter imports dspy, which a server's caller has

    return {"stop": [COMPLETED_MARKER], "extra_body": {"include_stop_str_in_output": True}}
