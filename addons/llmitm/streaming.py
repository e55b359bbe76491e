"""A response-stream pipeline that several addons share on one flow.

mitmproxy accepts one ``flow.response.stream`` callable per flow. Repair, recording and payments
all need to see the streamed bytes, so the streaming addon installs one ``StreamPipeline`` and
the others add stages (which may rewrite bytes) and taps (which only observe what the client
receives, in order). A ``ChunkLog`` keeps, for the recorder, what the upstream sent and what the
client got: the chunks themselves, in lists (an append or two per chunk).

Contract with mitmproxy (see research/mitmproxy.md): the callable is called per upstream chunk
and once with ``b""`` at the end; it must never return ``b""`` mid-stream (that writes the HTTP/1
chunked terminator), so it always returns a list without empty items.
"""

from __future__ import annotations

import logging
import time
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
    """A stream as it passed, for the recorder: the upstream's chunks, what the client got for
    each (kept apart only from the first chunk a stage changed; until then the upstream's), and
    each chunk's arrival time: lists, aligned, of the chunks as they came, so a chunk costs an
    append or two on the hot path (no copy); the recorder hands them over as they are and its
    writer joins them. Logging stops once ``limit`` upstream bytes are in."""

    __slots__ = ("client", "room", "times", "upstream")

    def __init__(self, limit: int) -> None:
        self.upstream: list[bytes] = []
        self.times: list[float] = []
        self.client: list[bytes] | None = None
        self.room = limit

    def add(self, at: float, data: bytes, pieces: list[bytes] | None) -> None:
        """One chunk: ``data`` from the upstream, ``pieces`` what the client got instead (None:
        ``data`` itself, the usual case). StreamPipeline does the same inline."""
        self.room -= len(data)
        self.times.append(at)
        self.upstream.append(data)
        if pieces is not None:
            self.changed(b"".join(pieces))
        elif self.client is not None:
            self.client.append(data)

    def changed(self, sent: bytes) -> None:
        """The client got ``sent`` for the chunk just added."""
        if self.client is None:  # the first change: until now the client got the upstream's
            self.client = self.upstream[:-1]
        self.client.append(sent)


def pipeline_of(stream: object) -> StreamPipeline | None:
    """The pipeline behind a ``flow.response.stream`` value (its ``feed``), if it is one."""
    owner = getattr(stream, "__self__", stream)
    return owner if isinstance(owner, StreamPipeline) else None


class StreamPipeline:
    """Runs stages in order, then hands every outgoing piece to the taps."""

    __slots__ = ("_chain", "end_taps", "finished", "log", "stages", "taps")

    def __init__(self) -> None:
        self.stages: list[StreamStage] = []
        self._chain: tuple[StreamStage, ...] = ()  # the stages, as the hot path walks them
        self.taps: list[StreamTap] = []
        self.end_taps: list[StreamEndTap] = []
        self.log: ChunkLog | None = None
        self.finished = False

    def add_stage(self, stage: StreamStage) -> None:
        self.stages.append(stage)
        self._chain = tuple(self.stages)

    def add_tap(self, tap: StreamTap, on_end: StreamEndTap | None = None) -> None:
        self.taps.append(tap)
        if on_end is not None:
            self.end_taps.append(on_end)

    def start_log(self, limit: int) -> ChunkLog:
        """Keep a ``ChunkLog`` of this stream (for the recorder), of about ``limit`` bytes."""
        self.log = ChunkLog(limit)
        return self.log

    def feed(self, data: bytes) -> list[bytes]:
        """One upstream chunk (``b""``: the end) in, what the client gets out. Installed as
        ``flow.response.stream`` as this bound method, not the pipeline itself: mitmproxy calls it
        per chunk, and calling an instance looks ``__call__`` up on every call (~70 ns more)."""
        # The hot path, once per upstream chunk (usually one SSE frame): kept to a few
        # bytecodes per stage, as it runs between mitmproxy's own ~30 µs per chunk.
        if not data:
            return self._end()
        piece = data
        pieces = out = None
        stage = several = None
        try:
            # while every stage returns one piece, hand it on without building lists
            for stage in self._chain:
                out = stage.feed(piece)
                if len(out) != 1:
                    several = stage
                    break
                piece = out[0]
        except Exception:
            assert stage is not None
            index = self.stages.index(stage)
            # the stages after it (indexes moved down by the detach)
            pieces = self._through(index, self._detach(stage, [piece]))
        if several is not None:  # none or several pieces: the general way for the rest
            assert out is not None
            pieces = self._through(self.stages.index(several) + 1, out) if out else []
        elif pieces is None:  # one piece: the last stage's own list is handed on
            pieces = (out if out is not None else [piece]) if piece else []
        log = self.log
        if log is not None and log.room > 0:
            # ChunkLog.add, inline: not a tap, as it needs the upstream's chunk too
            log.room -= len(data)
            log.times.append(time.time())
            log.upstream.append(data)
            if piece is not data or len(pieces) != 1:
                log.changed(b"".join(pieces))
            elif log.client is not None:
                log.client.append(data)
        if self.taps:
            self._tap(pieces)
        return pieces

    __call__ = feed

    def _end(self) -> list[bytes]:
        pieces = self._finish()
        log = self.log
        if log is not None and log.room > 0 and pieces:
            log.add(time.time(), b"", pieces)
        if self.taps:
            self._tap(pieces)
        for end in tuple(self.end_taps):
            try:
                end()
            except Exception:
                self._tap_failed(end)
        return pieces

    def _tap(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            for tap in tuple(self.taps):
                try:
                    tap(piece)
                except Exception:
                    self._tap_failed(tap)

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
        self._chain = tuple(self.stages)
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
