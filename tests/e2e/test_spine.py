"""The gateway spine end to end: real mitmdump, real TLS both sides, real clients."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import anthropic
import httpx
import openai
import pytest

from tests.conftest import FakeProvider, GatewayFactory
from tests.harness.gateway import Gateway


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provider_requests(fake: FakeProvider) -> list[dict]:
    return [r for r in fake.requests() if not r["path"].startswith("/_fake")]


# --- every client, non-streamed and streamed ---------------------------------------------------

def test_openai_sdk_chat_json_and_stream(shared_gateway: Gateway, fake_provider: FakeProvider,
                                         client_env) -> None:
    client_env(shared_gateway)
    client = openai.OpenAI(api_key="sk-test", max_retries=0)
    reply = client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "w0 w1 w2 w3 w4 "
    chunks = list(client.chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "w0 w1 w2 w3 w4 "
    seen = provider_requests(fake_provider)
    assert [r["host"] for r in seen] == ["api.openai.com", "api.openai.com"]
    assert json.loads(__import__("base64").b64decode(seen[1]["body_b64"]))["stream"] is True


def test_openai_sdk_responses_json_and_stream(shared_gateway: Gateway, fake_provider: FakeProvider,
                                              client_env) -> None:
    client_env(shared_gateway)
    client = openai.OpenAI(api_key="sk-test", max_retries=0)
    assert client.responses.create(model="gpt-x", input="hi").output_text == "w0 w1 w2 w3 w4 "
    with client.responses.stream(model="gpt-x", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == "w0 w1 w2 w3 w4 "


def test_anthropic_sdk_messages_json_and_stream(shared_gateway: Gateway,
                                                fake_provider: FakeProvider, client_env) -> None:
    client_env(shared_gateway)
    client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0)
    msg = client.messages.create(model="claude-x", max_tokens=10,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "w0 w1 w2 w3 w4 "
    with client.messages.stream(model="claude-x", max_tokens=10,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
    assert text == "w0 w1 w2 w3 w4 "
    assert {r["host"] for r in provider_requests(fake_provider)} == {"api.anthropic.com"}


def test_httpx_json_and_stream(shared_gateway: Gateway, fake_provider: FakeProvider,
                               client_env) -> None:
    client_env(shared_gateway)
    with httpx.Client(timeout=10) as client:  # proxy and CA from the environment
        r = client.post("https://api.openai.com/v1/chat/completions", json={"model": "m"})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        with client.stream("POST", "https://api.openai.com/v1/chat/completions",
                           json={"model": "m", "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-accel-buffering"] == "no"
            body = b"".join(resp.iter_raw())
    assert body.endswith(b"data: [DONE]\n\n")


def test_curl_json_and_stream(shared_gateway: Gateway, fake_provider: FakeProvider) -> None:
    env = shared_gateway.client_env()
    base = ["curl", "-sS", "--max-time", "20", "-H", "content-type: application/json"]
    plain = subprocess.run([*base, "https://api.openai.com/v1/chat/completions",
                            "-d", '{"model":"m"}'], env=env, capture_output=True, check=True)
    assert json.loads(plain.stdout)["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4 "
    streamed = subprocess.run([*base, "-N", "https://api.anthropic.com/v1/messages",
                               "-d", '{"model":"c","stream":true}'],
                              env=env, capture_output=True, check=True)
    assert streamed.stdout.count(b"event: content_block_delta") == 5
    assert streamed.stdout.endswith(b'data: {"type":"message_stop"}\n\n')


# --- streams are not held back -------------------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "m", "stream": True}),
    ("/v1/responses", {"model": "m", "stream": True}),
    ("/v1/messages", {"model": "m", "stream": True}),
])
def test_stream_is_incremental(shared_gateway: Gateway, fake_provider: FakeProvider,
                               client_env, path: str, body: dict) -> None:
    client_env(shared_gateway)
    fake_provider.script({"frame_delay": 0.1, "frames": 10})
    host = "api.anthropic.com" if path.endswith("messages") else "api.openai.com"
    with httpx.Client(timeout=20) as client, client.stream(
            "POST", f"https://{host}{path}", json=body) as resp:
        first_at = None
        for _ in resp.iter_raw():
            first_at = first_at or time.time()
    assert first_at is not None
    sent = provider_requests(fake_provider)[-1]
    # Frames are 100 ms apart; a gateway that held the stream back would deliver the first frame
    # only after the last one was sent (>= 1 s after the first).
    assert sent["last_sent_at"] - sent["first_sent_at"] > 0.9
    assert first_at < sent["last_sent_at"] - 0.5, (first_at, sent)


def test_openai_sdk_sees_first_chunk_early(shared_gateway: Gateway, fake_provider: FakeProvider,
                                           client_env) -> None:
    client_env(shared_gateway)
    fake_provider.script({"frame_delay": 0.1, "frames": 10})
    client = openai.OpenAI(api_key="sk-test", max_retries=0)
    arrivals = [time.time() for _ in client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)]
    sent = provider_requests(fake_provider)[-1]
    assert len(arrivals) == 12
    assert arrivals[0] < sent["last_sent_at"] - 0.5


# --- upstream status and bodies pass through ---------------------------------------------------

@pytest.mark.parametrize("status,headers,body", [
    (400, {}, {"error": {"message": "bad param", "type": "invalid_request_error"}}),
    (401, {}, {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}),
    (429, {"retry-after": "7"}, {"error": {"message": "Rate limit", "type": "requests"}}),
    (500, {}, {"error": {"message": "boom", "type": "server_error"}}),
])
def test_status_passthrough(shared_gateway: Gateway, fake_provider: FakeProvider, client_env,
                            status: int, headers: dict, body: dict) -> None:
    client_env(shared_gateway)
    raw = json.dumps(body, indent=1).encode()
    fake_provider.script({"status": status, "headers": {**headers, "content-type": "application/json"},
                          "body_b64": __import__("base64").b64encode(raw).decode()})
    with httpx.Client(timeout=10) as client:
        r = client.post("https://api.openai.com/v1/chat/completions", json={"model": "m"})
    assert r.status_code == status
    assert r.content == raw
    for name, value in headers.items():
        assert r.headers[name] == value


def test_openai_sdk_sees_429_with_retry_after(shared_gateway: Gateway,
                                              fake_provider: FakeProvider, client_env) -> None:
    client_env(shared_gateway)
    fake_provider.script({"status": 429, "headers": {"retry-after": "3"},
                          "json": {"error": {"message": "slow down", "type": "rate_limit"}}})
    client = openai.OpenAI(api_key="sk-test", max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after"] == "3"
    assert "slow down" in str(info.value)


# --- a dead upstream gives a 502 in the provider's shape ---------------------------------------

def test_dead_upstream_502_openai_and_anthropic(gateway_factory: GatewayFactory,
                                                client_env) -> None:
    dead = closed_port()
    gw = gateway_factory(extra_args=[
        "--set", f"llmitm_resolve=api.openai.com:443=127.0.0.1:{dead}",
        "--set", f"llmitm_resolve=api.anthropic.com:443=127.0.0.1:{dead}"])
    client_env(gw)
    client = openai.OpenAI(api_key="sk-test", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_unreachable"
    assert "api.openai.com:443" in info.value.body["message"]
    claude = anthropic.Anthropic(api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as ainfo:
        claude.messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ainfo.value.status_code == 502
    body = ainfo.value.response.json()
    assert body["type"] == "error" and "api.anthropic.com:443" in body["error"]["message"]


# --- configuration errors and hot reload --------------------------------------------------------

@pytest.mark.parametrize("text,needle", [
    ("providers:\n  groq:\n    hostz: [api.groq.com]\n", "providers.groq.hostz: unknown key"),
    ("sesions: {}\n", "sesions: unknown key"),
    ("providers:\n  g:\n    hosts: ['${LLMITM_TEST_UNSET_VAR}']\n",
     "environment variable LLMITM_TEST_UNSET_VAR is not set"),
    ("providers: [\n", "not valid YAML"),
])
def test_invalid_config_refuses_to_start(gateway_factory: GatewayFactory, text: str,
                                         needle: str) -> None:
    gw = gateway_factory(config_text=text, expect_failure=True)
    assert gw.proc is not None
    assert gw.proc.popen.returncode != 0
    assert needle in gw.proc.output


def test_config_hot_reload(gateway_factory: GatewayFactory, client_env) -> None:
    dead = closed_port()
    gw = gateway_factory(
        config_text="providers:\n  deadco:\n    hosts: [dead.example.test]\n    style: openai\n",
        extra_args=["--set", f"llmitm_resolve=dead.example.test:443=127.0.0.1:{dead}"])
    client_env(gw)

    def shape() -> dict:
        with httpx.Client(timeout=10) as client:
            r = client.post("https://dead.example.test/v1/messages", json={})
        assert r.status_code == 502
        return dict(r.json())

    assert "error" in shape() and shape()["error"]["code"] == "upstream_unreachable"
    gw.config_path.write_text(
        "providers:\n  deadco:\n    hosts: [dead.example.test]\n    style: anthropic\n")
    gw.proc.wait_for(lambda s: "configuration reloaded" in s, timeout=10)
    assert shape()["type"] == "error"
    gw.config_path.write_text("providers:\n  deadco:\n    hosts: []\n")
    gw.proc.wait_for(lambda s: "config edit rejected" in s, timeout=10)
    assert "providers.deadco.hosts" in gw.proc.output
    assert shape()["type"] == "error"  # the previous configuration stays in force
