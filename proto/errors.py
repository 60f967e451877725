"""Errors shared by both ends of the wire.

A node raises these; the gRPC servicer turns each into its status code, and the client turns a
status back into the same class, so LocalBackend and RemoteBackend fail the same way.
"""
from __future__ import annotations

import enum


class Status(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class BackendError(Exception):
    """A request a node refused or could not carry out; `status` says which kind."""

    status = Status.INTERNAL

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node

    def __str__(self) -> str:
        return f"{self.node}: {self.message}" if self.node else self.message


class InvalidArgument(BackendError):
    status = Status.INVALID_ARGUMENT


class NotFound(BackendError):
    status = Status.NOT_FOUND


class ResourceExhausted(BackendError):
    status = Status.RESOURCE_EXHAUSTED


class FailedPrecondition(BackendError):
    status = Status.FAILED_PRECONDITION


class Unauthenticated(BackendError):
    status = Status.UNAUTHENTICATED


class NodeUnavailable(BackendError):
    """The node did not answer (down, unreachable, or past its deadline)."""

    status = Status.UNAVAILABLE


ERROR_BY_STATUS: dict[Status, type[BackendError]] = {
    cls.status: cls
    for cls in (InvalidArgument, NotFound, ResourceExhausted, FailedPrecondition, Unauthenticated,
                NodeUnavailable, BackendError)
}
