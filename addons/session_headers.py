"""Addon: session and per-turn headers (SPEC §3), with their provenance on the flow.

Session headers go only to requests inside their scope (host pattern, optional path pattern).
Per-turn headers come from the request (``X-Llmitm-Turn-Headers``, read by Identify) or from the
control API's turn for the session; the control API's turn applies to the session's model
requests (provider endpoints other than ``other``), never to telemetry or side hosts. The
gateway's value wins over a header the client sent with the same name.
"""

from __future__ import annotations

from mitmproxy import http

from glue import SESSIONS_ADDON_NAME, add_comment, current_config, for_control_host
from identify import turn_headers_of
from llmitm import flowmeta
from llmitm.config import GatewayConfig
from llmitm.leaks import Injected
from llmitm.sessions import (
    CompiledScope,
    Injection,
    MergeStrategy,
    SessionStore,
    combine,
    compile_scopes,
    session_injections,
)


class SessionHeaders:
    name = SESSIONS_ADDON_NAME

    def __init__(self) -> None:
        self.store = SessionStore()
        self._compiled: dict[str, tuple[CompiledScope, ...]] = {}
        self._compiled_for: tuple[GatewayConfig | None, int] = (None, -1)

    def effective_headers(self, config: GatewayConfig, session: str) -> tuple[
            dict[str, dict[str, str]], dict[str, str]]:
        configured = config.sessions[session].headers if session in config.sessions else {}
        return self.store.effective(session, configured)

    def scopes_for(self, config: GatewayConfig, session: str) -> tuple[CompiledScope, ...]:
        if config is not self._compiled_for[0] or self.store.version != self._compiled_for[1]:
            self._compiled, self._compiled_for = {}, (config, self.store.version)
        compiled = self._compiled.get(session)
        if compiled is None:
            compiled = compile_scopes(self.effective_headers(config, session)[0])
            self._compiled[session] = compiled
        return compiled

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or for_control_host(flow):
            return
        session = flow.metadata.get(flowmeta.SESSION)
        if not isinstance(session, str):
            return
        request = flow.request
        scopes = self.scopes_for(current_config(), session)
        # request.host is where the connection really goes (the CONNECT target); the Host header
        # is the client's to choose, so it must never decide where a session's key is sent.
        from_session = session_injections(scopes, request.host, request.port, request.path)
        turn = turn_headers_of(flow)
        strategy: MergeStrategy = flow.metadata.get(flowmeta.TURN_MERGE) or "override"
        origin_turn = "request"
        if turn is None and flow.metadata.get(flowmeta.ENDPOINT, "other") != "other":
            stored = self.store.turns.get(session)
            if stored is not None:
                turn, origin_turn = stored.headers, "control API"
                strategy = flow.metadata.get(flowmeta.TURN_MERGE) or stored.merge
        injections = combine(from_session, turn, strategy)
        if injections:
            self._inject(flow, session, injections, origin_turn)

    @staticmethod
    def _inject(flow: http.HTTPFlow, session: str, injections: list[Injection],
                turn_source: str) -> None:
        headers = flow.request.headers
        provenance = []
        for injection in injections:
            replaced = injection.name in headers
            headers[injection.name] = injection.value  # replaces any case variant the client sent
            provenance.append(Injected(injection.name, injection.origin, injection.matcher,
                                       session).to_meta())
            where = (f"session {session}, scope {injection.scope}" if injection.origin == "session"
                     else f"turn of session {session} via {turn_source}")
            note = " (replaced the client's value)" if replaced else ""
            add_comment(flow, f"llmitm: injected {injection.name} <- {where}{note}")
        flow.metadata[flowmeta.INJECTED] = provenance


addons = [SessionHeaders()]
