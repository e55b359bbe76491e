"""The incremental SSE parser (llmitm.sse): WHATWG rules, raw bytes kept, any chunking."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from openai._streaming import SSEDecoder

from llmitm.sse import BOM, Frame, SSEParser

STREAMS = Path(__file__).resolve().parents[1] / "data" / "streams"
CORPUS = sorted(STREAMS.glob("*.sse"))


def parse(
    data: bytes, cuts: list[int] | None = None, strict: bool = False
) -> tuple[list[Frame], bytes, SSEParser]:
    """Feed ``data`` cut at ``cuts``; after the parser gives up, the caller keeps the bytes."""
    parser = SSEParser(strict=strict)
    frames: list[Frame] = []
    last = 0
    for cut in [*(cuts or []), len(data)]:
        frames += parser.feed(data[last:cut])
        last = cut
        if parser.broken:
            return frames, parser.take_rest() + data[cut:], parser
    return frames, parser.finish(), parser


def events(frames: list[Frame]) -> list[tuple[str | None, str | None, str | None, int | None]]:
    """What a WHATWG client would dispatch (frames with data), plus comments as (None, ...)."""
    out = []
    for f in frames:
        if f.data is not None:
            out.append((f.event, f.data, f.id, f.retry))
        for c in f.comments:
            out.append((None, None, ":" + c, None))
    return out


def joined(frames: list[Frame], rest: bytes) -> bytes:
    return b"".join(f.raw for f in frames) + rest


# --- WHATWG interpretation -----------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_line_ending_styles(eol: bytes) -> None:
    body = eol.join([b"event: a", b"data: 1", b"", b"data: 2", b"id: x", b"", b""])
    frames, rest, _ = parse(body)
    assert rest == b""
    assert events(frames) == [("a", "1", None, None), (None, "2", "x", None)]
    assert joined(frames, rest) == body
    assert [f.raw for f in frames] == [b"event: a" + eol + b"data: 1" + eol + eol,
                                       b"data: 2" + eol + b"id: x" + eol + eol]


def test_mixed_line_endings() -> None:
    body = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\rdata: e\n\n"
    frames, rest, _ = parse(body)
    assert events(frames) == [(None, "a\nb\nc", None, None), (None, "d", None, None),
                              (None, "e", None, None)]
    assert joined(frames, rest) == body


def test_fields() -> None:
    body = (
        b"event:  two spaces\ndata:no-space\ndata: one\ndata:  two\ndata\nid: 7\nretry: 1500\n"
        b"unknown: x\n\n"
        b"retry: soon\nid: a\x00b\ndata: z\n\n"
    )
    frames, _, _ = parse(body)
    first, second = frames
    assert first.event == " two spaces"
    assert first.data == "no-space\none\n two\n"
    assert first.id == "7" and first.retry == 1500
    assert first.unknown == (("unknown", "x"),)
    assert second.retry is None  # not all digits: ignored
    assert second.id is None  # contains NUL: ignored
    assert second.data == "z"


def test_comments_and_empty_frames() -> None:
    body = b": OPENROUTER PROCESSING\n\n\n:\n: two\ndata: x\n\n"
    frames, _, _ = parse(body)
    assert [f.raw for f in frames] == [b": OPENROUTER PROCESSING\n\n", b"\n",
                                       b":\n: two\ndata: x\n\n"]
    assert frames[0].comments == (" OPENROUTER PROCESSING",) and frames[0].data is None
    assert frames[1].is_blank
    assert frames[2].comments == ("", " two") and frames[2].data == "x"


def test_leading_bom_is_skipped_once() -> None:
    body = BOM + b"data: 1\n\n" + BOM + b"data: 2\n\n"
    for cut in range(len(body) + 1):
        frames, rest, _ = parse(body, [cut])
        assert joined(frames, rest) == body
        assert frames[0].data == "1" and frames[0].start == 3 and frames[0].raw.startswith(BOM)
        # a BOM later in the stream is not special: it makes an unknown field name
        assert frames[-1].data is None
        assert frames[-1].unknown == (("\ufeffdata", "2"),)


def test_cr_at_chunk_end_then_lf() -> None:
    body = b"data: 1\r\n\r\ndata: 2\r\n\r\n"
    cut = body.index(b"\r\n\r\n") + 3  # between the CR and LF of the blank line
    frames, rest, _ = parse(body, [cut])
    assert [f.raw for f in frames] == [b"data: 1\r\n\r", b"\n", b"data: 2\r\n\r\n"]
    assert events(frames) == [(None, "1", None, None), (None, "2", None, None)]
    assert joined(frames, rest) == body


def test_unterminated_last_frame_is_returned_by_finish() -> None:
    frames, rest, _ = parse(b"data: 1\n\ndata: 2\n")
    assert events(frames) == [(None, "1", None, None)]
    assert rest == b"data: 2\n"


def test_utf8_and_invalid_utf8() -> None:
    text = "data: {\"t\":\"données 😀 ✓\"}\n\n".encode()
    frames, _, _ = parse(text)
    assert frames[0].data == "{\"t\":\"données 😀 ✓\"}" and not frames[0].lossy
    frames, _, _ = parse(b"data: \xff\xfe\n\n")
    assert frames[0].lossy and frames[0].data == "\ufffd\ufffd"


# --- every split position ------------------------------------------------------------------

SAMPLES = [
    "event: message_start\ndata: {\"t\":\"héllo wörld 😀\"}\n\n: keep-alive\n\n"
    "data: {\"a\":\n data: 1}\nid: 9\n\ndata: [DONE]\n\n",
]


def _variants(base: bytes) -> list[bytes]:
    lf = base.replace(b"\r\n", b"\n")
    return [lf, lf.replace(b"\n", b"\r\n"), lf.replace(b"\n", b"\r"), BOM + lf]


@pytest.mark.parametrize("sample", [s.encode() for s in SAMPLES])
def test_every_single_split_gives_the_same_frames(sample: bytes) -> None:
    for body in _variants(sample):
        whole, rest, _ = parse(body)
        assert joined(whole, rest) == body
        for cut in range(len(body) + 1):
            frames, rest2, _ = parse(body, [cut])
            assert joined(frames, rest2) == body
            assert events(frames) == events(whole), cut


def test_every_two_way_split_of_a_small_stream() -> None:
    body = "data: é😀\r\n\r\ndata: x\r\r: c\n\n".encode()
    whole, _, _ = parse(body)
    for a in range(len(body) + 1):
        for b in range(a, len(body) + 1):
            frames, rest, _ = parse(body, [a, b])
            assert joined(frames, rest) == body
            assert events(frames) == events(whole)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name[:60])
def test_corpus_split_everywhere(path: Path) -> None:
    """Every split position for small streams; for big ones the first and last 1500 bytes
    (every frame shape occurs there) plus random positions."""
    body = path.read_bytes()
    whole, rest, parser = parse(body, strict=True)
    assert not parser.broken and rest == b""
    assert joined(whole, rest) == body
    rng = random.Random(path.name)
    positions = set(range(min(len(body), 1500))) | set(range(max(0, len(body) - 1500), len(body)))
    positions |= set(rng.sample(range(len(body)), min(len(body), 300)))
    for cut in sorted(positions):
        frames, rest2, _ = parse(body, [cut], strict=True)
        assert joined(frames, rest2) == body
        assert events(frames) == events(whole)
    for _ in range(5):
        cuts = sorted(rng.sample(range(len(body)), min(len(body) - 1, 40)))
        frames, rest2, _ = parse(body, cuts, strict=True)
        assert events(frames) == events(whole) and joined(frames, rest2) == body


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name[:60])
def test_corpus_agrees_with_the_openai_sdk_decoder(path: Path) -> None:
    body = path.read_bytes()
    frames, _, _ = parse(body)
    sdk = [(e.event, e.data) for e in SSEDecoder().iter_bytes(iter([body]))]
    ours = [(f.event, f.data if f.data is not None else "") for f in frames
            if f.data is not None or f.event is not None or f.id is not None]
    assert ours == sdk


# --- strict mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "noise",
    [
        b"\x00\x01binary\xff noise without newlines",
        b"<html><body>502 Bad Gateway</body></html>\n",
        b'{"error": {"message": "not SSE"}}\n\n',
        b"data: hello world\n\n",
        b"datum: 1\n\n",
        b"   \n\n",
    ],
)
def test_strict_mode_gives_up_on_noise(noise: bytes) -> None:
    good = b"data: {\"a\":1}\n\n: c\n\n"
    body = good + noise + b"data: {\"b\":2}\n\n"
    whole, rest, parser = parse(body, strict=True)
    assert parser.broken
    assert [f.raw for f in whole] == [b"data: {\"a\":1}\n\n", b": c\n\n"]
    assert rest == noise + b"data: {\"b\":2}\n\n"
    for cut in range(len(body) + 1):
        frames, rest2, parser2 = parse(body, [cut], strict=True)
        assert parser2.broken and joined(frames, rest2) == body
        assert [f.raw for f in frames] == [f.raw for f in whole][: len(frames)]


def test_strict_mode_breaks_as_soon_as_noise_arrives() -> None:
    parser = SSEParser(strict=True)
    assert parser.feed(b"data: {}\n\n")[0].data == "{}"
    parser.feed(b"\x89PNG\r\n\x1a\n")
    assert parser.broken and parser.take_rest() == b"\x89PNG\r\n\x1a\n"
    parser = SSEParser(strict=True)
    parser.feed(b"dat")
    assert not parser.broken  # could still become "data:"
    parser.feed(b"e")
    assert parser.broken


def test_strict_mode_accepts_spaced_fields_and_continuation_lines() -> None:
    body = b' data: {"a":1}\n\ndata: {"a":\ndata: 1}\n\ndata:\n\ndata: : wrapped\n\n'
    frames, rest, parser = parse(body, strict=True)
    assert not parser.broken and rest == b""
    assert frames[0].spaced and frames[0].data is None
    assert frames[1].data == '{"a":\n1}'
    assert frames[2].data == "" and frames[3].data == ": wrapped"
