"""The fast path of stream repair (llmitm/repair/_shapes.py) changes nothing: the same bytes and
the same repairs as the full path, on the corpus, the defect streams and generated streams with
awkward argument text; and it is really taken for the frames it is for."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmitm.repair import StreamRepairer, stream_repairer_for
from llmitm.repair._shapes import shape_of, string_value
from llmitm.sse import SSEParser
from tests.unit.conftest import random_cuts
from tests.unit.test_repair_properties import ALL, BODIES, REQUESTS

FAST = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def repaired(endpoint: str, body: bytes, request: dict[str, Any] | None, cuts: list[int],
             fast: bool) -> tuple[bytes, StreamRepairer]:
    repairer = stream_repairer_for(endpoint, request)
    assert repairer is not None
    repairer.fast_path = fast
    out, last = [], 0
    for cut in [*cuts, len(body)]:
        if cut > last:
            out += repairer.feed(body[last:cut])
        last = max(last, cut)
    out += repairer.finish()
    return b"".join(out), repairer


def frame_ends(body: bytes) -> list[int]:
    ends, pos = [], 0
    for frame in SSEParser().feed(body):
        pos += len(frame.raw)
        ends.append(pos)
    return ends


def assert_same(endpoint: str, body: bytes, request: dict[str, Any] | None, cuts: list[int]) -> int:
    """Fast and full path give the same bytes and repairs; returns how many frames took the
    fast path."""
    slow, full = repaired(endpoint, body, request, cuts, fast=False)
    out, fast = repaired(endpoint, body, request, cuts, fast=True)
    assert out == slow
    assert fast.repairs == full.repairs
    assert fast.upstream_changed == full.upstream_changed
    assert fast.error is None and full.error is None
    return full.full_frames - fast.full_frames


@pytest.mark.parametrize("case", ALL, ids=lambda c: c[0].name[:60])
def test_corpus_and_defects_fast_path_changes_nothing(case: tuple[Any, str]) -> None:
    path, endpoint = case
    body, request = BODIES[path], REQUESTS[path]
    rng = random.Random(path.name)
    for cuts in ([], frame_ends(body), random_cuts(body, rng, 8), random_cuts(body, rng, 200)):
        assert_same(endpoint, body, request, cuts)


# -- generated streams ---------------------------------------------------------------------------
AWKWARD = st.sampled_from(['"', "\\", '\\"', "\u2028", "\x00", "\x1f", "é", "😀", "{", "}", " ",
                           '":"', "\\u0041", "arguments", '"arguments":"'])
JSON_PIECES = st.sampled_from(['{"a":', "1}", '{"b":2}', "{}", "[1]", '{"a":1}', " "])
FRAGMENT = st.one_of(st.lists(st.one_of(st.text(max_size=4), AWKWARD), max_size=4).map("".join),
                     JSON_PIECES)
MUTATIONS = ("none", "none", "none", "drop_index", "repeat_id", "spaced_json", "ascii",
             "obfuscation", "raw_control", "bad_escape", "null_args", "name_again")


def _data(obj: dict[str, Any], mutation: str, event: str | None = None) -> bytes:
    if mutation == "spaced_json":
        text = json.dumps(obj)
    else:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=mutation == "ascii")
    raw = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
    data = raw.encode("utf-8", "surrogatepass")
    if mutation == "raw_control":  # a control character JSON does not allow, inside the text
        data = data.replace(b'"}', b'\x01"}', 1)
    elif mutation == "bad_escape":
        data = data.replace(b'"}', b'\\q"}', 1)
    return data


def chat_stream(calls: list[list[tuple[str, str]]]) -> bytes:
    base = {"id": "chatcmpl-gen", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = [_data({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}, "none")]
    for c, fragments in enumerate(calls):
        first = {"index": c, "id": f"call_{c}", "type": "function",
                 "function": {"name": "f", "arguments": ""}}
        out.append(_data({**base, "choices": [{"index": 0, "delta": {"tool_calls": [first]}}]},
                         "none"))
        for text, mutation in fragments:
            fragment: dict[str, Any] = {"index": c, "function": {"arguments": text}}
            if mutation == "drop_index":
                del fragment["index"]
            elif mutation == "repeat_id":
                fragment["id"] = f"call_{c}"
            elif mutation == "null_args":
                fragment["function"]["arguments"] = None
            elif mutation == "name_again":
                fragment["function"]["name"] = "f"
            chunk: dict[str, Any] = {**base, "choices": [{"index": 0,
                                                          "delta": {"tool_calls": [fragment]}}]}
            if mutation == "obfuscation":
                chunk["obfuscation"] = text[:3]
            out.append(_data(chunk, mutation))
    out.append(_data({**base, "choices": [{"index": 0, "delta": {},
                                           "finish_reason": "tool_calls"}]}, "none"))
    return b"".join(out) + b"data: [DONE]\n\n"


def responses_stream(calls: list[list[tuple[str, str]]]) -> bytes:
    seq = iter(range(10**6))
    out = []
    for c, fragments in enumerate(calls):
        item = {"id": f"fc_{c}", "type": "function_call", "call_id": f"call_{c}", "name": "f",
                "arguments": ""}
        out.append(_data({"type": "response.output_item.added", "output_index": c, "item": item,
                          "sequence_number": next(seq)}, "none", "response.output_item.added"))
        args = ""
        for text, mutation in fragments:
            event: dict[str, Any] = {"type": "response.function_call_arguments.delta",
                                     "item_id": f"fc_{c}", "output_index": c, "delta": text,
                                     "sequence_number": next(seq)}
            if mutation == "drop_index":
                del event["output_index"]
            elif mutation == "null_args":
                event["delta"] = None
            elif mutation == "obfuscation":
                event["obfuscation"] = text[:3]
            args += text if isinstance(event["delta"], str) else ""
            out.append(_data(event, mutation, event["type"]))
        out.append(_data({"type": "response.output_item.done", "output_index": c,
                          "item": {**item, "arguments": args}, "sequence_number": next(seq)},
                         "none", "response.output_item.done"))
    return b"".join(out)


def messages_stream(calls: list[list[tuple[str, str]]]) -> bytes:
    out = [_data({"type": "message_start", "message": {"id": "msg_gen", "content": []}}, "none",
                 "message_start")]
    for c, fragments in enumerate(calls):
        out.append(_data({"type": "content_block_start", "index": c, "content_block": {
            "type": "tool_use", "id": f"toolu_{c}", "name": "f", "input": {}}}, "none",
            "content_block_start"))
        for text, mutation in fragments:
            event: dict[str, Any] = {"type": "content_block_delta", "index": c,
                                     "delta": {"type": "input_json_delta", "partial_json": text}}
            if mutation == "drop_index":
                del event["index"]
            elif mutation == "null_args":
                event["delta"]["partial_json"] = None
            name = None if mutation == "name_again" else "content_block_delta"
            out.append(_data(event, mutation, name))
        out.append(_data({"type": "content_block_stop", "index": c}, "none", "content_block_stop"))
    out.append(_data({"type": "message_stop"}, "none", "message_stop"))
    return b"".join(out)


BUILDERS = {"chat_completions": chat_stream, "responses": responses_stream,
            "messages": messages_stream}
CALLS = st.lists(st.lists(st.tuples(FRAGMENT, st.sampled_from(MUTATIONS)), max_size=12),
                 min_size=1, max_size=3)


@settings(FAST, max_examples=400)
@given(endpoint=st.sampled_from(sorted(BUILDERS)), calls=CALLS, data=st.data())
def test_generated_streams_fast_path_changes_nothing(endpoint: str,
                                                     calls: list[list[tuple[str, str]]],
                                                     data: st.DataObject) -> None:
    body = BUILDERS[endpoint](calls)
    cuts = data.draw(st.sampled_from(["frames", "random"]))
    if cuts == "frames":
        assert_same(endpoint, body, None, frame_ends(body))
    else:
        assert_same(endpoint, body, None, random_cuts(body, random.Random(len(body)), 40))


@pytest.mark.parametrize("endpoint", sorted(BUILDERS))
def test_the_fast_path_is_taken_for_plain_fragments(endpoint: str) -> None:
    calls = [[(f"part {i} of call {c}, ", "none") for i in range(50)] for c in range(3)]
    body = BUILDERS[endpoint](calls)
    hits = assert_same(endpoint, body, None, frame_ends(body))
    assert hits >= 3 * 48  # all but the first one or two fragments of each call


@pytest.mark.parametrize("mutation", ["none", "drop_index", "obfuscation"])
def test_a_chunk_that_is_one_frame_of_the_last_shape_takes_the_hottest_path(
        mutation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frame by frame (the usual chunking), a frame of the shape the last chunk ended with is
    handled by ``feed`` before the frame matchers: for plain fragments, repaired ones (every
    fragment without its index, written from the remembered repair) and two-hole shapes."""
    calls = [[(f"part {i} of call {c}, ", mutation) for i in range(50)] for c in range(3)]
    body = chat_stream(calls)
    matched: list[int] = []
    match_frames = StreamRepairer._match_frames

    def counted(self: StreamRepairer, chunk: bytes, out: list[bytes]) -> int:
        matched.append(len(chunk))
        return match_frames(self, chunk, out)

    monkeypatch.setattr(StreamRepairer, "_match_frames", counted)
    hits = assert_same("chat_completions", body, None, frame_ends(body))
    assert hits >= 3 * 48
    assert len(matched) <= 5 * 3  # the matchers see a few frames of each call (of 50) only


