"""Incremental Server-Sent Events parser that keeps every frame's raw bytes.

Follows the WHATWG ``text/event-stream`` interpretation rules: lines end in LF, CR or CRLF (a CR
at the end of a chunk may be completed by an LF at the start of the next one); ``data`` lines
are joined with LF; ``event``, ``id`` (ignored when it contains NUL) and ``retry`` (ASCII digits
only) are recognised; lines starting with ``:`` are comments; other field names are ignored; one
leading UTF-8 byte order mark is skipped.

Unlike a client-side decoder, the parser returns a :class:`Frame` for every piece of the stream,
including comment-only and empty frames, and each frame carries ``raw``: the exact bytes from its
first byte through its terminating blank line. Concatenating ``raw`` of all frames plus
:meth:`SSEParser.finish` gives back the input byte for byte, whatever the chunking, so a proxy
can re-emit untouched frames byte-identical.

Nothing is held back except the frame still being assembled. When the blank line that ends a
frame is a CR at the very end of a chunk, the frame is released at once; an LF that then starts
the next chunk belongs to that CR (CRLF) and is returned as a field-less frame of its own.

``strict=True`` adds a plausibility check for proxies that only want to touch streams they
understand: every line must be empty, a comment, or one of the four known fields (optionally
after spaces or tabs, recorded as ``Frame.spaced``), and the first ``data`` value of a frame must
be empty or start with ``{``, ``[`` or ``:`` (JSON, ``[DONE]`` or a re-wrapped comment); invalid
UTF-8 also counts. On the first violation the parser stops: ``broken`` becomes True and
:meth:`SSEParser.take_rest` hands back every byte it has not returned yet, starting with the
offending frame. The check looks at a partial frame too, so binary noise is given up on as soon
as it arrives instead of being held until a blank line that may never come. It is decided on the
bytes alone, so the same input gives the same frames and the same ``take_rest`` bytes under any
chunking.

Speed: frame ends are found with ``bytes.find`` (LF-only streams) or one precompiled regular
expression (streams that contain CR); there are no per-byte Python loops.
"""

from __future__ import annotations

import re

__all__ = ["BOM", "Frame", "SSEParser", "line_terminator", "split_lines"]

BOM = b"\xef\xbb\xbf"

_EOL_STR = re.compile(r"\r\n|\r|\n")
_EOL_BYTES = re.compile(rb"\r\n|\r|\n")
_LINE_WITH_EOL = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")

_KNOWN_FIELDS = ("data", "event", "id", "retry")
_KNOWN_FIELDS_B = (b"data", b"event", b"id", b"retry")
_DATA_STARTS = "{[:"
_DATA_STARTS_B = frozenset(b"{[:")
_NEED_MORE = None


class Frame:
    """One SSE frame: the raw bytes and the fields a WHATWG client would see.

    ``data`` is None when the frame has no ``data`` line (a client dispatches nothing then);
    otherwise the data lines joined with LF. ``comments`` holds comment lines without the colon.
    ``unknown`` lists fields a client ignores, as (name, value). ``spaced`` is True when some
    line is a known field preceded by spaces or tabs (which WHATWG clients ignore). ``start`` is
    the offset in ``raw`` where the frame's lines begin (after a BOM). ``lossy`` is True when the
    bytes were not valid UTF-8 (invalid sequences decoded as U+FFFD).
    """

    __slots__ = (
        "comments",
        "data",
        "event",
        "id",
        "lossy",
        "raw",
        "retry",
        "spaced",
        "start",
        "unknown",
    )

    def __init__(self, raw: bytes, start: int = 0) -> None:
        self.raw = raw
        self.start = start
        self.data: str | None = None
        self.event: str | None = None
        self.id: str | None = None
        self.retry: int | None = None
        self.comments: tuple[str, ...] = ()
        self.unknown: tuple[tuple[str, str], ...] = ()
        self.spaced = False
        self.lossy = False

    @property
    def is_blank(self) -> bool:
        """True for a frame with no lines but its terminator (or a lone LF after a CR)."""
        return not self.raw[self.start :].strip(b"\r\n")

    def __repr__(self) -> str:
        return (
            f"Frame(event={self.event!r}, data={self.data!r}, id={self.id!r}, "
            f"retry={self.retry!r}, comments={self.comments!r}, raw={self.raw!r})"
        )


def split_lines(raw: bytes) -> list[bytes]:
    """Split raw frame bytes into lines, each keeping its own terminator."""
    return _LINE_WITH_EOL.findall(raw)


def line_terminator(line: bytes) -> bytes:
    """The terminator a line (from :func:`split_lines`) ends with, or b"" for none."""
    if line.endswith(b"\r\n"):
        return b"\r\n"
    if line.endswith((b"\n", b"\r")):
        return line[-1:]
    return b""


