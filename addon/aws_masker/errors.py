"""Fail-closed answers: the proxy replies itself and forwards nothing."""

from __future__ import annotations

import json

from mitmproxy import http

ERROR_TYPES = {
    400: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    500: "api_error",
    501: "invalid_request_error",
    503: "api_error",
}


class Blocked(Exception):
    """Masking could not be done with certainty; the request must not leave."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def error_response(status: int, reason: str) -> http.Response:
    """An error in the Anthropic error shape, which the OpenAI SDKs also surface readably."""
    body = {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": f"aws-masker: {reason}"},
    }
    return http.Response.make(
        status,
        json.dumps(body).encode("utf-8"),
        {"content-type": "application/json", "x-aws-masker": "blocked"},
    )
