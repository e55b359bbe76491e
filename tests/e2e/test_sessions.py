"""Sessions, session headers, per-turn headers and the control API, end to end (SPEC §3, §8).

Every assertion about headers is made on what the fake provider really received.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest
from mitmproxy import io as mitm_io

from tests.conftest import FakeProvider, GatewayFactory
from tests.harness.gateway import Gateway

CONFIG = """
sessions:
  team-a:
    token: tok-a-${LLMITM_TEST_SUFFIX:-1}
    headers:
      api.openai.com:
        Authorization: Bearer sk-real-team-a-0123456789
        X-Tenant: a
      "api.anthropic.com/v1/*":
        x-api-key: sk-ant-real-team-a-0123456789
  team-b:
    token: tok-b
    headers:
      api.openai.com:
        Authorization: Bearer sk-real-team-b-9876543210
        X-Tenant: b
  open:
    headers:
      api.openai.com:
        X-Tenant: open
        X-Trace-Base: base
  default:
    headers:
      api.openai.com: {X-Tenant: default}
control:
  admin_token: admin-secret-token
"""


def received(fake: FakeProvider) -> list[dict]:
    return [r for r in fake.requests() if not r["path"].startswith("/_fake")]


def headers_of(record: dict) -> dict[str, str]:
    return {k.lower(): v for k, v in record["headers"]}


def proxy(gw: Gateway, user: str | None = None, token: str | None = None) -> str:
    if user is None:
        return gw.url
    return f"http://{user}:{token}@127.0.0.1:{gw.port}"


def client(gw: Gateway, user: str | None = None, token: str | None = None) -> httpx.Client:
    return httpx.Client(proxy=proxy(gw, user, token), verify=str(gw.bundle()), trust_env=False,
                        timeout=20)


@pytest.fixture
def gw(gateway_factory: GatewayFactory) -> Gateway:
    return gateway_factory(config_text=CONFIG)


def post(c: httpx.Client, url: str = "https://api.openai.com/v1/chat/completions",
         headers: dict[str, str] | None = None) -> httpx.Response:
    return c.post(url, json={"model": "m"}, headers=headers or {})


# --- identity ----------------------------------------------------------------------------------

def test_session_from_proxy_auth_header_or_default(gw: Gateway, fake_provider: FakeProvider) -> None:
    with client(gw, "team-a", "tok-a-1") as c:
        assert post(c).status_code == 200
    with client(gw) as c:
        assert post(c, headers={"X-Llmitm-Session": "open"}).status_code == 200
        assert post(c).status_code == 200
    tenants = [headers_of(r).get("x-tenant") for r in received(fake_provider)]
    assert tenants == ["a", "open", "default"]
    first = headers_of(received(fake_provider)[0])
    assert first["authorization"] == "Bearer sk-real-team-a-0123456789"
    assert "proxy-authorization" not in first


@pytest.mark.parametrize("user,token,header", [
    ("team-a", "wrong", None),  # wrong token
    (None, None, "team-a"),  # a token session named by header, no credentials
    ("open", "x", "team-a"),  # proxy auth wins; then team-a via header is never acted as
])
def test_token_sessions_need_their_token(gw: Gateway, fake_provider: FakeProvider,
                                         user: str | None, token: str | None,
                                         header: str | None) -> None:
    headers = {"X-Llmitm-Session": header} if header else {}
    with client(gw, user, token) as c:
        try:
            r = post(c, headers=headers)
        except httpx.ProxyError as e:  # 407 on CONNECT: the tunnel is refused
            assert "407" in str(e)
            r = None
    if r is not None and user == "open":
        assert r.status_code == 200  # acts as "open", never as team-a
        assert headers_of(received(fake_provider)[-1])["x-tenant"] == "open"
        return
    if r is not None:
        assert r.status_code == 407
        assert r.headers["proxy-authenticate"].startswith("Basic")
        assert "team-a" in r.json()["error"]["message"]
    assert not any(headers_of(x).get("x-tenant") == "a" for x in received(fake_provider))


# --- scopes ------------------------------------------------------------------------------------

def test_session_headers_never_leave_their_scope(gw: Gateway, fake_provider: FakeProvider) -> None:
    with client(gw, "team-a", "tok-a-1") as c:
        assert post(c, "https://telemetry.example.test/v1/chat/completions").status_code == 200
        assert post(c, "https://api.anthropic.com/api/event_logging/batch").status_code == 200
        assert post(c, "https://api.anthropic.com/api/claude_code/settings").status_code == 200
        assert post(c, "https://api.anthropic.com/v1/messages?beta=true").status_code == 200
    tele, event_log, settings, messages = (headers_of(r) for r in received(fake_provider))
    for side in (tele, event_log, settings):
        assert "x-tenant" not in side and "x-api-key" not in side
        assert "sk-real" not in json.dumps(side) and "sk-ant-real" not in json.dumps(side)
    assert messages["x-api-key"] == "sk-ant-real-team-a-0123456789"
    assert "x-tenant" not in messages  # the api.openai.com scope does not apply here


def test_a_spoofed_host_header_never_pulls_session_headers(gw: Gateway,
                                                         fake_provider: FakeProvider) -> None:
    with client(gw, "team-a", "tok-a-1") as c:
        # The tunnel goes to telemetry.example.test; only the Host header names the provider.
        r = c.post("https://telemetry.example.test/v1/chat/completions", json={"model": "m"},
                   headers={"Host": "api.openai.com"})
    assert r.status_code == 200
    (record,) = received(fake_provider)
    sent = headers_of(record)
    assert sent["host"] == "api.openai.com"  # the request reached the telemetry tunnel as sent
    assert "x-tenant" not in sent and "sk-real" not in json.dumps(sent)


# --- per-turn headers ----------------------------------------------------------------------------

@pytest.mark.parametrize("turn,merge,expected", [
    (None, None, {"x-tenant": "open", "x-trace-base": "base"}),
    ("{}", None, {}),  # explicit empty set, override: no session headers this turn
    ('{"X-Trace": "t1"}', None, {"x-trace": "t1"}),
    ('{"X-Trace": "t1"}', "override", {"x-trace": "t1"}),
    ("{}", "merge", {"x-tenant": "open", "x-trace-base": "base"}),
    ('{"x-TENANT": "turn", "X-Trace": "t1"}', "merge",
     {"x-tenant": "turn", "x-trace-base": "base", "x-trace": "t1"}),
])
def test_turn_header_semantics(gw: Gateway, fake_provider: FakeProvider, turn: str | None,
                               merge: str | None, expected: dict[str, str]) -> None:
    headers = {"X-Llmitm-Session": "open"}
    if turn is not None:
        headers["X-Llmitm-Turn-Headers"] = turn
    if merge is not None:
        headers["X-Llmitm-Header-Merge"] = merge
    with client(gw) as c:
        assert post(c, headers=headers).status_code == 200
    got = headers_of(received(fake_provider)[-1])
    watched = {"x-tenant", "x-trace-base", "x-trace"}
    assert {k: v for k, v in got.items() if k in watched} == expected
    assert not [k for k in got if k.startswith("x-llmitm")]


@pytest.mark.parametrize("turn,merge,needle", [
    ('{"X-Trace":', None, "not valid JSON"),
    ('["X-Trace"]', None, "must be a JSON object"),
    ('{"X-Trace": 5}', None, "value must be a string"),
    ('{"X-Trace": "a\\r\\nInjected: 1"}', None, "CR or LF"),
    ('{"Bad Name": "x"}', None, "not a valid HTTP header name"),
    ("{}", "sideways", "X-Llmitm-Header-Merge"),
])
def test_malformed_turn_headers_are_400_and_nothing_goes_upstream(
        gw: Gateway, fake_provider: FakeProvider, turn: str, merge: str | None,
        needle: str) -> None:
    headers = {"X-Llmitm-Turn-Headers": turn}
    if merge:
        headers["X-Llmitm-Header-Merge"] = merge
    with client(gw) as c:
        r = post(c, headers=headers)
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"]
    assert received(fake_provider) == []


def test_openai_sdk_extra_headers_as_turn(gw: Gateway, fake_provider: FakeProvider,
                                          client_env) -> None:
    client_env(gw)
    sdk = openai.OpenAI(api_key="dummy", max_retries=0,
                        default_headers={"X-Llmitm-Session": "open"})
    sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Llmitm-Turn-Headers": json.dumps({"X-Trace-Id": "turn-7"}),
                       "X-Llmitm-Header-Merge": "merge"})
    got = headers_of(received(fake_provider)[-1])
    assert got["x-trace-id"] == "turn-7" and got["x-tenant"] == "open"


# --- the gateway's value wins; provenance; stripping ------------------------------------------

def test_gateway_key_wins_and_provenance_is_in_the_flow_comment(
        gateway_factory: GatewayFactory, fake_provider: FakeProvider, tmp_path: Path) -> None:
    dump = tmp_path / "flows.mitm"
    gw = gateway_factory(config_text=CONFIG, extra_args=["-w", str(dump)])
    with client(gw, "team-a", "tok-a-1") as c:
        r = post(c, headers={"Authorization": "Bearer dummy-client-key",
                             "X-Llmitm-Turn-Headers": '{"X-Turn": "1"}',
                             "X-Llmitm-Header-Merge": "merge"})
    assert r.status_code == 200
    got = headers_of(received(fake_provider)[-1])
    assert got["authorization"] == "Bearer sk-real-team-a-0123456789"
    gw.stop()
    with dump.open("rb") as fh:
        flows = list(mitm_io.FlowReader(fh).stream())
    comment = flows[-1].comment
    assert ("injected Authorization <- session team-a, scope api.openai.com "
            "(replaced the client's value)") in comment
    assert "injected X-Tenant <- session team-a, scope api.openai.com" in comment
    assert "injected X-Turn <- turn of session team-a via request" in comment
    assert "sk-real" not in comment and "dummy-client-key" not in comment
    injected = flows[-1].metadata["llmitm.injected"]
    assert {i["name"]: i["origin"] for i in injected} == {
        "Authorization": "session", "X-Tenant": "session", "X-Turn": "turn"}


@pytest.mark.parametrize("config", [None, CONFIG])
def test_control_headers_never_go_upstream(gateway_factory: GatewayFactory,
                                           fake_provider: FakeProvider,
                                           config: str | None) -> None:
    gw = gateway_factory(config_text=config)
    with client(gw) as c:
        assert post(c, headers={"X-Llmitm-Bypass": "1", "X-Llmitm-Anything": "x",
                                "x-llmitm-session": "open",
                                "X-LLMITM-TURN-HEADERS": '{"A": "b"}'}).status_code == 200
        assert post(c, "https://telemetry.example.test/x",
                    headers={"X-Llmitm-Other": "y"}).status_code == 200
    records = received(fake_provider)
    assert len(records) == 2
    for record in records:
        assert not [k for k in headers_of(record) if k.startswith("x-llmitm")]
    assert headers_of(records[0])["a"] == "b"  # the turn header itself did go


# --- two sessions in parallel --------------------------------------------------------------------

def test_two_token_sessions_in_parallel_never_mix(gw: Gateway, fake_provider: FakeProvider) -> None:
    errors: list[BaseException] = []

    def run(user: str, token: str) -> None:
        try:
            sdk = openai.OpenAI(api_key="dummy", max_retries=0, http_client=httpx.Client(
                proxy=proxy(gw, user, token), verify=str(gw.bundle()), trust_env=False))
            for i in range(25):
                sdk.chat.completions.create(model="m", user=f"{user}:{i}",
                                            messages=[{"role": "user", "content": "hi"}])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=a) for a in (("team-a", "tok-a-1"),
                                                               ("team-b", "tok-b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    records = received(fake_provider)
    assert len(records) == 50
    for record in records:
        owner = json.loads(base64.b64decode(record["body_b64"]))["user"].split(":")[0]
        got = headers_of(record)
        tenant = owner[-1]
        assert got["x-tenant"] == tenant
        assert got["authorization"] == f"Bearer sk-real-team-{tenant}-" + (
            "0123456789" if tenant == "a" else "9876543210")
    # interleaved for real: both sessions appear in each half of the arrival order
    owners = [json.loads(base64.b64decode(r["body_b64"]))["user"][5] for r in records]
    assert set(owners[:25]) == {"a", "b"}


# --- config edits mid-run ---------------------------------------------------------------------------

def test_config_edit_applies_to_next_request_and_spares_streams_in_flight(
        gw: Gateway, fake_provider: FakeProvider) -> None:
    with client(gw, "open", "") as c:
        assert post(c).status_code == 200
        fake_provider.script({"frame_delay": 0.1, "frames": 15})
        with c.stream("POST", "https://api.openai.com/v1/chat/completions",
                      json={"model": "m", "stream": True}) as resp:
            raw = resp.iter_raw()
            chunks = [next(raw)]
            gw.config_path.write_text(CONFIG.replace("X-Tenant: open", "X-Tenant: open-v2"))
            gw.proc.wait_for(lambda s: "configuration reloaded" in s, timeout=10)
            chunks += list(raw)
        body = b"".join(chunks)
        assert body.count(b"data: ") == 18 and body.endswith(b"data: [DONE]\n\n")
        assert post(c).status_code == 200
    tenants = [headers_of(r).get("x-tenant") for r in received(fake_provider)]
    assert tenants == ["open", "open", "open-v2"]


# --- control API ------------------------------------------------------------------------------------

def control(gw: Gateway, method: str, path: str, user: str | None = None,
            token: str | None = None, bearer: str | None = None,
            body: object | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    with client(gw, user, token) as c:
        return c.request(method, f"http://llmitm.internal{path}", headers=headers,
                         content=None if body is None else json.dumps(body))


def test_control_api_auth(gw: Gateway, fake_provider: FakeProvider) -> None:
    assert control(gw, "GET", "/healthz").json()["status"] == "ok"
    r = control(gw, "GET", "/sessions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert control(gw, "GET", "/sessions", bearer="not-the-token").status_code == 401
    assert control(gw, "GET", "/sessions/team-a", "team-b", "tok-b").status_code == 403
    assert control(gw, "GET", "/sessions/open", "open", "").status_code == 401  # no token: no self-management
    assert control(gw, "PATCH", "/sessions/team-b", "team-a", "tok-a-1",
                   body={"headers": {}}).status_code == 403
    mine = control(gw, "GET", "/sessions", "team-a", "tok-a-1").json()["sessions"]
    assert [s["id"] for s in mine] == ["team-a"]
    every = control(gw, "GET", "/sessions", bearer="admin-secret-token").json()["sessions"]
    assert {s["id"] for s in every} == {"team-a", "team-b", "open", "default"}
    text = json.dumps(every)
    for secret in ("sk-real-team-a", "sk-ant-real", "tok-a-1", "tok-b", "admin-secret-token"):
        assert secret not in text
    assert every[[s["id"] for s in every].index("team-a")]["token"] == "set"
    assert received(fake_provider) == []  # nothing of the control API goes upstream


def test_control_api_patch_is_partial_and_turns_apply(gw: Gateway,
                                                      fake_provider: FakeProvider) -> None:
    admin = "admin-secret-token"
    r = control(gw, "PATCH", "/sessions/team-a", bearer=admin,
                body={"headers": {"api.openai.com": {"X-Tenant": "a2", "X-New": "n"}}})
    assert r.status_code == 200
    view = r.json()["headers"]["api.openai.com"]
    assert view["X-Tenant"]["source"] == "runtime" and view["X-New"]["source"] == "runtime"
    assert view["Authorization"]["source"] == "config"  # not mentioned: stays
    assert view["Authorization"]["value"].startswith("[redacted:")
    with client(gw, "team-a", "tok-a-1") as c:
        post(c)
    got = headers_of(received(fake_provider)[-1])
    assert (got["x-tenant"], got["x-new"]) == ("a2", "n")
    assert got["authorization"] == "Bearer sk-real-team-a-0123456789"
    # an explicit empty value clears that header only
    r = control(gw, "PATCH", "/sessions/team-a", "team-a", "tok-a-1",
                body={"headers": {"api.openai.com": {"X-New": ""}}})
    assert "X-New" not in r.json()["headers"]["api.openai.com"]
    # a turn set through the API applies to model requests, not to side endpoints
    r = control(gw, "PUT", "/sessions/team-a/turn", "team-a", "tok-a-1",
                body={"headers": {"X-Turn": "t"}, "merge": "merge"})
    assert r.status_code == 200 and r.json()["turn"]["merge"] == "merge"
    with client(gw, "team-a", "tok-a-1") as c:
        post(c)
        post(c, "https://api.anthropic.com/api/event_logging/batch")
    model_call, side_call = (headers_of(x) for x in received(fake_provider)[-2:])
    assert model_call["x-turn"] == "t" and model_call["x-tenant"] == "a2"
    assert "x-turn" not in side_call
    assert control(gw, "PUT", "/sessions/team-a/turn", bearer=admin,
                   body={"headers": {}}).status_code == 200
    before = len(received(fake_provider))
    with client(gw, "team-a", "tok-a-1") as c:
        assert post(c).status_code == 200
    records = received(fake_provider)
    assert len(records) == before + 1
    assert not {"x-turn", "x-tenant", "authorization"} & set(headers_of(records[-1]))
    assert control(gw, "DELETE", "/sessions/team-a/turn", bearer=admin).json()["turn"] is None
    # explicit {} for all headers clears the config's too, and says so
    r = control(gw, "PATCH", "/sessions/team-a", bearer=admin, body={"headers": {}})
    assert r.json()["headers"] == {} and r.json()["runtime"]["cleared_config_headers"] is True
    for bad in ({"headers": {"s": {"Bad Name": "x"}}}, {"headerz": {}}, [1]):
        r = control(gw, "PATCH", "/sessions/team-a", bearer=admin, body=bad)
        assert r.status_code == 400, bad
