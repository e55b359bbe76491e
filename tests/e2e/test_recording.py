"""Recording through a real mitmdump: JSON, streamed and WebSocket flows, redaction, a kill -9
mid-stream, and a recording replayed offline through the whole stack."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve

from llmitm import flowmeta
from llmitm.recording import UPSTREAM_ORIGINAL_BODY, UPSTREAM_ORIGINAL_TIMING
from llmitm.redact import redacted
from tests.conftest import FakeProvider, GatewayFactory
from tests.e2e.recording_support import (
    assert_no_secrets,
    flow_texts,
    read_flows,
    recording_files,
    session_client,
    wait_flows,
)
from tests.harness.certs import CertFiles
from tests.replay_fixture import run_replay

OPENAI_KEY = "sk-proj-rec-A1b2C3d4E5f6G7h8I9j0"
TEAM_TOKEN = "rec-team-token-7f3a9c"
ADMIN_TOKEN = "rec-admin-token-5e8d2b1c"
INTERNAL = "internal-value-4c4f1e0a"
CLIENT_KEY = "sk-client-own-key-0099887766"
# Every secret is in the gateway's environment, so tests/zz_last scans the whole run for it too.
ENV = {"REC_OPENAI_KEY": OPENAI_KEY, "REC_TEAM_TOKEN": TEAM_TOKEN, "REC_ADMIN_TOKEN": ADMIN_TOKEN,
       "REC_INTERNAL_SECRET": INTERNAL, "REC_CLIENT_KEY": CLIENT_KEY}
SECRETS = [OPENAI_KEY, TEAM_TOKEN, ADMIN_TOKEN, INTERNAL, CLIENT_KEY]
CONFIG = """
sessions:
  team-a:
    token: ${REC_TEAM_TOKEN}
    headers:
      api.openai.com:
        Authorization: Bearer ${REC_OPENAI_KEY}
control:
  admin_token: ${REC_ADMIN_TOKEN}
record:
  redact: [X-Internal-Secret]
  max_body: 200000
