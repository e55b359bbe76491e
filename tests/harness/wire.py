"""The providers' real wire formats, for the fake provider: JSON bodies and SSE frames for OpenAI
chat completions, OpenAI Responses and Anthropic Messages (shapes as the official SDKs parse them).
"""

from __future__ import annotations

import json
import time
from typing import Any


def sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def words(n: int) -> list[str]:
    return [f"w{i} " for i in range(n)]


def chat_json(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake1", "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def chat_frames(model: str, n: int) -> list[bytes]:
    base = {"id": "chatcmpl-fake1", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "system_fingerprint": "fp_fake"}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}], **extra})

    frames = [chunk({"role": "assistant", "content": "", "refusal": None})]
    frames += [chunk({"content": w}) for w in words(n)]
    frames.append(chunk({}, "stop"))
    frames.append(sse("[DONE]"))
    return frames


def responses_json(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "resp_fake1", "object": "response", "created_at": int(time.time()),
        "status": "completed", "model": model, "error": None, "incomplete_details": None,
        "instructions": None, "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0,
        "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "output": [{"type": "message", "id": "msg_fake1", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }


def responses_frames(model: str, n: int) -> list[bytes]:
    text = "".join(words(n))
    final = responses_json(model, text)
    started = {**final, "status": "in_progress", "output": [], "usage": None}
    item = {"type": "message", "id": "msg_fake1", "status": "in_progress", "role": "assistant",
            "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    seq = iter(range(10_000))
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        ("response.output_item.added", {"output_index": 0, "item": item}),
        ("response.content_part.added", {"item_id": "msg_fake1", "output_index": 0,
                                         "content_index": 0, "part": part}),
    ]
    events += [("response.output_text.delta", {"item_id": "msg_fake1", "output_index": 0,
                                               "content_index": 0, "delta": w, "logprobs": []})
               for w in words(n)]
    done_part = {**part, "text": text}
    events += [
        ("response.output_text.done", {"item_id": "msg_fake1", "output_index": 0,
                                       "content_index": 0, "text": text, "logprobs": []}),
        ("response.content_part.done", {"item_id": "msg_fake1", "output_index": 0,
                                        "content_index": 0, "part": done_part}),
        ("response.output_item.done", {"output_index": 0, "item": final["output"][0]}),
        ("response.completed", {"response": final}),
    ]
    return [sse({"type": name, "sequence_number": next(seq), **body}, event=name)
            for name, body in events]


def messages_json(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "msg_fake1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 3},
    }


def messages_frames(model: str, n: int) -> list[bytes]:
    start = {**messages_json(model, ""), "content": [], "stop_reason": None,
             "usage": {"input_tokens": 5, "output_tokens": 1}}
    frames = [
        sse({"type": "message_start", "message": start}, "message_start"),
        sse({"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}}, "content_block_start"),
        sse({"type": "ping"}, "ping"),
    ]
    frames += [sse({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": w}}, "content_block_delta")
               for w in words(n)]
    frames += [
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": n}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    return frames


def models_json() -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "fake"}]}


def default_reply(path: str, request: dict[str, Any], frames: int) -> tuple[dict[str, Any] | None,
                                                                          list[bytes] | None]:
    """(json_body, sse_frames) the real API would give for this request."""
    model = str(request.get("model", "fake-model"))
    stream = bool(request.get("stream"))
    text = "".join(words(frames))
    path = path.split("?", 1)[0]
    if path.endswith("/chat/completions"):
        return (None, chat_frames(model, frames)) if stream else (chat_json(model, text), None)
    if path.endswith("/responses"):
        return (None, responses_frames(model, frames)) if stream else (responses_json(model, text), None)
    if path.endswith("/messages"):
        return (None, messages_frames(model, frames)) if stream else (messages_json(model, text), None)
    if path.endswith("/models"):
        return models_json(), None
    return {"ok": True, "path": path}, None
