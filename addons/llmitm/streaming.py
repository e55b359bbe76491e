"""A response-stream pipeline that several addons share on one flow.

mitmproxy accepts one ``flow.response.stream`` callable per flow. Repair, recording and payments
all need to see the streamed bytes, so the streaming addon installs one ``StreamPipeline`` and
the others add stages (which may rewrite bytes) and taps (which only observe what the client
receives, in order). A ``ChunkLog`` keeps, for the recorder, what the upstream sent and what the
client got, in flat buffers (an append to each per chunk).

Contract with mitmproxy (see research/mitmproxy.md): the callable is called per upstream chunk
and once with ``b""`` at the end; it must never return ``b""`` mid-stream (that writes the HTTP/1
chunked terminator), so it always returns a list without empty items.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class StreamStage(Protocol):
    """A byte transform on a stream: ``feed`` per chunk, ``finish`` once at the end."""

    def feed(self, chunk: bytes) -> list[bytes]: ...

    def finish(self) -> list[bytes]: ...


StreamTap = Callable[[bytes], None]
StreamEndTap = Callable[[], None]


class ChunkLog:
    """A stream as it passed, for the recorder: the upstream's bytes, the client's (kept apart
    only from the first chunk a stage changed; until then they are the upstream's), and each
    chunk's arrival time and end offset in both. Flat buffers, no object kept per chunk: a
    chunk's bytes are freed once sent on, and the recorder hands the buffers over as they are.
    Logging stops once ``limit`` upstream bytes are in."""

    __slots__ = ("client", "client_ends", "room", "times", "upstream", "upstream_ends")

    def __init__(self, limit: int) -> None:
        self.upstream = bytearray()
        self.upstream_ends = array("q")
        self.times = array("d")
        self.client: bytearray | None = None
        self.client_ends: array[int] | None = None
        self.room = limit

    def add(self, at: float, data: bytes, pieces: list[bytes] | None) -> None:
        """One chunk: ``data`` from the upstream, ``pieces`` what the client got instead (None:
        ``data`` itself, the usual case)."""
        self.room -= len(data)
        self.times.append(at)
        self.upstream += data
        self.upstream_ends.append(len(self.upstream))
        if pieces is not None and self.client is None:  # the first change
            self.client = self.upstream[:len(self.upstream) - len(data)]
            self.client_ends = self.upstream_ends[:-1]
        if self.client is not None:
            assert self.client_ends is not None
            self.client += data if pieces is None else b"".join(pieces)
            self.client_ends.append(len(self.client))


class StreamPipeline:
    """Runs stages in order, then hands every outgoing piece to the taps."""

    __slots__ = ("end_taps", "finished", "log", "stages", "taps")

    def __init__(self) -> None:
        self.stages: list[StreamStage] = []
        self.taps: list[StreamTap] = []
        self.end_taps: list[StreamEndTap] = []
        self.log: ChunkLog | None = None
        self.finished = False

    def add_stage(self, stage: StreamStage) -> None:
        self.stages.append(stage)

    def add_tap(self, tap: StreamTap, on_end: StreamEndTap | None = None) -> None:
        self.taps.append(tap)
        if on_end is not None:
            self.end_taps.append(on_end)

    def start_log(self, limit: int) -> ChunkLog:
        """Keep a ``ChunkLog`` of this stream (for the recorder), of about ``limit`` bytes."""
        self.log = ChunkLog(limit)
        return self.log

    def __call__(self, data: bytes) -> list[bytes]:
        if data:
            # The hot path (once per upstream chunk): while every stage returns one piece, hand
            # it on without building lists; anything else goes the general way (_through).
            piece = data
            for index, stage in enumerate(tuple(self.stages)):
                try:
                    out = stage.feed(piece)
                except Exception:
                    out = self._detach(stage, [piece])
                    pieces = self._through(index, out)  # the stages after it (indexes moved down)
                    break
                if len(out) != 1:
                    pieces = self._through(index + 1, out) if out else []
                    break
                piece = out[0]
            else:
                pieces = [piece] if piece else []
        else:
            pieces = self._finish()
        log = self.log
        if log is not None and log.room > 0 and (data or pieces):
            # not a tap: it needs the upstream's chunk too
            log.add(time.time(), data, None if len(pieces) == 1 and pieces[0] is data else pieces)
        if self.taps:
            for piece in pieces:
                for tap in tuple(self.taps):
                    try:
                        tap(piece)
                    except Exception:
                        self._tap_failed(tap)
            if not data:
                for end in tuple(self.end_taps):
                    try:
                        end()
                    except Exception:
                        self._tap_failed(end)
        return pieces

    def _tap_failed(self, tap: Callable[..., None]) -> None:
        # an observer must never cut the client's stream
        log.exception("stream tap failed; it is detached, the stream goes on")
        if tap in self.taps:
            self.taps.remove(tap)
        if tap in self.end_taps:
            self.end_taps.remove(tap)

    def _through(self, start: int, pieces: list[bytes]) -> list[bytes]:
        for stage in list(self.stages[start:]):
            fed: list[bytes] = []
            try:
                for piece in pieces:
                    fed.extend(stage.feed(piece))
            except Exception:
                fed = self._detach(stage, pieces)
            pieces = fed
            if not pieces:
                return []
        return [p for p in pieces if p]

    def _detach(self, stage: StreamStage, pieces: list[bytes]) -> list[bytes]:
        # A stage bug must not cut the stream (SPEC §5): detach the stage and pass its input on,
        # after whatever it still holds (if it can say).
        log.exception("stream stage %s failed; it is detached, bytes pass through",
                      type(stage).__name__)
        self.stages.remove(stage)
        salvage = getattr(stage, "salvage", None)
        held = salvage() if callable(salvage) else b""
        return [held, *pieces] if held else list(pieces)

    def _finish(self) -> list[bytes]:
        if self.finished:
            return []
        self.finished = True
        out: list[bytes] = []
        # What a stage emits at its end still has to pass the stages after it.
        for index, stage in enumerate(list(self.stages)):
            try:
                tail = stage.finish()
            except Exception:
                log.exception("stream stage %s failed at the end", type(stage).__name__)
                salvage = getattr(stage, "salvage", None)
                tail = [salvage()] if callable(salvage) else []
            if tail:
                out.extend(self._through(index + 1, tail))
        # Later stages were fed everything earlier ones emitted; now they may flush too.
        return [p for p in out if p]