@pytest.mark.parametrize("endpoint", sorted(BUILDERS))
@pytest.mark.parametrize("pieces", [
    ['{"a":', "1}", '{"b":2}', "{}"],  # a second call glued to a complete first one
    ['{"a":1', "}", '{"a":1}'],  # the whole arguments again after they were complete
    ["[", "1]", " ", "[2]"],
])
def test_fragments_after_complete_arguments(endpoint: str, pieces: list[str]) -> None:
    body = BUILDERS[endpoint]([[(piece, "none") for piece in pieces]] * 2)
    for cuts in ([], frame_ends(body)):
        assert_same(endpoint, body, None, cuts)


def test_a_second_call_under_the_same_upstream_index_or_item_id() -> None:
    """A known shape whose state was taken over by another call must leave the fast path."""
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chat(fragment: dict[str, Any]) -> bytes:
        return _data({**base, "choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]},
                     "none")

    def plain(text: str) -> bytes:
        return chat({"index": 0, "function": {"arguments": text}})

    body = b"".join([
        chat({"index": 0, "id": "call_a", "type": "function",
              "function": {"name": "f", "arguments": "{"}}),
        plain('"x":'), plain("1"), plain(" "),
        chat({"index": 0, "id": "call_b", "type": "function",
              "function": {"name": "g", "arguments": "{"}}),  # index collision: a new call
        plain('"y":'), plain("2"), plain("}"),
    ])
    assert assert_same("chat_completions", body, None, frame_ends(body)) >= 2

    def added(index: int) -> bytes:
        return _data({"type": "response.output_item.added", "output_index": index, "item": {
            "id": "fc_same", "type": "function_call", "call_id": f"call_{index}", "name": "f",
            "arguments": ""}}, "none", "response.output_item.added")

    def delta(text: str) -> bytes:
        return _data({"type": "response.function_call_arguments.delta", "item_id": "fc_same",
                      "output_index": 0, "delta": text}, "none",
                     "response.function_call_arguments.delta")

    body = b"".join([added(0), delta("{"), delta("1"), delta("2"), added(1), delta("3"),
                     delta("}")])
    assert assert_same("responses", body, None, frame_ends(body)) >= 1

    def start() -> bytes:
        return _data({"type": "content_block_start", "index": 0, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}, "none",
            "content_block_start")

    def partial(text: str) -> bytes:
        return _data({"type": "content_block_delta", "index": 0, "delta": {
            "type": "input_json_delta", "partial_json": text}}, "none", "content_block_delta")

    # the second block's input ends up repeating itself only if its deltas reach the first block
    body = b"".join([start(), partial('{"a":'), partial(" "), start(), partial("1}"),
                     partial('{"a":1}'), partial('{"a":1}')])
    assert assert_same("messages", body, None, frame_ends(body)) >= 1


def test_chunk_ids_that_change_mid_stream_keep_the_template() -> None:
    """The chunk a repair adds at [DONE] copies the latest chunk's id and model: a fast-path frame
    must move that template back as the full path would."""

    def plain(chunk_id: str, text: str) -> bytes:
        return _data({"id": chunk_id, "object": "chat.completion.chunk", "model": chunk_id,
                      "choices": [{"index": 0, "delta": {"tool_calls": [
                          {"index": 0, "function": {"arguments": text}}]}}]}, "none")

    first = _data({"id": "a", "object": "chat.completion.chunk", "model": "a", "choices": [
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                               "function": {"name": "f", "arguments": "{"}}]}}]},
                  "none")
    body = b"".join([first, plain("a", "1"), plain("a", "2"), plain("b", "3"), plain("a", "4"),
                     b"data: [DONE]\n\n"])  # no finish_reason: the repair adds one
    assert assert_same("chat_completions", body, None, frame_ends(body)) >= 1


