"""The one map from core errors to gRPC status codes (SPEC §3)."""

from __future__ import annotations

import logging

import grpc

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

_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExpiredError: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotAllowedError: grpc.StatusCode.FAILED_PRECONDITION,
    NotOfferedError: grpc.StatusCode.UNIMPLEMENTED,
    SignatureNotFoundError: grpc.StatusCode.FAILED_PRECONDITION,
}


def to_status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an error raised while serving a request.

    Anything that is not one of the core's errors is a genuine fault: INTERNAL, logged with its traceback.
    """
    for error_type, code in _CODES.items():
        if isinstance(error, error_type):
            return code, str(error)
    log.error("internal error while serving a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
