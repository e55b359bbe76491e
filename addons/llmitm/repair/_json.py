"""JSON helpers shared by the repairers: compact dumps, completeness tracking, argument fixes."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, TypeGuard

_STRUCT = re.compile(r'[{}\[\]"]')
_IN_STRING = re.compile(r'["\\]')
_decoder = json.JSONDecoder()


def is_int(value: object) -> TypeGuard[int]:
    """A JSON integer (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def dumps(value: Any) -> str:
    """Compact JSON, keeping non-ASCII text as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def encode(value: Any) -> bytes:
    """Compact JSON as UTF-8 (lone surrogates fall back to ASCII escapes)."""
    text = dumps(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def short_hash(*parts: object) -> str:
    """24 hex digits of SHA-256 over the parts: stable, collision-free in practice."""
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class Fragments:
    """Text that grows fragment by fragment: a tool call's arguments. ``s += t`` on an attribute
    copies all of ``s`` every time (CPython grows only a local variable in place), quadratic over
    the thousands of fragments of a long call; fragments are kept and joined when the text is
    read. ``blank``: no text but whitespace so far (what the repairs ask on every fragment).
    ``progress``, if given, is fed every fragment (one call per fragment on the hot path)."""

    __slots__ = ("_parts", "_text", "blank", "progress")

    def __init__(self, text: str = "", progress: JsonProgress | None = None) -> None:
        self._text = text
        self._parts: list[str] = []
        self.blank = not text.strip()
        self.progress = progress

    def add(self, fragment: str) -> None:
        if not fragment:
            return
        self._parts.append(fragment)
        if self.blank and not fragment.isspace():
            self.blank = False
        progress = self.progress
        # JsonProgress.feed's own first test, inline: most fragments are text inside a string
        if progress is not None and not progress.complete and (
            not progress.in_string or progress.escape or '"' in fragment or "\\" in fragment
        ):
            progress.feed(fragment)

    @property
    def text(self) -> str:
        if self._parts:
            self._parts.insert(0, self._text)
            self._text = "".join(self._parts)
            self._parts = []
        return self._text


class JsonProgress:
    """Tracks whether streamed text has completed one top-level JSON object or array.

    Only structural characters are looked at (regular expressions, no per-character Python
    loop). ``complete`` becomes True when the depth returns to zero after an opening bracket.
    """

    __slots__ = ("complete", "depth", "escape", "in_string", "started")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.complete = False

    def feed(self, text: str) -> None:
        if self.complete or not text:
            return
        if self.in_string and not self.escape and '"' not in text and "\\" not in text:
            return  # more text inside a string (most argument fragments): nothing changes
        pos = 0
        size = len(text)
        if self.escape:
            self.escape = False
            pos = 1
        while pos < size:
            if self.in_string:
                m = _IN_STRING.search(text, pos)
                if m is None:
                    return
                if m.group() == '"':
                    self.in_string = False
                    pos = m.end()
                else:
                    if m.end() >= size:
                        self.escape = True
                        return
                    pos = m.end() + 1
                continue
            m = _STRUCT.search(text, pos)
            if m is None:
                return
            c = m.group()
            pos = m.end()
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
                self.started = True
            else:
                self.depth -= 1
                if self.started and self.depth <= 0:
                    self.complete = True
                    return


def starts_value(text: str) -> bool:
    """True when the text (after whitespace) opens a JSON object or array."""
    return text.lstrip()[:1] in ("{", "[")


def unwrap_double_encoded(text: str) -> str | None:
    """If ``text`` is a JSON string literal holding a JSON object/array, return the inner JSON."""
    stripped = text.strip()
    if len(stripped) < 4 or stripped[0] != '"':
        return None
    try:
        inner = json.loads(stripped)
    except ValueError:
        return None
    if not isinstance(inner, str) or not starts_value(inner):
        return None
    try:
        value = json.loads(inner)
    except ValueError:
        return None
    if isinstance(value, (dict, list)):
        return inner
    return None


def split_concatenated(text: str) -> list[str] | None:
    """Split ``{..}{..}`` (several JSON values back to back) into their texts; None if the text
    is not a sequence of two or more complete JSON objects/arrays."""
    parts: list[str] = []
    pos = 0
    size = len(text)
    while True:
        while pos < size and text[pos] in " \t\r\n":
            pos += 1
        if pos >= size:
            break
        if text[pos] not in "{[":
            return None
        try:
            _value, end = _decoder.raw_decode(text, pos)
        except ValueError:
            return None
        parts.append(text[pos:end])
        pos = end
    return parts if len(parts) > 1 else None


def arguments_text(value: Any) -> tuple[str, str | None]:
    """Normalise an ``arguments`` value to a string: (text, repair class or None)."""
    if isinstance(value, str):
        return value, None
    if value is None:
        return "", "null_arguments"
    return dumps(value), "object_arguments"


def same_json(a: str, b: str) -> bool:
    """Two JSON texts that mean the same value (or are the same text)."""
    if a.strip() == b.strip():
        return True
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return False
