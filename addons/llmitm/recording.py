"""Recording (SPEC §9 ``record``) and the leak guard (``guard``): configuration and the plain
logic of the recorder. Imports nothing from mitmproxy; the addons are ``addons/recorder.py`` and
``addons/guard.py``.

A recording is one mitmproxy flow file per session and UTC day, ``<dir>/<session>-<date>.mitm``,
appended one whole flow at a time. What the recorder leaves on a flow's metadata:

- ``llmitm.stream_timing`` (flowmeta.STREAM_TIMING): ``[[seconds_after_response_headers, nbytes],
  ...]`` of a streamed body as the client received it (the body is the response content);
- ``llmitm.upstream_original`` (flowmeta.UPSTREAM_ORIGINAL): ``True`` when a repair changed the
  stream; then ``llmitm.upstream_original_body`` holds the upstream's bytes (``bytes``, redacted
  and bounded like the body) and ``llmitm.upstream_original_timing`` their timing;
- ``llmitm.truncated``: ``{"request"|"response"|"upstream_original"|"websocket": original
  length}`` for each body cut at ``record.max_body``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmitm.streaming import ChunkLog

logger = logging.getLogger(__name__)

MAX_OPEN_FILES = 32
UPSTREAM_ORIGINAL_BODY = "llmitm.upstream_original_body"  # bytes: the upstream's stream body
UPSTREAM_ORIGINAL_TIMING = "llmitm.upstream_original_timing"  # list[[seconds, nbytes]]
TRUNCATED = "llmitm.truncated"  # dict[str, int]: part -> length before the cut
RECORDING_SUFFIX = ".mitm"

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class RecordConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(
        "recordings",
        description="one flow file per session and UTC day (relative to mitmdump's working "
        "directory); null turns recording off",
    )
    redact: list[str] = Field(default_factory=list, description="extra header names to redact")
    max_body: int = Field(1_000_000, ge=0, description="bytes of each body kept in a recording")
    upstream_original: bool = Field(
        True, description="keep the upstream's bytes beside a stream that a repair changed"
    )

    @field_validator("redact")
    @classmethod
    def _header_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
        return value


class GuardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["mark", "block"] = Field(
        "mark", description="mark: mark the flow and log; block: also answer 403, send nothing"
    )


# -- file names --------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_session(session: str) -> str:
    """A session id usable as a file name part (ids from X-Llmitm-Session are not validated)."""
    text = _UNSAFE.sub("_", session)[:64].lstrip(".")
    return text or "_"


def recording_name(session: str, timestamp: float) -> str:
    """``<session>-<YYYY-MM-DD>.mitm`` for the UTC day of ``timestamp``."""
    day = datetime.fromtimestamp(timestamp, UTC).date().isoformat()
    return f"{safe_session(session)}-{day}{RECORDING_SUFFIX}"


_TNET_TYPES = frozenset(b",;#^!~}]")


def valid_prefix(path: str | os.PathLike[str]) -> int:
    """Length of the leading whole tnetstring records of a flow file (its size when intact).

    A process killed in the middle of a write leaves a partial record at the end; appending
    after it would make every later flow unreadable. Only length prefixes are read, so this is
    cheap even for large files.
    """
    good = 0
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while good < size:
            fh.seek(good)
            head = fh.read(12)
            colon = head.find(b":")
            if colon <= 0 or not head[:colon].isdigit():
                break
            end = good + colon + 1 + int(head[:colon])
            if end >= size:
                break
            fh.seek(end)
            kind = fh.read(1)
            if not kind or kind[0] not in _TNET_TYPES:
                break
            good = end + 1
    return good


# -- streamed bodies ---------------------------------------------------------------------------
# Bytes kept beyond max_body so that a secret cut by the limit is still redacted whole.
SLACK = 64 * 1024


class StreamCapture:
    """The bytes of one streamed body with their timing, bounded.

    ``add`` per chunk (on the hot path: it only keeps a reference to the chunk and the time), for
    the first ``limit + SLACK`` bytes; ``raw`` hands them over, and ``joined`` puts the body and
    its chunk ends together.
    """

    __slots__ = ("_chunks", "_clock", "_kept", "_times", "limit", "start", "total")

    def __init__(self, limit: int, start: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self._clock = clock
        self.start = clock() if start is None else start
        self._chunks: list[bytes] = []
        self._times: list[float] = []
        self._kept = 0
        self.total = 0

    def add(self, chunk: bytes) -> None:
        size = len(chunk)
        self.total += size
        room = self.limit + SLACK - self._kept
        if room <= 0 or not size:
            return
        if size > room:
            chunk, size = chunk[:room], room
        self._chunks.append(chunk)
        self._times.append(self._clock())
        self._kept += size

    @property
    def raw(self) -> RawChunks:
        """The chunks with their times, for ``joined`` (in the recording writer)."""
        return self.start, self._times, self._chunks


# A streamed body as taken on the hot path: (start, arrival times, the chunks), handed over as
# they are (no copy, no join on the event loop); joined() puts them together, in the writer.
RawChunks = tuple[float, Sequence[float], Sequence[bytes]]


def joined(raw: RawChunks) -> tuple[bytes, list[tuple[float, int]]]:
    """(the body, ``(seconds since start, end offset)`` per chunk): a chunk within a millisecond
    of the first of a run merged into it, empty chunks left out."""
    start, times, chunks = raw
    ends = _Ends(start)
    for at, chunk in zip(times, chunks, strict=True):
        ends.add(at, len(chunk))
    return b"".join(chunks), ends.ends


def captured_from_log(log: ChunkLog, start: float,
                      upstream: bool) -> tuple[RawChunks, RawChunks | None]:
    """(what the client got, what the upstream sent or None) from a pipeline's finished
    ``ChunkLog``; the upstream's only when ``upstream`` (a repair changed the stream)."""
    sent = log.upstream if log.client is None else log.client
    return (start, log.times, sent), (start, log.times, log.upstream) if upstream else None