def _parse_into(frame: Frame, text: str, strict: bool) -> bool:
    """Fill ``frame``'s fields from its decoded text; False if ``strict`` rules are broken."""
    if "\r" not in text:
        body = text[:-2] if text[-2:] == "\n\n" else text.rstrip("\n")
        single = "\n" not in body
    elif text[-4:] == "\r\n\r\n":
        body = text[:-4]
        single = "\n" not in body and "\r" not in body
    else:
        body = text
        single = False
    if single and body[:5] == "data:":
        # the common case: one data line
        value = body[6:] if body[5:6] == " " else body[5:]
        if strict:
            head = value.lstrip(" \t")[:1]
            if head and head not in _DATA_STARTS:
                return False
        frame.data = value
        return True
    lines = body.split("\n") if "\r" not in text else _EOL_STR.split(text)
    data: list[str] | None = None
    comments: list[str] | None = None
    unknown: list[tuple[str, str]] | None = None
    seen_data = False  # a data line, spaced or not (strict: only the first one is checked)
    for line in lines:
        if not line:
            continue
        if line[0] == ":":
            if comments is None:
                comments = []
            comments.append(line[1:])
            continue
        colon = line.find(":")
        if colon < 0:
            name, value = line, ""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == " ":
                value = value[1:]
        if name == "data":
            if data is None:
                data = [value]
            else:
                data.append(value)
        elif name == "event":
            frame.event = value
            continue
        elif name == "id":
            if "\0" not in value:
                frame.id = value
            continue
        elif name == "retry":
            if value.isascii() and value.isdigit():
                frame.retry = int(value)
            continue
        else:
            if unknown is None:
                unknown = []
            unknown.append((name, value))
            stripped = name.lstrip(" \t")
            if stripped in _KNOWN_FIELDS:
                frame.spaced = True
            elif strict:
                return False
            if stripped != "data":
                continue
        # a data line (maybe spaced)
        if strict and not seen_data:
            head = value.lstrip(" \t")[:1]
            if head and head not in _DATA_STARTS:
                return False
        seen_data = True
    if data is not None:
        frame.data = data[0] if len(data) == 1 else "\n".join(data)
    if comments is not None:
        frame.comments = tuple(comments)
    if unknown is not None:
        frame.unknown = tuple(unknown)
    return True


_NAME_AT = re.compile(rb"[ \t]*(data|event|id|retry)(?=[:\r\n]|$)|[ \t]*([a-z]{0,4})$")


def _line_start_ok(buf: bytes, pos: int, end: int, first_data: bool) -> tuple[bool | None, bool]:
    """Strict check of one line that begins at ``pos``; ``end``: its terminator or buffer end.

    Returns (verdict, is_data): verdict True (fine), False (breaks the strict rules) or None
    (cannot tell until more bytes come). ``first_data``: no data line yet in this frame.
    """
    complete = end < len(buf)
    if pos >= end or buf[pos] == 0x3A:  # empty line or comment
        return True, False
    m = _NAME_AT.match(buf, pos, end)
    if m is None:
        return False, False
    name = m.group(1)
    if name is None:
        # only blanks and/or a prefix of a field name so far
        if complete:
            return False, False
        prefix = m.group(2)
        if any(known.startswith(prefix) for known in _KNOWN_FIELDS_B):
            return _NEED_MORE, False
        return False, False
    q = m.end()
    if q == end:
        return (True if complete else _NEED_MORE), name == b"data"
    # buf[q] is ':'
    if name != b"data":
        return True, False
    if not first_data:
        return True, True
    q += 1
    while q < end and buf[q] in (0x20, 0x09):
        q += 1
    if q == end:
        return (True if complete else _NEED_MORE), True
    return buf[q] in _DATA_STARTS_B, True


