"""Batched generation for the in-process engine: concurrent requests gathered into one left-padded `generate`.

DSPy runs a program over many questions in threads (`dspy.Evaluate`, the harvest's `ParallelExecutor`); each
thread's call blocks in `TransformersEngine.complete`. `GenerationBatcher` collects the calls that arrive
within a short window, groups them by generation settings and runs each group as one batch, so the threads
share the matrix multiplications instead of queueing behind a lock.

DSPy ships `dspy.utils.unbatchify.Unbatchify` for this shape of work; it cannot group requests by their
settings and prints to stdout when it closes, hence this small variant.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationJob:
    """One request: its prompt ids and the settings that must be equal across a batch."""

    prompt: list[int]
    settings: Hashable
    future: Future = field(default_factory=Future)


_CLOSE = GenerationJob([], None)


class GenerationBatcher:
    """Runs `generate_batch(prompts, settings)` on groups of jobs with equal settings, in a worker thread.

    Args:
        generate_batch: Generates for a list of prompts that share `settings`; returns one result each
            (what `generate` returns).
        max_batch_size: Most prompts in one batch.
        wait_s: How long the first job of a round waits for others to join it.
    """

    def __init__(
        self,
        generate_batch: Callable[[list[list[int]], Any], Sequence[Any]],
        *,
        max_batch_size: int = 8,
        wait_s: float = 0.02,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.generate_batch = generate_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: queue.Queue[GenerationJob] = queue.Queue()
        self._held: list[GenerationJob] = []  # jobs of other settings left over from the last round
        self._worker = threading.Thread(target=self._run, name="steper-generation", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """End the worker once the jobs queued so far are done."""
        self._queue.put(_CLOSE)

    def generate(self, prompt: list[int], settings: Hashable) -> Any:
        """Generate for one prompt (blocking until its batch is done); raises what its batch raised."""
        job = GenerationJob(prompt, settings)
        self._queue.put(job)
        return job.future.result()

    def _run(self) -> None:
        while True:
            jobs = self._gather()
            if _CLOSE in jobs:
                for job in jobs:
                    if job is not _CLOSE:
                        job.future.set_exception(RuntimeError("the model was unloaded"))
                return
            settings = jobs[0].settings
            batch = [job for job in jobs if job.settings == settings][: self.max_batch_size]
            self._held = [job for job in jobs if job not in batch]
            try:
                outputs = self.generate_batch([job.prompt for job in batch], settings)
            except BaseException as exc:  # the callers re-raise it; the worker lives on
                for job in batch:
                    job.future.set_exception(exc)
                continue
            for job, output in zip(batch, outputs, strict=True):
                job.future.set_result(output)

    def _gather(self) -> list[GenerationJob]:
        jobs = self._held or [self._queue.get()]
        deadline = time.monotonic() + self.wait_s
        while sum(job.settings == jobs[0].settings for job in jobs) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs
