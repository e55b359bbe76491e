"""The leak guard through a real mitmdump: a session's key sent to a telemetry host (and to
another provider host), a key in a query string, one session's header on another session's
flow; marked (and still sent) or blocked (403, nothing upstream); leakscan on the recording."""

from __future__ import annotations

import json
import subprocess
from typing import Literal

import pytest

from llmitm import flowmeta
from llmitm.redact import redacted
from tests.conftest import FakeProvider, GatewayFactory
from tests.e2e.recording_support import assert_no_secrets, recording_files, session_client, wait_flows
from tests.harness.gateway import Gateway
from tests.replay_fixture import REPO

KEY_A = "sk-proj-guard-A0b1C2d3E4f5G6h7"
KEY_B = "sk-ant-guard-B9y8X7w6V5u4T3s2"
TOKEN_A = "guard-token-a-31d7"
TOKEN_B = "guard-token-b-82c4"
ENV = {"GUARD_KEY_A": KEY_A, "GUARD_KEY_B": KEY_B, "GUARD_TOKEN_A": TOKEN_A, "GUARD_TOKEN_B": TOKEN_B}
SECRETS = [KEY_A, KEY_B, TOKEN_A, TOKEN_B]


def config(action: str) -> str:
    return f"""
sessions:
  team-a:
    token: ${{GUARD_TOKEN_A}}
    headers:
      api.openai.com:
        Authorization: Bearer ${{GUARD_KEY_A}}
  team-b:
    token: ${{GUARD_TOKEN_B}}
    headers:
      api.anthropic.com/v1/*:
        x-api-key: ${{GUARD_KEY_B}}
guard:
  action: {action}
"""


# (session, method, url, headers, expected kind, where)
CASES = [
    ("team-a", "POST", "https://telemetry.example.test/v1/events",
     {"Authorization": f"Bearer {KEY_A}"}, "out_of_scope_host", "Authorization"),
    ("team-a", "POST", "https://compat.example.test/v1/chat/completions",
     {"Authorization": f"Bearer {KEY_A}"}, "out_of_scope_host", "Authorization"),
    ("team-a", "GET", f"https://api.openai.com/v1/models?key={KEY_A}", {}, "in_url", "url"),
    ("team-b", "POST", "https://api.openai.com/v1/chat/completions",
     {"Authorization": f"Bearer {KEY_A}"}, "other_session", "Authorization"),
]
TOKENS = {"team-a": TOKEN_A, "team-b": TOKEN_B}


def send_cases(gw: Gateway) -> list[tuple[int, bytes]]:
    out = []
    for session, method, url, headers, _, _ in CASES:
        with session_client(gw, session, TOKENS[session]) as client:
            body = {"model": "m"} if method == "POST" else None
            resp = client.request(method, url, headers=headers, json=body)
            out.append((resp.status_code, resp.content))
    return out


def provider_requests(fake: FakeProvider) -> list[dict]:
    return [r for r in fake.requests() if not r["path"].startswith("/_fake")]


@pytest.mark.parametrize("action", ["mark", "block"])
def test_guard_marks_or_blocks_the_leaks(gateway_factory: GatewayFactory, fake_provider: FakeProvider,
                                         action: Literal["mark", "block"]) -> None:
    gw = gateway_factory(config_text=config(action), env=ENV)
    # A clean request first: the injected key in its own scope is no finding.
    with session_client(gw, "team-a", TOKEN_A) as client:
        assert client.post("https://api.openai.com/v1/chat/completions", json={"model": "m"}).is_success
    results = send_cases(gw)
    sent = provider_requests(fake_provider)
    if action == "mark":
        assert [status for status, _ in results] == [200] * len(CASES)
        assert len(sent) == 1 + len(CASES)  # marked, and still sent
    else:
        for status, body in results:
            assert status == 403
            error = json.loads(body)["error"]
            assert error["code"] == "llmitm_leak_blocked" or error.get("type") == "llmitm_leak_blocked"
            assert "Nothing was sent upstream" in error["message"]
            assert_no_secrets(body, SECRETS, "the 403 body")
        assert len(sent) == 1  # only the clean request went upstream

    flows = wait_flows(gw, "team-a", 4) + wait_flows(gw, "team-b", 1)
    clean, *leaky = flows
    assert not clean.marked and flowmeta.LEAKS not in clean.metadata
    for flow, (session, _, _, _, kind, where) in zip(leaky, CASES, strict=True):
        assert flow.metadata[flowmeta.SESSION] == session
        assert flow.marked == ":warning:"
        found = [(x["kind"], x["where"]) for x in flow.metadata[flowmeta.LEAKS]]
        assert (kind, where) in found, found
        assert f"llmitm: LEAK {kind} in {where}" in flow.comment
        assert ("guard blocked" in flow.comment) == (action == "block")
    # The query-string key was scrubbed from the live flow too (mitmweb, the flow log).
    assert f"key={redacted(KEY_A)}" in leaky[2].request.path
    log = gw.proc.output if gw.proc else ""
    assert log.count("llmitm guard: session") == len(CASES), log
    assert_no_secrets(log, SECRETS, "the gateway log")
    for path in recording_files(gw):
        assert_no_secrets(path.read_bytes(), SECRETS, str(path))


def test_leakscan_reports_the_recorded_leaks(gateway_factory: GatewayFactory,
                                             fake_provider: FakeProvider) -> None:
    gw = gateway_factory(config_text=config("mark"), env=ENV)
    send_cases(gw)
    wait_flows(gw, "team-a", 3)
    wait_flows(gw, "team-b", 1)
    leakscan = str(REPO / "scripts" / "leakscan")
    env = {**(gw.env or {}), **ENV}
    for path in recording_files(gw):
        for extra in ([], ["--config", str(gw.config_path)]):
            proc = subprocess.run([leakscan, str(path), "--json", *extra], capture_output=True,
                                  text=True, timeout=60, env=env)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            kinds = {json.loads(line)["kind"] for line in proc.stdout.splitlines()}
            assert kinds & {"out_of_scope_host", "in_url", "other_session"}
            assert_no_secrets(proc.stdout + proc.stderr, SECRETS, "leakscan's output")
