"""Small mitmproxy-side helpers shared by the addons (the only shared glue; logic lives in llmitm/).

Addons find each other the mitmproxy way, by name through ``ctx.master.addons.get``, so each
addon module still loads alone with ``-s`` and then falls back to defaults.
"""

from __future__ import annotations

from mitmproxy import ctx, http

from llmitm import flowmeta
from llmitm.config import GatewayConfig
from llmitm.errors import JSON_HEADERS, error_body
from llmitm.providers import ProviderStyle

# Names addons find each other by, and the control API's virtual host: defined once, here.
CONFIG_ADDON_NAME = "llmitm-config"
SESSIONS_ADDON_NAME = "llmitm-sessions"
PAYMENTS_ADDON_NAME = "llmitm-payments"
CONTROL_HOST = "llmitm.internal"
_DEFAULT_CONFIG = GatewayConfig()


def current_config() -> GatewayConfig:
    """The validated configuration in force now (defaults when the config addon is absent)."""
    addon = ctx.master.addons.get(CONFIG_ADDON_NAME)
    config = getattr(addon, "config", None)
    return config if isinstance(config, GatewayConfig) else _DEFAULT_CONFIG


def for_control_host(flow: http.HTTPFlow) -> bool:
    """``flow.request.pretty_host == CONTROL_HOST``, the test mitmproxy's ASGI apps serve by.
    A substring test rules out almost every request first: ``pretty_host`` parses the Host
    header, several µs on every request of every addon that asks."""
    request = flow.request
    if CONTROL_HOST not in (request.host_header or request.host).lower():
        return False
    return request.pretty_host == CONTROL_HOST


def provider_style(flow: http.HTTPFlow) -> ProviderStyle:
    style = flow.metadata.get(flowmeta.PROVIDER_STYLE)
    return "anthropic" if style == "anthropic" else "openai"


def answer_error(flow: http.HTTPFlow, status: int, message: str, code: str,
                 headers: dict[str, str] | None = None) -> None:
    """Answer the flow from the gateway with a JSON error in the provider's shape."""
    flow.metadata[flowmeta.ANSWERED_BY_GATEWAY] = True  # nothing of this request went upstream
    flow.response = http.Response.make(
        status, error_body(provider_style(flow), status, message, code),
        {**JSON_HEADERS, "x-llmitm-error": code, **(headers or {})},
    )


def add_comment(flow: http.HTTPFlow, line: str) -> None:
    """Append a line to the flow comment (shown in mitmweb)."""
    flow.comment = f"{flow.comment}\n{line}" if flow.comment else line
