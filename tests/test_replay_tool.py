"""scripts/replay: a recording served as a local upstream, over plain HTTP and TLS."""

from __future__ import annotations

import gzip
import ipaddress
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llmitm import flowmeta
from llmitm.redact import redacted
from tests.replay_fixture import REPLAY, make_flow, replay_server, run_replay, write_flows

__all__ = ["replay_server"]  # the fixture, used by name below

SECRET = "sk-live-0123456789abcdefXYZ"
CHAT = b'{"id":"chatcmpl-1","choices":[{"message":{"role":"assistant","content":"hi"}}]}'
FRAMES = [
    b'data: {"id":"c1","choices":[{"delta":{"content":"a"}}]}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"b"}}]}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"c"}}]}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"d"}}]}\n\n',
    b"data: [DONE]\n\n",
]
SSE_HEADERS = (("content-type", "text/event-stream"), ("transfer-encoding", "chunked"))


def client(port: int, **kw: object) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10, **kw)


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    stream_body = b"".join(FRAMES)
    timing = [[0.1 * i, len(f)] for i, f in enumerate(FRAMES)]
    flows = [
        make_flow(
            "POST",
            "http://api.example.test/v1/chat/completions",
            b'{"model":"m","n":1}',
            response_body=CHAT,
        ),
        make_flow(
            "POST",
            "http://api.example.test/v1/chat/completions",
            b'{"model":"m","stream":true}',
            response_body=stream_body,
            response_headers=SSE_HEADERS,
            metadata={flowmeta.STREAM_TIMING: timing},
        ),
        # A recording whose request body held a secret (redacted by the recorder).
        make_flow(
            "POST",
            "http://api.example.test/v1/responses",
            b'{"input":"use key ' + redacted(SECRET).encode() + b' please"}',
            response_body=b'{"id":"resp-redacted"}',
        ),
        make_flow(
            "GET",
            f"http://api.example.test/v1/models?key={redacted(SECRET)}&x=1",
            response_body=b'{"data":[]}',
        ),
        # SSE without timing: served frame by frame with --frame-gap.
        make_flow(
            "POST",
            "http://api.example.test/v1/untimed",
            b"{}",
            response_body=stream_body,
            response_headers=SSE_HEADERS,
        ),
    ]
    return write_flows(tmp_path / "rec.mitm", flows)


HOST = {"Host": "api.example.test"}


def test_json_body_identical_then_miss(replay_server, recording: Path) -> None:
    port = replay_server(recording)
    with client(port) as c:
        r = c.post("/v1/chat/completions", content=b'{"model":"m","n":1}', headers=HOST)
        assert r.status_code == 200
        assert r.content == CHAT
        # Served once (mitmproxy's default): the same request again is a miss.
        again = c.post("/v1/chat/completions", content=b'{"model":"m","n":1}', headers=HOST)
        assert again.status_code == 404
        err = again.json()["error"]
        assert err["type"] == "replay_miss"
        assert "no recorded flow matches" in err["message"]
        # Body and host are part of the key.
        assert c.post("/v1/chat/completions", content=b"{}", headers=HOST).status_code == 404
        other = {"Host": "other.example.test"}
        assert c.get("/v1/models?key=x&x=1", headers=other).status_code == 404


def test_reuse_keeps_serving(replay_server, recording: Path) -> None:
    port = replay_server(recording, reuse=True)
    with client(port) as c:
        for _ in range(3):
            r = c.post("/v1/chat/completions", content=b'{"model":"m","n":1}', headers=HOST)
            assert r.content == CHAT


def _stream(c: httpx.Client, path: str, body: bytes) -> tuple[bytes, list[float]]:
    arrivals: list[float] = []
    data = b""
    start = time.monotonic()
    with c.stream("POST", path, content=body, headers=HOST) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        for chunk in r.iter_raw():
            data += chunk
            arrivals.append(time.monotonic() - start)
    return data, arrivals


def test_sse_streamed_with_recorded_pacing(replay_server, recording: Path) -> None:
    port = replay_server(recording)
    with client(port) as c:
        data, arrivals = _stream(c, "/v1/chat/completions", b'{"model":"m","stream":true}')
    assert data == b"".join(FRAMES)
    assert len(arrivals) >= 3
    # Frames were recorded 100 ms apart: 400 ms from first to last, not all at once.
    assert arrivals[-1] - arrivals[0] >= 0.3, arrivals
    assert arrivals[0] < 0.2, arrivals


def test_speed_zero_sends_at_once_and_untimed_sse_uses_frame_gap(replay_server, recording: Path) -> None:
    port = replay_server(recording, speed=0, frame_gap=0.5)
    with client(port) as c:
        data, arrivals = _stream(c, "/v1/chat/completions", b'{"model":"m","stream":true}')
        assert data == b"".join(FRAMES)
        assert arrivals[-1] < 0.3, arrivals
    port = replay_server(recording, frame_gap=0.1)
    with client(port) as c:
        data, arrivals = _stream(c, "/v1/untimed", b"{}")
        assert data == b"".join(FRAMES)
        assert arrivals[-1] - arrivals[0] >= 0.3, arrivals


