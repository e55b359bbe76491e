"""The control API at ``http://llmitm.internal/`` (SPEC §8), as a Starlette app.

Served inside mitmproxy by ``addons/control.py`` (an ASGIApp on a virtual host, like mitmproxy's
onboarding app); it never goes upstream. Who calls is decided before the app runs and handed in
through ``CALLER``: the session the request verifiably acts as (proxy auth with its token), or an
admin (``Authorization: Bearer <control.admin_token>``). Values of headers are always shown
redacted: the API says which headers exist and where they come from, never what they are.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmitm.config import GatewayConfig
from llmitm.redact import redacted
from llmitm.sessions import (
    HeaderError,
    SessionStore,
    Turn,
    check_session_id,
    parse_merge,
    tokens_equal,
    validate_header_set,
)


@dataclass(frozen=True)
class Caller:
    session: str | None  # a session verified by its token, or None
    bearer: str | None  # the Bearer token presented, if any (compared, never echoed)


CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("llmitm_control_caller")

PaymentsLister = Callable[[str | None, int], Awaitable[list[dict[str, Any]]]]


class ControlBackend(Protocol):
    @property
    def store(self) -> SessionStore: ...

    def config(self) -> GatewayConfig: ...

    def effective_headers(self, config: GatewayConfig, session: str) -> tuple[
        dict[str, dict[str, str]], dict[str, str]]: ...

    def payments(self) -> PaymentsLister | None: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_response(status: int, message: str, code: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="llmitm"'} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": code, "code": code}}, status,
                        headers=headers)


def build_app(backend: ControlBackend) -> Starlette:
    def is_admin(config: GatewayConfig, caller: Caller) -> bool:
        token = config.control.admin_token
        return bool(token and caller.bearer and tokens_equal(caller.bearer, token.get_secret_value()))

    def authorize(config: GatewayConfig, session: str | None) -> tuple[Caller, bool]:
        """(caller, admin). Raises 401 without credentials and 403 outside the caller's session."""
        caller = CALLER.get(Caller(None, None))
        admin = is_admin(config, caller)
        if admin:
            return caller, True
        if caller.bearer is not None:
            raise ApiError(401, "the Bearer token is not control.admin_token", "unauthorized")
        if caller.session is None:
            raise ApiError(401, "authenticate with your session's proxy credentials "
                                "(http://SESSION:TOKEN@proxy) or Bearer control.admin_token",
                           "unauthorized")
        if session is not None and session != caller.session:
            raise ApiError(403, f"session {caller.session!r} may manage only itself", "forbidden")
        return caller, False

    def known_sessions(config: GatewayConfig) -> list[str]:
        store = backend.store
        return sorted(set(config.sessions) | set(store.overlays) | set(store.turns))

    def view(config: GatewayConfig, session: str) -> dict[str, Any]:
        headers, sources = backend.effective_headers(config, session)
        overlay = backend.store.overlays.get(session)
        turn = backend.store.turns.get(session)
        configured = config.sessions.get(session)
        return {
            "id": session,
            "configured": configured is not None,
            "token": "set" if configured is not None and configured.token else None,
            "headers": {
                scope: {name: {"value": redacted(value), "source": sources[f"{scope}\0{name.lower()}"]}
                        for name, value in names.items()}
                for scope, names in headers.items()
            },
            "runtime": None if overlay is None or overlay.is_empty() else {
                "cleared_config_headers": overlay.cleared,
                "scopes": sorted(overlay.scopes),
            },
            "turn": None if turn is None else {
                "headers": {n: redacted(v) for n, v in turn.headers.items()},
                "merge": turn.merge,
            },
        }

    async def read_object(request: Request, allowed: set[str]) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise ApiError(400, "the body must be a JSON object", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_json")
        unknown = set(body) - allowed
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(sorted(unknown))}; "
                                f"allowed: {', '.join(sorted(allowed))}", "unknown_field")
        return body

    def session_id(request: Request) -> str:
        try:
            return check_session_id(request.path_params["session"])
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_session_id") from None

    async def healthz(request: Request) -> Response:
        config = backend.config()
        return JSONResponse({"status": "ok", "sessions": len(known_sessions(config)),
                             "payments": backend.payments() is not None})

    async def list_sessions(request: Request) -> Response:
        config = backend.config()
        caller, admin = authorize(config, None)
        ids = known_sessions(config) if admin else [caller.session or ""]
        return JSONResponse({"sessions": [view(config, s) for s in ids]})

    async def get_session(request: Request) -> Response:
        config = backend.config()
        sid = session_id(request)
        authorize(config, sid)
        return JSONResponse(view(config, sid))

    async def patch_session(request: Request) -> Response:
        config = backend.config()
        sid = session_id(request)
        authorize(config, sid)
        body = await read_object(request, {"headers"})
        headers = body.get("headers")
        if headers is not None and not isinstance(headers, dict):
            raise ApiError(400, "headers must be an object of scope -> header -> value",
                           "invalid_headers")
        try:
            backend.store.patch(sid, headers)
        except HeaderError as e:
            raise ApiError(400, str(e), "invalid_headers") from None
        return JSONResponse(view(config, sid))

    async def put_turn(request: Request) -> Response:
        config = backend.config()
        sid = session_id(request)
        authorize(config, sid)
        body = await read_object(request, {"headers", "merge"})
        headers = body.get("headers")
        if not isinstance(headers, dict):
            raise ApiError(400, "headers must be an object of header -> value ({} is allowed)",
                           "invalid_headers")
        merge = body.get("merge", "override")
        try:
            turn = Turn(validate_header_set(headers, "headers"),
                        parse_merge(merge if isinstance(merge, str) else repr(merge)) or "override")
        except HeaderError as e:
            raise ApiError(400, str(e), "invalid_headers") from None
        backend.store.set_turn(sid, turn)
        return JSONResponse(view(config, sid))

    async def delete_turn(request: Request) -> Response:
        config = backend.config()
        sid = session_id(request)
        authorize(config, sid)
        backend.store.clear_turn(sid)
        return JSONResponse(view(config, sid))

    async def payments(request: Request) -> Response:
        config = backend.config()
        caller, admin = authorize(config, None)
        lister = backend.payments()
        if lister is None:
            return JSONResponse({"enabled": False, "payments": []})
        try:
            limit = max(1, min(int(request.query_params.get("limit", "100")), 1000))
        except ValueError:
            raise ApiError(400, "limit must be an integer", "invalid_limit") from None
        wanted = request.query_params.get("session") if admin else caller.session
        return JSONResponse({"enabled": True, "payments": await lister(wanted, limit)})

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[
            [Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return error_response(e.status, e.message, e.code)
        return run

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, f"no control endpoint {request.method} {request.url.path}",
                              "not_found")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}",
                              "method_not_allowed")

    return Starlette(
        routes=[
            Route("/healthz", guarded(healthz), methods=["GET"]),
            Route("/sessions", guarded(list_sessions), methods=["GET"]),
            Route("/sessions/{session}", guarded(get_session), methods=["GET"]),
            Route("/sessions/{session}", guarded(patch_session), methods=["PATCH"]),
            Route("/sessions/{session}/turn", guarded(put_turn), methods=["PUT"]),
            Route("/sessions/{session}/turn", guarded(delete_turn), methods=["DELETE"]),
            Route("/payments", guarded(payments), methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )
