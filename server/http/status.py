"""The one map from core errors to HTTP status codes (SPEC §13), beside the gRPC status each one is on the other
transport: the request metrics' `code` label is that gRPC status name whatever the transport, so one dashboard
query counts a kind of failure on both."""

from __future__ import annotations

import logging

from server.base.errors import (
    DeadlineExpiredError,
    InvalidInputError,
    ModelNotFoundError,
    NotAllowedError,
    NotOfferedError,
    OverloadedError,
    SignatureNotFoundError,
    UnavailableError,
)

log = logging.getLogger(__name__)

# error kind -> (HTTP status, the gRPC status name it has on gRPC)
_STATUSES: dict[type[Exception], tuple[int, str]] = {
    InvalidInputError: (400, "INVALID_ARGUMENT"),
    ModelNotFoundError: (404, "NOT_FOUND"),
    OverloadedError: (429, "RESOURCE_EXHAUSTED"),
    UnavailableError: (503, "UNAVAILABLE"),
    DeadlineExpiredError: (504, "DEADLINE_EXCEEDED"),
    NotAllowedError: (400, "FAILED_PRECONDITION"),  # google.rpc's HTTP mapping of FAILED_PRECONDITION
    SignatureNotFoundError: (400, "FAILED_PRECONDITION"),  # as TF Serving's REST API answers it
    NotOfferedError: (501, "UNIMPLEMENTED"),
}
# The code label of an HTTP answer that no core error produced (the transport's own refusals).
CODE_OF_STATUS = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    408: "DEADLINE_EXCEEDED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def to_status(error: Exception) -> tuple[int, str, str]:
    """(HTTP status, gRPC status name, message) for an error raised while serving a request. Anything that is not one
    of the core's errors is a genuine fault: 500, logged with its traceback."""
    for error_type, (status, code) in _STATUSES.items():
        if isinstance(error, error_type):
            return status, code, str(error)
    log.error("internal error while serving an HTTP request", exc_info=error)
    return 500, "INTERNAL", f"internal error: {type(error).__name__}: {error}"
