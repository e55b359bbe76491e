"""scripts/leakscan: offline leak findings for recordings, with and without the config."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from mitmproxy import http

from llmitm import flowmeta
from llmitm.leaks import Finding
from llmitm.redact import redacted
from tests.replay_fixture import REPO, make_flow, write_flows

LEAKSCAN = REPO / "scripts" / "leakscan"
KEY = "sk-proj-leakscan-0123456789abcdef"
AUTH = f"Bearer {KEY}"
CONFIG = (
    "sessions:\n"
    "  team-a:\n"
    "    token: ${LEAKSCAN_TEAM_A_TOKEN}\n"
    "    headers:\n"
    "      api.openai.com:\n"
    "        Authorization: Bearer ${LEAKSCAN_OPENAI_KEY}\n"
    "  team-b:\n"
    "    headers:\n"
    "      api.anthropic.com/v1/*:\n"
    "        x-api-key: ${LEAKSCAN_ANTHROPIC_KEY:-sk-ant-leakscan-default-key}\n"
)
ENV = {"LEAKSCAN_OPENAI_KEY": KEY, "LEAKSCAN_TEAM_A_TOKEN": "team-a-proxy-token-123"}


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV}
    return subprocess.run(
        [str(LEAKSCAN), *map(str, args)], capture_output=True, text=True, timeout=60, env=env
    )


def injected(session: str, scope: str | None = None) -> list[dict[str, str]]:
    entry = {"name": "Authorization", "origin": f"sessions.{session}.headers"}
    if scope:
        entry["scope"] = scope
    return [entry]


def openai_flow(
    session: str,
    host: str = "api.openai.com",
    *,
    body: bytes = b"{}",
    inject: bool = True,
    scope: str | None = "api.openai.com",
    path: str = "/v1/x",
    extra_meta: dict[str, object] | None = None,
) -> http.HTTPFlow:
    meta: dict[str, object] = {flowmeta.SESSION: session}
    if inject:
        meta[flowmeta.INJECTED] = injected(session, scope)
    meta.update(extra_meta or {})
    return make_flow(
        "POST",
        f"https://{host}{path}",
        body,
        request_headers=[("Authorization", redacted(AUTH)), ("content-type", "application/json")],
        metadata=meta,
    )


def config_file(tmp_path: Path) -> Path:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(CONFIG)
    return cfg


def assert_clean_output(proc: subprocess.CompletedProcess[str]) -> None:
    for text in (proc.stdout, proc.stderr):
        assert KEY not in text
        assert "team-a-proxy-token-123" not in text


def test_clean_recording_exits_0(tmp_path: Path) -> None:
    path = write_flows(tmp_path / "clean.mitm", [openai_flow("team-a"), openai_flow("team-a")])
    for args in ((path,), (path, "--config", config_file(tmp_path))):
        proc = run(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout == ""
        assert "0 finding(s) in 2 flow(s)" in proc.stderr


def test_leaks_found_with_config(tmp_path: Path) -> None:
    flows = [
        openai_flow("team-a"),
        # The key in the body of a telemetry request (recorder redacted the bare key).
        openai_flow(
            "team-a",
            "telemetry.example.test",
            inject=False,
            body=b'{"event":"x","key":"' + redacted(KEY).encode() + b'"}',
        ),
        # team-a's header in team-b's flow.
        openai_flow("team-b", inject=False),
    ]
    path = write_flows(tmp_path / "leaky.mitm", flows)
    proc = run(path, "--config", config_file(tmp_path), "--json")
    assert proc.returncode == 1, proc.stderr
    found = [json.loads(line) for line in proc.stdout.splitlines()]
    kinds = sorted((f["session"], f["kind"], f["where"]) for f in found)
    assert kinds == [
        ("team-a", "in_body", "body"),
        ("team-a", "out_of_scope_host", "Authorization"),
        ("team-b", "other_session", "Authorization"),
    ]
    for f in found:
        assert f["origin"] == "sessions.team-a.headers.api.openai.com.Authorization"
        assert f["secret"] in (redacted(AUTH), redacted(KEY))
    assert_clean_output(proc)
    text = run(path, "--config", config_file(tmp_path))
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert len(lines) == 3
    assert any(" team-b POST https://api.openai.com/v1/x other_session " in ln for ln in lines)
    assert_clean_output(text)


def test_leaks_found_without_config(tmp_path: Path) -> None:
    guard = Finding(
        "out_of_scope_host", "x-api-key", "sessions.team-b.headers", redacted("k"), "the guard saw it live"
    )
    flows = [
        openai_flow("team-a", scope=None),  # teaches: this marker is team-a's
        openai_flow("team-b", inject=False),  # ... so here it is another session's
        openai_flow("team-a", "chatgpt.com", path="/backend-api/x"),  # injected outside scope
        openai_flow("team-c", "api.openai.com", inject=False, extra_meta={flowmeta.LEAKS: [guard.to_meta()]}),
    ]
    path = write_flows(tmp_path / "noconfig.mitm", flows)
    proc = run(path, "--json")
    assert proc.returncode == 1, proc.stderr
    found = sorted((f["session"], f["kind"], f["where"]) for f in map(json.loads, proc.stdout.splitlines()))
    assert found == [
        ("team-a", "out_of_scope_host", "Authorization"),
        ("team-b", "other_session", "Authorization"),
        ("team-c", "other_session", "Authorization"),
        ("team-c", "out_of_scope_host", "x-api-key"),
    ]


def test_unredacted_recording_with_config(tmp_path: Path) -> None:
    flow = make_flow(
        "GET",
        f"https://telemetry.example.test/collect?k={KEY}",
        request_headers=[("x-debug", AUTH)],
        metadata={flowmeta.SESSION: "team-a"},
    )
    path = write_flows(tmp_path / "raw.mitm", [flow])
    proc = run(path, "--config", config_file(tmp_path))
    assert proc.returncode == 1
    assert " in_url " in proc.stdout and " out_of_scope_host x-debug" in proc.stdout
    assert redacted(KEY) in proc.stdout  # the URL is printed redacted
    assert_clean_output(proc)


def test_unreadable_input_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mitm"
    bad.write_bytes(b"\x00\x01 definitely not tnetstring")
    assert run(bad).returncode == 2
    assert run(tmp_path / "missing.mitm").returncode == 2
    good = write_flows(tmp_path / "ok.mitm", [openai_flow("team-a")])
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("sessions: [unclosed\n")
    proc = run(good, "--config", bad_cfg)
    assert proc.returncode == 2, proc.stderr
    assert run(good, "--config", tmp_path / "missing.yaml").returncode == 2
