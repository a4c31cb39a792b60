"""The async face of a synchronous engine: DSPy's `acall` needs one, our engines block (generation, file I/O)."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from dspy.lm15 import Request, Response, response_to_events


class ThreadedAsyncEngine:
    """Runs a sync engine's `complete` in a worker thread; subclasses name the sync class for `load_state`."""

    sync_class: ClassVar[type]

    def __init__(self, sync: Any):
        self.sync = sync

    def __deepcopy__(self, memo: dict[int, Any]) -> ThreadedAsyncEngine:
        return self  # its sync engine is shared by copies (see their __deepcopy__)

    async def complete(self, request: Request) -> Response:
        """Answer one request without blocking the event loop."""
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> Any:
        """Stream events of one answer (generated whole, then emitted)."""
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Close the sync engine."""
        self.sync.close()

    def dump_state(self) -> dict[str, Any]:
        """The sync engine's settings."""
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> ThreadedAsyncEngine:
        """Rebuild from `dump_state()`."""
        return cls(cls.sync_class.load_state(state))
