"""User-fixable errors raised inside DSPy's engine boundary."""

from __future__ import annotations

from dspy.utils.exceptions import LMError

from steper_dspy.errors import SteperError


class SteperLMError(SteperError, LMError):
    """A `SteperError` raised from inside an engine (a lazy model load, a replay miss).

    DSPy wraps any engine exception that is not an `LMError` into `LMUnexpectedError`, which would hide the
    `SteperError` (and its fix) from callers and the command line. Being both, it passes through unchanged and
    is not retried (it is not one of DSPy's transient error classes).
    """

    default_code = "steper_user_error"

    def __init__(self, message: str, *, model: str | None = None):
        LMError.__init__(self, message, model=model)


def engine_error(exc: SteperError, model: str | None = None) -> SteperLMError:
    """The `SteperLMError` to raise (`from exc`) for a `SteperError` met while serving a request."""
    return exc if isinstance(exc, SteperLMError) else SteperLMError(str(exc), model=model)


class ServerDiedError(SteperLMError):
    """The model server a run started has died: every further call would fail the same way."""

    default_code = "server_died"
