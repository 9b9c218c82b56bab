"""The core's errors. The core knows nothing of gRPC; server/status.py maps these to status codes."""

from __future__ import annotations


class ServingError(Exception):
    """Base class: the message tells the caller what was expected and what was received."""


class InvalidInputError(ServingError):
    """Wrong input names, dtypes, shapes, row counts, or values the model cannot take."""


class ModelNotFoundError(ServingError):
    """No such model or version in the repository."""


class OverloadedError(ServingError):
    """The model's queue is full: the request is shed at once instead of waiting without bound."""


class UnavailableError(ServingError):
    """The server is starting (models not yet ready) or draining for shutdown."""


class DeadlineExpiredError(ServingError):
    """The request's deadline passed before the model could run it."""
