from __future__ import annotations

from llmitm.streaming import StreamPipeline


class Upper:
    def feed(self, chunk: bytes) -> list[bytes]:
        return [chunk.upper()]

    def finish(self) -> list[bytes]:
        return [b"!"]


class HoldUntilNewline:
    """Holds a partial line back, like a frame assembler does."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        head, sep, tail = self.buf.rpartition(b"\n")
        self.buf = tail
        return [head + sep] if sep else []

    def finish(self) -> list[bytes]:
        out, self.buf = self.buf, b""
        return [out] if out else []


def test_empty_pipeline_passes_chunks_and_never_returns_empty_bytes() -> None:
    p = StreamPipeline()
    assert p(b"abc") == [b"abc"]
    assert p(b"") == []


def test_stages_and_taps_see_client_bytes_in_order() -> None:
    p = StreamPipeline()
    p.add_stage(HoldUntilNewline())
    p.add_stage(Upper())
    seen: list[bytes] = []
    ended: list[bool] = []
    p.add_tap(seen.append, lambda: ended.append(True))
    out = p(b"ab") + p(b"c\nd") + p(b"")
    assert out == [b"ABC\n", b"D", b"!"]
    assert seen == out and ended == [True]
    assert p(b"") == []  # finishing twice emits nothing more


class Exploding:
    """Holds bytes, then fails: the pipeline must pass everything on and keep streaming."""

    def __init__(self) -> None:
        self.held = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.held:
            raise RuntimeError("bug")
        self.held = chunk
        return []

    def finish(self) -> list[bytes]:
        return []

    def salvage(self) -> bytes:
        held, self.held = self.held, b""
        return held


def test_a_failing_stage_or_tap_never_cuts_the_stream() -> None:
    p = StreamPipeline()
    p.add_stage(Exploding())
    p.add_stage(Upper())

    def bad_tap(piece: bytes) -> None:
        raise ValueError("tap bug")

    p.add_tap(bad_tap)
    out = p(b"ab") + p(b"cd") + p(b"ef") + p(b"")
    assert b"".join(out) == b"ABCDEF!"
    assert len(p.stages) == 1 and p.taps == []


def test_input_taps_see_the_upstream_bytes_before_any_stage() -> None:
    p = StreamPipeline()
    p.add_stage(HoldUntilNewline())
    p.add_stage(Upper())
    received: list[bytes] = []
    p.add_input_tap(received.append)

    def bad_input_tap(chunk: bytes) -> None:
        raise ValueError("tap bug")

    p.add_input_tap(bad_input_tap)
    out = p(b"ab") + p(b"c\nd") + p(b"e") + p(b"")
    assert received == [b"ab", b"c\nd", b"e"]  # as sent, never b"" (the end is no chunk)
    assert out == [b"ABC\n", b"DE", b"!"]
    assert p.input_taps == [received.append]  # the failing one is detached, the stream goes on


def test_a_stage_failing_mid_pipeline_hands_its_input_to_the_stages_after_it() -> None:
    p = StreamPipeline()
    p.add_stage(Upper())
    p.add_stage(Exploding())
    p.add_stage(HoldUntilNewline())
    out = p(b"a\n") + p(b"b\nc") + p(b"")
    assert b"".join(out) == b"A\nB\nC!"
    assert len(p.stages) == 2
