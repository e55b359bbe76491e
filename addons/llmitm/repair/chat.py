"""OpenAI chat-completions tool-call repair: streamed ``tool_calls`` deltas and whole responses.

Every fragment of ``choices[].delta.tool_calls`` is routed to a call, then rewritten so that
openai-python's ``ChatCompletionStreamState`` (and index-keyed accumulators generally) rebuild
the calls the upstream meant. Client-side indexes are dense (0, 1, 2, ...) in order of first
appearance; a call's ``id``, ``type`` and ``function.name`` travel on its first fragment only.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from llmitm.sse import Frame

from ._base import StreamRepairer
from ._json import (
    Fragments,
    JsonProgress,
    arguments_text,
    is_int,
    same_json,
    short_hash,
    split_concatenated,
    starts_value,
    unwrap_double_encoded,
)
from ._shapes import HoleValues

_NO_ARG_FIX_FINISH = ("length", "content_filter")
_ARGUMENTS = b"arguments"


def tool_choice_forced(request_json: dict[str, Any] | None) -> bool:
    """True when the request forces a tool call (``required``/``any`` or one named tool)."""
    if not isinstance(request_json, dict):
        return False
    choice = request_json.get("tool_choice")
    if choice in ("required", "any"):
        return True
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "tool", "any", "custom"):
            return True
        allowed = choice.get("allowed_tools")
        if kind == "allowed_tools" and isinstance(allowed, dict):
            return allowed.get("mode") == "required"
        if kind == "allowed_tools":
            return choice.get("mode") == "required"
    legacy = request_json.get("function_call")
    return isinstance(legacy, dict) and bool(legacy.get("name"))


def tool_names(request_json: dict[str, Any] | None) -> frozenset[str]:
    """Names of the function tools a request declares (chat, Responses or Messages shape)."""
    names: set[str] = set()
    tools = request_json.get("tools") if isinstance(request_json, dict) else None
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else tool.get("name")
        if isinstance(name, str) and name:
            names.add(name)
    return frozenset(names)


class _Call:
    __slots__ = (
        "args", "id", "id_invented", "index", "name", "progress", "remap", "type", "upstream"
    )

    def __init__(self, index: int, upstream: int | None) -> None:
        self.index = index
        self.type = "function"
        self.upstream = upstream
        self.remap = "sparse_index"  # why fragments of this call get a new index
        self.id = ""
        self.id_invented = False
        self.name = ""
        self.progress = JsonProgress()
        self.args = Fragments(progress=self.progress)  # feeds the progress


class _Choice:
    __slots__ = ("by_id", "by_upstream", "calls", "finish")

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.by_upstream: dict[int, _Call] = {}  # latest call seen under an upstream index
        self.by_id: dict[str, _Call] = {}
        self.finish: str | None = None


class _Continuation:
    """What a plain argument fragment continues: its call, reached by its upstream index (or, with
    none, as the latest call), and the repairs each such fragment needs (a client index)."""

    __slots__ = ("args", "call", "choice", "chunk_id", "function", "notes", "up")

    def __init__(self, call: _Call, choice: _Choice, up: int | None, args: str,
                 function: dict[str, Any], notes: tuple[str, ...]) -> None:
        self.call = call
        self.choice = choice
        self.up = up
        self.args = args
        self.function = function  # the fragment's "function" object, for _put_holes
        self.notes = notes
        self.chunk_id: str | None = None


class ChatRepairer(StreamRepairer):
    """Streamed chat completions (``chat.completion.chunk`` events)."""

    endpoint = "chat_completions"
    # ``obfuscation``: OpenAI's per-chunk random padding, never read here
    _holes = (b'"arguments":', b'"obfuscation":')
    _main = _ARGUMENTS

    def __init__(self, request_json: dict[str, Any] | None = None) -> None:
        super().__init__(request_json)
        self.forced = tool_choice_forced(self.request)
        self.tool_names = tool_names(self.request)
        self._choices: dict[int, _Choice] = {}
        self._active = False  # a tool call has been seen: look at every chunk from now on
        self._stream_id = ""
        self._template: dict[str, Any] = {}
        self._usage: Any = None

    def _wants(self, frame: Frame) -> bool:
        return self._active or frame.raw.find(b"tool_calls") >= 0

    # --- events ---------------------------------------------------------------------------

    def _event(self, obj: dict[str, Any], frame: Frame) -> bool:
        chunk_id = obj.get("id")
        # The template (for frames the repairer adds) changes with the chunk id, rarely per frame.
        if isinstance(chunk_id, str) and chunk_id and chunk_id != self._template.get("id"):
            if not self._stream_id:
                self._stream_id = chunk_id
            self._template = {
                k: obj[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                if k in obj
            }
        if obj.get("usage") is not None:
            self._usage = obj["usage"]
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return False
        changed = False
        reason: Any = None
        many = False  # several tool-call fragments in one chunk
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            ci = choice.get("index")
            ci = ci if is_int(ci) else 0
            state = self._choices.get(ci)
            if state is None:
                state = self._choices[ci] = _Choice()
            delta = choice.get("delta")
            if isinstance(delta, dict):
                fragments = delta.get("tool_calls")
                if isinstance(fragments, list) and fragments:
                    self._active = True
                    if len(fragments) != 1:
                        many = True
                    for fragment in fragments:
                        if isinstance(fragment, dict) and self._fragment(state, ci, fragment):
                            changed = True
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason and self._finish(state, choice, reason):
                changed = True
        if self._admit is not None:
            # a plain continuation may take the fast path only if nothing else in the chunk
            # touched the state: one choice, one fragment, no finish, no usage
            if many or len(choices) != 1 or obj.get("usage") is not None or reason:
                self._admit = None
            elif isinstance(chunk_id, str) and chunk_id:
                self._admit.chunk_id = chunk_id
        return changed

    def _admits(self, state: Any, values: HoleValues) -> bool:
        return values.get(_ARGUMENTS) == state.args

    def _put_holes(self, state: Any, obj: dict[str, Any], values: dict[bytes, str]) -> bool:
        state.function["arguments"] = values.pop(_ARGUMENTS, None)
        if b"obfuscation" in values:
            obj["obfuscation"] = values.pop(b"obfuscation")
        return not values

    def _take(self, state: Any, text: str) -> bool:
        # the conditions under which _event finds this frame a plain continuation of the call
        call: _Call = state.call
        choice: _Choice = state.choice
        if (
            (choice.by_upstream.get(state.up) if state.up is not None else choice.calls[-1])
            is not call
            or call.progress.complete
            or (state.chunk_id is not None and self._template.get("id") != state.chunk_id)
        ):
            return False
        # (no test for blank arguments: they were not at admission, and they only grow)
        call.args.add(text)
        return True

    def _route(
        self, state: _Choice, up: int | None, fid: str | None, name: Any, args: str | None
    ) -> tuple[_Call | None, str | None]:
        """The call a fragment continues, or (None, why a new call starts)."""
        if fid is not None:
            known = state.by_id.get(fid)
            if known is not None:
                if (
                    args is not None
                    and known.progress.complete
                    and starts_value(args)
                    and not same_json(args, known.args.text)
                ):
                    return None, "concatenated_call"
                return known, None
        current = state.by_upstream.get(up) if up is not None else (
            state.calls[-1] if state.calls else None
        )
        collision = "index_collision" if up is not None and current is not None else "new"
        if fid is not None:
            if (
                current is not None
                and current.id_invented
                and not current.progress.complete
                and (not name or name == current.name)
            ):
                return current, "late_id"
            return None, collision
        if current is None:
            return None, "new"
        if (
            isinstance(name, str)
            and name
            and current.name
            and name != current.name
            and not current.args.blank
        ):
            return None, collision
        if (
            args is not None
            and current.progress.complete
            and starts_value(args)
            and not same_json(args, current.args.text)
        ):
            return None, "concatenated_call"
        return current, None

    def _fragment(self, state: _Choice, ci: int, tc: dict[str, Any]) -> bool:
        up_raw = tc.get("index")
        up = up_raw if is_int(up_raw) else None
        raw_id = tc.get("id")
        fid = raw_id if isinstance(raw_id, str) and raw_id else None
        fn = tc.get("function")
        if not isinstance(fn, dict):
            fn = None
        name = fn.get("name") if fn is not None else None
        has_args = fn is not None and "arguments" in fn
        args, args_fix = arguments_text(fn["arguments"]) if fn is not None and has_args else ("", None)
        # only the fragment's arguments (and index, type): judged before any repair touches it
        plain = has_args and len(fn) == 1 and set(tc) <= {"index", "function", "type"}  # type: ignore[arg-type]

        changed = False
        call, why = self._route(state, up, fid, name, args if has_args else None)
        new = call is None
        previous = state.calls[-1] if state.calls else None
        if call is None:
            if why == "concatenated_call" and fid is not None and fid in state.by_id:
                fid = None  # the split-off call needs an id of its own
            call = self._new_call(state, ci, up, fid, why or "new")
            if call.id_invented:
                tc["id"] = call.id
                changed = True
            if up != call.index:
                tc["index"] = call.index
                changed = True
            kind = tc.get("type")
            if kind is None and "custom" not in tc:
                tc["type"] = kind = "function"
                self._note("missing_type")
                changed = True
            call.type = kind if isinstance(kind, str) else ""
        else:
            changed |= self._continuation(state, call, tc, up, fid, why)
        if call.type != "function":
            return changed  # custom tool calls and the like: routing only

        if fn is None:
            fn = tc["function"] = {}  # openai-python asserts every fragment has one
            self._note("missing_function")
            changed = True
        if "name" in fn:
            if new:
                changed |= self._first_name(call, fn, name)
            else:
                changed |= self._next_name(call, fn, name)
        elif new and why == "concatenated_call" and previous is not None and previous.name:
            fn["name"] = call.name = previous.name
            changed = True
        if has_args:
            if (
                plain and not new and why is None and args_fix is None
                and changed == (up != call.index) and not call.args.blank and not call.progress.complete
                and (state.by_upstream.get(up) if up is not None else state.calls[-1]) is call
            ):
                # a plain argument fragment (maybe with a client index to set): frames of its
                # shape can take the fast path
                notes = () if up == call.index else ("missing_index" if up is None else call.remap,)
                self._admit = None if self._admit is not None else _Continuation(
                    call, state, up, args, fn, notes)
            else:
                self._admit = None
            if args_fix is not None:
                self._note(args_fix)
                fn["arguments"] = args
                changed = True
            if call.args.blank:
                inner = unwrap_double_encoded(args)
                if inner is not None:
                    self._note("double_encoded_arguments")
                    fn["arguments"] = args = inner
                    changed = True
            elif call.progress.complete and args.strip() and same_json(args, call.args.text):
                self._note("duplicate_arguments")
                fn["arguments"] = args = ""
                changed = True
            call.args.add(args)
        return changed

    def _new_call(self, state: _Choice, ci: int, up: int | None, fid: str | None, why: str) -> _Call:
        call = _Call(len(state.calls), up)
        state.calls.append(call)
        if up is not None:
            state.by_upstream[up] = call
        else:  # later fragments that do carry an index most likely count the same way
            state.by_upstream.setdefault(call.index, call)
        if up is None:
            self._note("missing_index")
        elif why in ("index_collision", "concatenated_call"):
            call.remap = "index_collision"
            self._note(why)
        elif up != call.index:
            self._note("sparse_index")
        if fid is not None:
            call.id = fid
            state.by_id[fid] = call
            self._ids.add(fid)
        else:
            call.id = self._invent_id("call_", self._stream_id, ci, call.index)
            call.id_invented = True
            self._note("missing_id")
        return call

    def _continuation(
        self,
        state: _Choice,
        call: _Call,
        tc: dict[str, Any],
        up: int | None,
        fid: str | None,
        why: str | None,
    ) -> bool:
        changed = False
        if fid is not None and why is None and call is not state.calls[-1]:
            self._note("interleaved_call")  # routed back to an earlier call by its id
        if up != call.index:
            tc["index"] = call.index
            changed = True
            self._note("missing_index" if up is None else call.remap)
        if "id" in tc:
            raw_id = tc.pop("id")
            changed = True
            if why == "late_id" and fid is not None:
                state.by_id[fid] = call
                self._note("late_id")
            elif not raw_id:
                self._note("empty_id")
            else:
                self._note("repeated_id")
        if "type" in tc and tc["type"] != call.type:
            del tc["type"]  # null (or changed) later: accumulators overwrite the first type
            self._note("missing_type")
            changed = True
        return changed

    def _first_name(self, call: _Call, fn: dict[str, Any], name: Any) -> bool:
        if isinstance(name, str) and name:
            call.name = name
            return False
        del fn["name"]  # empty or null name on a first fragment: leave it out
        self._note("empty_name")
        return True

    def _next_name(self, call: _Call, fn: dict[str, Any], name: Any) -> bool:
        if not isinstance(name, str) or not name:
            del fn["name"]
            self._note("empty_name")
            return True
        if call.name and (name == call.name or not call.args.blank):
            # repeated, or (same id, arguments under way) contradicting: keep the first
            del fn["name"]
            self._note("repeated_name")
            return True
        if (
            call.name
            and name.startswith(call.name)
            and name in self.tool_names
            and call.name not in self.tool_names
        ):
            fn["name"] = name[len(call.name) :]  # cumulative name fragments
            call.name = name
            self._note("repeated_name")
            return True
        call.name += name
        return False

    def _finish(self, state: _Choice, choice: dict[str, Any], reason: str) -> bool:
        if state.finish is not None:
            if reason != state.finish:
                choice["finish_reason"] = state.finish
                self._note("conflicting_finish_reason")
                return True
            return False
        changed = False
        if state.calls and reason not in _NO_ARG_FIX_FINISH:
            missing = [c for c in state.calls if c.type == "function" and c.args.blank]
            if missing:
                delta = choice.get("delta")
                if not isinstance(delta, dict):
                    delta = choice["delta"] = {}
                fragments = delta.get("tool_calls")
                if not isinstance(fragments, list):
                    fragments = delta["tool_calls"] = []
                for call in missing:
                    fragments.append({"index": call.index, "function": {"arguments": "{}"}})
                    call.args.add("{}")
                    self._note("missing_arguments")
                changed = True
            if reason == "stop" and not self.forced:
                choice["finish_reason"] = reason = "tool_calls"
                self._note("stop_with_tool_calls")
                changed = True
        state.finish = reason
        return changed

    def _on_done(self) -> list[bytes]:
        """``[DONE]`` while calls are still open: send their missing end first."""
        out: list[bytes] = []
        for ci in sorted(self._choices):
            state = self._choices[ci]
            if not state.calls or state.finish is not None:
                continue
            delta: dict[str, Any] = {}
            missing = [c for c in state.calls if c.type == "function" and c.args.blank]
            if missing:
                delta["tool_calls"] = [
                    {"index": c.index, "function": {"arguments": "{}"}} for c in missing
                ]
                for call in missing:
                    call.args.add("{}")
                    self._note("missing_arguments")
            state.finish = "stop" if self.forced else "tool_calls"
            self._note("missing_finish_reason")
            chunk: dict[str, Any] = {
                "id": self._stream_id,
                "object": "chat.completion.chunk",
                **{k: v for k, v in self._template.items() if k not in ("id", "object")},
                "choices": [{"index": ci, "delta": delta, "finish_reason": state.finish}],
            }
            if self._usage is not None:
                chunk["usage"] = self._usage
            out.append(self._synth(chunk))
        return out


# --- whole (non-streamed) responses -----------------------------------------------------------


def repair_chat_json(obj: dict[str, Any], request_json: dict[str, Any] | None) -> Counter[str]:
    """Fix the tool calls of a ``chat.completion`` object in place; returns the repairs."""
    repairs: Counter[str] = Counter()
    forced = tool_choice_forced(request_json)
    base = obj.get("id") if isinstance(obj.get("id"), str) else ""
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not isinstance(calls, list) or not calls:
            continue
        ci = choice.get("index") if is_int(choice.get("index")) else 0
        fixed: list[Any] = []
        seen_ids: set[str] = set()
        for call in calls:
            if not isinstance(call, dict):
                fixed.append(call)
                continue
            fixed.extend(_fix_whole_call(call, repairs))
        for n, call in enumerate(fixed):
            if not isinstance(call, dict):
                continue
            cid = call.get("id")
            if not isinstance(cid, str) or not cid or cid in seen_ids:
                call["id"] = "call_" + short_hash("chat_completions", base, ci, n)
                repairs["missing_id"] += 1
            seen_ids.add(call["id"])
        if isinstance(message, dict):
            message["tool_calls"] = fixed
        if choice.get("finish_reason") == "stop" and not forced:
            choice["finish_reason"] = "tool_calls"
            repairs["stop_with_tool_calls"] += 1
    return repairs


def _fix_whole_call(call: dict[str, Any], repairs: Counter[str]) -> list[dict[str, Any]]:
    if call.get("type") is None:
        call["type"] = "function"
        repairs["missing_type"] += 1
    fn = call.get("function")
    if not isinstance(fn, dict):
        return [call]
    args, fix = arguments_text(fn.get("arguments"))
    if not args.strip():
        repairs["missing_arguments"] += 1
        fn["arguments"] = "{}"
        return [call]
    if fix is not None:
        repairs[fix] += 1
        fn["arguments"] = args
    inner = unwrap_double_encoded(args)
    if inner is not None:
        repairs["double_encoded_arguments"] += 1
        fn["arguments"] = args = inner
    parts = split_concatenated(args)
    if parts is None:
        return [call]
    if all(same_json(p, parts[0]) for p in parts[1:]):
        repairs["duplicate_arguments"] += len(parts) - 1
        fn["arguments"] = parts[0]
        return [call]
    repairs["concatenated_call"] += len(parts) - 1
    fn["arguments"] = parts[0]
    out = [call]
    for part in parts[1:]:
        extra = json.loads(json.dumps(call))
        extra.pop("id", None)
        extra["function"]["arguments"] = part
        out.append(extra)
    return out
