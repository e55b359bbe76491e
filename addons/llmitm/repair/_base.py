"""The SSE side of stream repair: framing, passthrough, re-serialising repaired frames."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from llmitm.sse import Frame, SSEParser, line_terminator, split_lines

from ._json import encode, short_hash

log = logging.getLogger(__name__)

_KNOWN = (b"data", b"event", b"id", b"retry")


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

    def __init__(self, request_json: dict[str, Any] | None = None) -> None:
        self.repairs: Counter[str] = Counter()
        self.upstream_changed = False
        self.passthrough = False
        self.error: str | None = None  # an internal error that forced passthrough (a bug)
        self.request = request_json if isinstance(request_json, dict) else None
        self._parser = SSEParser(strict=True)
        self._eol = b"\n"
        self._named_events = False  # the upstream labels events with "event:" lines
        self._ids: set[str] = set()
        # set by _event for the frame being handled
        self._before: list[bytes] = []
        self._after: list[bytes] = []
        self._set_event: str | None = None

    # --- StreamStage ----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            return []
        if self.passthrough:
            return [chunk]
        out: list[bytes] = []
        frames = self._parser.feed(chunk)
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
        if self._parser.broken and not self.passthrough:
            self.passthrough = True
        if self.passthrough:
            rest = self._parser.take_rest()
            if rest:
                out.append(rest)
        joined = b"".join(out)
        return [joined] if joined else []

    def salvage(self) -> bytes:
        """After a failure: the bytes received but not yet sent on (for StreamPipeline)."""
        self.passthrough = True
        return self._parser.take_rest()

    def finish(self) -> list[bytes]:
        if self.passthrough:
            return []
        rest = self._parser.finish()
        return [rest] if rest else []

    # --- frames ---------------------------------------------------------------------------

    def _note(self, repair: str, count: int = 1) -> None:
        self.repairs[repair] += count

    def _frame(self, frame: Frame) -> list[bytes]:
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
            return [frame.raw]
        if not isinstance(obj, dict):
            return self._changed([frame.raw], "spaced_field") if spaced else [frame.raw]
        self._eol = self._frame_eol(frame)
        self._before = []
        self._after = []
        self._set_event = None
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
