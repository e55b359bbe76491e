"""Tool-call repair for LLM responses: streamed (SSE) and whole JSON bodies.

``stream_repairer_for(endpoint, request_json)`` gives a :class:`StreamRepairer` (a
``llmitm.streaming.StreamStage``) for ``"chat_completions"``, ``"responses"`` or ``"messages"``;
``repair_json_response(endpoint, body, request_json)`` fixes a non-streamed body.

Guarantees (SPEC section 5): a frame without a defect is re-emitted as its exact upstream bytes
(line endings included); only a repaired frame is re-serialised (compact JSON, its other lines
kept); a repair may add whole frames (never drops one); nothing is held back except the frame
still being assembled; unknown fields are never removed (DeepSeek ``reasoning_content``, Gemini
``thought_signature``...); a stream that is not understood (not SSE, binary noise, a ``data``
value that is not JSON) passes through unchanged from that point on, never cut. Invented ids
are deterministic: a prefix (``call_``, ``fc_``, ``toolu_``) plus a hash of the endpoint, the
response id and the call's position, unique within the stream and sent once, on the call's
first fragment.

Speed: frames of a shape already handled in full (an argument fragment like the one before)
take a fast path that skips the SSE and JSON parsers and gives the same bytes and repairs;
see ``_shapes.py``.

Repair classes (``StreamRepairer.repairs`` keys; counts are per fixed fragment/event/frame) and
the defect classes of research/toolcall-defects.md they answer:

==============================  ====  =========================================================
name                            #     what is fixed
==============================  ====  =========================================================
missing_index                   1     chat fragment / Anthropic block event without ``index``
sparse_index                    1     chat indexes not dense from 0 (SDK list insert breaks)
index_collision                 2     new id, or other function, on an index already in use:
                                      the call moves to its own index
interleaved_call                3     fragment routed back to an earlier call by its id
repeated_name                   4     ``function.name`` repeated on a continuation fragment
repeated_id                     4     call ``id`` repeated on a continuation fragment
empty_id                        5     ``"id": ""`` (or null) on a continuation fragment
empty_name                      5/19  empty/null ``name`` on a fragment; ``name: ""`` in a
                                      Responses ``output_item.done`` (filled from ``added``)
missing_id                      6     no id on a call (chat, Anthropic ``tool_use``): invented
late_id                         6     a real id arriving after one was invented: dropped
missing_call_id                 6/19  Responses function_call without ``call_id``: invented once,
                                      then filled into ``output_item.done`` and the final output
missing_type                    7     tool call ``type`` missing/null on the first fragment, or
                                      null later (would overwrite "function")
object_arguments                8     ``arguments``/``partial_json``/``delta`` sent as a JSON
                                      object instead of a string
double_encoded_arguments        8     arguments that are a JSON string holding the JSON
string_input                    8     (whole Messages body) ``input`` given as a JSON string
null_arguments                  9     ``arguments: null`` (or missing where required): ""
missing_arguments               9     a call ending with no arguments at all: ``"{}"``
missing_function                9     chat fragment without a ``function`` object (openai-python
                                      asserts one on every fragment of a function call)
duplicate_arguments             11    a complete argument object sent again on the same call
concatenated_call               11    a second, different complete object on the same index:
                                      split into its own call
stop_with_tool_calls            12    finish_reason ``stop`` with tool calls (only when the
                                      request did not force a tool) / Anthropic ``end_turn``
conflicting_finish_reason       13    a second, different finish_reason (kept the first)
missing_finish_reason           14    ``[DONE]`` with open tool calls and no finish_reason
wrapped_comment                 15    ``data: : OPENROUTER PROCESSING``: back to a comment
empty_data                      15    empty ``data:`` on an OpenAI stream: made a comment
spaced_field                    15    `` data:`` (space before the field name): unspaced
missing_event_name              15    Anthropic event without ``event:`` line (the SDK drops it)
missing_input                   18    Anthropic ``tool_use`` start without ``input``: ``{}``
missing_output_index            19    Responses event without ``output_index`` (from item_id)
mismatched_output_index         19    ``output_index`` contradicting ``item_id``
missing_item_id                 19    Responses event without ``item_id`` (learnt from routing)
mismatched_item_id              19    an ``item_id`` contradicting the call's first one
mismatched_call_id              19    a ``call_id`` contradicting the one in ``output_item.added``
missing_arguments_delta         19    arguments only in ``.done``/``output_item.done``: the
                                      missing ``function_call_arguments.delta`` is sent first
missing_output_item_done        19    function_call never closed before ``response.completed``
missing_response_output         19    ``response.completed`` with an empty ``output`` list
==============================  ====  =========================================================

Classes 10 (whole call in one chunk) and 16 (provider fields) need no repair and are left as
sent; class 17 (``event: error`` in a 200 stream) is passed through.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ._base import StreamRepairer
from ._json import encode
from .chat import ChatRepairer, repair_chat_json, tool_choice_forced
from .messages import TOOL_BLOCK_TYPES, MessagesRepairer, repair_messages_json
from .responses import ResponsesRepairer, repair_responses_json

__all__ = [
    "ChatRepairer",
    "MessagesRepairer",
    "ResponsesRepairer",
    "StreamRepairer",
    "may_need_json_repair",
    "repair_json_response",
    "stream_repairer_for",
    "tool_choice_forced",
]

_STREAM = {
    "chat_completions": ChatRepairer,
    "responses": ResponsesRepairer,
    "messages": MessagesRepairer,
}
_JSON = {
    "chat_completions": repair_chat_json,
    "responses": repair_responses_json,
    "messages": repair_messages_json,
}


# What a repairable JSON body must contain: each repairer above only touches tool calls, and
# these are the keys or type values it finds them by.
_JSON_MARKERS = {
    "chat_completions": (b'"tool_calls"',),
    "responses": (b'"function_call"',),
    "messages": tuple(f'"{t}"'.encode() for t in sorted(TOOL_BLOCK_TYPES)),
}


def may_need_json_repair(endpoint: str, body: bytes) -> bool:
    """False when ``body`` certainly holds nothing to repair: no tool-call marker in its text.
    A substring test instead of parsing every JSON response; a ``\\u`` escape could spell a
    marker, so a body with one is always parsed."""
    markers = _JSON_MARKERS.get(endpoint)
    if markers is None:
        return False
    return body.find(b"\\u") >= 0 or any(body.find(marker) >= 0 for marker in markers)


def stream_repairer_for(endpoint: str, request_json: dict[str, Any] | None) -> StreamRepairer | None:
    """A fresh repairer for one streamed response of ``endpoint``; None for other endpoints."""
    cls = _STREAM.get(endpoint)
    return cls(request_json) if cls is not None else None


def repair_json_response(
    endpoint: str, body: bytes, request_json: dict[str, Any] | None
) -> tuple[bytes | None, Counter[str]]:
    """Repair a non-streamed JSON response: (new body, or None if unchanged; repairs)."""
    fix = _JSON.get(endpoint)
    if fix is None or not body or not may_need_json_repair(endpoint, body):
        return None, Counter()
    try:
        obj = json.loads(body)
    except ValueError:
        return None, Counter()
    if not isinstance(obj, dict):
        return None, Counter()
    request = request_json if isinstance(request_json, dict) else None
    try:
        repairs = fix(obj, request)
    except Exception:  # a repair bug must not break the response
        return None, Counter()
    if not repairs:
        return None, repairs
    return encode(obj), repairs
