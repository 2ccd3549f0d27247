"""OpenAI-style errors: one exception type carrying status, message and the offending field."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from parallm.server.async_engine import RequestFailed
from parallm.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("parallm.server")

# OpenAI's ``error.type`` for each status we return.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error that becomes an HTTP response with an OpenAI-style body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        kind = _TYPES.get(self.status, HTTPStatus(self.status).phrase)
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(message, 400, param=param, code=code)


def from_validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first invalid field, from pydantic's report."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"malformed JSON body: {first['msg']}", code="invalid_json")
    # A union field fails once per alternative; report the field, not each alternative.
    loc = _common_prefix([e["loc"] for e in errors if e["loc"][:1] == first["loc"][:1]])
    param = ".".join(str(part) for part in loc) or None
    if param is None:
        return bad_request("the request body must be a JSON object", code="invalid_type")
    if first["type"] == "missing":
        return bad_request(f"'{param}' is a required property", param, "missing_required_parameter")
    got = first.get("input")
    detail = "; ".join(dict.fromkeys(e["msg"] for e in errors if e["loc"][: len(loc)] == loc))
    return bad_request(f"'{param}': {detail} (got {got!r})", param, "invalid_type")


def from_value_error(exc: ValueError, fields: set[str]) -> APIError:
    """A 400 from a ``ValueError`` whose message starts with the field name (SamplingParams)."""
    message = str(exc)
    first_word = message.split(" ", 1)[0].strip(":'\"")
    return bad_request(message, first_word if first_word in fields else None)


def _common_prefix(locs: list[tuple]) -> tuple:
    prefix = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def error_from(exc: BaseException) -> APIError:
    """The APIError that reports ``exc`` to a client."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestFailed):
        return APIError(str(exc), exc.status, code=str(exc.status))
    logger.exception("request failed", exc_info=exc)
    return APIError(f"{type(exc).__name__}: {exc}", 500, code="500")
