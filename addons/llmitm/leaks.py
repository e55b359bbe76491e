"""Leak finding, shared by the live guard and the offline scanner (SPEC §9). No mitmproxy here.

Vocabulary:

- ``KnownSecret``: a secret value with its owner session, the scope it may be sent to, the
  header names it may travel in, and where it came from (``origin``, a config key path such as
  ``sessions.team-a.headers.api.openai.com.Authorization``).
- ``Injected``: one header the gateway put on a request, with its origin, owner session and scope.
- ``OutgoingRequest``: what is about to leave (or, offline, what a recording says left).
- ``Finding``: one problem. It never holds a secret, only its marker ``[redacted:xxxxxxxx]``.

A secret is fine only in a header it was configured for, on a request of its own session whose
host and path match its scope. Anything else is a finding:

- ``other_session``: it belongs to another session;
- ``out_of_scope_host`` / ``out_of_scope_path``: the request is outside its scope (a secret
  with no scope, like a proxy token or the wallet, may never go upstream at all);
- ``other_header``: right request, wrong header (e.g. an OpenAI key copied into a custom header);
- ``in_url`` / ``in_body``: it appears in the URL or in the body (or a WebSocket message).

An injected header is also checked on its own (its value need not be a secret): it must belong
to the request's session and match its scope.

``LeakChecker.check`` looks for the raw values (live guard); ``LeakChecker.check_recorded`` looks
for redaction markers whose digest is a known secret's (offline scan of redacted recordings).
Both precompute everything in the constructor; a check is a handful of dict lookups and one regex
search over headers, URL and body.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import parse_qsl, urlsplit

from llmitm.redact import (
    DEFAULT_MIN_LEN,
    SecretSet,
    bare_token,
    digest,
    iter_marker_digests,
    needle_pattern,
    needle_pattern_bytes,
    redacted,
    secret_needles,
)
from llmitm.scope import Scope

Kind = Literal[
    "out_of_scope_host",
    "out_of_scope_path",
    "other_session",
    "other_header",
    "in_url",
    "in_body",
]
KINDS: tuple[Kind, ...] = get_args(Kind)
# When a value has several owners, the finding names the closest one (least severe kind).
_RANK: dict[str, int] = {
    "other_header": 0,
    "out_of_scope_path": 1,
    "out_of_scope_host": 2,
    "other_session": 3,
}


ANYWHERE = Scope("*")


@dataclass(frozen=True, slots=True)
class KnownSecret:
    """A secret value and where it may go.

    ``session=None``: any session may send it (profile keys). ``scope=None``: it may never be
    sent upstream (proxy tokens, the admin token, the wallet). ``headers``: the header names it
    may travel in. ``value`` may be empty when only the ``digest`` is known (learned from a
    redacted recording).
    """

    origin: str
    value: str = ""
    session: str | None = None
    scope: Scope | None = None
    headers: tuple[str, ...] = ()
    digest: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple(h.lower() for h in self.headers))
        if not self.digest:
            if not self.value:
                raise ValueError(f"{self.origin}: a known secret needs a value or a digest")
            object.__setattr__(self, "digest", digest(self.value))

    @property
    def marker(self) -> str:
        return f"[redacted:{self.digest}]"


@dataclass(frozen=True, slots=True)
class Injected:
    """One header the gateway injected: its name, origin label (e.g. ``session:team-a`` or a
    config key path), owner session and scope (``None`` for turn headers, which go wherever
    their one request goes)."""

    name: str
    origin: str
    scope: Scope | None = None
    session: str | None = None

    def to_meta(self) -> dict[str, str]:
        """The entry for ``flow.metadata[flowmeta.INJECTED]`` (no value)."""
        out = {"name": self.name, "origin": self.origin}
        if self.scope is not None:
            out["scope"] = str(self.scope)
        if self.session is not None:
            out["session"] = self.session
        return out

    @classmethod
    def from_meta(cls, entry: Mapping[str, Any]) -> Injected | None:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            return None
        scope = entry.get("scope")
        session = entry.get("session")
        return cls(
            name=name,
            origin=str(entry.get("origin", "")),
            scope=Scope.parse(scope) if isinstance(scope, str) and scope else None,
            session=session if isinstance(session, str) else None,
        )


@dataclass(slots=True)
class OutgoingRequest:
    """A plain description of a request about to leave (or recorded as having left).

    ``path`` is the request target (path and query). ``url`` is the full URL when known (it is
    what the ``in_url`` search covers; ``path`` is used otherwise). ``body`` is the decoded
    body; set ``body_label`` to e.g. ``"websocket"`` to check a WebSocket message instead.
    """

    session: str
    host: str
    path: str = "/"
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    url: str = ""
    port: int | None = None
    injected: Sequence[Injected] = ()
    body_label: str = "body"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: Kind
    where: str  # header name, "url", "body" or "websocket"
    origin: str  # the secret's (or injected header's) origin label
    secret: str  # its marker, never the value; "" when unknown
    explanation: str

    def to_meta(self) -> dict[str, str]:
        """The entry for ``flow.metadata[flowmeta.LEAKS]``."""
        return {
            "kind": self.kind,
            "where": self.where,
            "origin": self.origin,
            "secret": self.secret,
            "explanation": self.explanation,
        }

    @classmethod
    def from_meta(cls, entry: Mapping[str, Any]) -> Finding | None:
        kind = entry.get("kind")
        if kind not in KINDS:
            return None
        return cls(
            kind=kind,
            where=str(entry.get("where", "")),
            origin=str(entry.get("origin", "")),
            secret=str(entry.get("secret", "")),
            explanation=str(entry.get("explanation", "")),
        )

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.kind, self.where.lower(), self.secret, self.origin)


def _marker_of(value: str) -> str:
    """The marker naming a header value: its own if it is (or holds) one, else its hash."""
    if not value:
        return ""
    for d, _ in iter_marker_digests(value):
        return f"[redacted:{d}]"
    return redacted(value)


def _owner(s: KnownSecret) -> str:
    return f"session {s.session}" if s.session is not None else "any session"


def _scope_text(s: KnownSecret) -> str:
    if s.scope is None:
        return "may never be sent upstream"
    allowed = ", ".join(s.headers) if s.headers else "no header"
    return f"allowed for {s.scope} in {allowed}"


class LeakChecker:
    """One precomputed matcher over all known secrets. Immutable; build a new one when the
    configuration changes. Thread-safe (no state changes after construction)."""

    def __init__(
        self,
        secrets: Iterable[KnownSecret],
        *,
        learned: Iterable[KnownSecret] = (),
        min_len: int = DEFAULT_MIN_LEN,
    ) -> None:
        known = list(secrets)
        config_digests = {s.digest for s in known}
        # Learned owners only fill in what the configuration does not know.
        known += [s for s in learned if s.digest not in config_digests]
        self.secrets: tuple[KnownSecret, ...] = tuple(known)
        self.min_len = min_len

        by_value: dict[str, list[KnownSecret]] = {}
        by_digest: dict[str, list[KnownSecret]] = {}
        needles: dict[str, tuple[str, list[KnownSecret]]] = {}
        for s in self.secrets:
            by_digest.setdefault(s.digest, []).append(s)
            if not s.value:
                continue
            by_value.setdefault(s.value, []).append(s)
            token = bare_token(s.value)
            if token is not None:
                by_digest.setdefault(digest(token), []).append(s)
            for needle, canonical in secret_needles(s.value):
                if len(needle) < min_len or len(canonical) < min_len:
                    continue
                entry = needles.setdefault(needle, (canonical, []))
                entry[1].append(s)
        # value -> (its marker, the secrets with it): markers made once, not per request
        self._by_value = {v: (redacted(v), tuple(c)) for v, c in by_value.items()}
        self._by_digest = {d: tuple(c) for d, c in by_digest.items()}
        self._needles = {n: (redacted(c), tuple(ss)) for n, (c, ss) in needles.items()}
        self._needles_b = {n.encode("utf-8", "surrogateescape"): v for n, v in self._needles.items()}
        self._re: re.Pattern[str] | None = needle_pattern(self._needles) if needles else None
        self._re_b: re.Pattern[bytes] | None = needle_pattern_bytes(self._needles_b) if needles else None
        self.secret_set = SecretSet([s.value for s in self.secrets if s.value], min_len=min_len)

    def __bool__(self) -> bool:
        return bool(self.secrets)

    # -- judging one occurrence ------------------------------------------------------------
    @staticmethod
    def _kind_for(s: KnownSecret, header: str, req: OutgoingRequest) -> Kind | None:
        if s.session is not None and s.session != req.session:
            return "other_session"
        if s.scope is None or not s.scope.matches_host(req.host, req.port):
            return "out_of_scope_host"
        if not s.scope.matches_path(req.path):
            return "out_of_scope_path"
        if header not in s.headers:
            return "other_header"
        return None

    def _judge_header(
        self, name: str, marker: str, cands: Sequence[KnownSecret], req: OutgoingRequest
    ) -> Finding | None:
        lname = name.lower()
        best: tuple[Kind, KnownSecret] | None = None
        for s in cands:
            kind = self._kind_for(s, lname, req)
            if kind is None:
                return None
            if best is None or _RANK[kind] < _RANK[best[0]]:
                best = (kind, s)
        if best is None:
            return None
        kind, s = best
        src = f"secret from {s.origin} ({_owner(s)}, {_scope_text(s)})"
        if kind == "other_session":
            why = f"{src} in header {name} of a request from session {req.session}"
        elif kind == "out_of_scope_host":
            why = f"{src} in header {name} to host {req.host}"
        elif kind == "out_of_scope_path":
            why = f"{src} in header {name} to {req.host}{self._safe_path(req.path)}"
        else:
            why = f"{src} in header {name}, a header it is not configured for"
        return Finding(kind, name, s.origin, marker, why)

    def _judge_payload(
        self, where: str, marker: str, cands: Sequence[KnownSecret], req: OutgoingRequest
    ) -> Finding:
        s = next((c for c in cands if c.session == req.session), cands[0])
        kind: Kind = "in_url" if where == "url" else "in_body"
        place = "the URL" if where == "url" else f"the request {where}"
        why = f"secret from {s.origin} ({_owner(s)}) appears in {place} to host {req.host}"
        return Finding(kind, where, s.origin, marker, why)

    def _safe_path(self, path: str) -> str:
        return self.secret_set.redact_text(path.split("?", 1)[0])

    def _check_injected(self, req: OutgoingRequest, out: list[Finding]) -> None:
        values: dict[str, str] | None = None
        for inj in req.injected:
            kind: Kind
            if inj.session is not None and inj.session != req.session:
                kind = "other_session"
                why = (
                    f"header {inj.name} injected from {inj.origin} (session {inj.session}) "
                    f"on a request from session {req.session}"
                )
            elif inj.scope is not None and not inj.scope.matches_host(req.host, req.port):
                kind = "out_of_scope_host"
                why = (
                    f"header {inj.name} injected from {inj.origin} (scope {inj.scope}) "
                    f"on a request to host {req.host}"
                )
            elif inj.scope is not None and not inj.scope.matches_path(req.path):
                kind = "out_of_scope_path"
                why = (
                    f"header {inj.name} injected from {inj.origin} (scope {inj.scope}) "
                    f"on a request to {req.host}{self._safe_path(req.path)}"
                )
            else:
                continue
            if values is None:
                values = {n.lower(): v for n, v in req.headers}
            out.append(Finding(kind, inj.name, inj.origin, _marker_of(values.get(inj.name.lower(), "")), why))

    @staticmethod
    def _dedupe(findings: list[Finding]) -> list[Finding]:
        if len(findings) < 2:
            return findings
        seen: set[tuple[str, str, str]] = set()
        out = []
        for f in findings:
            k = (f.kind, f.where.lower(), f.secret)
            if k not in seen:
                seen.add(k)
                out.append(f)
        return out

    # -- live: raw values ------------------------------------------------------------------
    def check(self, req: OutgoingRequest) -> list[Finding]:
        """Findings for a request carrying raw values (the guard, or unredacted recordings)."""
        out: list[Finding] = []
        if self.secrets:
            self._check_header_values(req, out)
            if self._re is not None:
                url = req.url or req.path
                for m in self._re.finditer(url):
                    marker, cands = self._needles[m.group(0)]
                    out.append(self._judge_payload("url", marker, cands, req))
            if self._re_b is not None and req.body:
                for mb in self._re_b.finditer(req.body):
                    marker, cands = self._needles_b[mb.group(0)]
                    out.append(self._judge_payload(req.body_label, marker, cands, req))
        if req.injected:
            self._check_injected(req, out)
        return self._dedupe(out)

    def _check_header_values(self, req: OutgoingRequest, out: list[Finding]) -> None:
        headers = req.headers
        if not headers:
            return
        exact_hit: set[int] = set()
        by_value = self._by_value
        for i, (name, value) in enumerate(headers):
            known = by_value.get(value)
            if known is None:
                token = bare_token(value) if " " in value else None
                known = by_value.get(token) if token is not None else None
                if known is None:
                    continue
            marker, cands = known
            exact_hit.add(i)
            finding = self._judge_header(name, marker, cands, req)
            if finding is not None:
                out.append(finding)
        if self._re is None:
            return
        # One search over all values joined; offsets map hits back to their header.
        joined = "\n".join(v for _, v in headers)
        starts: list[int] | None = None
        for m in self._re.finditer(joined):
            if starts is None:
                starts, pos = [], 0
                for _, v in headers:
                    starts.append(pos)
                    pos += len(v) + 1
            i = bisect.bisect_right(starts, m.start()) - 1
            if i in exact_hit:
                continue
            marker, cands = self._needles[m.group(0)]
            finding = self._judge_header(headers[i][0], marker, cands, req)
            if finding is not None:
                out.append(finding)

    # -- offline: redaction markers --------------------------------------------------------
    def check_recorded(self, req: OutgoingRequest) -> list[Finding]:
        """Findings for a redacted recording: markers whose digest is a known secret's, placed
        where that secret may not be, plus the injected-header checks."""
        out: list[Finding] = []
        by_digest = self._by_digest
        if by_digest:
            for name, value in req.headers:
                for d, _ in iter_marker_digests(value):
                    cands = by_digest.get(d)
                    if cands:
                        finding = self._judge_header(name, f"[redacted:{d}]", cands, req)
                        if finding is not None:
                            out.append(finding)
            for d, _ in iter_marker_digests(req.url or req.path):
                cands = by_digest.get(d)
                if cands:
                    out.append(self._judge_payload("url", f"[redacted:{d}]", cands, req))
            for d, _ in iter_marker_digests(req.body):
                cands = by_digest.get(d)
                if cands:
                    out.append(self._judge_payload(req.body_label, f"[redacted:{d}]", cands, req))
        if req.injected:
            self._check_injected(req, out)
        return self._dedupe(out)


def learn_secrets(recorded: Iterable[OutgoingRequest]) -> list[KnownSecret]:
    """Owners learned from a redacted recording without a config: a marker in a header the
    gateway injected belongs to that flow's session (and to the injection's scope when the
    recording kept it). Pass the result as ``LeakChecker(..., learned=...)``: a marker then
    seen in another session's flow (where it was not injected) is an ``other_session``."""
    seen: set[tuple[str, str | None, str, str]] = set()
    out: list[KnownSecret] = []
    for req in recorded:
        if not req.injected:
            continue
        values: dict[str, list[str]] = {}
        for n, v in req.headers:
            values.setdefault(n.lower(), []).append(v)
        for inj in req.injected:
            for value in values.get(inj.name.lower(), ()):
                for d, _ in iter_marker_digests(value):
                    scope = inj.scope or ANYWHERE
                    key = (d, req.session, inj.name.lower(), str(scope))
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(
                        KnownSecret(
                            origin=inj.origin or f"injected {inj.name} (session {req.session})",
                            session=req.session,
                            scope=scope,
                            headers=(inj.name,),
                            digest=d,
                        )
                    )
    return out