class _Ends:
    """``(seconds since start, end offset)`` per chunk; a chunk within a millisecond of the first
    of a run is merged into it."""

    __slots__ = ("end", "ends", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.end = 0
        self.ends: list[tuple[float, int]] = []

    def add(self, at: float, size: int) -> None:
        if not size:
            return
        self.end += size
        t = max(0.0, at - self.start)
        if self.ends and t - self.ends[-1][0] < 0.001:
            self.ends[-1] = (self.ends[-1][0], self.end)
        else:
            self.ends.append((t, self.end))


def timing_of(ends: list[tuple[float, int]], mapped: list[int], length: int) -> list[list[float | int]]:
    """``[[seconds, nbytes], ...]`` for a body of ``length`` bytes whose chunks end at ``mapped``
    (``ends`` offsets after redaction moved them); chunks past ``length`` are cut off."""
    out: list[list[float | int]] = []
    prev = 0
    for (t, _), end in zip(ends, mapped, strict=True):
        end = min(end, length)
        if end > prev:
            out.append([round(t, 4), end - prev])
            prev = end
        if prev >= length:
            break
    if prev < length:  # bytes not covered (e.g. mapping lost): send them with the last chunk
        if out:
            out[-1][1] = int(out[-1][1]) + length - prev
        else:
            out.append([0.0, length - prev])
    return out


class RecordingFiles:
    """Recording files open for appending: O_APPEND, one write per flow, at most
    ``MAX_OPEN_FILES`` open, a partial tail (a crash mid-write) cut before the first append."""

    def __init__(self) -> None:
        self._fds: OrderedDict[Path, int] = OrderedDict()

    def append(self, path: Path, data: bytes) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._open(path)
        else:
            self._fds.move_to_end(path)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _open(self, path: Path) -> int:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            good = valid_prefix(path)
            size = path.stat().st_size
            if good < size:
                os.truncate(path, good)
                logger.warning(
                    "llmitm recorder: %s ended in a partial flow (killed mid-write?); cut %d bytes",
                    path, size - good,
                )
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fds[path] = fd
        logger.info("llmitm recorder: recording to %s", path)
        while len(self._fds) > MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def close_all(self) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            with contextlib.suppress(OSError):
                os.close(fd)



def recording_path(directory: str, session: str, timestamp: float) -> Path:
    return Path(directory) / recording_name(session, timestamp)
