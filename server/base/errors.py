"""The core's errors. The core knows nothing of gRPC; server/grpc/status.py maps these to status codes."""

from __future__ import annotations

# Caller-supplied strings are cut to this many characters wherever they appear in a message, so that a huge
# name cannot overflow the status trailer (and turn NOT_FOUND into RESOURCE_EXHAUSTED).
MAX_ECHOED_CHARS = 64


def quoted(value: str) -> str:
    """A caller-supplied string for an error message: repr-quoted and cut to MAX_ECHOED_CHARS."""
    if len(value) <= MAX_ECHOED_CHARS:
        return repr(value)
    return f"{value[:MAX_ECHOED_CHARS]!r}... ({len(value)} characters)"


def quoted_list(values: list[str], shown: int = 3) -> str:
    """Several caller-supplied strings for an error message: the first few quoted, then how many more."""
    text = ", ".join(quoted(v) for v in values[:shown])
    return text + (f" and {len(values) - shown} more" if len(values) > shown else "")


class ServingError(Exception):
    """Base class: the message tells the caller what was expected and what was received."""


class InvalidInputError(ServingError):
    """Wrong input names, dtypes, shapes, row counts, or values the model cannot take."""


class ModelNotFoundError(ServingError):
    """No such model or version in the repository."""


class SignatureNotFoundError(ServingError):
    """The version has no signature of that key (TF Serving's FAILED_PRECONDITION, "Serving signature key ... not
    found"): the message names the signatures it has."""


class OverloadedError(ServingError):
    """The model's queue is full: the request is shed at once instead of waiting without bound."""


class UnavailableError(ServingError):
    """The server is starting (models not yet ready) or draining for shutdown."""


class DeadlineExpiredError(ServingError):
    """The request's deadline passed before the model could run it."""


class NotAllowedError(ServingError):
    """The server is configured not to do this (repository control switched off)."""


class NotOfferedError(ServingError):
    """A method, or a protocol extension, this server does not offer: the message says what to use instead."""
