"""Anthropic Messages tool_use repair: streamed events and whole responses."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from llmitm.sse import Frame

from ._base import StreamRepairer
from ._json import Fragments, JsonProgress, arguments_text, is_int, same_json, short_hash
from ._shapes import HoleValues

TOOL_BLOCK_TYPES = ("tool_use", "server_tool_use", "mcp_tool_use")
_WANTED = frozenset({"message_start", "content_block_start", "message_delta"})
_PARTIAL_JSON = b"partial_json"


class _Block:
    __slots__ = ("args", "progress")

    def __init__(self) -> None:
        self.progress = JsonProgress()
        self.args = Fragments(progress=self.progress)  # feeds the progress


class _Continuation:
    """What a plain ``input_json_delta`` continues: its block, by index."""

    __slots__ = ("block", "index", "text")

    def __init__(self, block: _Block, index: int, text: str) -> None:
        self.block = block
        self.index = index
        self.text = text


class MessagesRepairer(StreamRepairer):
    """Streamed Anthropic Messages events."""

    endpoint = "messages"
    _json_every_data = False  # anthropic-python skips events with empty data
    _holes = (b'"partial_json":',)
    _main = _PARTIAL_JSON

    def __init__(self, request_json: dict[str, Any] | None = None) -> None:
        super().__init__(request_json)
        self._message_id = ""
        self._blocks: dict[int, _Block] = {}
        self._last_index: int | None = None
        self._tool_use = False  # a client tool_use block was seen

    def _wants(self, frame: Frame) -> bool:
        event = frame.event
        if event is None or event in _WANTED:
            return True
        return event == "content_block_delta" and frame.raw.find(b"partial_json") >= 0

    def _event(self, obj: dict[str, Any], frame: Frame) -> bool:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return False
        if frame.event is None and kind and "\n" not in kind and "\r" not in kind:
            # anthropic-python ignores events without an "event:" name
            self._set_event = kind
            self._note("missing_event_name")
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict) and isinstance(message.get("id"), str):
                self._message_id = self._message_id or message["id"]
            return False
        if kind == "content_block_start":
            return self._block_start(obj)
        if kind == "content_block_delta":
            return self._block_delta(obj, frame.event is not None)
        if kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason") == "end_turn" and self._tool_use:
                delta["stop_reason"] = "tool_use"
                self._note("stop_with_tool_calls")
                return True
        return False

    def _block_start(self, obj: dict[str, Any]) -> bool:
        changed = False
        index = obj.get("index")
        if not is_int(index):
            index = obj["index"] = 0 if self._last_index is None else self._last_index + 1
            self._note("missing_index")
            changed = True
        self._last_index = index
        block = obj.get("content_block")
        if not isinstance(block, dict) or block.get("type") not in TOOL_BLOCK_TYPES:
            self._blocks.pop(index, None)
            return changed
        if block.get("type") == "tool_use":
            self._tool_use = True
        block_id = block.get("id")
        if not isinstance(block_id, str) or not block_id:
            prefix = "toolu_" if block.get("type") == "tool_use" else "srvtoolu_"
            block["id"] = self._invent_id(prefix, self._message_id, index)
            self._note("missing_id")
            changed = True
        else:
            self._ids.add(block_id)
        if "input" not in block or block["input"] is None:
            block["input"] = {}
            self._note("missing_input")
            changed = True
        self._blocks[index] = _Block()
        return changed

    def _block_delta(self, obj: dict[str, Any], frame_named: bool) -> bool:
        delta = obj.get("delta")
        if not isinstance(delta, dict) or delta.get("type") != "input_json_delta":
            return False
        changed = False
        index = obj.get("index")
        if not is_int(index) and self._last_index is not None:
            index = obj["index"] = self._last_index
            self._note("missing_index")
            changed = True
        block = self._blocks.get(index) if is_int(index) else None
        text, fix = arguments_text(delta.get("partial_json"))
        if fix is not None:
            delta["partial_json"] = text
            self._note(fix)
            changed = True
        if block is None:
            return changed
        if block.progress.complete and text.strip() and same_json(text, block.args.text):
            delta["partial_json"] = text = ""
            self._note("duplicate_arguments")
            changed = True
        elif not changed and frame_named and is_int(index) and not block.progress.complete:
            # a plain delta of a known block: frames of its shape take the fast path
            self._admit = _Continuation(block, index, text)
        block.args.add(text)
        return changed

    def _admits(self, state: Any, values: HoleValues) -> bool:
        return values.get(_PARTIAL_JSON) == state.text

    def _take(self, state: Any, text: str) -> bool:
        # the conditions under which _event finds this frame a plain delta of the block
        block: _Block = state.block
        if self._blocks.get(state.index) is not block or block.progress.complete:
            return False
        block.args.add(text)
        return True


# --- whole (non-streamed) responses -----------------------------------------------------------


def repair_messages_json(
    obj: dict[str, Any], request_json: dict[str, Any] | None
) -> Counter[str]:
    """Fix the tool_use blocks of an Anthropic ``message`` object in place."""
    repairs: Counter[str] = Counter()
    base = obj.get("id") if isinstance(obj.get("id"), str) else ""
    content = obj.get("content")
    tool_use = False
    seen: set[str] = set()
    for n, block in enumerate(content if isinstance(content, list) else ()):
        if not isinstance(block, dict) or block.get("type") not in TOOL_BLOCK_TYPES:
            continue
        if block.get("type") == "tool_use":
            tool_use = True
        bid = block.get("id")
        if not isinstance(bid, str) or not bid or bid in seen:
            prefix = "toolu_" if block.get("type") == "tool_use" else "srvtoolu_"
            block["id"] = prefix + short_hash("messages", base, n)
            repairs["missing_id"] += 1
        seen.add(block["id"])
        value = block.get("input")
        if value is None:
            block["input"] = {}
            repairs["missing_input"] += 1
        elif isinstance(value, str):
            try:
                parsed = json.loads(value) if value.strip() else {}
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                block["input"] = parsed
                repairs["string_input"] += 1
    if tool_use and obj.get("stop_reason") == "end_turn":
        obj["stop_reason"] = "tool_use"
        repairs["stop_with_tool_calls"] += 1
    return repairs
