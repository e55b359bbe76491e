"""Addon: who is asking and what this is, before anything else acts on a request.

Provider and endpoint kind (from host and path), bypass, the session (proxy-auth user, else
``X-Llmitm-Session``, else ``default``; a session with a token answers 407 unless that token was
presented through proxy auth) and the per-turn headers (400 when malformed), all read from the
``X-Llmitm-*`` and ``Proxy-Authorization`` headers it takes off the request first, so none ever
goes upstream, whatever later addons decide.
"""

from __future__ import annotations

import weakref

from mitmproxy import connection, http
from mitmproxy.addons.proxyauth import parse_http_basic_auth

from glue import answer_error, current_config
from llmitm import flowmeta
from llmitm.config import GatewayConfig
from llmitm.providers import ProviderTable, classify_endpoint
from llmitm.sessions import (
    AuthFailure,
    HeaderError,
    parse_merge,
    parse_turn_headers,
    resolve_identity,
)

CONTROL_PREFIX = b"x-llmitm-"
PROXY_AUTHORIZATION = b"proxy-authorization"
_TURN_HEADERS: weakref.WeakKeyDictionary[http.HTTPFlow, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


def turn_headers_of(flow: http.HTTPFlow) -> dict[str, str] | None:
    """The request's parsed ``X-Llmitm-Turn-Headers`` (``{}`` is a real, empty set), or None."""
    return _TURN_HEADERS.get(flow)


def _is_control(name: bytes) -> bool:
    lname = name.lower()
    return lname.startswith(CONTROL_PREFIX) or lname == PROXY_AUTHORIZATION


def take_control_headers(headers: http.Headers) -> dict[str, str]:
    """Remove every ``X-Llmitm-*`` header and ``Proxy-Authorization``; return their values by
    lower-case name (repeated ones folded with ", ", as ``Headers.get`` does). One pass over the
    raw fields instead of a ``Headers`` lookup per name: this runs on every request."""
    found: dict[str, list[str]] = {}
    for name, value in headers.fields:
        if _is_control(name):
            found.setdefault(name.lower().decode("utf-8", "surrogateescape"), []).append(
                value.decode("utf-8", "surrogateescape"))
    if found:
        headers.fields = tuple(f for f in headers.fields if not _is_control(f[0]))
    return {name: ", ".join(values) for name, values in found.items()}


def _credentials(value: str) -> tuple[str, str] | None:
    try:
        _scheme, user, password = parse_http_basic_auth(value)
    except ValueError:
        return None
    return user, password


class Identify:
    name = "llmitm-identify"

    def __init__(self) -> None:
        self._derived_for: GatewayConfig | None = None
        self._providers = ProviderTable()
        self._tokens: dict[str, str | None] = {}
        # Proxy credentials given on CONNECT hold for every request inside that tunnel.
        self._tunnel_credentials: weakref.WeakKeyDictionary[connection.Client, tuple[str, str]] = (
            weakref.WeakKeyDictionary()
        )

    def _derive(self) -> None:
        config = current_config()
        if config is not self._derived_for:
            self._providers = ProviderTable(config.providers)
            self._tokens = {sid: (s.token.get_secret_value() if s.token else None)
                            for sid, s in config.sessions.items()}
            self._derived_for = config

    def http_connect(self, flow: http.HTTPFlow) -> None:
        value = flow.request.headers.get("proxy-authorization")
        if value is None:
            return
        credentials = _credentials(value)
        self._derive()
        try:
            if credentials is None:
                raise AuthFailure("malformed Proxy-Authorization (expected Basic user:token)")
            resolve_identity(credentials, None, self._tokens)
        except AuthFailure as e:
            self._answer_407(flow, str(e))
            return
        self._tunnel_credentials[flow.client_conn] = credentials

    def request(self, flow: http.HTTPFlow) -> None:
        # Stripped first, whatever happens next: none of them ever goes upstream.
        control = take_control_headers(flow.request.headers)
        if flow.response is not None:  # answered already (e.g. a concurrency 503)
            return
        self._derive()
        request, metadata = flow.request, flow.metadata
        provider = self._providers.match(request.host)  # where it goes, not the Host header
        metadata[flowmeta.PROVIDER] = provider.name if provider else None
        if provider is not None:
            metadata[flowmeta.PROVIDER_STYLE] = provider.style
        metadata[flowmeta.ENDPOINT] = classify_endpoint(request.path) if provider else "other"
        metadata[flowmeta.BYPASS] = control.get("x-llmitm-bypass", "").strip().lower() in ("1", "true")
        try:
            self._identify(flow, control)
        except AuthFailure as e:
            self._answer_407(flow, str(e))
        except HeaderError as e:
            answer_error(flow, 400, f"{e}. Nothing was sent upstream.", "invalid_turn_headers")

    def _identify(self, flow: http.HTTPFlow, control: dict[str, str]) -> None:
        """``control``: the request's control headers, as take_control_headers returned them."""
        credentials = self._tunnel_credentials.get(flow.client_conn) if self._tunnel_credentials else None
        if "proxy-authorization" in control:  # plain-HTTP proxy requests carry it themselves
            credentials = _credentials(control["proxy-authorization"])
            if credentials is None:
                raise AuthFailure("malformed Proxy-Authorization (expected Basic user:token)")
        identity = resolve_identity(credentials, control.get("x-llmitm-session"), self._tokens)
        flow.metadata[flowmeta.SESSION] = identity.session
        flow.metadata[flowmeta.SESSION_VERIFIED] = identity.verified
        merge = parse_merge(control.get("x-llmitm-header-merge"))
        if merge is not None:
            flow.metadata[flowmeta.TURN_MERGE] = merge
        if "x-llmitm-turn-headers" in control:
            _TURN_HEADERS[flow] = parse_turn_headers(control["x-llmitm-turn-headers"])

    @staticmethod
    def _answer_407(flow: http.HTTPFlow, message: str) -> None:
        answer_error(flow, 407, f"{message}. Nothing was sent upstream.", "proxy_auth_required",
                     {"Proxy-Authenticate": 'Basic realm="llmitm"'})


addons = [Identify()]
