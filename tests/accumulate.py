"""Run the official SDK stream accumulators over raw SSE bytes and return the tool calls.

Each helper builds the real SDK client (openai / anthropic) on a mock HTTP transport that answers
the request with the given bytes as a ``text/event-stream`` body, then consumes the stream with
the SDK's own streaming helper: SSE decoding, chunk models, accumulation and final parsing are
all the SDK's, so a test sees what a real client sees.

- chat completions: ``client.chat.completions.stream()`` (``ChatCompletionStreamState``)
- Responses: ``client.responses.stream()`` (``ResponseStreamState``)
- Messages: ``client.messages.stream()`` (``MessageStream`` / ``accumulate_event``)

Whatever the SDK raises propagates. The Responses helper additionally raises
:class:`StreamMismatch` when the streamed view of a function call (arguments accumulated from
``function_call_arguments.delta`` events, the ``output_item.done`` item) disagrees with the final
response, because streaming clients such as Codex act on those events.

``body_chunks`` splits the body into pieces of that size (default: one piece), to exercise the
SDK decoders across chunk boundaries too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import openai

__all__ = [
    "StreamMismatch",
    "anthropic_message",
    "anthropic_tool_uses",
    "openai_chat_chunks",
    "openai_chat_completion",
    "openai_chat_tool_calls",
    "openai_responses_final",
    "openai_responses_tool_calls",
]

_BASE = "http://llmitm.invalid"


class StreamMismatch(AssertionError):
    """The SDK accepted the stream, but its streamed view contradicts the final result."""


def _transport(body: bytes, body_chunks: int | None) -> httpx2.MockTransport:
    def pieces() -> Iterator[bytes]:
        if not body_chunks:
            yield body
            return
        for i in range(0, len(body), body_chunks):
            yield body[i : i + body_chunks]

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=pieces()
        )

    return httpx2.MockTransport(handler)


def _openai(body: bytes, body_chunks: int | None) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url=_BASE + "/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=_transport(body, body_chunks)),
    )


def _anthropic(body: bytes, body_chunks: int | None) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url=_BASE,
        max_retries=0,
        http_client=httpx2.Client(transport=_transport(body, body_chunks)),
    )


def _function_tools(tools: Any) -> list[dict[str, Any]] | None:
    if not isinstance(tools, list):
        return None
    kept = [t for t in tools if isinstance(t, dict) and t.get("type") == "function"]
    return kept or None


# --- chat completions -------------------------------------------------------------------------


def _chat_kwargs(request_json: dict[str, Any] | None) -> dict[str, Any]:
    req = request_json or {}
    kwargs: dict[str, Any] = {
        "model": req.get("model") or "test-model",
        "messages": req.get("messages") or [{"role": "user", "content": "hi"}],
    }
    tools = _function_tools(req.get("tools"))
    if tools:
        kwargs["tools"] = tools
        if "tool_choice" in req:
            kwargs["tool_choice"] = req["tool_choice"]
    return kwargs


def openai_chat_completion(
    sse: bytes, request_json: dict[str, Any] | None = None, *, body_chunks: int | None = None
) -> Any:
    """The ``ParsedChatCompletion`` openai-python's ``chat.completions.stream()`` builds."""
    client = _openai(sse, body_chunks)
    with client.chat.completions.stream(**_chat_kwargs(request_json)) as stream:
        for _event in stream:
            pass
        return stream.get_final_completion()


def openai_chat_tool_calls(
    sse: bytes,
    request_json: dict[str, Any] | None = None,
    *,
    choice: int = 0,
    body_chunks: int | None = None,
) -> list[dict[str, Any]]:
    """Tool calls of one choice: dicts with id, type, name, arguments (as the SDK holds them)."""
    completion = openai_chat_completion(sse, request_json, body_chunks=body_chunks)
    choices = [c for c in completion.choices if c.index == choice]
    if not choices:
        return []
    calls = []
    for call in choices[0].message.tool_calls or []:
        function = getattr(call, "function", None)
        calls.append(
            {
                "id": getattr(call, "id", None),
                "type": getattr(call, "type", None),
                "name": getattr(function, "name", None),
                "arguments": getattr(function, "arguments", None),
            }
        )
    return calls


def openai_chat_chunks(sse: bytes, request_json: dict[str, Any] | None = None) -> list[Any]:
    """The ``ChatCompletionChunk`` objects the SDK decodes (``create(stream=True)``)."""
    client = _openai(sse, None)
    stream = client.chat.completions.create(stream=True, **_chat_kwargs(request_json))
    return list(stream)


# --- Responses --------------------------------------------------------------------------------


def _responses_kwargs(request_json: dict[str, Any] | None) -> dict[str, Any]:
    req = request_json or {}
    kwargs: dict[str, Any] = {
        "model": req.get("model") or "test-model",
        "input": req.get("input") or "hi",
    }
    tools = _function_tools(req.get("tools"))
    if tools:
        kwargs["tools"] = tools
    return kwargs