class SSEParser:
    """Feed bytes, get complete :class:`Frame` objects; see the module docstring."""

    __slots__ = (
        "_checked",
        "_cr",
        "_first",
        "_frame_data",
        "_lead",
        "_parts",
        "_plen",
        "_settled",
        "_skip_lf",
        "broken",
        "strict",
    )

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.broken = False
        self._parts: list[bytes] = []  # the partial frame, as received
        self._plen = 0
        self._first = True  # before the first frame (a BOM may still come)
        self._lead = 0  # bytes to skip at the start of the partial frame (a BOM)
        self._skip_lf = False  # the last frame ended in a CR at a chunk end
        self._cr = False  # a CR has been seen: use the general scanner
        self._checked = 0  # strict: offset of the next unchecked line in the partial frame
        self._frame_data = False  # strict: the partial frame has had a data line
        # The partial frame ends inside a line whose start has been checked: more bytes without
        # CR or LF cannot end the frame nor start a line, so they are only stored.
        self._settled = False

    def feed(self, chunk: bytes) -> list[Frame]:
        """Add bytes; return the frames they complete (possibly none)."""
        if self.broken or not chunk:
            return []
        frames: list[Frame] = []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                frames.append(Frame(b"\n", 1))
                chunk = chunk[1:]
                if not chunk:
                    return frames
        has_cr = chunk.find(b"\r") >= 0  # find: see _shapes.py on `in`
        if self._settled and not has_cr and chunk.find(b"\n") < 0:
            self._parts.append(chunk)
            self._plen += len(chunk)
            return frames
        if has_cr:
            self._cr = True
        if self._parts:
            resume = self._plen - 3  # the partial frame held no frame end up to here
            self._parts.append(chunk)
            data = b"".join(self._parts)
            self._parts = []
            self._plen = 0
        else:
            resume = -1
            data = chunk
        size = len(data)
        pos = 0
        nl_nl = cr_cr = nl_cr = -1  # next LF LF / CR CR / LF CR at or after the scan point
        while pos < size:
            if self._first:
                head = data[pos : pos + 3]
                if len(head) < 3 and BOM.startswith(head):
                    break  # maybe a BOM split across chunks
                self._first = False
                if head == BOM:
                    self._lead = 3
            lead = self._lead
            body = pos + lead
            if body >= size:
                break
            first = data[body]
            if first == 0x0A or first == 0x0D:
                # a blank line right at the frame start: an empty frame
                end = body + 1
                if first == 0x0D:
                    if end < size:
                        if data[end] == 0x0A:
                            end += 1
                    else:
                        self._skip_lf = True
                frames.append(Frame(data[pos:end], lead))
            else:
                scan = body if resume <= body else resume
                if self._cr:
                    # Every frame end contains LF LF, CR CR or LF CR, and each of those is one.
                    if nl_nl < scan:
                        nl_nl = data.find(b"\n\n", scan)
                        if nl_nl < 0:
                            nl_nl = size
                    if cr_cr < scan:
                        cr_cr = data.find(b"\r\r", scan)
                        if cr_cr < 0:
                            cr_cr = size
                    if nl_cr < scan:
                        nl_cr = data.find(b"\n\r", scan)
                        if nl_cr < 0:
                            nl_cr = size
                    idx = min(nl_nl, cr_cr, nl_cr)
                    if idx == size:
                        break
                    end = idx + 2
                    if idx != nl_nl:  # the blank line ends in CR, maybe CRLF
                        if end < size:
                            if data[end] == 0x0A:
                                end += 1
                        else:
                            self._skip_lf = True
                else:
                    idx = data.find(b"\n\n", scan)
                    if idx < 0:
                        break
                    end = idx + 2
                raw = data[pos:end]
                frame = Frame(raw, lead)
                try:
                    text = (raw[lead:] if lead else raw).decode("utf-8")
                except UnicodeDecodeError:
                    text = (raw[lead:] if lead else raw).decode("utf-8", "replace")
                    frame.lossy = True
                ok = _parse_into(frame, text, self.strict)
                if self.strict and (not ok or frame.lossy):
                    self.broken = True
                    self._skip_lf = False
                    self._keep(data[pos:] if pos else data)
                    return frames
                frames.append(frame)
            pos = end
            resume = -1
            self._lead = 0
            self._checked = 0
            self._frame_data = False
            self._settled = False
        if pos < size:
            rest = data[pos:] if pos else data
            self._keep(rest)
            if not self.strict:
                self._settled = not self._first and rest[-1] not in (0x0A, 0x0D)
            elif not self._check_partial(rest):
                self.broken = True
                self._skip_lf = False
        return frames

    def at_frame_start(self) -> bool:
        """True when the next byte fed starts a new frame (nothing held, no BOM or CRLF pending),
        so a caller that recognises a whole frame may skip :meth:`feed` for it."""
        return not (self._parts or self._first or self._skip_lf or self.broken)

    def _keep(self, rest: bytes) -> None:
        self._parts = [rest]
        self._plen = len(rest)

    def _check_partial(self, buf: bytes) -> bool:
        """Strict check of the lines of the partial frame not checked yet."""
        self._settled = False
        if self._first:
            return True  # only a BOM prefix so far
        size = len(buf)
        pos = max(self._checked, self._lead)
        while pos < size:
            m = _EOL_BYTES.search(buf, pos)
            end = m.start() if m is not None else size
            verdict, is_data = _line_start_ok(buf, pos, end, not self._frame_data)
            if verdict is False:
                return False
            if m is None:
                self._settled = verdict is True
                break
            if verdict is _NEED_MORE or (m.end() == size and m.group() == b"\r"):
                break  # (a CR at the end may be half of a CRLF): look again next time
            if is_data:
                self._frame_data = True
            pos = m.end()
        self._checked = pos
        return True

    def take_rest(self) -> bytes:
        """Every byte not yet returned in a frame (after ``broken``, from the bad frame on)."""
        rest = b"".join(self._parts)
        self._parts = []
        self._plen = 0
        return rest

    def finish(self) -> bytes:
        """End of stream: the bytes of an unterminated last frame (clients discard them)."""
        self._skip_lf = False
        return self.take_rest()
