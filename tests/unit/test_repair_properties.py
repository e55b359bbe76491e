"""Property tests for stream repair: chunking, idempotence, noise."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmitm.sse import SSEParser
from tests.unit.conftest import DATA, load_request, run_repair

ENDPOINT_OF_FORMAT = {"chat": "chat_completions", "responses": "responses", "anthropic": "messages"}


def _endpoint(path: Path) -> str | None:
    name = path.name
    if "__" in name:  # corpus: provider__endpoint__name
        kind = name.split("__")[1]
        return {"chat-completions": "chat_completions", "responses": "responses",
                "messages": "messages", "anthropic-rawpredict": "messages"}.get(kind)
    return {"chat": "chat_completions", "messages": "messages",
            "responses": "responses"}[name.split("-")[1]]


CORPUS = sorted((DATA / "streams").glob("*.sse"))
DEFECTS = sorted((DATA / "defects").glob("*.sse"))
ALL = [(p, _endpoint(p) or "chat_completions") for p in CORPUS + DEFECTS]
BODIES = {p: p.read_bytes() for p, _ in ALL}
REQUESTS = {p: load_request(p) for p, _ in ALL}
WHOLE = {p: run_repair(ep, BODIES[p], REQUESTS[p])[0] for p, ep in ALL}

FAST = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _line_endings(body: bytes, style: int) -> bytes:
    if style == 0:
        return body
    lf = body.replace(b"\r\n", b"\n")
    return lf.replace(b"\n", b"\r\n" if style == 1 else b"\r")


@st.composite
def cuts_for(draw: st.DrawFn, size: int) -> list[int]:
    if size <= 1:
        return []
    return sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=min(size - 1, 60)))))


@settings(FAST, max_examples=500)
@given(data=st.data(), case=st.sampled_from(ALL))
def test_any_chunking_gives_the_same_bytes(data: st.DataObject, case: tuple[Path, str]) -> None:
    path, endpoint = case
    body = BODIES[path]
    out, repairer = run_repair(endpoint, body, REQUESTS[path], data.draw(cuts_for(len(body))))
    assert out == WHOLE[path]
    assert repairer.error is None


@settings(FAST, max_examples=200)
@given(data=st.data(), case=st.sampled_from([c for c in ALL if c[0] in DEFECTS]),
       style=st.sampled_from([1, 2]))
def test_chunking_with_other_line_endings(data: st.DataObject, case: tuple[Path, str],
                                          style: int) -> None:
    path, endpoint = case
    body = _line_endings(BODIES[path], style)
    whole, first = run_repair(endpoint, body, REQUESTS[path])
    out, repairer = run_repair(endpoint, body, REQUESTS[path], data.draw(cuts_for(len(body))))
    assert out == whole and repairer.repairs == first.repairs
    # same repairs as with LF endings, and repaired frames keep the stream's line ending
    lf_repairs = run_repair(endpoint, BODIES[path], REQUESTS[path])[1].repairs
    assert first.repairs == lf_repairs
    if style == 1:
        assert b"\n" not in whole.replace(b"\r\n", b"")
    else:
        assert b"\n" not in whole


def test_repairing_a_repaired_stream_changes_nothing() -> None:
    for path, endpoint in ALL:
        once = WHOLE[path]
        twice, repairer = run_repair(endpoint, once, REQUESTS[path])
        assert twice == once, path.name
        assert not repairer.repairs and not repairer.upstream_changed, path.name


@settings(FAST, max_examples=100)
@given(data=st.data(), case=st.sampled_from(ALL))
def test_idempotent_under_chunking(data: st.DataObject, case: tuple[Path, str]) -> None:
    path, endpoint = case
    once = WHOLE[path]
    twice, repairer = run_repair(endpoint, once, REQUESTS[path], data.draw(cuts_for(len(once))))
    assert twice == once and not repairer.repairs


@settings(FAST, max_examples=300)
@given(noise=st.binary(max_size=300), data=st.data(),
       endpoint=st.sampled_from(["chat_completions", "responses", "messages"]))
def test_random_noise_never_raises_and_is_never_changed(noise: bytes, data: st.DataObject,
                                                        endpoint: str) -> None:
    out, repairer = run_repair(endpoint, noise, None, data.draw(cuts_for(len(noise))))
    assert repairer.error is None
    if not repairer.repairs:
        assert out == noise
    assert not repairer.upstream_changed or repairer.repairs


def _frame_boundaries(body: bytes) -> list[int]:
    pos, out = 0, [0]
    for frame in SSEParser().feed(body):
        pos += len(frame.raw)
        out.append(pos)
    return out


@settings(FAST, max_examples=300)
@given(data=st.data(), case=st.sampled_from([c for c in ALL if c[0] in DEFECTS or
                                             len(BODIES[c[0]]) < 6000]),
       noise=st.binary(min_size=1, max_size=40))
def test_noise_spliced_into_streams_loses_no_bytes(data: st.DataObject, case: tuple[Path, str],
                                                   noise: bytes) -> None:
    path, endpoint = case
    clean = BODIES[path]
    at = data.draw(st.integers(0, len(clean)))
    body = clean[:at] + noise + clean[at:]
    out, repairer = run_repair(endpoint, body, REQUESTS[path], data.draw(cuts_for(len(body))))
    assert repairer.error is None
    assert out == run_repair(endpoint, body, REQUESTS[path])[0]  # chunking still irrelevant
    if not repairer.repairs:
        assert out == body
    if repairer.passthrough:
        # the output is the repaired stream up to some frame boundary, then the input verbatim
        assert any(
            out == run_repair(endpoint, body[:p], REQUESTS[path])[0] + body[p:]
            for p in _frame_boundaries(body)
        )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\{}[]:,é😀 \n'),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(alphabet='ab"\\{}', max_size=4), children, max_size=4),
    max_leaves=12,
)


@settings(FAST, max_examples=200)
@given(value=st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=4), data=st.data())
def test_argument_progress_sees_the_end_of_the_object(value: dict[str, object],
                                                      data: st.DataObject) -> None:
    """The completeness tracker behind duplicate/concatenated detection, on split JSON."""
    import json

    from llmitm.repair._json import JsonProgress

    text = json.dumps(value, ensure_ascii=data.draw(st.booleans()))
    cuts = data.draw(cuts_for(len(text)))
    progress = JsonProgress()
    last = 0
    for cut in [*cuts, len(text)]:
        assert not progress.complete
        progress.feed(text[last:cut])
        last = cut
    assert progress.complete