# -- secrets of a gateway configuration ------------------------------------------------------
# Built from the validated ``GatewayConfig`` (the same object the gateway runs on), plus the
# control API's runtime state when the caller has it. Which configured header values count as
# secrets is decided here, once, for redaction, the guard and the offline scanner alike.

_SENSITIVE_NAME = re.compile(
    r"auth|key|token|secret|cookie|session|signature|password|passwd|credential|payment|bearer",
    re.I,
)
# Lower-case words and numbers joined by punctuation ("prompt-caching-2024-07-31",
# "claude-3-5-sonnet-20241022"): identifiers, not credentials.
_PLAIN_WORDS = re.compile(r"[a-z]+(?:[-._=:/](?:[a-z]+|[0-9]+))*")
_API_KEY_HEADERS = ("authorization", "x-api-key", "api-key")


def looks_like_credential(value: str) -> bool:
    """A value shaped like a key: at least 16 characters without spaces (after an auth scheme),
    letters and digits mixed, and not just lower-case words and numbers joined by dashes."""
    token = bare_token(value) or value.strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        return False
    if not (any(c.isdigit() for c in token) and any(c.isalpha() for c in token)):
        return False
    return _PLAIN_WORDS.fullmatch(token) is None


def is_secret_header(name: str, value: str, from_env: bool = False) -> bool:
    """Which configured header values count as secrets: those written as ``${VAR}`` in the
    file, those whose header name says so (auth, key, token, cookie, ...), and values shaped
    like a key. Plain literals such as ``anthropic-version: 2023-06-01`` do not (they would hit
    everywhere)."""
    return from_env or _SENSITIVE_NAME.search(name) is not None or looks_like_credential(value)


