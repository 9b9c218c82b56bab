"""What every protocol's handlers share: the core they call, and the metric labels of a request.

A request is counted (modelserver_requests_total, modelserver_request_duration_seconds) under a `method` label
that names the protocol and the method, `<protocol>.<method>` (`oip.ModelInfer`, `tfs.Predict`,
`typed.PredictMultiInput`), whatever transport carried it: each protocol lists its methods once, as a `Method`
enumeration in its handlers module, and its transports count under those values. Its `model` label is the model's
name when the repository knows the model, and one shared label otherwise (caller-supplied names must not make
series without bound).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import StrEnum

from server.base.errors import ModelNotFoundError
from server.dataplane.inference import InferenceService

# The model label of a model the repository does not know (and of a call counted before its model is read).
UNKNOWN_MODEL = "unknown"
# The model label of a call that names no model (ServerLive, ListModels, ...).
NO_MODEL = ""


class MethodLabel(StrEnum):
    """A protocol's methods, as the request metrics label them (`method`, `<protocol>.<method>`), whatever transport
    carries them; the member's name is the method's name in the protocol. Each protocol subclasses it once."""


@contextlib.contextmanager
def not_found_in_words(phrase: str) -> Iterator[None]:
    """An unknown model or version in a protocol's own words (`phrase`, which its clients look for), followed by
    ours (what exists)."""
    try:
        yield
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"{phrase}: {error}") from None


class Handlers:
    """A protocol's transport-free handlers: each takes a decoded request and returns a reply, or raises one of the
    core's errors (server/base/errors.py), which each transport maps to its status codes."""

    def __init__(self, core: InferenceService) -> None:
        self.core = core

    def model_label(self, name: str) -> str:
        """The metric label for a caller-supplied model name: unknown names share one label."""
        return name if self.core.is_known(name) else UNKNOWN_MODEL