def test_redacted_recording_matches_live_secret_without_config(replay_server, recording: Path) -> None:
    port = replay_server(recording)
    with client(port) as c:
        live = b'{"input":"use key ' + SECRET.encode() + b' please"}'
        r = c.post("/v1/responses", content=live, headers=HOST)
        assert r.status_code == 200, r.text
        assert r.content == b'{"id":"resp-redacted"}'
        r = c.get(f"/v1/models?key={SECRET}&x=1", headers=HOST)
        assert r.status_code == 200, r.text
        # Another value in the secret's place does not match its digest.
        r = c.get("/v1/models?key=sk-live-somebody-elses-key&x=1", headers=HOST)
        assert r.status_code == 404
        assert SECRET not in r.text


def test_redacted_recording_matches_with_config(
    replay_server, recording: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "sessions:\n  team-a:\n    headers:\n      api.example.test:\n"
        "        Authorization: Bearer ${REPLAY_TEST_KEY}\n"
    )
    monkeypatch.setenv("REPLAY_TEST_KEY", SECRET)
    port = replay_server(recording, config=cfg)
    with client(port) as c:
        live = b'{"input":"use key ' + SECRET.encode() + b' please"}'
        r = c.post("/v1/responses", content=live, headers=HOST)
        assert r.status_code == 200, r.text
        miss = c.post("/v1/nothing-here", content=SECRET.encode(), headers=HOST)
        assert miss.status_code == 404


def test_compress_gzips_unencoded_bodies(replay_server, recording: Path) -> None:
    port = replay_server(recording, compress=True, speed=0)
    with client(port) as c:
        r = c.post(
            "/v1/chat/completions",
            content=b'{"model":"m","n":1}',
            headers={**HOST, "Accept-Encoding": "gzip"},
        )
        assert r.headers["content-encoding"] == "gzip"
        assert r.content == CHAT  # httpx decoded it
        data = b""
        with c.stream(
            "POST",
            "/v1/chat/completions",
            content=b'{"model":"m","stream":true}',
            headers={**HOST, "Accept-Encoding": "gzip"},
        ) as s:
            assert s.headers["content-encoding"] == "gzip"
            for chunk in s.iter_raw():
                data += chunk
        assert gzip.decompress(data) == b"".join(FRAMES)


def test_recorded_content_encoding_is_served_as_is(replay_server, tmp_path: Path) -> None:
    packed = gzip.compress(CHAT)
    path = write_flows(
        tmp_path / "gz.mitm",
        [
            make_flow(
                "GET",
                "http://api.example.test/v1/x",
                response_body=packed,
                response_headers=(("content-type", "application/json"), ("content-encoding", "gzip")),
            )
        ],
    )
    port = replay_server(path, compress=True)
    with client(port) as c:
        r = c.get("/v1/x", headers={**HOST, "Accept-Encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        assert r.content == CHAT


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from mitmproxy.certs import CertStore

    store = CertStore.from_store(directory, "replay-test", 2048)
    sans: list[x509.GeneralName] = [
        x509.DNSName("api.openai.com"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    entry = store.get_cert("api.openai.com", sans)
    ca, cert, key = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.write_bytes(store.default_ca.to_pem())
    cert.write_bytes(entry.cert.to_pem())
    key.write_bytes(
        entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return ca, cert, key


def test_tls_and_no_listener_left_behind(tmp_path: Path) -> None:
    ca, cert, key = _make_certs(tmp_path / "certs")
    path = write_flows(
        tmp_path / "tls.mitm",
        [
            make_flow("POST", "https://api.openai.com/v1/chat/completions", b'{"a":1}', response_body=CHAT),
        ],
    )
    ctx = ssl.create_default_context(cafile=str(ca))
    with run_replay(path, certfile=cert, keyfile=key) as server:
        port = server.port
        with httpx.Client(verify=ctx, trust_env=False, timeout=10) as c:
            r = c.post(
                f"https://127.0.0.1:{port}/v1/chat/completions",
                content=b'{"a":1}',
                headers={"Host": "api.openai.com"},
            )
            assert r.status_code == 200, server.log()
            assert r.content == CHAT
    assert server.proc.returncode is not None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_unreadable_input_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mitm"
    bad.write_bytes(b"this is not a flow file at all")
    for target in (bad, tmp_path / "missing.mitm"):
        proc = subprocess.run([str(REPLAY), str(target)], capture_output=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert json.dumps({"ready": True}).encode()[:10] not in proc.stdout


def test_upstream_original_served_only_on_request(replay_server, tmp_path: Path) -> None:
    from llmitm.recording import UPSTREAM_ORIGINAL_BODY, UPSTREAM_ORIGINAL_TIMING

    repaired, original = b"data: fixed\n\n", b"data: brok\n\nen\n\n"
    path = write_flows(tmp_path / "repaired.mitm", [make_flow(
        "POST", "http://api.example.test/v1/chat/completions", b'{"stream":true}',
        response_body=repaired, response_headers=SSE_HEADERS,
        metadata={flowmeta.STREAM_TIMING: [[0.0, len(repaired)]], flowmeta.UPSTREAM_ORIGINAL: True,
                  UPSTREAM_ORIGINAL_BODY: original, UPSTREAM_ORIGINAL_TIMING: [[0.0, 12], [0.05, 6]]},
    )])
    for flags, want in (({}, repaired), ({"upstream_original": True}, original)):
        with client(replay_server(path, **flags)) as c:
            r = c.post("/v1/chat/completions", content=b'{"stream":true}',
                       headers={"host": "api.example.test"})
            assert r.content == want
