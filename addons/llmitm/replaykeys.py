"""Request matching for replaying recordings (scripts/replay). No mitmproxy here.

The key mirrors mitmproxy's server replay (``ServerPlayback._hash``): scheme, method, path,
body, host, port and the query's (name, value) pairs in order; headers are ignored. Options
mirror its ``server_replay_ignore_*`` options.

Recordings are redacted, live requests are not, so both sides are normalised before keying:

1. with the secrets of a config (a ``SecretSet``), secrets in the path, query and body of both
   the recorded and the live request become the same ``[redacted:xxxxxxxx]`` marker;
2. without them (or for a secret the config does not know), a recorded part holding markers is
   also kept as a pattern: each marker matches any text whose sha256 starts with its digest
   (or its percent-encoded / JSON-escaped form, or the same marker).

Each recorded request is served once, in recording order, like mitmproxy's default; with
``reuse`` the first match keeps being served (``server_replay_reuse``).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, unquote_plus

from llmitm.redact import MARKER_RE, MARKER_RE_BYTES, SecretSet, digest

type Part = str | bytes
type Key = tuple[Part, ...]


@dataclass(frozen=True, slots=True)
class MatchOptions:
    ignore_scheme: bool = False
    ignore_host: bool = False
    ignore_port: bool = False
    ignore_content: bool = False
    ignore_params: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RequestView:
    """The parts of a request that matching looks at. ``path`` is the request target (path and
    query); ``body`` is the decoded body (no Content-Encoding)."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    body: bytes = b""


def request_key(
    req: RequestView, opts: MatchOptions = MatchOptions(), secrets: SecretSet | None = None
) -> Key:
    """The match key of a request (after redacting ``secrets`` in path, query and body)."""
    target = req.path.split("#", 1)[0]
    path, _, query = target.partition("?")
    body = req.body
    if secrets is not None:
        path = secrets.redact_text(path)
        query = secrets.redact_text(query)
        if not opts.ignore_content:
            body = secrets.redact_bytes(body)
    parts: list[Part] = []
    if not opts.ignore_scheme:
        parts.append(req.scheme.lower())
    parts.append(req.method.upper())
    parts.append(path or "/")
    if not opts.ignore_content:
        parts.append(body)
    if not opts.ignore_host:
        parts.append(req.host.lower().rstrip("."))
    if not opts.ignore_port:
        parts.append(str(req.port))
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in opts.ignore_params:
            parts.append(name)
            parts.append(value)
    return tuple(parts)


# -- marker patterns ---------------------------------------------------------------------------
def _forms(capture: str) -> tuple[str, ...]:
    return (capture, unquote(capture), unquote_plus(capture), capture.replace("\\/", "/"))


def _capture_ok(capture: Part, want: str) -> bool:
    text = capture.decode("utf-8", "surrogateescape") if isinstance(capture, bytes) else capture
    if text.lower() in (f"[redacted:{want}]", f"%5bredacted%3a{want}%5d"):
        return True
    return any(digest(form) == want for form in _forms(text))


class _PartPattern:
    """One recorded key part with markers: literal text between ``(.+?)`` holes."""

    __slots__ = ("digests", "greedy", "lazy")

    def __init__(self, part: Part) -> None:
        self.digests: list[str] = []
        if isinstance(part, bytes):
            pieces_b: list[bytes] = []
            pos = 0
            for m in MARKER_RE_BYTES.finditer(part):
                pieces_b.append(re.escape(part[pos : m.start()]))
                self.digests.append((m.group(1) or m.group(2)).decode().lower())
                pos = m.end()
            pieces_b.append(re.escape(part[pos:]))
            self.lazy: re.Pattern[str] | re.Pattern[bytes] = re.compile(b"(.+?)".join(pieces_b), re.DOTALL)
            self.greedy: re.Pattern[str] | re.Pattern[bytes] = re.compile(b"(.+)".join(pieces_b), re.DOTALL)
        else:
            pieces: list[str] = []
            pos = 0
            for ms in MARKER_RE.finditer(part):
                pieces.append(re.escape(part[pos : ms.start()]))
                self.digests.append((ms.group(1) or ms.group(2)).lower())
                pos = ms.end()
            pieces.append(re.escape(part[pos:]))
            self.lazy = re.compile("(.+?)".join(pieces), re.DOTALL)
            self.greedy = re.compile("(.+)".join(pieces), re.DOTALL)

    def matches(self, live: Part) -> bool:
        for regex in (self.lazy, self.greedy):
            m = regex.fullmatch(live)  # type: ignore[arg-type]
            if m is not None and all(
                _capture_ok(cap, d) for cap, d in zip(m.groups(), self.digests, strict=True)
            ):
                return True
        return False


def _has_marker(part: Part) -> bool:
    if isinstance(part, bytes):
        return MARKER_RE_BYTES.search(part) is not None
    return MARKER_RE.search(part) is not None


@dataclass(slots=True)
class _Entry[T]:
    key: Key
    item: T
    used: bool = False
    patterns: list[_PartPattern | None] | None = field(default=None)

    def matches_pattern(self, live: Key) -> bool:
        if self.patterns is None or len(live) != len(self.key):
            return False
        for rec, pat, got in zip(self.key, self.patterns, live, strict=True):
            if pat is None:
                if rec != got:
                    return False
            elif type(rec) is not type(got) or not pat.matches(got):
                return False
        return True


class ReplayIndex[T]:
    """Recorded requests (with any payload ``T``, e.g. a flow) to serve in order."""

    def __init__(
        self,
        opts: MatchOptions = MatchOptions(),
        secrets: SecretSet | None = None,
        *,
        reuse: bool = False,
    ) -> None:
        self.opts = opts
        self.secrets = secrets if secrets else None
        self.reuse = reuse
        self._exact: dict[Key, deque[_Entry[T]]] = {}
        self._patterned: list[_Entry[T]] = []
        self._count = 0

    def key(self, req: RequestView) -> Key:
        return request_key(req, self.opts, self.secrets)

    def add(self, req: RequestView, item: T) -> None:
        key = self.key(req)
        entry: _Entry[T] = _Entry(key, item)
        self._exact.setdefault(key, deque()).append(entry)
        if any(_has_marker(p) for p in key):
            entry.patterns = [_PartPattern(p) if _has_marker(p) else None for p in key]
            self._patterned.append(entry)
        self._count += 1

    def add_all(self, pairs: Sequence[tuple[RequestView, T]]) -> None:
        for req, item in pairs:
            self.add(req, item)

    def __len__(self) -> int:
        """Entries not yet served."""
        return self._count

    def match(self, req: RequestView) -> T | None:
        """The next recorded item for ``req`` (consumed unless ``reuse``), or None."""
        key = self.key(req)
        queue = self._exact.get(key)
        if queue:
            while queue and queue[0].used:
                queue.popleft()
            if queue:
                entry = queue[0]
                if not self.reuse:
                    queue.popleft()
                return self._take(entry)
        for entry in self._patterned:
            if not entry.used and entry.matches_pattern(key):
                return self._take(entry)
        return None

    def _take(self, entry: _Entry[T]) -> T:
        if not self.reuse:
            entry.used = True
            self._count -= 1
            if entry.patterns is not None:
                self._patterned = [e for e in self._patterned if not e.used]
        return entry.item
