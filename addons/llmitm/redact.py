"""Redaction of secrets in headers, URLs and bodies (SPEC §9). Imports nothing from mitmproxy.

A redacted secret becomes ``[redacted:<first 8 hex of sha256(secret)>]``: the same secret always
gives the same marker, so a recording can still be matched (replay) and scanned (leakscan) without
holding the secret itself.

``SecretSet`` holds everything that must not be written down:

- header names whose value is always replaced whole (``Authorization``, cookies, payment
  headers, ... plus the config's ``record.redact`` names);
- secret values (session header values, tokens, api keys from the config). A header whose whole
  value is a secret is replaced whatever its length; inside header values, URLs and bodies only
  secrets of at least ``min_len`` characters are searched for (short strings hit by accident).

Inside URLs and bodies a secret is also found percent-encoded and JSON-escaped, and the token of
a ``Bearer <token>`` value is found on its own; each is replaced by the marker of the string it
stands for (the percent-encoded form of ``s`` becomes the marker of ``s``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote, quote_plus

# Replaced whole, whatever their value. PAYMENT-REQUIRED (the 402's requirements) is public.
ALWAYS_REDACTED_HEADERS: frozenset[str] = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "set-cookie",
        "payment-signature",
        "payment-response",
        "x-payment",
        "x-payment-response",
    }
)

DEFAULT_MIN_LEN = 8

MARKER_PREFIX = "[redacted:"
# A marker, literal or percent-encoded (as it looks once a client or URL builder quoted it).
_MARKER = r"\[redacted:([0-9a-f]{8})\]|%5[Bb]redacted%3[Aa]([0-9a-f]{8})%5[Dd]"
MARKER_RE = re.compile(_MARKER)
MARKER_RE_BYTES = re.compile(_MARKER.encode())
_WHOLE_MARKER = re.compile(r"\[redacted:[0-9a-f]{8}\]")
_AUTH_SCHEME = re.compile(r"^(?:bearer|basic|token|bot|apikey|key)\s+(\S+)\s*$", re.I)


def digest(value: str | bytes) -> str:
    """The 8 hex digits that name ``value`` in a marker."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:8]


def redacted(value: str | bytes) -> str:
    """``[redacted:<first 8 hex of sha256(value)>]``."""
    return f"{MARKER_PREFIX}{digest(value)}]"


def is_marker(value: str) -> bool:
    """True when ``value`` is exactly one marker (already redacted)."""
    return _WHOLE_MARKER.fullmatch(value) is not None


def iter_marker_digests(data: str | bytes) -> Iterator[tuple[str, int]]:
    """Yield ``(digest, offset)`` for every marker in ``data``, literal or percent-encoded."""
    if isinstance(data, bytes):
        if data.find(b"redacted") < 0:  # cheap precheck; markers are always lower-case
            return
        for mb in MARKER_RE_BYTES.finditer(data):
            yield (mb.group(1) or mb.group(2)).decode().lower(), mb.start()
    else:
        if "redacted" not in data:
            return
        for ms in MARKER_RE.finditer(data):
            yield (ms.group(1) or ms.group(2)).lower(), ms.start()


def bare_token(value: str) -> str | None:
    """The credential of ``"Bearer <token>"``-style values (Bearer, Basic, Token, ...), or None."""
    m = _AUTH_SCHEME.match(value)
    return m.group(1) if m else None


