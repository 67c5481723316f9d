"""One error base carrying its HTTP status; REST and gRPC each map it once."""

from __future__ import annotations

from http import HTTPStatus


class ServingError(Exception):
    """An error the data plane reports to the client as OIP `{"error": message}`."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    #: (version, variant) of the routed version that failed it, counted against that
    #: version (a canary's failures are its own); None: failed before a version was chosen
    answered_by: tuple[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    status = HTTPStatus.BAD_REQUEST


class ModelNotFound(ServingError):
    status = HTTPStatus.NOT_FOUND


class RouteNotFound(ServingError):
    status = HTTPStatus.NOT_FOUND


class MethodNotAllowed(ServingError):
    status = HTTPStatus.METHOD_NOT_ALLOWED


class PayloadTooLarge(ServingError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class ModelNotReady(ServingError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


class InferenceFailed(ServingError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR


class ModelLoadError(Exception):
    """A model folder could not be loaded; the message says what is wrong with it."""
