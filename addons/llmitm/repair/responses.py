"""OpenAI Responses API function-call repair: streamed events and whole responses.

Function calls are tracked per output item, found by ``item_id`` first and ``output_index``
second, so argument deltas reach the right call even when one of the two is missing or wrong.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

from llmitm.sse import Frame

from ._base import StreamRepairer
from ._json import Fragments, arguments_text, is_int, short_hash
from ._shapes import HoleValues

_INTERESTING = frozenset(
    {
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.output_item.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.completed",
        "response.incomplete",
        "response.failed",
    }
)
_FINAL = ("response.completed", "response.incomplete", "response.failed")
_DELTA = b"delta"
_SEQ = b"sequence_number"


class _Item:
    __slots__ = ("added", "args", "call_id", "done", "final_args", "item_id", "name", "output_index")

    def __init__(self, output_index: int, item: dict[str, Any]) -> None:
        self.output_index = output_index
        self.added = item
        item_id = item.get("id")
        call_id = item.get("call_id")
        self.item_id: str = item_id if isinstance(item_id, str) else ""
        self.call_id: str = call_id if isinstance(call_id, str) else ""
        name = item.get("name")
        self.name: str = name if isinstance(name, str) else ""
        self.args = Fragments()  # as streamed to the client so far
        self.final_args: str | None = None
        self.done = False


class _Continuation:
    """What a plain ``function_call_arguments.delta`` continues: its item, found by its id."""

    __slots__ = ("delta", "item", "item_id", "seq")

    def __init__(self, item: _Item, item_id: str, delta: str, seq: Any) -> None:
        self.item = item
        self.item_id = item_id
        self.delta = delta
        self.seq = seq  # the sequence number when it is not a hole


class ResponsesRepairer(StreamRepairer):
    """Streamed Responses API events (``response.*``)."""

    endpoint = "responses"
    _holes = (b'"delta":', b'"obfuscation":', b'"sequence_number":')
    _main = _DELTA

    def __init__(self, request_json: dict[str, Any] | None = None) -> None:
        super().__init__(request_json)
        self._response_id = ""
        self._by_index: dict[int, _Item] = {}
        self._by_id: dict[str, _Item] = {}
        self._done_items: dict[int, dict[str, Any]] = {}  # every output_item.done, any type
        self._seq: Any = None

    def _wants(self, frame: Frame) -> bool:
        return frame.event is None or frame.event in _INTERESTING

    def _event(self, obj: dict[str, Any], frame: Frame) -> bool:
        kind = obj.get("type")
        self._seq = obj.get("sequence_number")
        if kind in ("response.created", "response.in_progress"):
            response = obj.get("response")
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self._response_id = self._response_id or response["id"]
            return False
        if kind == "response.output_item.added":
            return self._added(obj)
        if kind == "response.function_call_arguments.delta":
            return self._delta(obj)
        if kind == "response.function_call_arguments.done":
            return self._args_done(obj)
        if kind == "response.output_item.done":
            return self._item_done(obj)
        if kind in _FINAL:
            return self._final(obj, kind)
        return False

    # --- routing --------------------------------------------------------------------------

    def _resolve(self, obj: dict[str, Any]) -> tuple[_Item | None, bool]:
        """The function-call item an event is about; fixes its item_id/output_index."""
        iid = obj.get("item_id")
        oi = obj.get("output_index")
        item = self._by_id.get(iid) if isinstance(iid, str) and iid else None
        if item is None and is_int(oi):
            item = self._by_index.get(oi)
        if item is None:
            return None, False
        if not item.item_id and isinstance(iid, str) and iid and iid not in self._by_id:
            item.item_id = iid  # the id the added item lacked
            self._by_id[iid] = item
        changed = False
        if oi != item.output_index:
            obj["output_index"] = item.output_index
            self._note("missing_output_index" if not is_int(oi) else "mismatched_output_index")
            changed = True
        if item.item_id and iid != item.item_id:
            obj["item_id"] = item.item_id
            self._note("missing_item_id" if not iid else "mismatched_item_id")
            changed = True
        return item, changed

    def _fix_item(self, item: dict[str, Any], state: _Item | None) -> bool:
        """Fill id / call_id / name / arguments of a function_call item from what we know."""
        changed = False
        if state is not None:
            if state.item_id and item.get("id") != state.item_id:
                self._note("missing_item_id" if not item.get("id") else "mismatched_item_id")
                item["id"] = state.item_id
                changed = True
            if item.get("call_id") != state.call_id and state.call_id:
                self._note("missing_call_id" if not item.get("call_id") else "mismatched_call_id")
                item["call_id"] = state.call_id
                changed = True
            if not item.get("name") and state.name:
                item["name"] = state.name
                self._note("empty_name")
                changed = True
        args, fix = arguments_text(item.get("arguments"))
        if "arguments" not in item:
            fix = "missing_arguments"
        if not args.strip():
            args = state.args.text if state is not None and not state.args.blank else "{}"
            self._note(fix or "missing_arguments")
            changed = True
        elif fix is not None:
            self._note(fix)
            changed = True
        if changed:
            item["arguments"] = args
        return changed

    def _catch_up(self, state: _Item, target: str, obj: dict[str, Any]) -> None:
        """The client has seen fewer argument deltas than the final arguments: send the rest."""
        sent = state.args.text
        if sent == target or not target.startswith(sent):
            return
        delta: dict[str, Any] = {
            "type": "response.function_call_arguments.delta",
            "item_id": state.item_id,
            "output_index": state.output_index,
            "delta": target[len(sent) :],
        }
        if self._seq is not None:
            delta["sequence_number"] = self._seq
        self._before.append(self._synth(delta, delta["type"]))
        self._note("missing_arguments_delta")
        state.args = Fragments(target)

    # --- event handlers -------------------------------------------------------------------

    def _added(self, obj: dict[str, Any]) -> bool:
        item = obj.get("item")
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return False
        changed = False
        oi = obj.get("output_index")
        if not is_int(oi):
            oi = obj["output_index"] = max([*self._by_index, *self._done_items, -1]) + 1
            self._note("missing_output_index")
            changed = True
        if "id" in item and not isinstance(item["id"], str):
            del item["id"]  # an item id that is not a string; it may still come with a delta
            self._note("missing_item_id")
            changed = True
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            item["call_id"] = self._invent_id("call_", self._response_id, oi)
            self._note("missing_call_id")
            changed = True
        self._ids.add(item["call_id"])
        if "arguments" not in item or not isinstance(item["arguments"], str):
            args, fix = arguments_text(item.get("arguments"))
            self._note(fix or "null_arguments")
            item["arguments"] = args
            changed = True
        state = _Item(oi, copy.deepcopy(item))
        state.args = Fragments(item["arguments"])
        self._by_index[oi] = state
        if state.item_id:
            self._by_id[state.item_id] = state
        return changed

    def _delta(self, obj: dict[str, Any]) -> bool:
        state, changed = self._resolve(obj)
        if state is None:
            return False
        if "delta" not in obj or not isinstance(obj["delta"], str):
            text, fix = arguments_text(obj.get("delta"))
            self._note(fix or "null_arguments")
            obj["delta"] = text
            changed = True
        elif not changed and self._found_by_id(obj, state):
            # a plain delta of a call found by its id: frames of its shape take the fast path
            self._admit = _Continuation(state, state.item_id, obj["delta"], self._seq)
        state.args.add(obj["delta"])
        return changed

    def _found_by_id(self, obj: dict[str, Any], state: _Item) -> bool:
        iid = obj.get("item_id")
        return isinstance(iid, str) and self._by_id.get(iid) is state

    def _admits(self, state: Any, values: HoleValues) -> bool:
        return values.get(_DELTA) == state.delta and values.get(_SEQ, state.seq) == state.seq

    def _take(self, state: Any, text: str) -> bool:
        # the conditions under which _event finds this frame a plain delta of the item
        item: _Item = state.item
        if self._by_id.get(state.item_id) is not item:
            return False
        self._seq = state.seq
        item.args.add(text)
        return True

    def _continue(self, state: Any, values: HoleValues) -> bool:
        text = values.get(_DELTA)
        if not isinstance(text, str) or not self._take(state, text):
            return False
        self._seq = values.get(_SEQ, state.seq)  # the frame's own, when it is a hole
        return True

    def _args_done(self, obj: dict[str, Any]) -> bool:
        state, changed = self._resolve(obj)
        if state is None:
            return False
        args, fix = arguments_text(obj.get("arguments"))
        if fix is not None:
            self._note(fix)
            changed = True
        if not args.strip():
            args = state.args.text if not state.args.blank else "{}"
            self._note("missing_arguments")
            changed = True
        if changed:
            obj["arguments"] = args
        if "name" in obj and not obj["name"] and state.name:
            obj["name"] = state.name
            self._note("empty_name")
            changed = True
        self._catch_up(state, args, obj)
        state.final_args = args
        return changed

    def _item_done(self, obj: dict[str, Any]) -> bool:
        item = obj.get("item")
        oi = obj.get("output_index")
        if not isinstance(item, dict):
            return False
        state: _Item | None = None
        if item.get("type") == "function_call":
            iid = item.get("id")
            state = self._by_id.get(iid) if isinstance(iid, str) and iid else None
            if state is None and is_int(oi):
                candidate = self._by_index.get(oi)
                if candidate is not None and not candidate.done:
                    state = candidate
        changed = False
        if state is not None and oi != state.output_index:
            obj["output_index"] = oi = state.output_index
            self._note("missing_output_index")
            changed = True
        if item.get("type") == "function_call":
            changed |= self._fix_item(item, state)
            if state is not None:
                self._catch_up(state, item["arguments"], obj)
                state.done = True
                state.final_args = item["arguments"]
        if is_int(oi):
            self._done_items[oi] = copy.deepcopy(item)
        return changed

    def _final(self, obj: dict[str, Any], kind: str) -> bool:
        # function calls the stream opened but never closed
        for oi in sorted(self._by_index):
            state = self._by_index[oi]
            if state.done:
                continue
            item = copy.deepcopy(state.added)
            item["arguments"] = state.final_args or state.args.text
            item["status"] = "completed" if kind == "response.completed" else "incomplete"
            self._fix_item(item, state)
            self._catch_up(state, item["arguments"], obj)
            event: dict[str, Any] = {
                "type": "response.output_item.done",
                "output_index": oi,
                "item": item,
            }
            if self._seq is not None:
                event["sequence_number"] = self._seq
            self._before.append(self._synth(event, event["type"]))
            self._note("missing_output_item_done")
            state.done = True
            self._done_items[oi] = copy.deepcopy(item)
        response = obj.get("response")
        if not isinstance(response, dict):
            return False
        output = response.get("output")
        changed = False
        if isinstance(output, list) and not output and self._by_index:
            response["output"] = [self._done_items[i] for i in sorted(self._done_items)]
            self._note("missing_response_output")
            return True
        in_order = [self._by_index[i] for i in sorted(self._by_index)]
        position = 0
        for entry in output if isinstance(output, list) else ():
            if not isinstance(entry, dict) or entry.get("type") != "function_call":
                continue
            iid = entry.get("id")
            match = self._by_id.get(iid) if isinstance(iid, str) and iid else None
            if match is None:
                call_id = entry.get("call_id")
                match = next((s for s in in_order if call_id and s.call_id == call_id), None)
            if match is None and position < len(in_order):
                match = in_order[position]  # same position among the function calls
            position += 1
            changed |= self._fix_item(entry, match)
        return changed


# --- whole (non-streamed) responses -----------------------------------------------------------


def repair_responses_json(
    obj: dict[str, Any], request_json: dict[str, Any] | None
) -> Counter[str]:
    """Fix the function_call output items of a Responses ``response`` object in place."""
    repairs: Counter[str] = Counter()
    base = obj.get("id") if isinstance(obj.get("id"), str) else ""
    output = obj.get("output")
    seen: set[str] = set()
    for n, item in enumerate(output if isinstance(output, list) else ()):
        if not isinstance(item, dict) or item.get("type") != "function_call":
            continue
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id or call_id in seen:
            item["call_id"] = "call_" + short_hash("responses", base, n)
            repairs["missing_call_id"] += 1
        seen.add(item["call_id"])
        args, fix = arguments_text(item.get("arguments"))
        if not args.strip():
            item["arguments"] = "{}"
            repairs["missing_arguments"] += 1
        elif fix is not None:
            item["arguments"] = args
            repairs[fix] += 1
    return repairs