def secret_needles(value: str) -> list[tuple[str, str]]:
    """The strings to look for in URLs and bodies for one secret, each with the string whose
    marker replaces it: the value, its percent-encoded and JSON-escaped forms, and the bare token
    of an ``Authorization``-style value (with its own forms)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    canonicals = [value]
    token = bare_token(value)
    if token is not None and token != value:
        canonicals.append(token)
    for canonical in canonicals:
        for needle in (
            canonical,
            quote(canonical, safe=""),
            quote_plus(canonical, safe=""),
            canonical.replace("/", "\\/"),
        ):
            if needle not in seen:
                seen.add(needle)
                out.append((needle, canonical))
    return out


def _trie(units: Sequence[Sequence[str]]) -> str:
    """A regex matching any of ``units`` (each a sequence of already-escaped pieces), built as
    a prefix trie: several times faster than a flat alternation once there are more than a
    few needles, and leftmost-longest (a value wins over a token inside it)."""
    end = ""  # marks "a needle ends here"; escaped pieces are never empty
    root: dict[str, Any] = {}
    for unit in units:
        node = root
        for piece in unit:
            node = node.setdefault(piece, {})
        node[end] = {}

    def build(node: dict[str, Any]) -> str:
        out: list[str] = []
        # Follow single-child chains iteratively: needles can be long (JWTs).
        while len(node) == 1 and end not in node:
            ((piece, node),) = node.items()
            out.append(piece)
        if not node or list(node) == [end]:
            return "".join(out)
        optional = end in node
        alts = [piece + build(child) for piece, child in sorted(node.items()) if piece != end]
        group = alts[0] if len(alts) == 1 and len(alts[0]) == 1 else "(?:" + "|".join(alts) + ")"
        out.append(group + "?" if optional else group)
        return "".join(out)

    return build(root)


def needle_pattern(needles: Iterable[str]) -> re.Pattern[str]:
    """One compiled regex finding any of ``needles`` in text (leftmost-longest)."""
    return re.compile(_trie([[re.escape(ch) for ch in n] for n in set(needles)]))


def needle_pattern_bytes(needles: Iterable[bytes]) -> re.Pattern[bytes]:
    """``needle_pattern`` over bytes (built on bytes, so non-ASCII needles stay exact)."""
    units = [[re.escape(bytes([b])).decode("latin-1") for b in n] for n in set(needles)]
    return re.compile(_trie(units).encode("latin-1"))


class SecretSet:
    """Secret header names and secret values, with one precompiled matcher for str and bytes.

    Immutable after construction; build a new one (or use ``with_values``) when the config
    changes. Redacting is idempotent: a marker is never redacted again.
    """

    __slots__ = (
        "_bytes_map",
        "_bytes_re",
        "_text_map",
        "_text_re",
        "min_len",
        "names",
        "values",
    )

    def __init__(
        self,
        values: Iterable[str] = (),
        header_names: Iterable[str] = (),
        *,
        min_len: int = DEFAULT_MIN_LEN,
        always_redacted: bool = True,
    ) -> None:
        self.min_len = min_len
        names = {n.strip().lower() for n in header_names if n and n.strip()}
        if always_redacted:
            names |= ALWAYS_REDACTED_HEADERS
        self.names: frozenset[str] = frozenset(names)
        self.values: frozenset[str] = frozenset(v for v in values if v and not is_marker(v))
        text_map: dict[str, str] = {}
        for value in self.values:
            for needle, canonical in secret_needles(value):
                if len(needle) >= min_len and len(canonical) >= min_len:
                    # A needle shared by two secrets keeps the longer canonical (deterministic).
                    old = text_map.get(needle)
                    if old is None or (len(canonical), canonical) > (len(old), old):
                        text_map[needle] = canonical
        self._text_map = {n: redacted(c) for n, c in text_map.items()}
        self._bytes_map = {n.encode("utf-8", "surrogateescape"): m for n, m in self._text_map.items()}
        if text_map:
            self._text_re: re.Pattern[str] | None = needle_pattern(self._text_map)
            self._bytes_re: re.Pattern[bytes] | None = needle_pattern_bytes(self._bytes_map)
        else:
            self._text_re = None
            self._bytes_re = None

    def with_values(self, values: Iterable[str]) -> SecretSet:
        """A new set with more secret values (e.g. a flow's turn headers)."""
        return SecretSet(
            [*self.values, *values],
            self.names,
            min_len=self.min_len,
            always_redacted=False,
        )

    def __bool__(self) -> bool:
        return bool(self.values or self.names)

    # -- headers ---------------------------------------------------------------------------
    def is_secret_name(self, name: str) -> bool:
        return name.lower() in self.names

    def redact_header(self, name: str, value: str, extra_names: Iterable[str] = ()) -> str:
        """The value to record for one header.

        A secret name (or one of ``extra_names``, e.g. the flow's injected headers) or a value
        that is wholly a secret is replaced whole; otherwise secrets inside are replaced.
        """
        return self._redact_header(name, value, frozenset(n.lower() for n in extra_names))

    def _redact_header(self, name: str, value: str, extra: frozenset[str]) -> str:
        if not value or is_marker(value):
            return value
        lname = name.lower()
        if lname in self.names or lname in extra or value in self.values:
            return redacted(value)
        return self.redact_text(value)

    def redact_headers(
        self, headers: Iterable[tuple[str, str]], extra_names: Iterable[str] = ()
    ) -> list[tuple[str, str]]:
        """``redact_header`` over ``(name, value)`` pairs; order and duplicates are kept."""
        extra = frozenset(n.lower() for n in extra_names)
        return [(n, self._redact_header(n, v, extra)) for n, v in headers]

    # -- text (URLs, header values) and bytes (bodies) ---------------------------------------
    def redact_text(self, text: str) -> str:
        """Replace every secret (>= ``min_len``) inside ``text``, e.g. a URL or a path."""
        if self._text_re is None or not text:
            return text
        mapping = self._text_map
        return self._text_re.sub(lambda m: mapping[m.group(0)], text)

    def redact_bytes(self, data: bytes) -> bytes:
        """Replace every secret (>= ``min_len``) inside ``data``, e.g. a request body."""
        if self._bytes_re is None or not data:
            return data
        regex = self._bytes_re
        if regex.search(data) is None:  # the common case: one pass, no copy
            return data
        mapping = self._bytes_map
        return regex.sub(lambda m: mapping[m.group(0)].encode(), data)

    def redact_bytes_mapped(self, data: bytes, offsets: Sequence[int]) -> tuple[bytes, list[int]]:
        """``redact_bytes`` plus where each of ``offsets`` (ascending positions in ``data``, e.g.
        the ends of streamed chunks) lands in the result; an offset inside a replaced secret
        moves to the end of its marker."""
        if self._bytes_re is None or not data or self._bytes_re.search(data) is None:
            return data, list(offsets)
        mapping = self._bytes_map
        out: list[bytes] = []
        spans: list[tuple[int, int, int]] = []  # (start, end, marker length)
        pos = 0
        for m in self._bytes_re.finditer(data):
            out.append(data[pos : m.start()])
            marker = mapping[m.group(0)].encode()
            out.append(marker)
            spans.append((m.start(), m.end(), len(marker)))
            pos = m.end()
        out.append(data[pos:])
        mapped: list[int] = []
        shift = 0
        i = 0
        for off in offsets:
            while i < len(spans) and spans[i][1] <= off:
                shift += spans[i][2] - (spans[i][1] - spans[i][0])
                i += 1
            if i < len(spans) and spans[i][0] < off:  # inside a secret: end of its marker
                start, _end, size = spans[i]
                mapped.append(start + shift + size)
            else:
                mapped.append(off + shift)
        return b"".join(out), mapped

    def contains(self, data: str | bytes) -> bool:
        """True when a secret (>= ``min_len``) occurs inside ``data``."""
        if isinstance(data, bytes):
            return self._bytes_re is not None and self._bytes_re.search(data) is not None
        return self._text_re is not None and self._text_re.search(data) is not None
