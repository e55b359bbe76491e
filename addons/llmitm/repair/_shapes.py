"""Frame shapes: the fast path of stream repair.

Most frames of a tool-call stream are argument fragments that differ from the previous fragment
of the same call only in the fragment text (and a sequence number, and OpenAI's random
``obfuscation`` padding). A *shape* is a frame with the values of such keys (its *holes*) cut
out. Once a repairer has handled a frame in full (SSE parse, ``json.loads``, its event logic) and
found nothing to change, it remembers the frame's shape with the state the frame continued; a
later frame of the same shape is then handled by updating that state with the new hole values:
no JSON parse, no event logic, and the frame's bytes pass on untouched.

Why this is sound: a hole key is searched as JSON writes it, ``"name":``. Outside a string that
text can only be a key; inside a JSON string its quotes would be escaped. Each hole key must occur
once, its value must be a plain string or integer, and the bytes outside the holes must hold no
``\\u`` escape (a key spelt with escapes would hide from the search). Two frames with the same
shape are therefore the same JSON value except for the hole values, and, since the holes hold no
CR or LF, the same SSE frame. Hole values are decoded as JSON would, so invalid text (bad escapes,
control characters, invalid UTF-8) leaves the fast path.

A shape seen more than once also gets a ``Matcher`` that recognises whole frames of it in a
chunk, so that such frames skip even the SSE parser: it compares the shape's bytes around the
holes (``startswith``/``find``) and decodes the hole text, falling back to a regular expression
built from the shape for text with escapes. That is written by hand because no library parses
"this JSON text with those values changed" without redoing the whole frame, as ``json`` and SSE
parsers would.

Substring tests on ``bytes`` on the hot paths are written ``b.find(x) >= 0``, not ``x in b``:
CPython's ``bytes.__contains__`` first tries ``x`` as an integer, raising and clearing a
TypeError each time (~440 ns against ~40 ns for ``find`` on a short frame; ``str`` is not
affected).
"""

from __future__ import annotations

import re
from json.decoder import scanstring  # type: ignore[attr-defined]  # the C scanner; not in typeshed
from json.encoder import encode_basestring
from typing import Any

HoleValue = str | int
HoleValues = dict[bytes, HoleValue]

# An integer hole: at most 18 digits (Python refuses to parse huge ones; json.loads would too).
_INT_VALUE = re.compile(rb"-?(?:0|[1-9][0-9]{0,17})(?=[\s,}\]])")
_INT_GROUP = rb"(-?(?:0|[1-9][0-9]{0,17}))"
# A string hole: JSON string text without CR, LF or an unescaped quote.
_STRING_GROUP = rb'([^"\\\r\n]*(?:\\[^\r\n][^"\\\r\n]*)*)'

MAX_SHAPES = 256  # shapes remembered per stream (a stream has a few per tool call)
MAX_MATCHERS = 8  # shapes per stream that also get a regular expression


class Shape:
    """A frame cut at its holes: ``key`` is the bytes between the holes, ``holes`` maps each hole
    key to (start, end, is_string) in the frame's raw bytes."""

    __slots__ = ("holes", "key")

    def __init__(self, key: tuple[bytes, ...], holes: dict[bytes, tuple[int, int, bool]]) -> None:
        self.key = key
        self.holes = holes


def _string_end(raw: bytes, start: int) -> int:
    """Offset of the quote that closes the JSON string whose text starts at ``start`` (-1: none)."""
    end = raw.find(b'"', start)
    while end > 0 and raw[end - 1] == 0x5C:  # escaped, unless the backslashes pair up
        run = end - 1
        while raw[run - 1] == 0x5C:  # stops at the opening quote at the latest
            run -= 1
        if (end - run) % 2 == 0:
            break
        end = raw.find(b'"', end + 1)
    return end


