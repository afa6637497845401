"""Error types shared by the loaders, the engine and the server; the server maps each to a status code."""

from __future__ import annotations


class JAXServerError(Exception):
    """Base class. `status_code`, `error_type` and `param` shape the HTTP error body."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ModelLoadError(JAXServerError):
    """A model path, file or architecture that cannot be loaded."""


class BadRequestError(JAXServerError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    """The prompt (plus the requested new tokens) does not fit the context."""

    def __init__(self, message: str, *, param: str | None = "prompt"):
        super().__init__(message, param=param, code="context_length_exceeded")


class NotReadyError(JAXServerError):
    status_code = 503
    error_type = "service_unavailable"


class OverloadedError(JAXServerError):
    """Every slot is busy and the waiting queue is full; the client should retry later."""

    status_code = 503
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s


class EngineError(JAXServerError):
    """The engine failed while running a request."""


class AuthenticationError(JAXServerError):
    """A missing or wrong API key."""

    status_code = 401
    error_type = "authentication_error"


class NotFoundError(JAXServerError):
    """An unknown model name (or another named thing that does not exist)."""

    status_code = 404
    error_type = "invalid_request_error"  # OpenAI's type for an unknown model