"""


def test_json_and_streamed_flows_recorded_redacted(gateway_factory: GatewayFactory,
                                                   fake_provider: FakeProvider) -> None:
    gw = gateway_factory(config_text=CONFIG, env=ENV)
    fake_provider.script({"json": {"id": "x", "note": f"the admin token is {ADMIN_TOKEN}"}},
                         {"frame_delay": 0.05, "frames": 6})
    with session_client(gw, "team-a", TEAM_TOKEN) as client:
        plain = client.post(
            f"https://api.openai.com/v1/chat/completions?key={OPENAI_KEY}",
            json={"model": "m", "messages": [{"role": "user", "content": f"my key: {OPENAI_KEY}"}],
                  "user": INTERNAL},
            headers={"X-Internal-Secret": INTERNAL, "Cookie": f"sid={CLIENT_KEY}"},
        )
        assert plain.status_code == 200
        with client.stream("POST", "https://compat.example.test/v1/chat/completions",
                           json={"model": "m", "stream": True},
                           headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as resp:
            streamed = b"".join(resp.iter_raw())
    assert streamed.endswith(b"data: [DONE]\n\n")
    # Upstream got the real values (redaction never touches the live flow).
    sent = fake_provider.requests()
    assert dict(sent[0]["headers"])["authorization"] == f"Bearer {OPENAI_KEY}"
    assert OPENAI_KEY.encode() in __import__("base64").b64decode(sent[0]["body_b64"])

    flows = wait_flows(gw, "team-a", 2)
    files = recording_files(gw, "team-a")
    assert len(files) == 1 and files[0].name.startswith("team-a-20")
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert_no_secrets(files[0].read_bytes(), SECRETS, str(files[0]))
    first, second = flows
    for flow in flows:
        for text in flow_texts(flow):
            assert_no_secrets(text, SECRETS, "a decoded body")
    # JSON flow: injected and always-secret headers whole, secrets inside bodies and URL.
    req = first.request
    assert req.headers["authorization"] == redacted(f"Bearer {OPENAI_KEY}")
    assert req.headers["x-internal-secret"] == redacted(INTERNAL)
    assert req.headers["cookie"] == redacted(f"sid={CLIENT_KEY}")
    assert f"key={redacted(OPENAI_KEY)}" in req.path
    body = json.loads(req.get_content())
    assert body["messages"][0]["content"] == f"my key: {redacted(OPENAI_KEY)}"
    assert body["user"] == redacted(INTERNAL)  # the value of a record.redact header, elsewhere
    assert [x["kind"] for x in first.metadata[flowmeta.LEAKS]] == ["in_url", "in_body"]
    assert first.response is not None
    assert json.loads(first.response.get_content())["note"] == f"the admin token is {redacted(ADMIN_TOKEN)}"
    assert first.metadata[flowmeta.SESSION] == "team-a"
    assert "llmitm: injected Authorization <- session team-a" in first.comment
    # Streamed flow: the body as the client received it, with its timing.
    assert second.response is not None
    assert second.response.raw_content == streamed
    timing = second.metadata[flowmeta.STREAM_TIMING]
    assert sum(n for _, n in timing) == len(streamed)
    assert len(timing) >= 3 and timing[-1][0] >= 0.2  # 6 frames 50 ms apart
    assert second.request.headers["authorization"] == redacted(f"Bearer {CLIENT_KEY}")


# --- WebSocket ----------------------------------------------------------------------------------

@pytest.fixture
def ws_upstream(test_certs: CertFiles) -> Iterator[int]:
    """A TLS WebSocket echo server on 127.0.0.1 (a stand-in for a provider's realtime API)."""
    ready = threading.Event()
    state: dict[str, object] = {}

    async def echo(conn: ServerConnection) -> None:
        async for message in conn:
            await conn.send(f"echo: {message}" if isinstance(message, str) else message[::-1])

    async def main() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(test_certs.server_cert, test_certs.server_key)
        async with serve(echo, "127.0.0.1", 0, ssl=ctx, compression=None) as server:
            state["port"] = next(iter(server.sockets)).getsockname()[1]
            state["stop"] = asyncio.get_running_loop().create_future()
            state["loop"] = asyncio.get_running_loop()
            ready.set()
            await state["stop"]  # type: ignore[misc]

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield int(state["port"])  # type: ignore[call-overload]
    loop: asyncio.AbstractEventLoop = state["loop"]  # type: ignore[assignment]
    loop.call_soon_threadsafe(state["stop"].set_result, None)  # type: ignore[attr-defined]
    thread.join(10)


def test_websocket_flow_recorded(gateway_factory: GatewayFactory, ws_upstream: int) -> None:
    gw = gateway_factory(config_text=CONFIG, env=ENV,
                         extra_args=["--set", f"llmitm_resolve=api.openai.com:443=127.0.0.1:{ws_upstream}"])

    async def talk() -> list[str | bytes]:
        ctx = ssl.create_default_context(cafile=str(gw.bundle()))
        got: list[str | bytes] = []
        async with ws_connect("wss://api.openai.com/v1/realtime?model=m", ssl=ctx, compression=None,
                              proxy=f"http://team-a:{TEAM_TOKEN}@127.0.0.1:{gw.port}") as conn:
            for message in ("hello", f"my key is {OPENAI_KEY}", b"\x00\x01binary"):
                await conn.send(message)
                got.append(await conn.recv())
        return got

    got = asyncio.run(talk())
    assert got == ["echo: hello", f"echo: my key is {OPENAI_KEY}", b"yranib\x01\x00"]
    (flow,) = wait_flows(gw, "team-a", 1)
    assert flow.websocket is not None
    contents = [(m.from_client, m.content) for m in flow.websocket.messages]
    assert contents == [
        (True, b"hello"), (False, b"echo: hello"),
        (True, f"my key is {redacted(OPENAI_KEY)}".encode()),
        (False, f"echo: my key is {redacted(OPENAI_KEY)}".encode()),
        (True, b"\x00\x01binary"), (False, b"yranib\x01\x00"),
    ]
    assert flow.request.headers["authorization"] == redacted(f"Bearer {OPENAI_KEY}")
    assert flow.response is not None and flow.response.status_code == 101
    # The guard saw the key leave in a client message (mark mode: it still went upstream).
    leaks = flow.metadata[flowmeta.LEAKS]
    assert [(x["kind"], x["where"]) for x in leaks] == [("in_body", "websocket")]
    assert flow.marked
    assert_no_secrets(recording_files(gw, "team-a")[0].read_bytes(), SECRETS, "the recording")


# --- kill -9 ------------------------------------------------------------------------------------

def test_kill9_mid_stream_keeps_earlier_flows(gateway_factory: GatewayFactory,
                                              fake_provider: FakeProvider) -> None:
    gw = gateway_factory(config_text=CONFIG, env=ENV)
    fake_provider.script({"json": {"n": 1}}, {"json": {"n": 2}}, {"frame_delay": 0.3, "frames": 30})
    with session_client(gw, "team-a", TEAM_TOKEN) as client:
        for _ in range(2):
            assert client.post("https://api.openai.com/v1/chat/completions", json={"model": "m"}).is_success
        wait_flows(gw, "team-a", 2)
        with client.stream("POST", "https://api.openai.com/v1/chat/completions",
                           json={"model": "m", "stream": True}) as resp:
            chunks = resp.iter_raw()
            assert next(chunks)  # the stream is under way
            assert gw.proc is not None
            gw.proc.kill9()
            with pytest.raises(Exception):  # noqa: B017 (the connection breaks; how is the client's business)
                for _ in chunks:
                    pass
    (path,) = recording_files(gw, "team-a")
    flows = read_flows(path)  # raises if the file were unreadable
    assert [json.loads(f.response.get_content())["n"] for f in flows if f.response] == [1, 2]


# --- offline replay through the whole stack -----------------------------------------------------

def test_recording_replays_offline_with_timing(gateway_factory: GatewayFactory,
                                               fake_provider: FakeProvider, test_certs: CertFiles) -> None:
    gw = gateway_factory(config_text=CONFIG, env=ENV)
    fake_provider.script({"frame_delay": 0.15, "frames": 6})
    request = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "replay me"}]}
    with session_client(gw, "team-a", TEAM_TOKEN) as client, client.stream(
            "POST", "https://api.openai.com/v1/chat/completions", json=request) as resp:
        live = b"".join(resp.iter_raw())
    (recorded,) = wait_flows(gw, "team-a", 1)
    assert recorded.metadata[flowmeta.STREAM_TIMING][-1][0] >= 0.6
    (path,) = recording_files(gw, "team-a")
    gw.stop()
    fake_provider.clear()

    with run_replay(path, certfile=test_certs.server_cert, keyfile=test_certs.server_key) as replay:
        offline = gateway_factory(config_text=CONFIG, env=ENV, extra_args=[
            "--set", f"llmitm_resolve=api.openai.com:443=127.0.0.1:{replay.port}"])
        arrivals: list[float] = []
        with session_client(offline, "team-a", TEAM_TOKEN) as client, client.stream(
                "POST", "https://api.openai.com/v1/chat/completions", json=request) as resp:
            assert resp.status_code == 200, resp.read()
            start = time.monotonic()
            body = b""
            for chunk in resp.iter_raw():
                arrivals.append(time.monotonic() - start)
                body += chunk
    assert body == live
    assert not [r for r in fake_provider.requests() if not r["path"].startswith("/_fake")]
    # Six frames 150 ms apart: the replay keeps the pacing (not one burst).
    assert arrivals[-1] - arrivals[0] > 0.5, arrivals
    assert len(arrivals) >= 4