def openai_responses_final(
    sse: bytes, request_json: dict[str, Any] | None = None, *, body_chunks: int | None = None
) -> tuple[Any, dict[int, dict[str, Any]]]:
    """The final ``ParsedResponse`` and, per output index, the streamed view of function calls.

    The streamed view has ``added`` (the item of ``output_item.added``), ``deltas`` (arguments
    accumulated from delta events, as the SDK's delta ``snapshot``), ``args_done`` (the
    ``function_call_arguments.done`` arguments) and ``done`` (the ``output_item.done`` item).
    """
    client = _openai(sse, body_chunks)
    streamed: dict[int, dict[str, Any]] = {}
    with client.responses.stream(**_responses_kwargs(request_json)) as stream:
        for event in stream:
            kind = event.type
            if kind == "response.output_item.added" and event.item.type == "function_call":
                streamed[event.output_index] = {
                    "added": event.item,
                    "deltas": "",
                    "args_done": None,
                    "done": None,
                }
            elif kind == "response.function_call_arguments.delta":
                entry = streamed.get(event.output_index)
                if entry is None:
                    raise StreamMismatch(f"delta for unknown output {event.output_index}")
                entry["deltas"] = event.snapshot
            elif kind == "response.function_call_arguments.done":
                entry = streamed.get(event.output_index)
                if entry is None:
                    raise StreamMismatch(f"arguments.done for unknown output {event.output_index}")
                entry["args_done"] = event.arguments
            elif kind == "response.output_item.done" and event.item.type == "function_call":
                entry = streamed.setdefault(
                    event.output_index,
                    {"added": None, "deltas": "", "args_done": None, "done": None},
                )
                entry["done"] = event.item
        final = stream.get_final_response()
    return final, streamed


def openai_responses_tool_calls(
    sse: bytes, request_json: dict[str, Any] | None = None, *, body_chunks: int | None = None
) -> list[dict[str, Any]]:
    """Function calls of the final response: dicts with id (call_id), item_id, name, arguments.

    Raises :class:`StreamMismatch` if a streaming client would have seen something else.
    """
    final, streamed = openai_responses_final(sse, request_json, body_chunks=body_chunks)
    calls = []
    for item in final.output:
        if item.type != "function_call":
            continue
        call = {
            "id": getattr(item, "call_id", None),
            "item_id": getattr(item, "id", None),
            "name": getattr(item, "name", None),
            "arguments": getattr(item, "arguments", None),
        }
        calls.append(call)
        views = [
            v
            for v in streamed.values()
            if v["done"] is not None and getattr(v["done"], "call_id", None) == call["id"]
        ]
        if len(views) != 1:
            raise StreamMismatch(f"{len(views)} output_item.done events for call {call['id']!r}")
        view = views[0]
        done = view["done"]
        if getattr(done, "name", None) != call["name"]:
            raise StreamMismatch(f"output_item.done name {done.name!r} != {call['name']!r}")
        if getattr(done, "arguments", None) != call["arguments"]:
            raise StreamMismatch(f"output_item.done arguments differ for {call['id']!r}")
        if view["deltas"] != call["arguments"]:
            raise StreamMismatch(
                f"arguments from delta events {view['deltas']!r} != {call['arguments']!r}"
            )
        if view["args_done"] is not None and view["args_done"] != call["arguments"]:
            raise StreamMismatch(f"function_call_arguments.done differs for {call['id']!r}")
        added = view["added"]
        if added is not None and getattr(added, "name", None) != call["name"]:
            raise StreamMismatch(f"output_item.added name {added.name!r} != {call['name']!r}")
    unfinished = [i for i, v in streamed.items() if v["done"] is None]
    if unfinished:
        raise StreamMismatch(f"function_call outputs {unfinished} never got output_item.done")
    return calls


# --- Anthropic Messages -----------------------------------------------------------------------


def _messages_kwargs(request_json: dict[str, Any] | None) -> dict[str, Any]:
    req = request_json or {}
    kwargs: dict[str, Any] = {
        "model": req.get("model") or "claude-test",
        "max_tokens": req.get("max_tokens") or 1024,
        "messages": req.get("messages") or [{"role": "user", "content": "hi"}],
    }
    if isinstance(req.get("tools"), list):
        kwargs["tools"] = req["tools"]
    return kwargs


def anthropic_message(
    sse: bytes, request_json: dict[str, Any] | None = None, *, body_chunks: int | None = None
) -> Any:
    """The final ``ParsedMessage`` of anthropic-python's ``messages.stream()``."""
    return _anthropic_stream(sse, request_json, body_chunks)[0]


def _anthropic_stream(
    sse: bytes, request_json: dict[str, Any] | None, body_chunks: int | None
) -> tuple[Any, dict[int, str]]:
    client = _anthropic(sse, body_chunks)
    partial: dict[int, str] = {}
    with client.messages.stream(**_messages_kwargs(request_json)) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial[event.index] = partial.get(event.index, "") + event.delta.partial_json
        return stream.get_final_message(), partial


def anthropic_tool_uses(
    sse: bytes, request_json: dict[str, Any] | None = None, *, body_chunks: int | None = None
) -> list[dict[str, Any]]:
    """``tool_use`` (and server-side ``*_tool_use``) blocks: dicts with type, id, name, input,
    and ``arguments``, the input as a JSON string.

    Raises :class:`StreamMismatch` when the ``partial_json`` deltas the SDK passed on, joined
    (what clients that concatenate and parse at ``content_block_stop`` do), are not valid JSON
    equal to the SDK's ``input`` (no deltas at all, or only empty ones, stand for ``{}``).
    """
    message, partial = _anthropic_stream(sse, request_json, body_chunks)
    uses = []
    for index, block in enumerate(message.content):
        if not str(block.type).endswith("tool_use"):
            continue
        value = block.input
        joined = partial.get(index, "")
        try:
            streamed = json.loads(joined) if joined.strip() else {}
        except ValueError as exc:
            raise StreamMismatch(f"joined partial_json of block {index} is not JSON: {joined!r}") from exc
        if streamed != value:
            raise StreamMismatch(f"joined partial_json {streamed!r} != input {value!r}")
        uses.append(
            {
                "type": block.type,
                "id": getattr(block, "id", None),
                "name": getattr(block, "name", None),
                "input": value,
                "arguments": json.dumps(value),
            }
        )
    return uses
