"""``limits.concurrency`` end to end: a real mitmdump, real clients, the fake provider's own
record of when each request arrived and when its last byte left."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import openai

from tests.conftest import FakeProvider, GatewayFactory
from tests.harness.gateway import Gateway

SLOW = {"x-fake-frames": "5", "x-fake-frame-delay": "0.1"}  # a stream of ~0.4 s


def max_overlap(records: list[dict[str, Any]]) -> int:
    """Most requests the upstream was serving at once (arrival to last byte sent)."""
    events = []
    for r in records:
        events += [(r["received_at"], 1), (r["last_sent_at"] - 0.005, -1)]
    events.sort(key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def provider_records(fake: FakeProvider, host: str) -> list[dict[str, Any]]:
    return [r for r in fake.requests() if r["host"] == host]


BUNDLES: dict[int, str] = {}


def client(gw: Gateway, timeout: float = 30) -> httpx.Client:
    if gw.port not in BUNDLES:  # written once: threads must not rewrite it under each other
        BUNDLES[gw.port] = str(gw.bundle())
    return httpx.Client(proxy=gw.url, verify=BUNDLES[gw.port], trust_env=False, timeout=timeout)


def stream_through(gw: Gateway, host: str, headers: dict[str, str]) -> tuple[int, bytes]:
    with client(gw) as c, \
            c.stream("POST", f"https://{host}/v1/chat/completions",
                     json={"model": "m", "stream": True}, headers=headers) as resp:
        return resp.status_code, b"".join(resp.iter_raw())


def test_requests_beyond_the_limit_wait_and_streams_hold_their_slot(
        gateway_factory: GatewayFactory, fake_provider: FakeProvider) -> None:
    gw = gateway_factory(config_text="limits:\n  concurrency:\n    'api.openai.*': 2\n"
                                     "  queue_timeout: 20\n")
    client(gw).close()
    with ThreadPoolExecutor(10) as pool:
        limited = [pool.submit(stream_through, gw, "api.openai.com", SLOW) for _ in range(6)]
        free = [pool.submit(stream_through, gw, "api.anthropic.com", SLOW) for _ in range(4)]
        results = [f.result() for f in limited + free]
    assert all(status == 200 and body.endswith(b"[DONE]\n\n") for status, body in results[:6])
    assert all(status == 200 for status, _ in results[6:])
    openai_records = provider_records(fake_provider, "api.openai.com")
    assert len(openai_records) == 6
    # never more than 2 in flight upstream, counting until each stream's last byte
    assert max_overlap(openai_records) == 2
    # another host is not limited
    assert max_overlap(provider_records(fake_provider, "api.anthropic.com")) >= 3


def test_queue_timeout_answers_503_in_the_provider_shape(gateway_factory: GatewayFactory,
                                                         fake_provider: FakeProvider,
                                                         client_env) -> None:
    config = ("limits:\n  concurrency:\n    api.openai.com: 1\n    API.ANTHROPIC.COM: 1\n"
              "  queue_timeout: 0.5\n")
    gw = gateway_factory(config_text=config)
    client_env(gw)
    client(gw).close()
    long = {"x-fake-frames": "12", "x-fake-frame-delay": "0.25"}  # ~2.75 s
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(stream_through, gw, "api.openai.com", long)
        first_claude = pool.submit(stream_through, gw, "api.anthropic.com", long)
        time.sleep(0.4)
        started = time.monotonic()
        try:
            openai.OpenAI(api_key="sk", max_retries=0).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}])
        except openai.InternalServerError as err:
            error = err
        waited = time.monotonic() - started
        try:
            anthropic.Anthropic(api_key="k", max_retries=0).messages.create(
                model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        except anthropic.APIStatusError as err:
            claude_error = err
        assert first.result()[0] == 200 and first_claude.result()[0] == 200
    assert error.status_code == 503 and error.response.headers["retry-after"] == "1"
    assert error.body["code"] == "concurrency_queue_timeout"
    assert "limits.concurrency 'api.openai.com' allows 1" in error.body["message"]
    assert 0.4 < waited < 15  # it queued for the timeout; the upper bound only catches a hang
    assert claude_error.status_code == 503
    body = claude_error.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    # the rejected requests never went upstream
    assert len(provider_records(fake_provider, "api.openai.com")) == 1
    assert len(provider_records(fake_provider, "api.anthropic.com")) == 1

    # a reload raises the limit for the next requests
    gw.config_path.write_text(config.replace("api.openai.com: 1", "api.openai.com: 3"))
    assert gw.proc is not None
    gw.proc.wait_for(lambda s: "configuration reloaded" in s, timeout=10)
    with ThreadPoolExecutor(3) as pool:
        three = [pool.submit(stream_through, gw, "api.openai.com", SLOW) for _ in range(3)]
        assert [f.result()[0] for f in three] == [200, 200, 200]
    assert max_overlap(provider_records(fake_provider, "api.openai.com")[1:]) == 3


def test_aborted_and_failed_flows_release_their_slot(gateway_factory: GatewayFactory,
                                                     fake_provider: FakeProvider) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    gw = gateway_factory(
        config_text="limits:\n  concurrency:\n    '*.example.test': 1\n    api.openai.com: 1\n"
                    "  queue_timeout: 1.5\n",
        extra_args=["--set", f"llmitm_resolve=dead.example.test:443=127.0.0.1:{dead}"])
    # a client that goes away in the middle of a long stream
    with client(gw) as c:
        with c.stream("POST", "https://api.openai.com/v1/chat/completions",
                      json={"model": "m", "stream": True},
                      headers={"x-fake-frames": "40", "x-fake-frame-delay": "0.25"}) as resp:
            next(resp.iter_raw())
    # (the upstream keeps sending for ~10 s; only a released slot lets the next one in now)
    for _ in range(3):
        status, body = stream_through(gw, "api.openai.com", {"x-fake-frames": "2"})
        assert status == 200 and body.endswith(b"[DONE]\n\n")
    # requests the gateway answers itself (502: the upstream is unreachable) release theirs too
    for _ in range(3):
        with client(gw, 10) as c:
            assert c.post("https://dead.example.test/v1/chat/completions", json={}).status_code == 502
    with client(gw, 10) as c:
        assert c.get("https://telemetry.example.test/ping").status_code == 200
