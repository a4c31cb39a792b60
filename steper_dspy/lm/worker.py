"""A generation worker process of `WorkerPool`: ``python -m steper_dspy.lm.worker HOST PORT INDEX THREADS``.

It connects back to the pool, builds a `TransformersEngine` from the state the pool sends, loads the model and
answers requests until the pool closes the connection; requests are served by as many threads as the engine
batches, so that they decode together in its batcher.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Client, Connection
from typing import Any


def serve(connection: Connection, index: int, threads: int) -> None:
    """Answer the pool's requests on `connection` until it closes."""
    import torch

    from steper_dspy.lm.engine import TransformersEngine
    from steper_dspy.lm.errors import SteperLMError

    torch.set_num_threads(threads)
    connection.send(index)
    state = connection.recv()
    try:
        engine = TransformersEngine.load_state({**state, "workers": 1})
        engine.load()
    except Exception as exc:  # the pool reports it as the engine's own error
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    connection.send(("ready", None))
    send_lock = threading.Lock()

    def answer(job: int, request: Any) -> None:
        try:
            reply: tuple[int, bool, Any] = (job, True, engine.complete(request))
        except Exception as exc:
            reply = (job, False, exc)
        if not reply[1]:
            try:  # an error the pool could not unpickle would be lost with its job: check it round-trips
                pickle.loads(pickle.dumps(reply[2]))
            except Exception:
                reply = (job, False, SteperLMError(f"{type(reply[2]).__name__}: {reply[2]}"))
        with send_lock:
            connection.send(reply)

    with ThreadPoolExecutor(engine.max_batch_size) as pool:
        while True:
            try:
                job, request = connection.recv()
            except (EOFError, OSError):
                break
            pool.submit(answer, job, request)
    os._exit(0)  # the pool is gone: do not wait for requests still generating


def main(argv: list[str]) -> None:
    host, port, index, threads = argv
    authkey = bytes.fromhex(os.environ.pop("STEPER_WORKER_AUTHKEY"))
    serve(Client((host, int(port)), authkey=authkey), int(index), int(threads))


if __name__ == "__main__":
    main(sys.argv[1:])
