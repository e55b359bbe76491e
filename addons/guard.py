"""Addon: the leak guard (SPEC §9), last before the wire.

It checks what is really about to leave (headers, URL, body; client WebSocket messages) against
every secret of the configuration and the scope and session of every injected header, with one
``LeakChecker`` per configuration snapshot (and control-API change). On a finding the flow is
marked (⚠ in mitmweb), each finding becomes a flow comment line and an entry of
``flowmeta.LEAKS``, and one warning is logged per flow. With ``guard.action: block`` the request
is answered 403 in the provider's error shape and nothing goes upstream (a client WebSocket
message is dropped).

Bypassed requests (``X-Llmitm-Bypass``) are checked too: bypass keeps bodies byte-identical, it
does not let secrets out. Findings name secrets by origin (a config key path) and marker, never
by value. A secret found in the URL is replaced by its marker in the flow once the exchange is
over (right away when blocked), so mitmweb and mitmdump's flow log never print it.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from glue import SESSIONS_ADDON_NAME, add_comment, answer_error, current_config
from llmitm import flowmeta
from llmitm.config import GatewayConfig
from llmitm.leaks import (
    ConfigSecrets,
    Finding,
    Injected,
    LeakChecker,
    OutgoingRequest,
    env_sourced_headers,
    secrets_from_config,
)
from llmitm.sessions import Overlay

logger = logging.getLogger(__name__)

GUARD_MARK = ":warning:"


# -- the configuration's secrets, shared with the recorder ---------------------------------------
class _Snapshot:
    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.store: Any = None
        self.version: int = -1
        self.secrets = ConfigSecrets((), ())
        self.generation = 0


_snapshot = _Snapshot()


def _env_headers() -> frozenset[tuple[str, str, str]]:
    path = getattr(ctx.options, "llmitm_config", "") or ""
    if not path:
        return frozenset()
    try:
        return env_sourced_headers(Path(path).read_text(encoding="utf-8"))
    except OSError:
        return frozenset()


def current_secrets() -> tuple[int, ConfigSecrets]:
    """The secrets of the configuration in force and of the control API's runtime headers, with
    a generation number that changes whenever they may have (cache what you derive by it)."""
    config = current_config()
    sessions = ctx.master.addons.get(SESSIONS_ADDON_NAME)
    store = getattr(sessions, "store", None)
    version = getattr(store, "version", -1)
    snap = _snapshot
    if snap.config is config and snap.store is store and snap.version == version:
        return snap.generation, snap.secrets
    session_headers: dict[str, Any] = {}
    turn_headers: dict[str, dict[str, str]] = {}
    if store is not None:
        for sid, overlay in store.overlays.items():
            if isinstance(overlay, Overlay) and not overlay.is_empty():
                configured = config.sessions[sid].headers if sid in config.sessions else {}
                session_headers[sid] = store.effective(sid, configured)[0]
        turn_headers = {sid: dict(turn.headers) for sid, turn in store.turns.items()}
    snap.secrets = secrets_from_config(
        config,
        session_headers=session_headers,
        turn_headers=turn_headers,
        env_headers=_env_headers() if config.sessions else frozenset(),
    )
    snap.config, snap.store, snap.version = config, store, version
    snap.generation += 1
    return snap.generation, snap.secrets


def injected_of(flow: http.HTTPFlow) -> list[Injected]:
    entries = flow.metadata.get(flowmeta.INJECTED)
    if not isinstance(entries, list):
        return []
    return [i for i in (Injected.from_meta(e) for e in entries if isinstance(e, dict)) if i is not None]


def session_of(flow: http.HTTPFlow) -> str:
    session = flow.metadata.get(flowmeta.SESSION)
    return session if isinstance(session, str) and session else "default"


def _outgoing(flow: http.HTTPFlow, **parts: Any) -> OutgoingRequest:
    """What is about to leave on this flow, for the leak checker (where: the real host)."""
    req = flow.request
    return OutgoingRequest(session=session_of(flow), host=req.host, path=req.path, url=req.url,
                           port=req.port, **parts)


class Guard:
    name = "llmitm-guard"

    def __init__(self) -> None:
        self._generation = -1
        self._checker = LeakChecker(())
        # Flows whose URL carried a secret upstream: scrubbed once the exchange is over.
        self._scrub: weakref.WeakKeyDictionary[http.HTTPFlow, LeakChecker] = weakref.WeakKeyDictionary()

    def checker(self) -> LeakChecker:
        generation, secrets = current_secrets()
        if generation != self._generation:
            self._checker = secrets.checker()
            self._generation = generation
        return self._checker

    # -- hooks ---------------------------------------------------------------------------------
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        checker = self.checker()
        injected = injected_of(flow)
        if not checker and not injected:
            return
        req = flow.request
        findings = checker.check(_outgoing(
            flow, headers=list(req.headers.items(multi=True)),
            body=req.get_content(strict=False) or b"", injected=injected,
        ))
        if not findings:
            return
        block = current_config().guard.action == "block"
        in_url = any(f.where == "url" for f in findings)
        self._report(flow, findings, checker, "blocked: answered 403" if block else "")
        if block:
            names = ", ".join(sorted({f"{f.kind} in {f.where} ({f.origin})" for f in findings}))
            answer_error(
                flow,
                403,
                f"llmitm guard blocked this request: a configured secret or session header would "
                f"leave where it must not ({names}). Nothing was sent upstream.",
                "llmitm_leak_blocked",
            )
            if in_url:
                self._scrub_url(flow, checker)
        elif in_url:
            self._scrub[flow] = checker

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None or not flow.websocket.messages:
            return
        message = flow.websocket.messages[-1]
        if not message.from_client or not message.content:
            return
        checker = self.checker()
        if not checker:
            return
        findings = checker.check(_outgoing(flow, body=message.content, body_label="websocket"))
        if not findings:
            return
        block = current_config().guard.action == "block"
        self._report(flow, findings, checker, "blocked: message dropped" if block else "")
        if block:
            message.drop()

    def response(self, flow: http.HTTPFlow) -> None:
        checker = self._scrub.pop(flow, None) if self._scrub else None  # no weakref made: usually empty
        if checker is not None:
            self._scrub_url(flow, checker)

    def error(self, flow: http.HTTPFlow) -> None:
        self.response(flow)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _scrub_url(flow: http.HTTPFlow, checker: LeakChecker) -> None:
        flow.request.path = checker.secret_set.redact_text(flow.request.path)

    @staticmethod
    def _report(flow: http.HTTPFlow, findings: list[Finding], checker: LeakChecker, action: str) -> None:
        flow.marked = GUARD_MARK
        entries = flow.metadata.get(flowmeta.LEAKS)
        known = {Finding.from_meta(e) for e in entries} if isinstance(entries, list) else set()
        fresh = [f for f in findings if f not in known]
        flow.metadata[flowmeta.LEAKS] = [*(entries if isinstance(entries, list) else []),
                                         *(f.to_meta() for f in fresh)]
        for f in fresh:
            add_comment(flow, f"llmitm: LEAK {f.kind} in {f.where} {f.secret}: {f.explanation}")
        if action:
            add_comment(flow, f"llmitm: guard {action}, nothing was sent upstream")
        redact = checker.secret_set.redact_text
        url = redact(flow.request.url)
        summary = "; ".join(f"{f.kind} in {f.where}: {f.explanation}" for f in fresh or findings)
        logger.warning(
            "llmitm guard: session %s %s %s: %s%s",
            session_of(flow),
            flow.request.method,
            url,
            redact(summary),
            f" [{action}]" if action else " [marked]",
        )


addons = [Guard()]
