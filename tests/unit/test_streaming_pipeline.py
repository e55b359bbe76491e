from __future__ import annotations

from llmitm.streaming import ChunkLog, StreamPipeline


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


def test_the_log_keeps_what_the_upstream_sent_and_what_the_client_got() -> None:
    p = StreamPipeline()
    p.add_stage(HoldUntilNewline())
    p.add_stage(Upper())
    log = p.start_log(limit=6)
    out = p(b"ab") + p(b"c\nd") + p(b"e") + p(b"f\n") + p(b"")
    assert out == [b"ABC\n", b"DEF\n", b"!"]
    # a chunk the stages held back gave the client nothing; the log stops once 6 bytes are in
    assert log.upstream == [b"ab", b"c\nd", b"e"]
    assert log.client == [b"", b"ABC\n", b""]
    assert len(log.times) == 3 and log.times == sorted(log.times)
    untouched = StreamPipeline()
    untouched_log = untouched.start_log(limit=100)
    untouched(b"x")
    untouched(b"yz")
    # the client got the chunks themselves: no copy of its own
    assert untouched_log.upstream == [b"x", b"yz"]
    assert untouched_log.client is None


def test_the_log_keeps_the_client_apart_from_the_first_change_on() -> None:
    log = ChunkLog(limit=100)
    log.add(1.0, b"a", None)  # the client got "a" itself, then "b" changed
    log.add(2.0, b"b", [b"B", b"!"])
    log.add(3.0, b"c", None)
    log.add(4.0, b"", [b"end"])
    assert log.upstream == [b"a", b"b", b"c", b""]
    assert log.client == [b"a", b"B!", b"c", b"end"]
    assert log.times == [1.0, 2.0, 3.0, 4.0]


def test_a_stage_failing_mid_pipeline_hands_its_input_to_the_stages_after_it() -> None:
    p = StreamPipeline()
    p.add_stage(Upper())
    p.add_stage(Exploding())
    p.add_stage(HoldUntilNewline())
    out = p(b"a\n") + p(b"b\nc") + p(b"")
    assert b"".join(out) == b"A\nB\nC!"
    assert len(p.stages) == 2
