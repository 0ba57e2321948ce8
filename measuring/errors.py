"""
The protocol's error codes, one exception type per code.

Raise the type where the problem is found, with a message a user can act on (which field, which
file); ``dispatch`` turns it into ``{"Code", "Message"}`` in one place. Plain Python: the worker
process imports this module too, so it must never import the reactor.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MeasuringError(Exception):
    """An error the server answers with; ``code`` is the protocol's Code."""

    code: ClassVar[str] = "Internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, str]:
        """The ``Error`` object of an answer."""
        return {"Code": self.code, "Message": self.message}


class BadRequest(MeasuringError):
    """The request could not be read, or a field is missing or has the wrong type or value."""

    code = "BadRequest"


class TooLarge(MeasuringError):
    """The request is longer than ``--max-request-bytes``."""

    code = "TooLarge"


class Unauthorized(MeasuringError):
    """The request carries no valid token."""

    code = "Unauthorized"


class Forbidden(MeasuringError):
    """A path leads outside the data roots."""

    code = "Forbidden"


class NotFound(MeasuringError):
    """A folder, file, formula or job does not exist."""

    code = "NotFound"


class Busy(MeasuringError):
    """The server cannot take more work now."""

    code = "Busy"


class Timeout(MeasuringError):
    """A job ran longer than its time limit and was stopped."""

    code = "Timeout"


class Cancelled(MeasuringError):
    """A job was cancelled before it finished."""

    code = "Cancelled"


class MemoryLimit(MeasuringError):
    """A job used more memory than its limit and was stopped."""

    code = "MemoryLimit"


class JobFailed(MeasuringError):
    """The formulas raised, could not be imported, or their process died."""

    code = "JobFailed"


class Unavailable(MeasuringError):
    """The cluster the server runs its jobs on (``--scheduler``) cannot be reached or used."""

    code = "Unavailable"


class Internal(MeasuringError):
    """A fault in the server itself; the details are in the server's log."""

    code = "Internal"


ERRORS: dict[str, type[MeasuringError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        TooLarge,
        Unauthorized,
        Forbidden,
        NotFound,
        Busy,
        Timeout,
        Cancelled,
        MemoryLimit,
        JobFailed,
        Unavailable,
        Internal,
    )
}


def from_json(error: dict[str, Any]) -> MeasuringError:
    """Rebuild an error a worker sent as ``{"Code", "Message"}``; an unknown Code is Internal."""
    cls = ERRORS.get(str(error.get("Code")), Internal)
    return cls(str(error.get("Message", "")))
