"""Addon: the control API at ``http://llmitm.internal/`` (SPEC §8), served inside mitmproxy.

An ASGIApp on a virtual host, like mitmproxy's own onboarding app. The caller's identity was
decided by Identify (proxy auth, 407 on a wrong token); this addon hands it to the app and the
app decides what that caller may see and change.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, http
from mitmproxy.addons import asgiapp

from glue import (
    CONTROL_HOST,
    PAYMENTS_ADDON_NAME,
    SESSIONS_ADDON_NAME,
    current_config,
    for_control_host,
)
from llmitm import flowmeta
from llmitm.config import GatewayConfig
from llmitm.control_app import CALLER, Caller, PaymentsLister, build_app
from llmitm.sessions import SessionStore


class _Backend:
    """What the app needs from the running gateway, found by addon name."""

    def __init__(self) -> None:
        self._fallback_store = SessionStore()

    @property
    def store(self) -> SessionStore:
        sessions: Any = ctx.master.addons.get(SESSIONS_ADDON_NAME)
        return sessions.store if sessions is not None else self._fallback_store

    def config(self) -> GatewayConfig:
        return current_config()

    def effective_headers(self, config: GatewayConfig, session: str) -> tuple[
            dict[str, dict[str, str]], dict[str, str]]:
        configured = config.sessions[session].headers if session in config.sessions else {}
        return self.store.effective(session, configured)

    def payments(self) -> PaymentsLister | None:
        payments: Any = ctx.master.addons.get(PAYMENTS_ADDON_NAME)
        lister = getattr(payments, "list_payments", None) if payments is not None else None
        return lister if callable(lister) else None


class Control(asgiapp.ASGIApp):
    def __init__(self) -> None:
        super().__init__(build_app(_Backend()), CONTROL_HOST, None)

    @property
    def name(self) -> str:
        return "llmitm-control"

    def should_serve(self, flow: http.HTTPFlow) -> bool:
        return for_control_host(flow) and super().should_serve(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        if not self.should_serve(flow):
            return
        authorization = flow.request.headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        verified = flow.metadata.get(flowmeta.SESSION_VERIFIED) is True
        caller = Caller(
            session=flow.metadata.get(flowmeta.SESSION) if verified else None,
            bearer=token.strip() if scheme.lower() == "bearer" else None,
        )
        reset = CALLER.set(caller)
        try:
            await asgiapp.serve(self.asgi_app, flow)
        finally:
            CALLER.reset(reset)


addons = [Control()]
