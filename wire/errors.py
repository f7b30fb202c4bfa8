"""Errors that cross the wire, named as AWS Lambda names them.

A reply that failed carries `error: {type, message, reason?, retryable?}`; `type` is the class's `type_name`.
`from_reply` turns such a map back into the same class on the calling side, so a client can catch
`TooManyRequestsException` exactly as a Lambda user would.
"""

from __future__ import annotations

from typing import Any


class FlintError(Exception):
    """Base of every error a tenant or operator can see. Subclasses set `type_name` and `retryable`."""

    type_name = "ServiceException"
    retryable = False

    def __init__(self, message: str, *, reason: str | None = None, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason
        if retryable is not None:
            self.retryable = retryable

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type_name, "message": self.message}
        if self.reason is not None:
            error["reason"] = self.reason
        if self.retryable or type(self).retryable:  # said whenever it differs from nothing-said (not retryable)
            error["retryable"] = bool(self.retryable)
        return error

    def __str__(self) -> str:
        suffix = f" (Reason: {self.reason})" if self.reason else ""
        return f"{self.type_name}: {self.message}{suffix}"


class ServiceException(FlintError):
    """Something on Flint's side failed; retrying may help."""

    type_name = "ServiceException"
    retryable = True


class PeerUnavailable(ServiceException):
    """A node did not answer in time or its connection dropped. Same Lambda name; the reason says which."""


class InvalidRequestContentException(FlintError):
    type_name = "InvalidRequestContentException"


class RequestTooLargeException(FlintError):
    type_name = "RequestTooLargeException"


class InvalidParameterValueException(FlintError):
    type_name = "InvalidParameterValueException"


class ResourceNotFoundException(FlintError):
    type_name = "ResourceNotFoundException"


class ResourceConflictException(FlintError):
    type_name = "ResourceConflictException"


class TooManyRequestsException(FlintError):
    type_name = "TooManyRequestsException"
    retryable = True


class AccessDeniedException(FlintError):
    type_name = "AccessDeniedException"


class ResourceNotReadyException(FlintError):
    type_name = "ResourceNotReadyException"
    retryable = True


class CodeStorageExceededException(FlintError):
    type_name = "CodeStorageExceededException"


_BY_NAME: dict[str, type[FlintError]] = {
    cls.type_name: cls
    for cls in (
        ServiceException,
        InvalidRequestContentException,
        RequestTooLargeException,
        InvalidParameterValueException,
        ResourceNotFoundException,
        ResourceConflictException,
        TooManyRequestsException,
        AccessDeniedException,
        ResourceNotReadyException,
        CodeStorageExceededException,
    )
}


def from_reply(error: Any) -> FlintError:
    """Rebuild the error a peer sent. Unknown or malformed error maps become ServiceException."""
    if not isinstance(error, dict):
        return ServiceException(f"peer sent a malformed error: {error!r:.200}")
    type_name = error.get("type")
    message = error.get("message")
    reason = error.get("reason")
    if not isinstance(message, str):
        message = repr(message)
    if not isinstance(reason, str):
        reason = None
    cls = _BY_NAME.get(type_name, ServiceException) if isinstance(type_name, str) else ServiceException
    err = cls(message, reason=reason)
    if isinstance(type_name, str) and cls is ServiceException and type_name != "ServiceException":
        err.type_name = type_name  # keep a name this version does not know, rather than hide it
    if "retryable" in error:
        err.retryable = error["retryable"] is True
    return err