def shape_of(raw: bytes, holes: tuple[bytes, ...]) -> Shape | None:
    """The frame's shape; None when it has no hole, a hole key twice, a hole value that is not a
    plain string or integer, or a ``\\u`` escape outside the holes. ``holes`` are keys as JSON
    writes them: ``b'"name":'``."""
    found: list[tuple[int, int, bool, bytes]] = []
    size = len(raw)
    for marker in holes:
        at = raw.find(marker)
        if at < 0:
            continue
        after = at + len(marker)
        if raw.find(marker, after) >= 0:
            return None
        while after < size and raw[after] in (0x20, 0x09):
            after += 1
        if after < size and raw[after] == 0x22:
            end = _string_end(raw, after + 1)
            if end < 0:
                return None
            found.append((after + 1, end, True, marker[1:-2]))
        else:
            number = _INT_VALUE.match(raw, after)
            if number is None:
                return None
            found.append((after, number.end(), False, marker[1:-2]))
    if not found:
        return None
    if len(found) > 1:
        found.sort()
    segments: list[bytes] = []
    spans: dict[bytes, tuple[int, int, bool]] = {}
    cut = 0
    for start, end, is_string, name in found:
        if start < cut:
            return None
        segments.append(raw[cut:start])
        spans[name] = (start, end, is_string)
        cut = end
    segments.append(raw[cut:])
    if raw.find(b"\\u") >= 0 and any(segment.find(b"\\u") >= 0 for segment in segments):
        return None
    return Shape(tuple(segments), spans)


def string_value(raw: bytes, start: int, end: int) -> str | None:
    """The text of a JSON string whose raw text is ``raw[start:end]``; None if it is invalid."""
    try:
        text = raw[start:end].decode("utf-8")
        if "\\" not in text and text.isprintable():
            return text
        return str(scanstring(text + '"', 0)[0])  # escapes; control characters are refused
    except ValueError:
        return None


def hole_values(raw: bytes, holes: dict[bytes, tuple[int, int, bool]]) -> HoleValues | None:
    """Every hole's value (str or int); None when a string hole is not valid JSON text."""
    values: HoleValues = {}
    for name, (start, end, is_string) in holes.items():
        if is_string:
            text = string_value(raw, start, end)
            if text is None:
                return None
            values[name] = text
        else:
            values[name] = int(raw[start:end])
    return values


def json_text(value: str) -> bytes:
    """A string as the repairers' compact JSON writes it, without the quotes (UnicodeEncodeError
    for a lone surrogate, which that writer would escape). ``encode_basestring`` is the C
    function behind ``json.dumps(ensure_ascii=False)`` for one string, without its overhead."""
    return encode_basestring(value)[1:-1].encode("utf-8")


class Rewrite:
    """How a repaired frame of a shape is written: the repaired frame's bytes cut at the string
    holes, which are filled with each frame's own values (``json_text``)."""

    __slots__ = ("names", "segments")

    def __init__(self, segments: tuple[bytes, ...], names: tuple[bytes, ...]) -> None:
        self.segments = segments
        self.names = names

    @classmethod
    def of(cls, written: bytes, marks: dict[bytes, bytes]) -> Rewrite | None:
        """Cut ``written`` (a frame written with each hole's value replaced by its mark) at the
        marks; None unless each mark occurs exactly once."""
        found = []
        for name, mark in marks.items():
            at = written.find(mark)
            if at < 0 or written.find(mark, at + 1) >= 0:
                return None
            found.append((at, at + len(mark), name))
        found.sort()
        segments, cut = [], 0
        for start, end, _ in found:
            segments.append(written[cut:start])
            cut = end
        segments.append(written[cut:])
        return cls(tuple(segments), tuple(name for _, _, name in found))

    def fill(self, values: HoleValues) -> bytes | None:
        parts = [self.segments[0]]
        try:
            for name, segment in zip(self.names, self.segments[1:], strict=True):
                value = values[name]
                if not isinstance(value, str):
                    return None
                parts.append(json_text(value))
                parts.append(segment)
        except UnicodeEncodeError:
            return None
        return b"".join(parts)


class ShapeEntry:
    """A remembered shape: the state its frames continue (None: frames the repairer does not
    look at), the line ending of its frames, how often it was met again, and for frames that
    get repaired, how they are written and which repairs they count."""

    __slots__ = ("eol", "hits", "names", "notes", "rewrite", "segments", "state")

    def __init__(self, shape: Shape, state: Any, eol: bytes, rewrite: Rewrite | None = None,
                 notes: tuple[str, ...] = ()) -> None:
        self.state = state
        self.eol = eol
        self.hits = 0
        self.segments = shape.key
        self.names = tuple((name, is_string) for name, (_, _, is_string) in shape.holes.items())
        self.rewrite = rewrite
        self.notes = notes


