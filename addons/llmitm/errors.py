"""Errors the gateway itself produces, in each provider's error shape (SPEC §10).

OpenAI clients parse ``{"error": {"message", "type", "param", "code"}}``; Anthropic clients
parse ``{"type": "error", "error": {"type", "message"}}``. Messages say what went wrong and what
to do, and must never contain a secret (callers pass only names, hosts and reasons).
"""

from __future__ import annotations

import json

from llmitm.providers import ProviderStyle

# Anthropic's documented error types by status; OpenAI uses free-form types.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    407: "authentication_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
}


def error_body(style: ProviderStyle, status: int, message: str, code: str) -> bytes:
    """JSON error body; ``code`` is a short machine-readable reason such as ``upstream_unreachable``."""
    if style == "anthropic":
        payload: dict[str, object] = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
            "llmitm_code": code,
        }
    else:
        payload = {
            "error": {
                "message": message,
                "type": "llmitm_error" if status >= 500 else "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    return json.dumps(payload).encode()


JSON_HEADERS = {"content-type": "application/json"}
