"""Tool-call repair of non-streamed JSON responses, checked against the SDKs' own models."""

from __future__ import annotations

import json
from typing import Any

import anthropic.types
import openai.types.chat
import openai.types.responses
import pydantic
import pytest

from llmitm.repair import may_need_json_repair, repair_json_response


def chat_body(calls: list[Any], finish: str = "tool_calls", **message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-json",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "test-model",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": None, "tool_calls": calls, **message},
            "finish_reason": finish,
            "logprobs": None,
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def call(args: Any = '{"city":"Paris"}', id: Any = "call_w1", name: str = "get_weather",
         type: Any = "function") -> dict[str, Any]:
    out: dict[str, Any] = {"id": id, "type": type, "function": {"name": name, "arguments": args}}
    if args is ...:
        del out["function"]["arguments"]
    return out


def repaired(endpoint: str, obj: dict[str, Any], request: dict[str, Any] | None = None
             ) -> tuple[dict[str, Any] | None, dict[str, int]]:
    body, repairs = repair_json_response(endpoint, json.dumps(obj).encode(), request)
    return (json.loads(body) if body is not None else None), dict(repairs)


def chat_calls(obj: dict[str, Any]) -> list[tuple[str, str, Any]]:
    completion = openai.types.chat.ChatCompletion.model_validate(obj)
    msg = completion.choices[0].message
    return [(c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
            for c in msg.tool_calls or []]


# --- chat completions -----------------------------------------------------------------------


def test_healthy_chat_response_is_left_alone() -> None:
    obj = chat_body([call()], reasoning_content="thinking")
    assert repaired("chat_completions", obj) == (None, {})


@pytest.mark.parametrize(
    ("calls", "repairs", "expected"),
    [
        ([call(id=None)], {"missing_id": 1}, [("*", "get_weather", {"city": "Paris"})]),
        ([call(type=None)], {"missing_type": 1}, [("call_w1", "get_weather", {"city": "Paris"})]),
        ([call(args={"city": "Paris"})], {"object_arguments": 1},
         [("call_w1", "get_weather", {"city": "Paris"})]),
        ([call(args=json.dumps('{"city": "Paris"}'))], {"double_encoded_arguments": 1},
         [("call_w1", "get_weather", {"city": "Paris"})]),
        ([call(args=None, name="get_time")], {"missing_arguments": 1}, [("call_w1", "get_time", {})]),
        ([call(args=..., name="get_time")], {"missing_arguments": 1}, [("call_w1", "get_time", {})]),
        ([call(args="", name="get_time")], {"missing_arguments": 1}, [("call_w1", "get_time", {})]),
        ([call(args='{"city":"Paris"}{"city":"Paris"}{"city":"Paris"}')], {"duplicate_arguments": 2},
         [("call_w1", "get_weather", {"city": "Paris"})]),
        ([call(args='{"path":"a"}{"path":"b"}', name="read_file")],
         {"concatenated_call": 1, "missing_id": 1},
         [("call_w1", "read_file", {"path": "a"}), ("*", "read_file", {"path": "b"})]),
        ([call(), call()], {"missing_id": 1},  # duplicate ids
         [("call_w1", "get_weather", {"city": "Paris"}), ("*", "get_weather", {"city": "Paris"})]),
    ],
)
def test_chat_call_defects(calls: list[Any], repairs: dict[str, int], expected: list[Any]) -> None:
    obj = chat_body(calls, reasoning_content="kept")
    fixed, got = repaired("chat_completions", obj)
    assert got == repairs
    assert fixed is not None
    result = chat_calls(fixed)
    assert len(result) == len(expected)
    for (got_id, got_name, got_args), (want_id, want_name, want_args) in zip(
        result, expected, strict=True
    ):
        assert got_id.startswith("call_") if want_id == "*" else got_id == want_id
        assert (got_name, got_args) == (want_name, want_args)
    ids = [r[0] for r in result]
    assert all(ids) and len(set(ids)) == len(ids)
    assert fixed["choices"][0]["message"]["reasoning_content"] == "kept"  # unknown field kept


def test_chat_defects_break_the_sdk_model_or_json_before_repair() -> None:
    with pytest.raises(pydantic.ValidationError):
        chat_calls(chat_body([call(args={"city": "Paris"})]))
    with pytest.raises(pydantic.ValidationError):
        chat_calls(chat_body([call(id=None)]))
    with pytest.raises(json.JSONDecodeError):
        chat_calls(chat_body([call(args='{"a":1}{"a":1}')]))


def test_chat_stop_with_tool_calls_depends_on_tool_choice() -> None:
    obj = chat_body([call()], finish="stop")
    fixed, repairs = repaired("chat_completions", obj, {"tool_choice": "auto"})
    assert repairs == {"stop_with_tool_calls": 1}
    assert fixed is not None and fixed["choices"][0]["finish_reason"] == "tool_calls"
    for forced in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        assert repaired("chat_completions", obj, {"tool_choice": forced}) == (None, {})


# --- Responses ------------------------------------------------------------------------------


def responses_body(*items: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "resp_json", "object": "response", "created_at": 1700000000, "status": "completed",
        "model": "test-model", "output": list(items), "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": [],
    }


def fc(**over: Any) -> dict[str, Any]:
    item = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1",
            "name": "get_weather", "arguments": '{"city":"Paris"}'}
    item.update(over)
    return {k: v for k, v in item.items() if v is not ...}