class Matcher:
    """Recognises one whole frame of a shape at a chunk position.

    The usual hole (text without escapes, quotes or control characters) is found by comparing the
    shape's bytes around it (``startswith``/``find``: C calls); a frame whose holes hold escapes
    is matched by a regular expression built from the shape (compiled when first needed)."""

    __slots__ = ("_regex", "entry", "head", "head_size", "holes", "names", "only", "tail",
                 "tail_size", "takes")

    def __init__(self, entry: ShapeEntry, main: bytes = b"") -> None:
        self.entry = entry
        self.names = entry.names  # in frame order (shape_of sorts the holes by position)
        self.head = entry.segments[0]
        self.head_size = len(self.head)
        self.tail = entry.segments[-1]
        self.tail_size = len(self.tail)
        # the name of a shape's only hole, a string one; None: other shapes
        self.only = self.names[0][0] if len(self.names) == 1 and self.names[0][1] else None
        self.takes = self.only is not None and self.only == main  # that hole is ``main``
        # each hole with the bytes that follow it, and their length
        self.holes = tuple((name, is_string, segment, len(segment)) for (name, is_string), segment
                           in zip(self.names, entry.segments[1:], strict=True))
        self._regex: re.Pattern[bytes] | None = None

    @property
    def regex(self) -> re.Pattern[bytes]:
        if self._regex is None:
            parts = [re.escape(self.head)]
            for _, is_string, segment, _ in self.holes:
                parts.append(_STRING_GROUP if is_string else _INT_GROUP)
                parts.append(re.escape(segment))
            self._regex = re.compile(b"".join(parts), re.DOTALL)
        return self._regex

    def match(self, chunk: bytes, pos: int) -> tuple[int, HoleValues] | None:
        """(end of the frame, its hole values) for a frame of this shape at ``pos``; None when
        there is none there, or its holes are not valid JSON text. Runs once per frame of a
        healthy stream: C calls (``startswith``, ``find``, ``decode``, ``isprintable``) do the
        work; text with an escape or a character that is not printable takes the regex."""
        if not chunk.startswith(self.head, pos):
            return None
        at = pos + self.head_size
        values: HoleValues = {}
        for name, is_string, segment, size in self.holes:
            if is_string:
                end = chunk.find(b'"', at)
                if end < 0 or not chunk.startswith(segment, end):
                    return self._by_regex(chunk, pos)
                try:
                    text = chunk[at:end].decode("utf-8")
                except UnicodeDecodeError:
                    return None
                # an escape, a control character (or a rarer one: U+2028...): the regex decides
                if "\\" in text or not text.isprintable():
                    return self._by_regex(chunk, pos)
                values[name] = text
            else:
                # plain digits up to the segment (no sign, no leading zero: else the regex)
                end = chunk.find(segment, at)
                digits = chunk[at:end]
                if end < 0 or not digits.isdigit() or len(digits) > 18 or (
                        digits[0] == 0x30 and len(digits) > 1):
                    number = _INT_VALUE.match(chunk, at)
                    if number is None:
                        return None
                    end = number.end()
                    if not chunk.startswith(segment, end):
                        return None
                    digits = chunk[at:end]
                values[name] = int(digits)
            at = end + size
        return at, values

    def _by_regex(self, chunk: bytes, pos: int) -> tuple[int, HoleValues] | None:
        match = self.regex.match(chunk, pos)
        if match is None:
            return None
        values = self.values(match)
        return None if values is None else (match.end(), values)

    def values(self, match: re.Match[bytes]) -> HoleValues | None:
        return hole_values(match.string, {name: (*match.span(group), is_string)
                                          for group, (name, is_string) in enumerate(self.names, 1)})


def can_match(entry: ShapeEntry) -> bool:
    """Only shapes of LF-only frames get a matcher: the SSE parser then finds the frame's end
    where the matcher does, whatever line endings the stream used before."""
    return entry.state is not None and not any(segment.find(b"\r") >= 0 for segment in entry.segments)
