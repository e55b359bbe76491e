"""Sessions, session headers and per-turn headers (SPEC §3), as plain logic.

Who a request acts as, which configured headers apply to it (by scope), and how per-turn
headers combine with them. The mitmproxy glue is ``addons/sessions.py``; the control API's
state (runtime overlays and turns) lives in ``SessionStore`` here.

Traps from the seed review, kept on purpose: an explicit empty per-turn set ``{}`` is a real
value (override: "send no session headers this turn"), and a partial update never clears what
it does not mention.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from llmitm.scope import Scope

MergeStrategy = Literal["override", "merge"]
DEFAULT_SESSION = "default"

# RFC 9110 token characters for header names.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class HeaderError(ValueError):
    """A header set that must not be sent; the message says what is wrong (never a value)."""


def check_header(name: str, value: object) -> str:
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        raise HeaderError(f"header name {name!r} is not a valid HTTP header name")
    if not isinstance(value, str):
        raise HeaderError(f"header {name}: value must be a string, not {type(value).__name__}")
    if "\r" in value or "\n" in value:
        raise HeaderError(f"header {name}: value contains CR or LF")
    if name.lower().startswith("x-llmitm-"):
        raise HeaderError(f"header {name}: X-Llmitm-* headers are the gateway's own")
    return value


def check_session_id(session_id: str) -> str:
    if not _SESSION_ID.match(session_id):
        raise ValueError(
            f"session id {session_id!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    return session_id


ScopedHeaderMap = dict[str, dict[str, str]]  # scope text -> header name -> value


def check_scope(scope: object) -> str:
    """A scope names a host (pattern); ``/v1/*`` alone would match every host."""
    if not isinstance(scope, str) or not scope.strip().split("://")[-1].split("/", 1)[0]:
        raise HeaderError(f"scope {scope!r}: must start with a host or host pattern "
                          "(e.g. api.openai.com or api.anthropic.com/v1/*)")
    return scope


def _check_scoped(headers: Mapping[str, Mapping[str, object]]) -> None:
    for scope, names in headers.items():
        check_scope(scope)
        lowered: set[str] = set()
        for name, value in names.items():
            check_header(name, value)
            if name.lower() in lowered:
                raise HeaderError(f"scope {scope}: header {name} given twice (names ignore case)")
            lowered.add(name.lower())


class SessionConfig(BaseModel):
    """``sessions.<id>``."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr | None = Field(None, description="proxy-auth password required for this session")
    headers: ScopedHeaderMap = Field(
        default_factory=dict, description="scope (host[/path] pattern) -> header -> value"
    )

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: ScopedHeaderMap) -> ScopedHeaderMap:
        _check_scoped(value)
        return value


class ControlConfig(BaseModel):
    """``control``: the control API at http://llmitm.internal/."""

    model_config = ConfigDict(extra="forbid")

    admin_token: SecretStr | None = Field(None, description="Bearer token that manages every session")


def validate_sessions(sessions: dict[str, SessionConfig]) -> dict[str, SessionConfig]:
    for session_id in sessions:
        check_session_id(session_id)
    return sessions


# --- identity -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Identity:
    session: str
    verified: bool  # presented the session's token through proxy auth


class AuthFailure(Exception):
    """407: proxy credentials required or wrong. The message names the session, never a token."""


def tokens_equal(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())


def _configured_tokens(tokens: Mapping[str, str | None]) -> set[str]:
    return {t for t in tokens.values() if t}


def _require_valid_id(session: str) -> None:
    try:
        check_session_id(session)
    except ValueError as e:
        # Not repeated verbatim: a malformed id is often a pasted credential.
        raise AuthFailure(
            "invalid session id (use 1-64 letters, digits, '.', '_' or '-')"
        ) from e


def resolve_identity(proxy_credentials: tuple[str, str] | None, header_session: str | None,
                     tokens: Mapping[str, str | None]) -> Identity:
    """Proxy-auth user, else ``X-Llmitm-Session``, else ``default`` (SPEC §3).

    A session with a token is only ever acted as with that token presented through proxy auth,
    whichever way it was named.
    """
    if proxy_credentials is not None:
        user, password = proxy_credentials
        if user in _configured_tokens(tokens):
            # HTTPS_PROXY=http://TOKEN@host: the token would become a session id (logs, files).
            raise AuthFailure("the proxy user name is a session token; use http://SESSION:TOKEN@host")
        _require_valid_id(user)
        token = tokens.get(user)
        if token is None:
            return Identity(user, False)
        if tokens_equal(password, token):
            return Identity(user, True)
        raise AuthFailure(f"wrong proxy credentials for session {user!r}")
    session = header_session.strip() if header_session else DEFAULT_SESSION
    _require_valid_id(session)
    if tokens.get(session) is not None:
        raise AuthFailure(
            f"session {session!r} requires proxy authentication "
            f"(HTTPS_PROXY=http://{session}:TOKEN@host:port)"
        )
    return Identity(session, False)


# --- per-turn headers -------------------------------------------------------------------------

def parse_turn_headers(text: str) -> dict[str, str]:
    """``X-Llmitm-Turn-Headers``: a JSON object of string values. ``{}`` is a valid, empty set."""
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise HeaderError(f"X-Llmitm-Turn-Headers is not valid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(value, dict):
        raise HeaderError("X-Llmitm-Turn-Headers must be a JSON object of header names to strings")
    return validate_header_set(value, "X-Llmitm-Turn-Headers")


def validate_header_set(value: Mapping[str, object], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name, item in value.items():
        try:
            out[name] = check_header(name, item)
        except HeaderError as e:
            raise HeaderError(f"{where}: {e}") from None
        if name.lower() in seen:
            raise HeaderError(f"{where}: header {name} given twice (names ignore case)")
        seen.add(name.lower())
    return out


def parse_merge(text: str | None) -> MergeStrategy | None:
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("override", "merge"):
        return value  # type: ignore[return-value]
    raise HeaderError(f"X-Llmitm-Header-Merge must be 'override' or 'merge', not {text!r}")


@dataclass(frozen=True, slots=True)
class Injection:
    name: str
    value: str
    origin: Literal["session", "turn"]
    scope: str  # the session scope it matched, or "turn"
    matcher: Scope | None = None  # that scope, parsed (None for turn headers)


def combine(session_headers: list[Injection], turn: dict[str, str] | None,
            strategy: MergeStrategy) -> list[Injection]:
    """SPEC §3: no turn → session headers; override → only the turn's (``{}`` means none);
    merge → both, the turn winning on a case-insensitive clash."""
    if turn is None:
        return session_headers
    turn_injections = [Injection(n, v, "turn", "turn") for n, v in turn.items()]
    if strategy == "override":
        return turn_injections
    turn_names = {n.lower() for n in turn}
    return [h for h in session_headers if h.name.lower() not in turn_names] + turn_injections


# --- runtime state: overlays from PATCH and turns from PUT ---------------------------------------

@dataclass
class Overlay:
    """A PATCH over the config: ``cleared`` drops every configured header; per scope ``None``
    drops that scope, and per name ``None`` drops that header."""

    cleared: bool = False
    scopes: dict[str, dict[str, str | None] | None] = field(default_factory=dict)

    def apply_patch(self, headers: Mapping[str, Any] | None) -> None:
        if headers is None:
            return
        if not headers:  # explicit {}: clear everything, config included
            self.cleared, self.scopes = True, {}
            return
        for scope, names in headers.items():
            check_scope(scope)
            if names is None or names == {}:
                self.scopes[scope] = None
                continue
            if not isinstance(names, Mapping):
                raise HeaderError(f"headers.{scope}: must be an object of header names")
            current = self.scopes.get(scope) or {}
            for name, value in names.items():
                if value is None or value == "":
                    current[name] = None
                else:
                    check_header(name, value)
                    current = {k: v for k, v in current.items() if k.lower() != name.lower()}
                    current[name] = value
            self.scopes[scope] = current

    def effective(self, configured: ScopedHeaderMap) -> tuple[ScopedHeaderMap, dict[str, str]]:
        """(scope -> name -> value, "scope\\0lowername" -> "config"|"runtime")."""
        result: ScopedHeaderMap = {} if self.cleared else {s: dict(h) for s, h in configured.items()}
        sources = {f"{s}\0{n.lower()}": "config" for s, h in result.items() for n in h}
        for scope, names in self.scopes.items():
            if names is None:
                for n in result.pop(scope, {}):
                    sources.pop(f"{scope}\0{n.lower()}", None)
                continue
            target = result.setdefault(scope, {})
            for name, value in names.items():
                for existing in [k for k in target if k.lower() == name.lower()]:
                    del target[existing]
                    sources.pop(f"{scope}\0{existing.lower()}", None)
                if value is not None:
                    target[name] = value
                    sources[f"{scope}\0{name.lower()}"] = "runtime"
            if not target:
                del result[scope]
        return result, sources

    def is_empty(self) -> bool:
        return not self.cleared and not self.scopes


@dataclass(frozen=True)
class Turn:
    headers: dict[str, str]
    merge: MergeStrategy = "override"


@dataclass(frozen=True, slots=True)
class CompiledScope:
    text: str
    scope: Scope
    headers: tuple[tuple[str, str], ...]


def compile_scopes(headers: ScopedHeaderMap) -> tuple[CompiledScope, ...]:
    return tuple(CompiledScope(text, Scope.parse(text), tuple(h.items()))
                 for text, h in headers.items() if h)


def session_injections(scopes: tuple[CompiledScope, ...], host: str, port: int | None,
                       path: str) -> list[Injection]:
    """Headers of every matching scope; a later (more specific, as written) scope wins a clash."""
    chosen: dict[str, Injection] = {}
    for compiled in scopes:
        if compiled.scope.matches(host, path, port):
            for name, value in compiled.headers:
                chosen[name.lower()] = Injection(name, value, "session", compiled.text,
                                                 compiled.scope)
    return list(chosen.values())


class SessionStore:
    """Runtime state the control API changes: overlays (PATCH) and turns (PUT/DELETE).

    Kept in memory: a restart returns to the config file, which stays the source of truth.
    ``version`` moves on every change so callers can cache what they derive from it.
    """

    def __init__(self) -> None:
        self.overlays: dict[str, Overlay] = {}
        self.turns: dict[str, Turn] = {}
        self.version = 0

    def effective(self, session: str, configured: ScopedHeaderMap) -> tuple[
            ScopedHeaderMap, dict[str, str]]:
        """The session's headers now: the config's with the runtime overlay over them."""
        return self.overlays.get(session, Overlay()).effective(configured)

    def patch(self, session: str, headers: Mapping[str, Any] | None) -> None:
        overlay = self.overlays.get(session) or Overlay()
        trial = Overlay(overlay.cleared, {k: (dict(v) if v is not None else None)
                                          for k, v in overlay.scopes.items()})
        trial.apply_patch(headers)  # validate fully before changing anything
        self.overlays[session] = trial
        self.version += 1

    def set_turn(self, session: str, turn: Turn) -> None:
        self.turns[session] = turn
        self.version += 1

    def clear_turn(self, session: str) -> bool:
        self.version += 1
        return self.turns.pop(session, None) is not None
