"""Tool-call repair end to end over the hand-made defect streams (tests/data/defects).

Two real gateways: the default one (repair on) and one started with ``--set llmitm_repair=false``.
Each defect stream is replayed by the fake provider, cut at random byte positions, through both,
and read by the official SDK stream helpers as real clients (HTTPS_PROXY + SSL_CERT_FILE): with
repair on they yield the intended calls (tests/unit/test_repair_streams.py's ``EXPECT``, equal to
what they yield in-process on the pure repair); with repair off the same SDK raises or yields
wrong calls, in the same test. ``-LEGIT`` streams come through both byte-identical and right.

Also: streams the parser cannot understand (binary noise, text that is not SSE, noise after a
repaired frame) pass through unchanged and are never cut; ``X-Llmitm-Bypass: 1`` gets the raw
upstream bytes; the flows saved with ``-w`` carry the repairs in their comment and metadata; and
non-streamed JSON defects are repaired end to end.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

import tests.accumulate as accumulate
from llmitm import flowmeta
from llmitm.repair import repair_json_response
from tests.conftest import FakeProvider, GatewayFactory
from tests.e2e.test_repair_corpus import (
    Outcome,
    assert_healthy,
    client_environment,
    close_clients,
    comment_line,
    fetch_raw,
    read_flows,
    sdk_outcome,
    sdk_patched,
    via_gateway,
)
from tests.harness.certs import CertFiles
from tests.harness.gateway import Gateway
from tests.unit.conftest import DATA, load_request, run_repair
from tests.unit.test_repair_streams import ANY_ID, EXPECT, INVENTED

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(180)]

DEFECTS = DATA / "defects"
STEMS = sorted(EXPECT)
ENDPOINT = {"chat": "chat_completions", "messages": "messages", "responses": "responses"}


def endpoint_of(stem: str) -> str:
    return ENDPOINT[stem.split("-")[1]]


def steering(path: Path, seed: int, delay: float = 0.001) -> dict[str, str]:
    """Request headers for the fake provider: replay ``path`` cut at random byte positions."""
    return {"x-fake-sse-file": str(path), "x-fake-split-seed": str(seed),
            "x-fake-frame-delay": str(delay), "x-test-stream": f"{path.name}|raw"}


def request_bytes(path: Path) -> bytes:
    req = path.with_name(path.name[:-4] + ".request.json")
    return req.read_bytes() if req.exists() else b'{"model": "m", "stream": true}'


@pytest.fixture(scope="module")
def gateways(mitm_confdir: Path, test_certs: CertFiles, fake_provider_session: FakeProvider,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Gateway]]:
    """{"on": default gateway, "off": gateway with llmitm_repair=false}; the SDK helpers of
    tests/accumulate.py talk to them while a test is inside ``via_gateway``."""
    started: dict[str, Gateway] = {}
    try:
        for name, args in (("on", []), ("off", ["--set", "llmitm_repair=false"])):
            gw = Gateway(confdir=mitm_confdir, workdir=tmp_path_factory.mktemp(f"gw-defects-{name}"),
                         upstream_ca=test_certs.ca_pem, resolve=fake_provider_session.resolve_map(),
                         extra_args=args)
            started[name] = gw.start()
        with sdk_patched():
            yield started
    finally:
        close_clients()
        for gw in started.values():
            gw.stop()


def through(gw: Gateway, headers: dict[str, str], endpoint: str,
            request: dict[str, Any] | None) -> tuple[Outcome, str | None]:
    """What the official SDK helper yields through ``gw`` (and, for Messages, the stop_reason
    of a second read of the same stream)."""
    with client_environment(gw), via_gateway(headers):
        result = sdk_outcome(endpoint, b"", request)
        stop = None
        if endpoint == "messages":
            try:
                stop = accumulate.anthropic_message(b"", request).stop_reason
            except Exception as exc:
                stop = f"raised {type(exc).__name__}"
    return result, stop


def matches(result: Outcome, expected: list[tuple[Any, str, Any]]) -> bool:
    if result[0] != "ok" or len(result[1]) != len(expected):
        return False
    for (gid, _kind, gname, gargs), (eid, ename, eargs) in zip(result[1], expected, strict=True):
        id_ok = bool(INVENTED.match(gid)) if eid == ANY_ID and isinstance(gid, str) else gid == eid
        if not (id_ok and gname == ename and gargs == eargs):
            return False
    return True


def finish_of(result: Outcome, stop: str | None, endpoint: str) -> str | None:
    if endpoint == "messages":
        return stop
    return result[2] if result[0] == "ok" else None


def empty_ids_seen(gw: Gateway, headers: dict[str, str], request: dict[str, Any] | None) -> bool:
    """Whether the chunks a client decodes carry ``"id": ""`` on a tool-call fragment (what
    clients that start a new call on any present id, spring-ai and symfony/ai, trip on)."""
    with client_environment(gw), via_gateway(headers):
        chunks = accumulate.openai_chat_chunks(b"", request)
    return any(tc.id == "" for ch in chunks for c in ch.choices for tc in c.delta.tool_calls or [])


@pytest.mark.parametrize("stem", STEMS)
def test_defect_repaired_on_and_broken_off(gateways: dict[str, Gateway], stem: str) -> None:
    expected_calls, expected_repairs, expected_finish = EXPECT[stem]
    endpoint = endpoint_of(stem)
    path = DEFECTS / f"{stem}.sse"
    body = path.read_bytes()
    request = load_request(path)
    repaired, repairer = run_repair(endpoint, body, request)
    assert dict(repairer.repairs) == expected_repairs
    intended = sdk_outcome(endpoint, repaired, request)  # in-process, on the pure repair
    legit = stem.endswith("-LEGIT")

    seed = sum(map(ord, stem))
    on, on_stop = through(gateways["on"], steering(path, seed), endpoint, request)
    off, off_stop = through(gateways["off"], steering(path, seed + 1), endpoint, request)
    with client_environment(gateways["on"]):
        wire_on = fetch_raw(endpoint, request_bytes(path), steering(path, seed + 2))
    with client_environment(gateways["off"]):
        wire_off = fetch_raw(endpoint, request_bytes(path), steering(path, seed + 3))

    # repair on: the intended calls, exactly what the pure repair gives in-process
    assert wire_on == repaired
    assert on == intended
    assert matches(on, expected_calls), on
    assert_healthy(on)
    assert finish_of(on, on_stop, endpoint) == expected_finish
    # repair off: the upstream's bytes, and the same SDK fails on them
    assert wire_off == body
    off_ok = matches(off, expected_calls) and finish_of(off, off_stop, endpoint) == expected_finish
    if endpoint == "chat_completions" and off_ok:
        off_ok = all(kind == "function" for _id, kind, _n, _a in off[1])
    if legit:
        assert repaired == body and off == on
    elif stem == "c05-chat-empty-id-name":
        # openai-python tolerates "" ids on continuations; stricter clients do not
        assert off_ok
        assert empty_ids_seen(gateways["off"], steering(path, seed + 4), request)
        assert not empty_ids_seen(gateways["on"], steering(path, seed + 5), request)
    else:
        assert not off_ok, f"the SDK copes without repair: {off} / {off_stop}"


# --- streams the parser does not understand -------------------------------------------------

def not_understood(tmp: Path) -> dict[str, bytes]:
    rng = random.Random(4)
    defect = (DEFECTS / "c01-chat-missing-index.sse").read_bytes()
    frames = defect.split(b"\n\n")
    return {
        "noise": rng.randbytes(6000),
        "noise-with-blank-lines": b"\n\n".join(rng.randbytes(300) for _ in range(12)),
        "html": b"<!doctype html><html><body><h1>502 Bad Gateway</h1>\n\n<p>nginx</p></body></html>\n",
        "ndjson": b"".join(json.dumps({"choices": [{"delta": {"content": f"w{i}"}}]}).encode() + b"\n"
                           for i in range(40)),
        "not-json-data": frames[0] + b"\n\ndata: {not json\n\n" + b"\n\n".join(frames[1:]),
        # a repaired frame first, then noise: the repair stays, the rest passes verbatim
        "repaired-then-noise": b"\n\n".join(frames[:2]) + b"\n\n\x00\x01\x02garbage\xff"
                               + b"\n\n".join(frames[2:]),
    }


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT.values()))
def test_not_understood_streams_pass_unchanged_never_cut(gateways: dict[str, Gateway],
                                                         tmp_path: Path, endpoint: str) -> None:
    for name, body in not_understood(tmp_path).items():
        path = tmp_path / f"{name}.sse"
        path.write_bytes(body)
        with client_environment(gateways["on"]):
            wire = fetch_raw(endpoint, b'{"model": "m", "stream": true}', steering(path, len(name)))
        if name == "repaired-then-noise" and endpoint == "chat_completions":
            expected, repairer = run_repair(endpoint, body)
            assert repairer.passthrough and repairer.repairs == {"missing_index": 1}
            assert wire == expected and wire.endswith(body[body.index(b"\x00\x01\x02"):])
        else:
            assert wire == body, name
        assert len(wire) >= len(body)  # never cut


# --- bypass -------------------------------------------------------------------------------------

def test_bypass_header_gets_the_raw_upstream_bytes(gateways: dict[str, Gateway],
                                                   fake_provider: FakeProvider) -> None:
    path = DEFECTS / "c02-chat-shared-index-distinct-ids.sse"
    body = path.read_bytes()
    with client_environment(gateways["on"]):
        bypassed = fetch_raw("chat_completions", request_bytes(path),
                             {**steering(path, 11), "X-Llmitm-Bypass": "1"})
        repaired = fetch_raw("chat_completions", request_bytes(path), steering(path, 12))
    assert bypassed == body
    assert repaired == run_repair("chat_completions", body, load_request(path))[0] != body
    sent = [r for r in fake_provider.requests() if r["path"] == "/v1/chat/completions"]
    assert len(sent) == 2
    assert not any(k.lower().startswith("x-llmitm") for r in sent for k, _ in r["headers"])


# --- the flow file: comment lines and counts --------------------------------------------------

def test_flow_comments_list_the_repairs(gateway_factory: GatewayFactory, tmp_path: Path,
                                        fake_provider: FakeProvider) -> None:
    flow_file = tmp_path / "flows.mitm"
    gw = gateway_factory(extra_args=["-w", str(flow_file)])
    try:
        with client_environment(gw), ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda stem: fetch_raw(
                endpoint_of(stem), request_bytes(DEFECTS / f"{stem}.sse"),
                steering(DEFECTS / f"{stem}.sse", 5, delay=0.0005)), STEMS))
    finally:
        close_clients()
        gw.stop()
    flows = {f.request.headers["x-test-stream"].split("|")[0][:-4]: f for f in read_flows(flow_file)}
    assert sorted(flows) == STEMS
    for stem, flow in flows.items():
        repairs = EXPECT[stem][1]
        lines = [ln for ln in (flow.comment or "").splitlines() if "repaired tool-call" in ln]
        assert lines == ([comment_line(repairs)] if repairs else []), stem
        assert flow.metadata.get(flowmeta.REPAIRS, {}) == repairs, stem
    assert gw.proc is not None
    logged = [ln for ln in gw.proc.lines if "llmitm: repaired" in ln]
    assert len(logged) == sum(1 for s in STEMS if EXPECT[s][1])
    assert all("repaired POST https://api." in ln for ln in logged), logged


# --- non-streamed JSON defects --------------------------------------------------------------

CHAT_JSON = {
    "id": "chatcmpl-json", "object": "chat.completion", "created": 1700000000, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
        "role": "assistant", "content": None, "reasoning_content": "kept",
        "tool_calls": [{"type": "function",  # no id
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
RESPONSES_JSON = {
    "id": "resp_json", "object": "response", "created_at": 1700000000, "status": "completed",
    "model": "m", "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
    "output": [{"id": "fc_1", "type": "function_call", "status": "completed",  # no call_id
                "name": "get_weather", "arguments": {"city": "Paris"}}],
}
MESSAGES_JSON = {
    "id": "msg_json", "type": "message", "role": "assistant", "model": "claude-test",
    "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1},
    "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": '{"city": "Paris"}'}],
}


def json_calls(gw: Gateway, fake: FakeProvider) -> list[tuple[Any, ...]]:
    """Each SDK's non-streamed call through ``gw``: (id, name, arguments as the SDK holds them,
    finish/stop reason)."""
    fake.script({"path_suffix": "/chat/completions", "json": CHAT_JSON},
                {"path_suffix": "/responses", "json": RESPONSES_JSON},
                {"path_suffix": "/messages", "json": MESSAGES_JSON})
    with client_environment(gw):
        oai = openai.OpenAI(api_key="sk-test", base_url="https://api.openai.com/v1", max_retries=0)
        claude = anthropic.Anthropic(api_key="sk-ant-test", base_url="https://api.anthropic.com",
                                     max_retries=0)
        with oai, claude:
            chat = oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "weather?"}],
                tools=[{"type": "function", "function": {"name": "get_weather"}}])
            resp = oai.responses.create(model="m", input="weather?")
            msg = claude.messages.create(model="claude-test", max_tokens=10,
                                         messages=[{"role": "user", "content": "weather?"}])
    c = (chat.choices[0].message.tool_calls or [])[0]
    r = next(o for o in resp.output if o.type == "function_call")
    m = next(b for b in msg.content if b.type == "tool_use")
    return [(c.id, c.function.name, c.function.arguments,  # type: ignore[union-attr]
             chat.choices[0].finish_reason),
            (r.call_id, r.name, r.arguments, None),
            (m.id, m.name, m.input, msg.stop_reason)]


def test_json_defects_repaired_end_to_end(gateways: dict[str, Gateway],
                                          fake_provider: FakeProvider) -> None:
    (chat, resp, msg) = json_calls(gateways["on"], fake_provider)
    assert chat[0].startswith("call_") and chat[1:] == ("get_weather", '{"city":"Paris"}',
                                                        "tool_calls")
    assert json.loads(chat[2]) == {"city": "Paris"}
    assert resp[0].startswith("call_") and resp[1] == "get_weather"
    assert json.loads(resp[2]) == {"city": "Paris"}
    assert msg == ("toolu_1", "get_weather", {"city": "Paris"}, "tool_use")
    # without repair the SDKs hand the defects to the application
    (chat, resp, msg) = json_calls(gateways["off"], fake_provider)
    assert chat[0] is None and chat[2] == {"city": "Paris"} and chat[3] == "stop"
    assert resp[0] is None and resp[2] == {"city": "Paris"}
    assert msg[2] == '{"city": "Paris"}' and msg[3] == "end_turn"


def test_json_repairs_in_flow_comment(gateway_factory: GatewayFactory, tmp_path: Path,
                                      fake_provider: FakeProvider) -> None:
    flow_file = tmp_path / "flows.mitm"
    gw = gateway_factory(extra_args=["-w", str(flow_file)])
    try:
        json_calls(gw, fake_provider)
    finally:
        gw.stop()
    flows = {f.request.path: f for f in read_flows(flow_file)}
    expected = {
        "/v1/chat/completions": ("chat_completions", CHAT_JSON),
        "/v1/responses": ("responses", RESPONSES_JSON),
        "/v1/messages": ("messages", MESSAGES_JSON),
    }
    assert sorted(flows) == sorted(expected)
    for path, (endpoint, body) in expected.items():
        fixed, repairs = repair_json_response(endpoint, json.dumps(body).encode(), None)
        flow = flows[path]
        assert flow.metadata[flowmeta.REPAIRS] == dict(repairs)
        assert comment_line(dict(repairs)) in (flow.comment or "").splitlines()
        assert flow.response is not None and flow.response.content == fixed  # what the client got
