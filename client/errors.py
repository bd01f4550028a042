"""The client's typed errors, one per way a request can fail, mapped from the server's Thrift exceptions.

Users catch these, never Thrift classes: `RinglmError` catches everything the
client raises on purpose; the subclasses also derive from the built-in error
they resemble (ValueError, TimeoutError, ConnectionError, PermissionError), so
generic handlers do the right thing too.
"""

from __future__ import annotations

from ringlm.client.result import Result, result_from_thrift
from ringlm.idl import ringlm_thrift as thrift


class RinglmError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str, server: str | None = None):
        super().__init__(f"{server}: {message}" if server else message)
        self.message = message
        self.server = server


class InvalidRequestError(RinglmError, ValueError):
    """The request itself is wrong (`field` names what); retrying elsewhere cannot help."""

    def __init__(self, message: str, field: str | None = None, server: str | None = None):
        super().__init__(f"{field}: {message}" if field else message, server)
        self.field = field


class OverloadedError(RinglmError):
    """Every server tried was full (or draining); try again after `retry_after_ms`."""

    def __init__(self, message: str, retry_after_ms: int = 0, draining: bool = False,
                 server: str | None = None):
        super().__init__(message, server)
        self.retry_after_ms = retry_after_ms
        self.draining = draining


class DeadlineExceededError(RinglmError, TimeoutError):
    """The deadline passed; `partial` holds what was generated until then (None if nothing ran)."""

    def __init__(self, message: str, partial: Result | None = None, server: str | None = None):
        super().__init__(message, server)
        self.partial = partial


class CancelledError(RinglmError):
    """The server cancelled the request; `partial` holds what was generated until then."""

    def __init__(self, message: str, partial: Result | None = None, server: str | None = None):
        super().__init__(message, server)
        self.partial = partial


class UnauthorizedError(RinglmError, PermissionError):
    """The server wants an auth token this client did not present (or presented wrongly)."""


class ModelError(RinglmError):
    """The model failed on the server (a server fault, not the request's)."""


class ServerUnavailableError(RinglmError, ConnectionError):
    """One server could not be reached or went away mid-call (the client retries elsewhere).

    `sent` tells the two apart: False when no connection was made (refused, connect timeout, TLS
    handshake), which says the server is down; True when the call may have reached it (reset, EOF,
    read timeout), which may as well be this call's own fault or a long answer.
    """

    def __init__(self, message: str, server: str | None = None, sent: bool = True):
        super().__init__(message, server)
        self.sent = sent


class NoServerAvailableError(RinglmError, ConnectionError):
    """No server could take the request: none known, or every one tried failed (`errors` says how)."""

    def __init__(self, message: str, errors: dict[str, Exception] | None = None):
        self.errors = dict(errors or {})
        detail = "; ".join(f"{server}: {error.message if isinstance(error, RinglmError) else error}"
                           for server, error in self.errors.items())
        super().__init__(f"{message} ({detail})" if detail else message)


def from_thrift(error: Exception, server: str) -> RinglmError:
    """The typed error for a Thrift exception from `server`."""
    if isinstance(error, thrift.InvalidRequest):
        return InvalidRequestError(error.message, field=error.field, server=server)
    if isinstance(error, thrift.Overloaded):
        return OverloadedError(error.message, retry_after_ms=error.retry_after_ms or 0,
                               draining=bool(error.draining), server=server)
    if isinstance(error, thrift.DeadlineExceeded):
        partial = result_from_thrift(error.partial) if error.partial is not None else None
        return DeadlineExceededError(error.message, partial=partial, server=server)
    if isinstance(error, thrift.Cancelled):
        partial = result_from_thrift(error.partial) if error.partial is not None else None
        return CancelledError(error.message, partial=partial, server=server)
    if isinstance(error, thrift.Unauthorized):
        return UnauthorizedError(error.message, server=server)
    if isinstance(error, thrift.ModelError):
        return ModelError(error.message, server=server)
    return RinglmError(f"{type(error).__name__}: {error}", server=server)
