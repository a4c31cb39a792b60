"""A generation worker process of `WorkerPool`: ``python -m steper_dspy.lm.worker HOST PORT INDEX THREADS``.

It connects back to the pool, builds a `TransformersEngine` from the state the pool sends, loads the model and
answers requests until the pool closes the connection; requests are served by as many threads as the engine
batches, so that they decode together in its batcher.
"""

from __future__ import annotations

import os
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
    from steper_dspy.lm.workers import error_for_pool

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
            reply = (job, False, error_for_pool(exc))
        with send_lock:
            try:
                connection.send(reply)
            except (EOFError, OSError):  # the pool is gone
                return
            except Exception as exc:  # a reply that does not pickle: its caller still gets an answer
                connection.send((job, False, SteperLMError(f"The reply could not be sent ({exc!r}).")))

    with ThreadPoolExecutor(engine.max_batch_size) as pool:
        while True:
            try:
                job, request = connection.recv()
            except (EOFError, OSError):
                os._exit(0)  # the pool is gone: do not wait for requests still generating
            pool.submit(answer, job, request)


def main(argv: list[str]) -> None:
    host, port, index, threads = argv
    authkey = bytes.fromhex(os.environ.pop("STEPER_WORKER_AUTHKEY"))
    serve(Client((host, int(port)), authkey=authkey), int(index), int(threads))


if __name__ == "__main__":
    main(sys.argv[1:])
