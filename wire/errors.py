"""Errors that cross the wire, named as AWS Lambda names them.

A reply that failed carries `error: {type, message, reason?, retryable?}`; `type` is the class's `type_name`.
`from_reply` turns such a map back into the same class on the calling side, so a client can catch
`TooManyRequestsException` exactly as a Lambda user would.
"""

from __future__ import annotations

import enum
from typing import Any


class Reason(enum.StrEnum):
    """Every `reason` Flint gives an error, defined once. Lambda's own where it has one (throttles)."""

    # throttles (TooManyRequestsException), as Lambda names them
    CONCURRENT_LIMIT = "ConcurrentInvocationLimitExceeded"
    RESERVED_LIMIT = "ReservedFunctionConcurrentInvocationLimitExceeded"
    # Flint's own: a tenant's async events not yet run are at its quota (Lambda documents no such queue quota)
    EVENT_QUEUE_FULL = "EventQueueLimitExceeded"
    # a peer could not be asked (PeerUnavailable): the first certainly did not run, the others may have
    NOT_SENT = "NotSent"
    TIMEOUT = "Timeout"
    CONNECTION_LOST = "ConnectionLost"
    # routing an invoke (ServiceException)
    NO_ROUTE = "NoRoute"
    NO_MANAGER = "NoManager"
    NO_HEALTHY_WORKER = "NoHealthyWorker"
    NO_CAPACITY = "NoCapacity"
    WORKER_FULL = "WorkerFull"
    WORKER_UNREACHABLE = "WorkerUnreachable"
    WORKER_LOST = "WorkerLost"
    ADMISSION_EXPIRED = "AdmissionExpired"
    ALREADY_STARTED = "AlreadyStarted"
    SHUTTING_DOWN = "ShuttingDown"  # the node is stopping: the request was refused before anything ran
    TENANT_MEMORY = "TenantSandboxMemoryLimitExceeded"  # a throttle: the tenant's sandboxes hold their memory cap
    SANDBOX_RECLAIMED = "SandboxReclaimed"  # the platform stopped the sandbox mid-invoke: not the function's error
    # a function with network, on a worker that cannot give it a network of its own (no root, no nftables)
    NO_SAFE_NETWORK = "NoSafeNetwork"
    # replicated state (ServiceException)
    NOT_A_REPLICA = "NotAReplica"
    NO_QUORUM = "NoQuorum"
    MEMBERSHIP_CHANGE_FAILED = "MembershipChangeFailed"
    # code blobs (ServiceException)
    CODE_NOT_REPLICATED = "CodeNotReplicated"
    CODE_CORRUPTED = "CodeCorrupted"


class FlintError(Exception):
    """Base of every error a tenant or operator can see. Subclasses set `type_name` and `retryable`.

    `may_still_run` says that the operation may be running on a peer we lost (a host gone mid-invoke): the
    caller must not assume it did not happen. It never crosses the wire: it is the calling side's knowledge."""

    type_name = "ServiceException"
    retryable = False

    def __init__(self, message: str, *, reason: str | None = None, retryable: bool | None = None,
                 may_still_run: bool = False):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.may_still_run = may_still_run
        if retryable is not None:
            self.retryable = retryable

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type_name, "message": self.message}
        if self.reason is not None:
            error["reason"] = str(self.reason)
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


class InvalidZipFileException(FlintError):
    """The function's code could not be unpacked where it was to run: the function's fault, never the host's."""

    type_name = "InvalidZipFileException"


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
        InvalidZipFileException,
    )
}


def error_fields(err: BaseException) -> dict[str, Any]:
    """What a log line says of an error: its type and reason as well as its message."""
    if isinstance(err, FlintError):
        out: dict[str, Any] = {"error_type": err.type_name, "error": err.message}
        if err.reason is not None:
            out["reason"] = str(err.reason)
        return out
    return {"error_type": type(err).__name__, "error": str(err)}


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
