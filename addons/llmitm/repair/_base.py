"""The SSE side of stream repair: framing, passthrough, re-serialising repaired frames."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, ClassVar

from llmitm.sse import Frame, SSEParser, line_terminator, split_lines

from ._json import encode, short_hash
from ._shapes import (
    MAX_MATCHERS,
    MAX_SHAPES,
    HoleValues,
    Matcher,
    Rewrite,
    Shape,
    ShapeEntry,
    can_match,
    hole_values,
    shape_of,
)

log = logging.getLogger(__name__)

_KNOWN = (b"data", b"event", b"id", b"retry")
_NOT_WANTED = object()  # _admit for a frame the repairer does not look at


def _field_name(content: bytes) -> bytes:
    colon = content.find(b":")
    return content if colon < 0 else content[:colon]


def _unspace(raw: bytes) -> bytes:
    """Remove spaces/tabs before known field names (`` data: x`` -> ``data: x``)."""
    out = []
    for line in split_lines(raw):
        stripped = line.lstrip(b" \t")
        if stripped is not line and _field_name(stripped.rstrip(b"\r\n")) in _KNOWN:
            out.append(stripped)
        else:
            out.append(line)
    return b"".join(out)


def _comment_out(raw: bytes, start: int) -> bytes:
    """The frame with every field line turned into a comment line (``data: : x`` -> ``: x``)."""
    out = [raw[:start]]
    for line in split_lines(raw[start:]):
        content = line.rstrip(b"\r\n")
        term = line[len(content) :]
        if not content or content[:1] == b":":
            out.append(line)
            continue
        if _field_name(content.lstrip(b" \t")) == b"data":
            value = content.lstrip(b" \t")[5:]
            if value[:1] == b" ":
                value = value[1:]
            out.append((value if value[:1] == b":" else b":" + value) + term)
        else:
            out.append(b":" + content + term)
    return b"".join(out)


class StreamRepairer:
    """Repairs one SSE response stream; satisfies ``llmitm.streaming.StreamStage``.

    Subclasses implement :meth:`_wants` (cheap test whether a frame needs its JSON looked at)
    and :meth:`_event` (inspect / fix one decoded JSON event). Untouched frames leave as their
    exact upstream bytes; a repaired frame is re-serialised (compact JSON, its other lines and
    line endings kept). Once the stream is not understood (not SSE, binary noise, data that is
    not JSON) every further byte passes through unchanged.
    """

    endpoint = ""
    #: endpoints whose official SDK json-decodes every data line (empty data breaks it)
    _json_every_data = True
    #: the keys whose values make a frame's holes (see ``Shape``); None: no fast path
    _holes: ClassVar[tuple[bytes, ...]] = ()
    #: the hole whose text a continuation takes (the arguments fragment), as ``Shape`` names it
    _main: ClassVar[bytes] = b""
    #: the fast path on: tests turn it off to show it changes nothing
    fast_path = True

    def __init__(self, request_json: dict[str, Any] | None = None) -> None:
        self.repairs: Counter[str] = Counter()
        self.upstream_changed = False
        self.passthrough = False
        self.error: str | None = None  # an internal error that forced passthrough (a bug)
        self.request = request_json if isinstance(request_json, dict) else None
        self._parser = SSEParser(strict=True)
        self._at_frame_start = False  # the parser's at_frame_start(), as of its last feed
        self._eol = b"\n"
        self._named_events = False  # the upstream labels events with "event:" lines
        self._ids: set[str] = set()
        # set by _event for the frame being handled
        self._before: list[bytes] = []
        self._after: list[bytes] = []
        self._set_event: str | None = None
        # Shapes of frames already handled in full (the fast path), and what _event leaves for
        # the frame being handled: the state a later frame of the same shape continues.
        self._shapes: dict[tuple[bytes, ...], ShapeEntry] = {}
        self._matchers: list[Matcher] = []  # most recently used first
        # the last matcher to pass a frame unchanged, when that frame ended the last chunk
        self._hot: Matcher | None = None
        self._admit: Any = None
        self._last_obj: dict[str, Any] | None = None  # the event _event just handled
        self.full_frames = 0  # frames that took the full path (the rest took the fast path)

    # --- StreamStage ----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> list[bytes]:
        hot = self._hot
        if hot is not None:
            # The hottest path: a chunk that is one whole frame of a shape the last chunk ended
            # with (see _match_frames: hot means at a frame start, not passing through, the
            # line ending already the shape's). A shape with one string hole is matched here,
            # inline; anything else takes the general way below.
            name = hot.only
            entry = hot.entry
            if name is None:
                match = hot.match(chunk, 0)
                if match is not None and match[0] == len(chunk):
                    values = match[1]
                    if entry.rewrite is None:
                        if self._continue(entry.state, values):
                            return [chunk]
                    else:
                        applied, written = self._apply(entry, values)
                        if applied:
                            return [written]  # type: ignore[list-item]  # applied: rewritten
            else:
                start = hot.head_size
                end = len(chunk) - hot.tail_size
                # Matcher.match, inline: the text is all between the head and the tail
                if start <= end and chunk.startswith(hot.head) and chunk.endswith(hot.tail):
                    try:
                        text = chunk[start:end].decode("utf-8")
                    except UnicodeDecodeError:
                        text = "\n"  # not printable: the general way decides
                    # (str ``in``: cheaper than bytes.find, see _shapes.py)
                    if ('"' not in text and "\\" not in text and text.isprintable() and (
                            self._take(entry.state, text) if hot.takes
                            else self._continue(entry.state, {name: text}))):
                        rewrite = entry.rewrite
                        if rewrite is None:
                            return [chunk]
                        # A repaired shape (Rewrite.fill, inline): text that is printable and
                        # holds no quote or backslash is written in JSON as these very bytes.
                        for repair in entry.notes:
                            self.repairs[repair] += 1
                        self.upstream_changed = True
                        head, tail = rewrite.segments
                        return [head + chunk[start:end] + tail]
            self._hot = None
        if self.passthrough or not chunk:
            return [chunk] if chunk else []
        out: list[bytes] = []
        if self._at_frame_start and self._matchers:
            done = self._match_frames(chunk, out)
            if done == len(chunk):
                return out if len(out) == 1 else [b"".join(out)]
            self._hot = None  # the parser takes the rest
            if done:
                chunk = chunk[done:]
        parser = self._parser
        frames = parser.feed(chunk)
        for frame in frames:
            if self.passthrough:
                out.append(frame.raw)
                continue
            try:
                pieces = self._frame(frame)
            except Exception as exc:  # never let a repair bug cut the stream
                log.exception("stream repair failed; passing the rest through")
                self.error = f"{type(exc).__name__}: {exc}"
                self.passthrough = True
                pieces = [frame.raw]
            out.extend(pieces)
        if parser.broken and not self.passthrough:
            self.passthrough = True
        if self.passthrough:
            rest = parser.take_rest()
            if rest:
                out.append(rest)
        self._at_frame_start = not self.passthrough and parser.at_frame_start()
        joined = b"".join(out)
        return [joined] if joined else []

    def salvage(self) -> bytes:
        """After a failure: the bytes received but not yet sent on (for StreamPipeline)."""
        self.passthrough = True
        self._at_frame_start = False
        self._hot = None
        return self._parser.take_rest()

    def finish(self) -> list[bytes]:
        if self.passthrough:
            return []
        rest = self._parser.finish()
        return [rest] if rest else []

    # --- frames ---------------------------------------------------------------------------

    def _note(self, repair: str, count: int = 1) -> None:
        self.repairs[repair] += count

    def _match_frames(self, chunk: bytes, out: list[bytes]) -> int:
        """Whole frames of known shapes at the start of ``chunk``, handled without the SSE
        parser (see llmitm/repair/_shapes.py): their output goes to ``out``; returns how many
        bytes of ``chunk`` they took. The hot path of a healthy stream: few calls per frame."""
        pos, size = 0, len(chunk)
        copied = 0  # chunk[copied:pos] passes on unchanged
        matchers = self._matchers
        cont = self._continue
        while pos < size:
            matcher = matchers[0]  # the latest shape met: usually this one again
            match = matcher.match(chunk, pos)
            if match is None:
                for index in range(1, len(matchers)):
                    match = matchers[index].match(chunk, pos)
                    if match is not None:
                        matcher = matchers.pop(index)
                        matchers.insert(0, matcher)
                        break
                else:
                    break
            end, values = match
            entry = matcher.entry
            if entry.rewrite is None:  # a frame that passes unchanged
                if not cont(entry.state, values):
                    break
                self._eol = entry.eol
            else:
                applied, written = self._apply(entry, values)
                if not applied:
                    break
                if pos > copied:
                    out.append(chunk[copied:pos])
                out.append(written)  # type: ignore[arg-type]  # applied with a rewrite
                copied = end
            pos = end
            self._hot = matcher
        if pos > copied:
            out.append(chunk[copied:pos] if copied or pos < size else chunk)
        return pos

    def _apply(self, entry: ShapeEntry, values: HoleValues) -> tuple[bool, bytes | None]:
        """A frame of a known shape that continues ``entry.state``: (done, the rewritten frame
        or None when it passes unchanged); (False, None), changing nothing, when the full path
        must handle it."""
        written = None
        if entry.rewrite is not None:
            written = entry.rewrite.fill(values)
            if written is None:
                return False, None
        if not self._continue(entry.state, values):
            return False, None
        self._eol = entry.eol
        if written is not None:
            for repair in entry.notes:
                self.repairs[repair] += 1
            self.upstream_changed = True
        return True, written

    def _frame(self, frame: Frame) -> list[bytes]:
        shape = None
        if self._holes and self.fast_path and not frame.spaced:
            shape = shape_of(frame.raw, self._holes)
            if shape is not None:
                entry = self._shapes.get(shape.key)
                if entry is not None:
                    written = self._fast(entry, frame, shape)
                    if written is not None:
                        return [written]
        pieces = self._full(frame)
        if shape is not None and len(self._shapes) < MAX_SHAPES:
            self._remember(frame, shape, pieces)
        return pieces

    def _fast(self, entry: ShapeEntry, frame: Frame, shape: Shape) -> bytes | None:
        """The frame's output if its known shape can handle it; None: the full path must."""
        values = hole_values(frame.raw, shape.holes)
        if values is None:
            return None
        if entry.state is None:  # a frame the repairer does not look at: valid JSON is enough
            return None if self._wants(frame) else frame.raw
        applied, written = self._apply(entry, values)
        if not applied:
            return None
        entry.hits += 1
        if entry.hits == 1 and len(self._matchers) < MAX_MATCHERS and can_match(entry):
            self._matchers.insert(0, Matcher(entry, self._main))
        return frame.raw if written is None else written

    def _remember(self, frame: Frame, shape: Shape, pieces: list[bytes]) -> None:
        """After the full path: remember the frame's shape when a later frame of that shape can
        take the fast path: the frame passed unchanged, or it was rewritten in a way the state
        (``_admit``) vouches for, and nothing was added."""
        state = self._admit
        if self.passthrough or len(pieces) != 1 or state is None:
            return
        if state is _NOT_WANTED:
            if pieces[0] is frame.raw:
                self._shapes[shape.key] = ShapeEntry(shape, None, self._eol)
            return
        values = hole_values(frame.raw, shape.holes)
        if values is None or not self._admits(state, values):
            return
        notes: tuple[str, ...] = getattr(state, "notes", ())
        if (pieces[0] is frame.raw) != (not notes):
            return  # the frame was repaired without the state saying how, or the other way round
        if not notes:
            self._shapes[shape.key] = ShapeEntry(shape, state, self._eol)
            return
        rewrite = self._rewrite_of(frame, shape, state, values, pieces[0])
        if rewrite is not None:
            self._shapes[shape.key] = ShapeEntry(shape, state, self._eol, rewrite, notes)

    def _rewrite_of(self, frame: Frame, shape: Shape, state: Any, values: HoleValues,
                    written: bytes) -> Rewrite | None:
        """How frames of this shape are rewritten: the repaired event written again with marks
        in its holes, cut at the marks; None unless that gives back ``written`` when filled with
        this frame's own values."""
        obj = self._last_obj
        if (obj is None or self._set_event is not None
                or not all(is_string for _, _, is_string in shape.holes.values())):
            return None
        marks = {name: f"\ue000llmitm:{n}\ue001" for n, name in enumerate(shape.holes)}
        if not self._put_holes(state, obj, dict(marks)):
            return None
        rewrite = Rewrite.of(self._reserialise(frame, obj),
                             {name: mark.encode() for name, mark in marks.items()})
        if rewrite is None or rewrite.fill(values) != written:
            return None
        return rewrite

    def _full(self, frame: Frame) -> list[bytes]:
        self._admit = None
        self._last_obj = None
        self.full_frames += 1
        spaced = False
        original = frame.raw
        if frame.spaced:
            fixed = _unspace(frame.raw)
            reparsed = SSEParser().feed(fixed)
            if len(reparsed) == 1:
                frame = reparsed[0]
                spaced = True
        data = frame.data
        if data is None:
            return self._changed([frame.raw], "spaced_field") if spaced else [frame.raw]
        if frame.event is not None:
            self._named_events = True
        head = data.lstrip(" \t\r\n")[:1]
        if not head:
            if self._json_every_data:
                return self._changed([_comment_out(frame.raw, frame.start)], "empty_data")
            return self._changed([frame.raw], "spaced_field") if spaced else [frame.raw]
        if head == ":":
            return self._changed([_comment_out(frame.raw, frame.start)], "wrapped_comment")
        if data.startswith("[DONE]"):
            before = self._on_done()
            pieces = [*before, frame.raw]
            if spaced:
                return self._changed(pieces, "spaced_field")
            if before:
                self.upstream_changed = True
            return pieces
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):  # not JSON where JSON is expected: give up
            self.passthrough = True
            return [original]
        if not spaced and not self._wants(frame):
            self._admit = _NOT_WANTED
            return [frame.raw]
        if not isinstance(obj, dict):
            return self._changed([frame.raw], "spaced_field") if spaced else [frame.raw]
        self._eol = self._frame_eol(frame)
        self._before = []
        self._after = []
        self._set_event = None
        self._last_obj = obj
        changed = self._event(obj, frame)
        pieces = self._before
        if changed or self._set_event is not None:
            pieces.append(self._reserialise(frame, obj))
            self.upstream_changed = True
        else:
            pieces.append(frame.raw)
        pieces.extend(self._after)
        if spaced:
            self._note("spaced_field")
            self.upstream_changed = True
        elif len(pieces) > 1:
            self.upstream_changed = True
        return pieces

    def _changed(self, pieces: list[bytes], repair: str) -> list[bytes]:
        self._note(repair)
        self.upstream_changed = True
        return pieces

    @staticmethod
    def _frame_eol(frame: Frame) -> bytes:
        raw = frame.raw
        nl = raw.find(b"\n", frame.start)
        cr = raw.find(b"\r", frame.start)
        if cr < 0:
            return b"\n"
        if nl == cr + 1:
            return b"\r\n"
        if nl < 0 or cr < nl:
            return b"\r"
        return b"\n"

    def _reserialise(self, frame: Frame, obj: dict[str, Any]) -> bytes:
        payload = encode(obj)
        raw = frame.raw
        out = [raw[: frame.start]]
        wrote = False
        for line in split_lines(raw[frame.start :]):
            content = line.rstrip(b"\r\n")
            if not content:
                out.append(line)
                continue
            name = _field_name(content)
            if name == b"data":
                if not wrote:
                    term = line_terminator(line) or self._eol
                    if self._set_event is not None:
                        out.append(b"event: " + self._set_event.encode() + term)
                    out.append(b"data: " + payload + term)
                    wrote = True
                continue
            out.append(line)
        return b"".join(out)

    def _synth(self, obj: dict[str, Any], event: str | None = None) -> bytes:
        """A new frame in the stream's own style."""
        eol = self._eol
        head = b""
        if event is not None and self._named_events:
            head = b"event: " + event.encode() + eol
        return head + b"data: " + encode(obj) + eol + eol

    def _invent_id(self, prefix: str, *facts: object) -> str:
        """A deterministic id, unique within this stream."""
        n = 0
        while True:
            candidate = prefix + short_hash(self.endpoint, *facts, n)
            if candidate not in self._ids:
                self._ids.add(candidate)
                return candidate
            n += 1

    # --- for subclasses -------------------------------------------------------------------

    def _wants(self, frame: Frame) -> bool:
        return True

    def _event(self, obj: dict[str, Any], frame: Frame) -> bool:
        return False

    def _on_done(self) -> list[bytes]:
        return []

    def _admits(self, state: Any, values: HoleValues) -> bool:
        """Whether ``state`` (left in ``_admit`` by ``_event``) may continue frames of this
        shape: the holes must hold the values ``_event`` used."""
        return False

    def _put_holes(self, state: Any, obj: dict[str, Any], values: dict[bytes, str]) -> bool:
        """Put ``values`` where ``state``'s frame had its holes in ``obj`` (the event as
        ``_event`` left it); False if the repairer cannot say where they go."""
        return False

    def _continue(self, state: Any, values: HoleValues) -> bool:
        """The fast path of a known shape: update the state exactly as ``_event`` would for a
        frame with these hole values, or return False, changing nothing, when the state no
        longer allows it. By default: the text of the ``_main`` hole is all that counts."""
        text = values.get(self._main)
        return isinstance(text, str) and self._take(state, text)

    def _take(self, state: Any, text: str) -> bool:
        """``_continue`` for a frame whose only hole value that counts is ``text``, the
        ``_main`` one (called without building the values on the hottest path)."""
        return False
