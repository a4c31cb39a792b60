"""One LM over several servers of the same model: each call goes to the least busy live endpoint.

A big harvest is served by several vLLM (or other OpenAI-compatible) servers. `pooled_lm` gives DSPy one LM
whose calls are spread over them: a call goes to the endpoint with the fewest calls in flight, and one that fails
to answer (connection refused, a dead server, a 5xx) is set aside for a while and the call is tried on the
others, so the chains of a dead server go on elsewhere and the harvest file stays one consistent file.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import dspy
from dspy.lm15 import Request, Response, response_to_events
from dspy.utils.exceptions import LMServerError, LMTransportError

from steper_dspy.lm.errors import SteperLMError
from steper_dspy.lm.threaded import ThreadedAsyncEngine

# What the pooled LM passes down in each request; connection settings stay with each endpoint's own LM.
GENERATION_SETTINGS = ("temperature", "max_tokens", "top_p", "top_k", "stop", "seed", "n")
# Failures that say "this endpoint cannot answer now", not "this request is wrong".
ENDPOINT_FAILURES = (LMTransportError, LMServerError)


class EndpointPool:
    """A DSPy engine that sends each request to the least busy of several LMs, failing over on endpoint errors.

    Args:
        lms: One LM per endpoint, all serving the same model.
        retry_after: Seconds an endpoint that failed is left out before it is tried again.
    """

    def __init__(self, lms: Sequence[dspy.BaseLM], *, retry_after: float = 60.0):
        if not lms:
            raise ValueError("an endpoint pool needs at least one LM")
        self.lms = list(lms)
        self.retry_after = retry_after
        self.in_flight = [0] * len(self.lms)
        self.served = [0] * len(self.lms)
        self._down_until = [0.0] * len(self.lms)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> EndpointPool:
        return self  # copies of a program share the pool and its view of which endpoints are up

    @property
    def max_concurrency(self) -> int | None:
        """The sum of the endpoints' capacities when each can tell (managed servers), else None."""
        from steper_dspy.lm.local import max_concurrency

        known = [max_concurrency(lm) for lm in self.lms]
        return sum(known) if all(known) else None

    def complete(self, request: Request) -> Response:
        """Answer on the least busy live endpoint; on an endpoint failure, try the others."""
        tried: set[int] = set()
        failure: Exception | None = None
        while (index := self._pick(tried)) is not None:
            lm = self.lms[index]
            try:
                with dspy.settings.context(disable_history=True):
                    response = lm(dataclasses.replace(request, model=lm.model))
            except ENDPOINT_FAILURES as err:
                failure = err
                tried.add(index)
                with self._lock:
                    self._down_until[index] = time.monotonic() + self.retry_after
                continue
            finally:
                with self._lock:
                    self.in_flight[index] -= 1
            with self._lock:
                self.served[index] += 1
            return response
        raise SteperLMError(
            f"None of the {len(self.lms)} endpoints answered ({', '.join(_base(lm) for lm in self.lms)}); "
            f"the last failure: {failure}"
        )

    def _pick(self, tried: set[int]) -> int | None:
        with self._lock:
            now = time.monotonic()
            candidates = [i for i in range(len(self.lms)) if i not in tried]
            live = [i for i in candidates if self._down_until[i] <= now] or candidates  # all down: try them anyway
            if not live:
                return None
            index = min(live, key=lambda i: (self.in_flight[i], self.served[i]))
            self.in_flight[index] += 1
            return index

    def stream(self, request: Request) -> Iterator[Any]:
        """Stream events of one answer (generated whole, then emitted)."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Nothing to release: the endpoints' LMs own their connections."""


class AsyncEndpointPool(ThreadedAsyncEngine):
    """The async face of an `EndpointPool` (for `acall`)."""

    sync_class = EndpointPool


def pooled_lm(lms: Sequence[dspy.BaseLM], **kwargs: Any) -> dspy.LM:
    """A `dspy.LM` whose calls are spread over `lms` (one per endpoint of the same model).

    Args:
        lms: The endpoints' LMs.
        **kwargs: `dspy.LM` settings of the pooled LM; generation settings default to the first LM's.

    Returns:
        The pooled LM, named like the first endpoint's model.
    """
    pool = EndpointPool(lms)
    first = lms[0]
    settings = {**{k: v for k, v in first.kwargs.items() if k in GENERATION_SETTINGS}, **kwargs}
    settings.setdefault("num_retries", 0)  # the pool fails over; the endpoints' LMs retry their own transients
    return dspy.LM(first.model, engine=pool, async_engine=AsyncEndpointPool(pool), **settings)


def _base(lm: dspy.BaseLM) -> str:
    return str(getattr(lm, "kwargs", {}).get("api_base") or lm.model)