def test_fragments_repaired_alike_take_the_fast_path_too() -> None:
    """Every fragment without its index (defect class 1): the repaired frames are written from
    the shape's rewrite, for each of two calls in turn."""
    calls = [[(f"part {i} of call {c}, ", "drop_index") for i in range(30)] for c in range(2)]
    body = chat_stream(calls)
    assert assert_same("chat_completions", body, None, frame_ends(body)) >= 2 * 27
    out, repairer = repaired("chat_completions", body, None, frame_ends(body), fast=True)
    assert repairer.repairs == {"missing_index": 60}
    assert out.count(b'"},"index":') == 60  # each fragment got its call's index
    assert out.count(b'{"function":{"arguments":"part 7 of call 1, "},"index":1}') == 1


def test_a_fragment_is_judged_plain_before_its_repairs() -> None:
    """A name repeated on a fragment of a split-off call: removing it leaves the fragment looking
    plain, but frames of its shape need that repair again (found by hypothesis)."""
    calls = [[('{"b":2}', "none"), ('{"a":', "none"), ("", "name_again"), ("", "name_again")]]
    body = chat_stream(calls)
    assert_same("chat_completions", body, None, frame_ends(body))


def test_interleaved_calls_switch_between_known_shapes() -> None:
    """Fragments of three calls taking turns: each frame's shape is one of several known ones."""
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(fragment: dict[str, Any]) -> bytes:
        return _data({**base, "choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]},
                     "none")

    frames = [chunk({"index": c, "id": f"call_{c}", "type": "function",
                     "function": {"name": "f", "arguments": "{"}}) for c in range(3)]
    frames += [chunk({"index": i % 3, "function": {"arguments": f"x{i}"}}) for i in range(60)]
    body = b"".join(frames)
    assert assert_same("chat_completions", body, None, frame_ends(body)) >= 50
    out, _ = repaired("chat_completions", body, None, [len(body) // 2], fast=True)
    assert out == body  # healthy: byte-identical, also when many frames come in one chunk


def test_openai_obfuscation_padding_does_not_defeat_the_fast_path() -> None:
    calls = [[(f"part {i}", "obfuscation") for i in range(40)]]
    body = chat_stream(calls)
    assert body.count(b'"obfuscation"') == 40
    assert assert_same("chat_completions", body, None, frame_ends(body)) >= 38


# -- shapes --------------------------------------------------------------------------------------
HOLES = (b'"arguments":', b'"sequence_number":')


def test_shape_of_cuts_the_holes_and_nothing_else() -> None:
    raw = b'data: {"a":1,"arguments":"x\\"y\\\\","sequence_number":12}\n\n'
    shape = shape_of(raw, HOLES)
    assert shape is not None
    assert shape.key == (b'data: {"a":1,"arguments":"', b'","sequence_number":', b"}\n\n")
    start, end, is_string = shape.holes[b"arguments"]
    assert is_string and string_value(raw, start, end) == 'x"y\\'
    start, end, is_string = shape.holes[b"sequence_number"]
    assert not is_string and raw[start:end] == b"12"


@pytest.mark.parametrize("raw", [
    b'data: {"arguments":"a","x":{"arguments":"b"}}\n\n',  # a hole key twice
    b'data: {"arguments":null}\n\n',  # not a string
    b'data: {"sequence_number":1.5}\n\n',  # not an integer
    b'data: {"sequence_number":1234567890123456789012}\n\n',  # an integer too long
    b'data: {"\\u0061rguments":"x","arguments":"y"}\n\n',  # a key spelt with an escape
    b'data: {"arguments":"never closed}\n\n',
    b'data: {"x":1}\n\n',  # no hole
])
def test_shape_of_refuses_what_it_cannot_vouch_for(raw: bytes) -> None:
    assert shape_of(raw, HOLES) is None


@pytest.mark.parametrize(("raw", "text"), [
    (b"plain", "plain"), (b"\\u00e9\\n", "é\n"), (b"caf\xc3\xa9", "café"),
    (b"a\x01b", None), (b"\\q", None), (b"\xff", None), (b"\\ud800", "\ud800"),
])
def test_string_value_decodes_as_json_does(raw: bytes, text: str | None) -> None:
    assert string_value(raw, 0, len(raw)) == text