def env_sourced_headers(text: str) -> frozenset[tuple[str, str, str]]:
    """``(session, scope, header)`` of the session headers written with ``${VAR}`` in a config
    file's text (unparseable text: none)."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return frozenset()
    out: set[tuple[str, str, str]] = set()
    sessions = raw.get("sessions") if isinstance(raw, Mapping) else None
    if not isinstance(sessions, Mapping):
        return frozenset()
    for sid, sess in sessions.items():
        headers = sess.get("headers") if isinstance(sess, Mapping) else None
        if not isinstance(headers, Mapping):
            continue
        for scope, names in headers.items():
            if not isinstance(names, Mapping):
                continue
            for name, value in names.items():
                if isinstance(value, str) and "${" in value.replace("$${", ""):
                    out.add((str(sid), str(scope), str(name)))
    return frozenset(out)


def _secret(value: Any) -> str:
    """The plain text of a ``SecretStr`` (or str); "" for None."""
    if value is None:
        return ""
    getter = getattr(value, "get_secret_value", None)
    text = getter() if callable(getter) else value
    return text if isinstance(text, str) else ""


def _wallet_is_secret(text: str) -> bool:
    # A base58 secret inline; a keypair file path is not itself the secret.
    return len(text) >= 32 and "/" not in text and not text.startswith("~") and not text.endswith(".json")


@dataclass(frozen=True, slots=True)
class ConfigSecrets:
    known: tuple[KnownSecret, ...]
    redact_names: tuple[str, ...]  # record.redact

    @property
    def values(self) -> frozenset[str]:
        return frozenset(s.value for s in self.known if s.value)

    def secret_set(self, extra_names: Iterable[str] = ()) -> SecretSet:
        return SecretSet(self.values, [*self.redact_names, *extra_names])

    def checker(self, learned: Iterable[KnownSecret] = ()) -> LeakChecker:
        return LeakChecker(self.known, learned=learned)


ScopedHeaders = Mapping[str, Mapping[str, str]]  # scope -> header name -> value


def secrets_from_config(
    config: Any,
    *,
    session_headers: Mapping[str, ScopedHeaders] | None = None,
    turn_headers: Mapping[str, Mapping[str, str]] | None = None,
    env_headers: frozenset[tuple[str, str, str]] = frozenset(),
) -> ConfigSecrets:
    """Secrets of a validated ``GatewayConfig``: session tokens, secret session header values
    (see ``is_secret_header``), the admin token, an inline x402 wallet, profile keys and
    headers (when the config has profiles), and ``record.redact``.

    ``session_headers``: the effective headers per session when the control API changed them
    at run time (session -> scope -> name -> value; defaults to the config's). ``turn_headers``:
    the control API's stored turn per session (sent to any provider host of that session).
    ``env_headers``: from ``env_sourced_headers`` of the file's text.
    """
    known: list[KnownSecret] = []
    seen: set[tuple[str, str]] = set()

    def add(origin: str, value: str, **kw: Any) -> None:
        if value and (origin, value) not in seen:
            seen.add((origin, value))
            known.append(KnownSecret(origin=origin, value=value, **kw))

    sessions: Mapping[str, Any] = getattr(config, "sessions", None) or {}
    for sid, sess in sessions.items():
        add(f"sessions.{sid}.token", _secret(getattr(sess, "token", None)), session=sid)
    effective: dict[str, ScopedHeaders] = {
        sid: getattr(sess, "headers", None) or {} for sid, sess in sessions.items()
    }
    effective.update(session_headers or {})
    for sid, scopes in effective.items():
        for scope_text, names in scopes.items():
            scope = Scope.parse(scope_text)
            for name, value in names.items():
                if is_secret_header(name, value, (sid, scope_text, name) in env_headers):
                    add(
                        f"sessions.{sid}.headers.{scope_text}.{name}",
                        value,
                        session=sid,
                        scope=scope,
                        headers=(name,),
                    )
    for sid, turn in (turn_headers or {}).items():
        for name, value in turn.items():
            if is_secret_header(name, value):
                add(f"turn of session {sid}: {name}", value, session=sid, scope=ANYWHERE, headers=(name,))

    profiles: Mapping[str, Any] = getattr(config, "profiles", None) or {}
    for pname, prof in profiles.items():
        base = getattr(prof, "base_url", None)
        pscope = _scope_of_url(str(base)) if base else None
        add(f"profiles.{pname}.api_key", _secret(getattr(prof, "api_key", None)), scope=pscope,
            headers=_API_KEY_HEADERS)
        for name, value in (getattr(prof, "headers", None) or {}).items():
            text = _secret(value)
            if is_secret_header(name, text):
                add(f"profiles.{pname}.headers.{name}", text, scope=pscope, headers=(name,))

    control = getattr(config, "control", None)
    add("control.admin_token", _secret(getattr(control, "admin_token", None)))

    x402 = getattr(config, "x402", None)
    wallet = _secret(getattr(x402, "wallet", None))
    if _wallet_is_secret(wallet):
        add("x402.wallet", wallet)
    # RPC providers put their API key in the URL (?api-key=..., /<token>/, user:pass@). The
    # gateway calls its RPC directly, never through the proxy, so none of it may appear in flows.
    for i, part in enumerate(_rpc_url_secrets(str(getattr(x402, "rpc_url", "") or ""))):
        add(f"x402.rpc_url[{i}]", part)

    record = getattr(config, "record", None)
    redact_names = tuple(str(n) for n in (getattr(record, "redact", None) or ()))
    return ConfigSecrets(tuple(known), redact_names)


def _rpc_url_secrets(url: str) -> list[str]:
    if not url:
        return []
    parts = urlsplit(url)
    found = [v for _, v in parse_qsl(parts.query) if len(v) >= 8]
    found += [seg for seg in parts.path.split("/") if len(seg) >= 16]
    if parts.password:
        found.append(parts.password)
    return found


def _scope_of_url(base_url: str) -> Scope | None:
    parts = urlsplit(base_url)
    if not parts.hostname:
        return None
    host = parts.hostname.lower()
    path = parts.path.rstrip("/")
    return Scope(host, f"{path}/*" if path else None)


def load_config_secrets(path: str | Path, env: Mapping[str, str] | None = None) -> ConfigSecrets:
    """Secrets of a gateway YAML file, loaded and validated the way the gateway loads it.

    Raises ``ValueError`` (``llmitm.config.ConfigError``) when the file is unreadable or invalid.
    """
    from llmitm.config import load_config_file

    config = load_config_file(path, env)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        text = ""
    return secrets_from_config(config, env_headers=env_sourced_headers(text))
