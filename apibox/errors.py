"""The ApiboxError tree.

Each class carries the HTTP status, the OpenAI error ``type`` and ``code`` it renders as, so
the gateway's error middleware and the CLI's one-line error both come from one place.
"""

from __future__ import annotations


class ApiboxError(Exception):
    """Base of every error apibox raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # Errors a retry cannot fix tell the official SDKs not to retry (x-should-retry: false).
    retryable: bool = True

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiboxError):
    status, type, code, retryable = 400, "invalid_request_error", None, False


class InvalidApiKey(ApiboxError):
    status, type, code, retryable = 401, "invalid_request_error", "invalid_api_key", False


class InsufficientQuota(ApiboxError):
    status, type, code, retryable = 402, "insufficient_quota", "insufficient_quota", False


class PermissionDenied(ApiboxError):
    status, type, code, retryable = 403, "permission_denied", "permission_denied", False


class NotFound(ApiboxError):
    status, type, code, retryable = 404, "invalid_request_error", "not_found", False


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ApiboxError):
    status, type, code, retryable = 409, "invalid_request_error", "conflict", False


class PayloadTooLarge(ApiboxError):
    status, type, code, retryable = 413, "invalid_request_error", "request_too_large", False


class RateLimited(ApiboxError):
    status, type, code = 429, "rate_limit_exceeded", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, headers: dict[str, str] | None = None,
                 retryable: bool = True) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.retryable = retryable  # False: the request itself is over the limit, however long one waits
        self.headers = dict(headers or {})  # e.g. the x-ratelimit-* state of the limit that refused


class UpstreamError(ApiboxError):
    """The upstream answered with an error or garbage (502)."""

    status, type, code = 502, "server_error", "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status, code = 503, "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status, code = 504, "upstream_timeout"


class ConfigError(ApiboxError):
    """The configuration file or environment is invalid; raised before anything starts."""

    status, type, code = 500, "config_error", "config_error"


class StoreError(ApiboxError):
    """The database is in a state apibox cannot work with (e.g. a migration failed)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached (down, restarting, or the connection to it lost)."""

    status, code = 503, "database_unavailable"
