"""Generation over several worker processes: each holds the model with its own share of the CPU cores.

On a CPU, one process generating with every core leaves most of them idle between the matrix products (a
decode step of a small model is mostly Python and memory traffic, and Python holds one core at a time). Two
processes with one torch thread each evaluated the quickstart's 40 questions in 132 s where one process with
two threads took 184 s (BENCHMARKS.md). `WorkerPool` starts `workers` processes (``python -m
steper_dspy.lm.worker``, so a user's script is never re-run in them), each with a `TransformersEngine` of the
same settings and its own batcher and prefix cache, and sends each request to one of them: the worker that
served the longest prefix of its prompt (the chain's earlier step, whose keys and values it holds), else the
least busy one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from itertools import count
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

from dspy.lm15 import ContextLengthError, Request, Response

from steper_dspy.errors import SteperError
from steper_dspy.lm.errors import SteperLMError

# Recent prompts remembered per worker, to send a chain's next step where its prefix is cached.
RECENT_PROMPTS = 64
MAX_WORKERS = 8
START_TIMEOUT_S = 600.0  # for every worker to connect
LOAD_TIMEOUT_S = 1800.0  # for every worker to load the model once connected


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: str, model: str | Path | None = None) -> int:
    """Worker processes for an in-process engine: the ``STEPER_WORKERS`` environment variable when set; else on
    a CPU one per usable core (at most `MAX_WORKERS`, and as many as the available memory holds copies of
    `model`'s weights twice over); on an accelerator one (its kernels, not Python, bound the speed)."""
    if os.environ.get("STEPER_WORKERS"):
        return max(1, int(os.environ["STEPER_WORKERS"]))
    if device != "cpu":
        return 1
    workers = min(usable_cores(), MAX_WORKERS)
    weights = _weights_bytes(model) if model is not None else 0
    available = _available_memory()
    if weights and available:
        workers = min(workers, max(1, available // (2 * weights)))
    return workers


def _weights_bytes(model: str | Path) -> int:
    from steper_dspy.lm.models import hub_snapshot_dir, resolve_model

    try:
        resolved = resolve_model(model)
    except SteperError:
        return 0  # the engine reports it when it loads
    folder = resolved if isinstance(resolved, Path) else hub_snapshot_dir(resolved)
    if folder is None:
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class WorkerPool:
    """Worker processes serving one `TransformersEngine`'s requests.

    Args:
        engine_state: The engine's `dump_state()` without `workers` (each worker builds the engine from it).
        workers: How many processes.
        threads: Torch threads per worker.
    """

    def __init__(self, engine_state: dict[str, Any], *, workers: int, threads: int):
        self.engine_state = engine_state
        self.workers = workers
        self.threads = threads
        self._lock = threading.Lock()
        self._ids = count()
        self._pending: dict[int, Future] = {}
        self._in_flight = [0] * workers
        self._recent: list[list[str]] = [[] for _ in range(workers)]
        self._connections: list[Connection] = []
        self._send_locks = [threading.Lock() for _ in range(workers)]
        self._processes: list[subprocess.Popen] = []
        self._failure: str | None = None
        # Stops the workers when the pool is collected (its engines are gone) or closed, or at exit.
        self._stop = weakref.finalize(self, _stop, self._processes, self._connections)
        self._start()

    def _start(self) -> None:
        authkey = secrets.token_bytes(16)
        with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
            host, port = listener.address
            env = {
                **os.environ,
                "STEPER_WORKER_AUTHKEY": authkey.hex(),
                "OMP_NUM_THREADS": str(self.threads),
                "MKL_NUM_THREADS": str(self.threads),
            }
            for index in range(self.workers):
                command = [
                    sys.executable,
                    "-m",
                    "steper_dspy.lm.worker",
                    host,
                    str(port),
                    str(index),
                    str(self.threads),
                ]
                self._processes.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
            # A worker that dies before it connects would leave accept() waiting: close the listener then.
            connected = threading.Event()
            threading.Thread(target=self._watch_start, args=(listener, connected), daemon=True).start()
            connections: dict[int, Connection] = {}
            try:
                while len(connections) < self.workers:
                    connection = listener.accept()
                    connections[connection.recv()] = connection
            except (EOFError, OSError):
                raise self._start_failed("did not start") from None
            finally:
                connected.set()
        self._connections.extend(connections[i] for i in range(self.workers))
        try:
            for connection in self._connections:
                connection.send(self.engine_state)
            self._await_loaded()
        except TimeoutError:  # before OSError, of which it is a kind
            raise self._start_failed(f"did not load the model within {LOAD_TIMEOUT_S:.0f} s") from None
        except (EOFError, OSError):
            raise self._start_failed("exited while loading the model") from None
        for index, connection in enumerate(self._connections):
            # The reader holds the pool weakly, so that the pool is freed (and stops its workers) with its engines.
            reader = threading.Thread(
                target=_read, args=(weakref.ref(self), index, connection), daemon=True, name="steper-worker"
            )
            reader.start()

    def _await_loaded(self) -> None:
        """Wait until every worker has loaded the model and said so.

        Raises:
            SteperError: A worker could not load the model (its message), as soon as it says so, however long
                the others still take.
            TimeoutError: A worker has not answered within `LOAD_TIMEOUT_S` (a worker hung in loading would
                otherwise hold the run forever).
        """
        waiting = list(self._connections)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while waiting:
            ready = wait(waiting, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            for connection in ready:
                waiting.remove(connection)
                status, message = connection.recv()
                if status != "ready":
                    self.close()
                    raise SteperError(message)
            if not ready and time.monotonic() > deadline:
                raise TimeoutError

    def _start_failed(self, what: str) -> SteperError:
        codes = ", ".join(f"worker {i}: code {p.poll()}" for i, p in enumerate(self._processes) if p.poll() is not None)
        self.close()
        return SteperError(
            f"The generation worker processes {what} ({codes or 'timed out'}): see the errors above "
            "(python -m steper_dspy.lm.worker)."
        )

    def _watch_start(self, listener: Listener, connected: threading.Event) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not connected.wait(0.2):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._processes):
                # close() alone does not wake a thread blocked in accept() on Linux; shutting the socket down does.
                with contextlib.suppress(AttributeError, OSError):
                    listener._listener._socket.shutdown(socket.SHUT_RDWR)
                listener.close()
                return

    @property
    def failed(self) -> bool:
        """Whether a worker stopped: the pool then answers every request with that error."""
        return self._failure is not None

    def complete(self, request: Request, key: str) -> Response:
        """Answer `request` on one worker (blocking); `key`, the text of its prompt, picks the worker."""
        future: Future = Future()
        with self._lock:
            if self._failure is not None:
                raise SteperLMError(self._failure)
            worker = self._pick(key)
            job = next(self._ids)
            self._pending[job] = future
            self._in_flight[worker] += 1
            recent = self._recent[worker]
            recent.append(key)
            del recent[:-RECENT_PROMPTS]
        try:
            with self._send_locks[worker]:
                self._connections[worker].send((job, request))
        except OSError as err:
            self._fail(f"A generation worker stopped ({err}).")
        ok, value = future.result()
        if not ok:
            raise error_from_worker(value)
        return value

    def _pick(self, key: str) -> int:
        # A worker holds this request's chain if it served a prompt of which this one repeats at least half (the
        # earlier step's prompt up to its passages); a shorter shared prefix is the template every prompt has.
        held = [0] * self.workers
        for worker, recent in enumerate(self._recent):
            for seen in recent:
                shared = len(os.path.commonprefix([key, seen]))
                if shared * 2 >= len(seen):
                    held[worker] = max(held[worker], shared)
        return max(range(self.workers), key=lambda i: (held[i], -self._in_flight[i]))

    def _answered(self, index: int, job: int, ok: bool, value: Any) -> None:
        with self._lock:
            future = self._pending.pop(job, None)  # None: the pool failed and answered it already
            self._in_flight[index] -= 1
        if future is not None:
            future.set_result((ok, value))

    def _fail(self, message: str) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = message
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            if not future.done():
                future.set_result((False, SteperLMError(message)))
        self._stop()  # the other workers too: a failed pool is never used again (see `failed`)

    def close(self) -> None:
        """Stop the workers; requests still in flight fail."""
        self._fail("The generation workers were stopped.")


def _read(pool_ref: weakref.ref, index: int, connection: Connection) -> None:
    """Hand each answer of worker `index` to its caller, until the worker's connection ends."""
    while True:
        try:
            job, ok, value = connection.recv()
        except Exception as exc:  # the connection ended (the worker exited) or a reply could not be read
            pool = pool_ref()
            if pool is not None and not pool.failed:
                cause = f"sent a reply that could not be read ({exc!r})"
                if isinstance(exc, (EOFError, OSError)):
                    with contextlib.suppress(subprocess.TimeoutExpired):  # its exit code, once it is reaped
                        pool._processes[index].wait(timeout=2)
                    cause = f"exited (code {pool._processes[index].poll()})"
                pool._fail(f"Generation worker {index} {cause} with requests in flight.")
            return
        pool = pool_ref()
        if pool is None:
            return
        pool._answered(index, job, ok, value)
        del pool


def _stop(processes: list[subprocess.Popen], connections: list[Connection]) -> None:
    for connection in connections:
        with contextlib.suppress(OSError):
            connection.close()
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


def error_for_pool(exc: Exception) -> Any:
    """A worker's request error in a form that reaches the pool: DSPy tells a context overflow by its type, which
    does not pickle, and an error the pool could not unpickle would be lost with its request."""
    if isinstance(exc, ContextLengthError):
        return ("ContextLengthError", str(exc))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return SteperLMError(f"{type(exc).__name__}: {exc}")
    return exc


def error_from_worker(value: Any) -> Exception:
    """The exception to raise for a worker's `error_for_pool` value."""
    if isinstance(value, tuple) and value[0] == "ContextLengthError":
        return ContextLengthError(value[1])
    return value
