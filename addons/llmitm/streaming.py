"""A response-stream pipeline that several addons share on one flow.

mitmproxy accepts one ``flow.response.stream`` callable per flow. Repair, recording and payments
all need to see the streamed bytes, so the streaming addon installs one ``StreamPipeline`` and
the others add stages (which may rewrite bytes) and taps (which only observe what the client
receives, in order; input taps see what the upstream sent).

Contract with mitmproxy (see research/mitmproxy.md): the callable is called per upstream chunk
and once with ``b""`` at the end; it must never return ``b""`` mid-stream (that writes the HTTP/1
chunked terminator), so it always returns a list without empty items.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class StreamStage(Protocol):
    """A byte transform on a stream: ``feed`` per chunk, ``finish`` once at the end."""

    def feed(self, chunk: bytes) -> list[bytes]: ...

    def finish(self) -> list[bytes]: ...


StreamTap = Callable[[bytes], None]
StreamEndTap = Callable[[], None]


class StreamPipeline:
    """Runs stages in order, then hands every outgoing piece to the taps."""

    __slots__ = ("end_taps", "finished", "input_taps", "stages", "taps")

    def __init__(self) -> None:
        self.stages: list[StreamStage] = []
        self.taps: list[StreamTap] = []
        self.input_taps: list[StreamTap] = []
        self.end_taps: list[StreamEndTap] = []
        self.finished = False

    def add_stage(self, stage: StreamStage) -> None:
        self.stages.append(stage)

    def add_tap(self, tap: StreamTap, on_end: StreamEndTap | None = None) -> None:
        self.taps.append(tap)
        if on_end is not None:
            self.end_taps.append(on_end)

    def add_input_tap(self, tap: StreamTap) -> None:
        """``tap`` sees every upstream chunk before the stages do (what the upstream sent)."""
        self.input_taps.append(tap)

    def __call__(self, data: bytes) -> list[bytes]:
        if data:
            for tap in self.input_taps:
                try:
                    tap(data)
                except Exception:
                    self._tap_failed(tap)
                    break  # the list changed under the loop; the others see the next chunk
            pieces = self._chunk(data)
        else:
            pieces = self._finish()
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

    def _chunk(self, data: bytes) -> list[bytes]:
        # The hot path (once per upstream chunk): while every stage returns one piece, hand it on
        # without building lists; anything else goes the general way.
        piece = data
        for index, stage in enumerate(tuple(self.stages)):
            try:
                out = stage.feed(piece)
            except Exception:
                out = self._detach(stage, [piece])
                return self._through(index, out)  # the stages after it (indexes moved down)
            if len(out) != 1:
                return self._through(index + 1, out) if out else []
            piece = out[0]
        return [piece] if piece else []

    def _tap_failed(self, tap: Callable[..., None]) -> None:
        # an observer must never cut the client's stream
        log.exception("stream tap failed; it is detached, the stream goes on")
        if tap in self.taps:
            self.taps.remove(tap)
        if tap in self.input_taps:
            self.input_taps.remove(tap)
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