def responses_calls(obj: dict[str, Any]) -> list[tuple[str, str, Any]]:
    response = openai.types.responses.Response.model_validate(obj)
    return [(o.call_id, o.name, json.loads(o.arguments)) for o in response.output
            if o.type == "function_call"]


def test_healthy_responses_body_is_left_alone() -> None:
    assert repaired("responses", responses_body(fc())) == (None, {})


@pytest.mark.parametrize(
    ("item", "repairs", "args"),
    [
        (fc(arguments={"city": "Paris"}), {"object_arguments": 1}, {"city": "Paris"}),
        (fc(arguments=""), {"missing_arguments": 1}, {}),
        (fc(arguments=None), {"missing_arguments": 1}, {}),
        (fc(call_id=...), {"missing_call_id": 1}, {"city": "Paris"}),
    ],
)
def test_responses_defects(item: dict[str, Any], repairs: dict[str, int], args: Any) -> None:
    obj = responses_body(item)
    with pytest.raises((pydantic.ValidationError, json.JSONDecodeError)):
        responses_calls(obj)
    fixed, got = repaired("responses", obj)
    assert got == repairs and fixed is not None
    ((call_id, name, value),) = responses_calls(fixed)
    assert call_id and name == "get_weather" and value == args


# --- Anthropic Messages ---------------------------------------------------------------------


def message_body(*blocks: dict[str, Any], stop: str = "tool_use") -> dict[str, Any]:
    return {
        "id": "msg_json", "type": "message", "role": "assistant", "model": "claude-test",
        "content": list(blocks), "stop_reason": stop, "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }


def tool_use(**over: Any) -> dict[str, Any]:
    block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    block.update(over)
    return {k: v for k, v in block.items() if v is not ...}


def test_healthy_message_is_left_alone() -> None:
    assert repaired("messages", message_body({"type": "text", "text": "hi"}, tool_use())) == (None, {})


@pytest.mark.parametrize(
    ("block", "stop", "repairs", "expected"),
    [
        (tool_use(input='{"city": "Paris"}'), "tool_use", {"string_input": 1}, {"city": "Paris"}),
        (tool_use(input=None, name="get_time"), "tool_use", {"missing_input": 1}, {}),
        (tool_use(input=..., name="get_time"), "tool_use", {"missing_input": 1}, {}),
        (tool_use(id=...), "tool_use", {"missing_id": 1}, {"city": "Paris"}),
        (tool_use(), "end_turn", {"stop_with_tool_calls": 1}, {"city": "Paris"}),
    ],
)
def test_message_defects(block: dict[str, Any], stop: str, repairs: dict[str, int],
                         expected: Any) -> None:
    obj = message_body(block, stop=stop)
    fixed, got = repaired("messages", obj)
    assert got == repairs and fixed is not None
    message = anthropic.types.Message.model_validate(fixed)
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.id and isinstance(use.input, dict) and use.input == expected
    assert message.stop_reason == "tool_use"


# --- not JSON / other endpoints ---------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_bodies_that_are_not_json_objects(body: bytes) -> None:
    for endpoint in ("chat_completions", "responses", "messages"):
        assert repair_json_response(endpoint, body, None) == (None, {})


def test_unknown_endpoint() -> None:
    body = json.dumps(chat_body([call(id=None)])).encode()
    assert repair_json_response("models", body, None) == (None, {})


@pytest.mark.parametrize("endpoint,body", [
    ("chat_completions", chat_body([call(id=None)])),
    ("responses", {"id": "resp_1", "output": [{"type": "function_call", "name": "f",
                                                "arguments": ""}]}),
    ("messages", {"id": "msg_1", "content": [{"type": "tool_use", "name": "f", "input": None}],
                  "stop_reason": "tool_use"}),
])
def test_marker_prefilter_never_skips_a_repair(endpoint: str, body: dict[str, Any]) -> None:
    """The substring prefilter skips parsing only when no tool call can be there: a body that
    spells its keys with \\u escapes is still parsed and repaired; one without any marker is
    skipped (and parsing it would find nothing to repair)."""
    plain = json.dumps(body).encode()
    escaped = json.dumps(body).replace("_", "\\u005f").encode()  # JSON-equal, no marker left
    assert json.loads(escaped) == body
    for text in (plain, escaped):
        assert may_need_json_repair(endpoint, text)
        repaired, repairs = repair_json_response(endpoint, text, None)
        assert repaired is not None and repairs
    no_tools = json.dumps({"id": "x", "choices": [], "output": [], "content": []}).encode()
    assert not may_need_json_repair(endpoint, no_tools)
    assert repair_json_response(endpoint, no_tools, None) == (None, {})