def test_recording_off_and_relative_dir(gateway_factory: GatewayFactory, fake_provider: FakeProvider,
                                        tmp_path: Path) -> None:
    off = gateway_factory(config_text="record:\n  dir: null\n")
    with session_client(off) as client:
        assert client.get("https://api.openai.com/v1/models").status_code == 200
    time.sleep(0.3)
    assert not (off.workdir / "recordings").exists()
    elsewhere = gateway_factory(config_text="record:\n  dir: traces/today\n")
    with session_client(elsewhere) as client:
        assert client.get("https://api.openai.com/v1/models").status_code == 200
    deadline = time.monotonic() + 10
    while not list((elsewhere.workdir / "traces" / "today").glob("default-*.mitm")):
        assert time.monotonic() < deadline
        time.sleep(0.05)


# --- a repaired stream keeps the upstream original ------------------------------------------------

DEFECT = Path(__file__).resolve().parents[1] / "data" / "defects" / "c01-chat-missing-index"


def test_repaired_stream_keeps_upstream_original(gateway_factory: GatewayFactory,
                                                 fake_provider: FakeProvider) -> None:
    gw = gateway_factory(config_text=CONFIG, env=ENV)
    upstream = DEFECT.with_suffix(".sse").read_bytes()
    request = json.loads(DEFECT.with_suffix(".request.json").read_text())
    fake_provider.script({"sse_file": str(DEFECT.with_suffix(".sse")), "frame_delay": 0.01})
    with session_client(gw, "team-a", TEAM_TOKEN) as client, client.stream(
            "POST", "https://api.openai.com/v1/chat/completions", json=request) as resp:
        received = b"".join(resp.iter_raw())
    assert received != upstream  # the repair changed the stream
    (flow,) = wait_flows(gw, "team-a", 1)
    assert flow.response is not None and flow.response.raw_content == received
    assert flow.metadata[flowmeta.REPAIRS]
    assert flow.metadata[flowmeta.UPSTREAM_ORIGINAL] is True
    assert flow.metadata[UPSTREAM_ORIGINAL_BODY] == upstream
    assert sum(n for _, n in flow.metadata[UPSTREAM_ORIGINAL_TIMING]) == len(upstream)
    (path,) = recording_files(gw, "team-a")
    for flags, want in (({}, received), ({"upstream_original": True}, upstream)):
        with run_replay(path, scheme="https", speed=0, **flags) as replay, httpx.Client(
                base_url=f"http://127.0.0.1:{replay.port}", trust_env=False, timeout=10) as direct:
            served = direct.post("/v1/chat/completions", content=flow.request.get_content(),
                                 headers={"host": "api.openai.com"})
            assert served.content == want, replay.log()
