"""Leak finding: scopes, sessions, headers, URL and body; live values and recorded markers."""

from __future__ import annotations

import json
from dataclasses import replace
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llmitm.leaks import (
    Finding,
    Injected,
    KnownSecret,
    LeakChecker,
    OutgoingRequest,
    Scope,
    learn_secrets,
    load_config_secrets,
    looks_like_credential,
    secrets_from_config,
)
from llmitm.redact import SecretSet, redacted

OPENAI_KEY = "sk-proj-team-a-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-team-b-0123456789abcdef"
PROXY_TOKEN = "proxy-token-team-a-xyz"

A_OPENAI = KnownSecret(
    origin="sessions.team-a.headers.api.openai.com.Authorization",
    value=f"Bearer {OPENAI_KEY}",
    session="team-a",
    scope=Scope.parse("api.openai.com"),
    headers=("Authorization",),
)
B_ANTHROPIC = KnownSecret(
    origin="sessions.team-b.headers.api.anthropic.com/v1/*.x-api-key",
    value=ANTHROPIC_KEY,
    session="team-b",
    scope=Scope.parse("api.anthropic.com/v1/*"),
    headers=("x-api-key",),
)
A_TOKEN = KnownSecret(origin="sessions.team-a.token", value=PROXY_TOKEN, session="team-a")
SHORT = KnownSecret(
    origin="sessions.team-a.headers.*.example.test.X-Pin",
    value="1234",
    session="team-a",
    scope=Scope.parse("*.example.test"),
    headers=("X-Pin",),
)
CHECKER = LeakChecker([A_OPENAI, B_ANTHROPIC, A_TOKEN, SHORT])
ALL_VALUES = [OPENAI_KEY, ANTHROPIC_KEY, PROXY_TOKEN, f"Bearer {OPENAI_KEY}"]


def req(
    session: str = "team-a",
    host: str = "api.openai.com",
    path: str = "/v1/chat/completions",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    **kw: object,
) -> OutgoingRequest:
    return OutgoingRequest(session, host, path, headers or [], body, **kw)  # type: ignore[arg-type]


def kinds(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.kind, f.where) for f in findings]


def assert_no_values(findings: list[Finding]) -> None:
    text = json.dumps([f.to_meta() for f in findings]) + repr(findings)
    for value in ALL_VALUES:
        assert value not in text


# -- scopes ------------------------------------------------------------------------------------
def test_scope_parse_and_match() -> None:
    s = Scope.parse("api.anthropic.com/v1/*")
    assert (s.host, s.path) == ("api.anthropic.com", "/v1/*")
    assert s.matches("API.Anthropic.com", "/v1/messages?beta=true")
    assert not s.matches("api.anthropic.com", "/api/event_logging/batch")
    assert not s.matches("evil.api.anthropic.com.attacker.test", "/v1/messages")
    w = Scope.parse("*.openai.com")
    assert w.matches_host("api.openai.com") and not w.matches_host("openai.com.evil.test")
    p = Scope.parse("localhost:8080")
    assert p.matches_host("localhost", 8080) and not p.matches_host("localhost", 9090)
    assert str(s) == "api.anthropic.com/v1/*"
    assert Scope.parse("https://h.test/x/*") == Scope("h.test", "/x/*")


# -- live checks -------------------------------------------------------------------------------
def test_configured_placement_is_fine() -> None:
    assert CHECKER.check(req(headers=[("Authorization", f"Bearer {OPENAI_KEY}")])) == []
    r = req(
        "team-b",
        "api.anthropic.com",
        "/v1/messages?beta=true",
        [("X-Api-Key", ANTHROPIC_KEY), ("content-type", "application/json")],
        body=b'{"messages":[]}',
    )
    assert CHECKER.check(r) == []
    assert CHECKER.check(req(host="pins.example.test", headers=[("x-pin", "1234")])) == []


def test_out_of_scope_host_and_path() -> None:
    f = CHECKER.check(req(host="telemetry.example.test", headers=[("Authorization", f"Bearer {OPENAI_KEY}")]))
    assert kinds(f) == [("out_of_scope_host", "Authorization")]
    assert f[0].origin == A_OPENAI.origin
    assert f[0].secret == redacted(f"Bearer {OPENAI_KEY}")
    assert "telemetry.example.test" in f[0].explanation
    f = CHECKER.check(req("team-b", "api.anthropic.com", "/api/eval/x", [("x-api-key", ANTHROPIC_KEY)]))
    assert kinds(f) == [("out_of_scope_path", "x-api-key")]
    assert_no_values(f)


def test_other_session_and_other_header() -> None:
    f = CHECKER.check(req("team-b", headers=[("Authorization", f"Bearer {OPENAI_KEY}")]))
    assert kinds(f) == [("other_session", "Authorization")]
    assert "team-b" in f[0].explanation and "team-a" in f[0].explanation
    # The key alone, in a header it is not configured for, on an in-scope request.
    f = CHECKER.check(req(headers=[("X-Forward-Key", OPENAI_KEY)]))
    assert kinds(f) == [("other_header", "X-Forward-Key")]
    assert f[0].secret == redacted(OPENAI_KEY)
    # Embedded inside another header value.
    f = CHECKER.check(req(host="x.test", headers=[("X-Debug", f"key={OPENAI_KEY};")]))
    assert kinds(f) == [("out_of_scope_host", "X-Debug")]


def test_token_without_scope_may_never_leave() -> None:
    f = CHECKER.check(req(headers=[("X-Token", PROXY_TOKEN)]))
    assert kinds(f) == [("out_of_scope_host", "X-Token")]
    assert "never" in f[0].explanation


def test_in_url_and_in_body() -> None:
    r = req(
        path=f"/v1/x?key={quote(OPENAI_KEY)}",
        url=f"https://api.openai.com/v1/x?key={OPENAI_KEY}",
        body=json.dumps({"note": f"my key is {ANTHROPIC_KEY}"}).encode(),
    )
    f = CHECKER.check(r)
    assert sorted(kinds(f)) == [("in_body", "body"), ("in_url", "url")]
    assert {x.origin for x in f} == {A_OPENAI.origin, B_ANTHROPIC.origin}
    assert_no_values(f)
    ws = req(body=PROXY_TOKEN.encode(), body_label="websocket")
    assert kinds(CHECKER.check(ws)) == [("in_body", "websocket")]


def test_short_secret_only_as_whole_header_value() -> None:
    assert kinds(CHECKER.check(req(host="x.test", headers=[("X-Pin", "1234")]))) == [
        ("out_of_scope_host", "X-Pin")
    ]
    assert CHECKER.check(req(host="x.test", headers=[("X-N", "a1234b")], body=b"1234")) == []


def test_shared_value_owned_by_two_sessions() -> None:
    a = replace(A_OPENAI)
    b = replace(A_OPENAI, origin="sessions.team-b.headers.api.openai.com.Authorization", session="team-b")
    checker = LeakChecker([a, b])
    for session in ("team-a", "team-b"):
        assert checker.check(req(session, headers=[("Authorization", a.value)])) == []
    f = checker.check(req("team-c", headers=[("Authorization", a.value)]))
    assert kinds(f) == [("other_session", "Authorization")]


def test_profile_key_any_session() -> None:
    key = KnownSecret(
        origin="profiles.fast.api_key",
        value="or-key-0123456789",
        scope=Scope.parse("openrouter.ai/api/v1/*"),
        headers=("authorization", "x-api-key"),
    )
    checker = LeakChecker([key])
    ok = req(
        "anyone", "openrouter.ai", "/api/v1/chat/completions", [("Authorization", "Bearer or-key-0123456789")]
    )
    assert checker.check(ok) == []
    assert kinds(checker.check(replace(ok, host="api.openai.com"))) == [
        ("out_of_scope_host", "Authorization")
    ]


def test_injected_headers_checked_without_values() -> None:
    inj = [
        Injected(
            "X-Team", "sessions.team-a.headers.api.openai.com.X-Team", Scope.parse("api.openai.com"), "team-a"
        ),
        Injected("X-Turn", "turn"),
    ]
    headers = [("X-Team", "alpha"), ("X-Turn", "t")]
    assert CHECKER.check(req(headers=headers, injected=inj)) == []
    f = CHECKER.check(req(host="chatgpt.com", headers=headers, injected=inj))
    assert kinds(f) == [("out_of_scope_host", "X-Team")]
    assert f[0].secret == redacted("alpha")
    f = CHECKER.check(req("team-b", headers=headers, injected=inj))
    assert kinds(f) == [("other_session", "X-Team")]
    f = CHECKER.check(
        req(
            path="/backend-api/x",
            headers=headers,
            injected=[Injected("X-Team", "o", Scope.parse("api.openai.com/v1/*"))],
        )
    )
    assert kinds(f) == [("out_of_scope_path", "X-Team")]
    # An empty checker still checks injections.
    assert kinds(LeakChecker([]).check(req(host="x.test", headers=headers, injected=inj))) == [
        ("out_of_scope_host", "X-Team")
    ]


def test_same_leak_reported_once() -> None:
    inj = [Injected("Authorization", A_OPENAI.origin, A_OPENAI.scope, "team-a")]
    f = CHECKER.check(req(host="x.test", headers=[("Authorization", A_OPENAI.value)], injected=inj))
    assert kinds(f) == [("out_of_scope_host", "Authorization")]


def test_meta_round_trips() -> None:
    f = CHECKER.check(req(host="x.test", headers=[("Authorization", A_OPENAI.value)]))[0]
    assert Finding.from_meta(json.loads(json.dumps(f.to_meta()))) == f
    assert Finding.from_meta({"kind": "nonsense"}) is None
    inj = Injected("X-A", "o", Scope.parse("h.test/v1/*"), "s")
    assert Injected.from_meta(inj.to_meta()) == inj
    assert Injected.from_meta({"name": "X-B", "origin": "turn"}) == Injected("X-B", "turn")
    assert Injected.from_meta({"origin": "x"}) is None


# -- recorded (redacted) -----------------------------------------------------------------------
def redact_request(r: OutgoingRequest) -> OutgoingRequest:
    s = SecretSet([x.value for x in CHECKER.secrets])
    return replace(
        r,
        headers=s.redact_headers(r.headers),
        body=s.redact_bytes(r.body),
        url=s.redact_text(r.url),
        path=s.redact_text(r.path),
    )


def test_recorded_markers() -> None:
    good = redact_request(req(headers=[("Authorization", A_OPENAI.value)]))
    assert good.headers[0][1] == redacted(A_OPENAI.value)
    assert CHECKER.check_recorded(good) == []
    bad = redact_request(
        req(
            host="telemetry.example.test",
            headers=[("Authorization", A_OPENAI.value)],
            body=f"k={OPENAI_KEY}".encode(),
            url=f"https://telemetry.example.test/?t={PROXY_TOKEN}",
        )
    )
    f = CHECKER.check_recorded(bad)
    assert sorted(kinds(f)) == [
        ("in_body", "body"),
        ("in_url", "url"),
        ("out_of_scope_host", "Authorization"),
    ]
    assert_no_values(f)
    # Unknown markers (a client's own key) are not findings.
    unknown = req(host="x.test", headers=[("Authorization", redacted("someone else"))])
    assert CHECKER.check_recorded(unknown) == []


def test_learned_owners_without_config() -> None:
    marker = redacted("Bearer team-a-key-0123456789")
    inj = [Injected("Authorization", "session:team-a")]
    a = req("team-a", headers=[("Authorization", marker)], injected=inj)
    b = req("team-b", headers=[("Authorization", marker)])
    learned = learn_secrets([a, b])
    assert len(learned) == 1 and learned[0].session == "team-a"
    checker = LeakChecker([], learned=learned)
    assert checker.check_recorded(a) == []
    assert kinds(checker.check_recorded(b)) == [("other_session", "Authorization")]
    # Learned owners never override what the config says.
    configured = KnownSecret(
        origin="c",
        digest=learned[0].digest,
        session="team-b",
        scope=Scope.parse("*"),
        headers=("authorization",),
    )
    assert LeakChecker([configured], learned=learned).check_recorded(b) == []


# -- config ------------------------------------------------------------------------------------
CONFIG_TEXT = """
sessions:
  team-a:
    token: ${TEAM_A_TOKEN}
    headers:
      api.openai.com:
        Authorization: Bearer ${OPENAI_KEY}
        OpenAI-Beta: assistants=v2
        X-Custom: ${CUSTOM}
        X-Org: Org7Zq2LkP9xW4mN0vB
        anthropic-beta: prompt-caching-2024-07-31
control:
  admin_token: admin-${ADMIN:-default-admin}
x402:
  wallet: 4NMwxzmYj2uvHuq8xoqhY8RXg63KSVJM1DXkpbmkUY7YQWuoyQgFnnzn6yo3CMnqDasnvybXMMcHNGBMqJ3DDWGb
  rpc_url: http://127.0.0.1:8899
  networks: [solana-devnet]
  assets: [EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v]
  limits: {per_request: "0.05", per_session_per_day: "1", total_per_day: "5"}
record:
  redact: [X-Internal]
"""


def test_secrets_from_config(tmp_path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG_TEXT)
    env = {"TEAM_A_TOKEN": "tok-a-123456", "OPENAI_KEY": OPENAI_KEY, "CUSTOM": "custom-val-1"}
    cfg = load_config_secrets(path, env)
    by_origin = {s.origin: s for s in cfg.known}
    assert set(by_origin) == {
        "sessions.team-a.token",
        "sessions.team-a.headers.api.openai.com.Authorization",
        "sessions.team-a.headers.api.openai.com.X-Custom",  # from ${CUSTOM}
        "sessions.team-a.headers.api.openai.com.X-Org",  # shaped like a key
        "control.admin_token",
        "x402.wallet",
    }
    auth = by_origin["sessions.team-a.headers.api.openai.com.Authorization"]
    assert auth.value == f"Bearer {OPENAI_KEY}" and auth.session == "team-a"
    assert auth.scope == Scope("api.openai.com") and auth.headers == ("authorization",)
    assert by_origin["sessions.team-a.token"].scope is None
    assert by_origin["control.admin_token"].value == "admin-default-admin"
    assert by_origin["x402.wallet"].scope is None
    assert cfg.redact_names == ("X-Internal",)
    assert cfg.secret_set().redact_header("x-internal", "v") == redacted("v")
    with pytest.raises(ValueError, match="is not set"):
        load_config_secrets(path, {})


def test_secrets_from_config_runtime_headers_and_wallet_path() -> None:
    from llmitm.config import parse_config

    config = parse_config(
        "sessions:\n  s1:\n    headers:\n      api.openai.com: {Authorization: Bearer k-0123456789}\n"
        "x402:\n  wallet: ~/.config/solana/id.json\n  rpc_url: http://127.0.0.1:1\n"
        "  networks: [solana]\n  assets: [EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v]\n"
        "  limits: {per_request: '1', per_session_per_day: '1', total_per_day: '1'}\n",
        env={},
    )
    cfg = secrets_from_config(
        config,
        session_headers={"s1": {"api.anthropic.com": {"x-api-key": "runtime-key-0123456789"}}},
        turn_headers={"s2": {"Authorization": "Bearer turn-key-0123456789", "X-Trace": "t1"}},
    )
    by_origin = {s.origin: s for s in cfg.known}
    assert set(by_origin) == {
        "sessions.s1.headers.api.anthropic.com.x-api-key",
        "turn of session s2: Authorization",
    }
    assert by_origin["turn of session s2: Authorization"].session == "s2"


@pytest.mark.parametrize("value,secret", [
    ("2023-06-01", False),
    ("prompt-caching-2024-07-31", False),
    ("claude-3-5-sonnet-20241022", False),
    ("application/json", False),
    ("sk-0123456789abcdef", True),
    ("Bearer AbCdEf0123456789xyz", True),
    ("0123456789abcdef0123", True),
])
def test_looks_like_credential(value: str, secret: bool) -> None:
    assert looks_like_credential(value) is secret


# -- properties --------------------------------------------------------------------------------
# Findings name headers, hosts, sessions and scopes; a "secret" that is a piece of those words
# (e.g. "Authoriz") would be found in an explanation without any leak, so such draws are skipped.
_VOCABULARY = ("authorization x-api-key api.openai.com/v1/* telemetry.example.test chatgpt.com "
               "api.anthropic.com session team-a team-b default request header secret from allowed "
               "other_session out_of_scope_host out_of_scope_path in_url in_body other_header "
               "[redacted:] in header of a request from kind explanation")
SECRET = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=8, max_size=48
).filter(lambda s: s.lower() not in _VOCABULARY)
FILLER = st.text(alphabet=' abcxyz:/{}",=', max_size=40)
HOSTS = st.sampled_from(["api.openai.com", "telemetry.example.test", "chatgpt.com", "api.anthropic.com"])


@given(
    secret=SECRET,
    owner=st.sampled_from(["team-a", "team-b"]),
    place=st.sampled_from(["configured_header", "other_header", "url", "body"]),
    host=HOSTS,
    session=st.sampled_from(["team-a", "team-b", "default"]),
    pre=FILLER,
    post=FILLER,
)
@settings(max_examples=300, deadline=None)
def test_secret_outside_its_place_is_always_found(
    secret: str, owner: str, place: str, host: str, session: str, pre: str, post: str
) -> None:
    s = KnownSecret(
        origin="o",
        value=secret,
        session=owner,
        scope=Scope.parse("api.openai.com/v1/*"),
        headers=("Authorization",),
    )
    checker = LeakChecker([s])
    in_place = place == "configured_header" and host == "api.openai.com" and session == owner
    assume(not in_place)
    headers = [("content-type", "application/json")]
    body, path = b"{}", "/v1/chat/completions"
    if place == "configured_header":
        headers.append(("Authorization", secret))
    elif place == "other_header":
        headers.append(("X-Something", pre + secret + post))
    elif place == "url":
        path = f"/v1/x?{quote(pre, safe='')}={quote(secret + post, safe='')}"
    else:
        body = (pre + secret + post).encode()
    r = OutgoingRequest(session, host, path, headers, body, url=f"https://{host}{path}")
    findings = checker.check(r)
    assert findings
    assert_no_values_for(findings, secret)


def assert_no_values_for(findings: list[Finding], secret: str) -> None:
    for f in findings:
        assert secret not in json.dumps(f.to_meta())


@given(
    secret=SECRET,
    path=st.sampled_from(["/v1/chat/completions", "/v1/responses?x=1"]),
    other=st.lists(
        st.tuples(st.sampled_from(["accept", "x-stainless-os", "user-agent"]), FILLER), max_size=5
    ),
    body=st.binary(max_size=200),
)
@settings(max_examples=200, deadline=None)
def test_configured_placement_is_never_a_finding(
    secret: str, path: str, other: list[tuple[str, str]], body: bytes
) -> None:
    assume(secret.encode() not in body)
    assume(all(secret not in v for _, v in other))
    assume(secret not in path)  # a secret in the URL is a finding wherever it may be sent
    s = KnownSecret(
        origin="o",
        value=f"Bearer {secret}",
        session="team-a",
        scope=Scope.parse("api.openai.com/v1/*"),
        headers=("Authorization",),
    )
    checker = LeakChecker([s])
    headers = [*other, ("Authorization", f"Bearer {secret}")]
    r = OutgoingRequest(
        "team-a",
        "api.openai.com",
        path,
        headers,
        body,
        url=f"https://api.openai.com{path}",
        injected=[Injected("Authorization", "o", s.scope, "team-a")],
    )
    assert checker.check(r) == []


# -- cost --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_secrets", [4, 40])
def test_check_cost_per_typical_request(n_secrets: int) -> None:
    secrets = [
        KnownSecret(
            origin=f"sessions.s{i}.headers.api.openai.com.Authorization",
            value=f"Bearer sk-proj-{i:04d}-0123456789abcdefghijklmnop",
            session=f"s{i}",
            scope=Scope.parse("api.openai.com/v1/*"),
            headers=("Authorization",),
        )
        for i in range(n_secrets)
    ]
    checker = LeakChecker(secrets)
    body = json.dumps(
        {
            "model": "gpt-4.1",
            "stream": True,
            "messages": [{"role": "user", "content": "Summarise the following text. " * 60}],
        }
    ).encode()
    headers = [
        ("host", "api.openai.com"),
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("user-agent", "OpenAI/Python 1.99.0"),
        ("x-stainless-lang", "python"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-runtime-version", "3.13.0"),
        ("x-stainless-retry-count", "0"),
        ("content-length", str(len(body))),
        ("Authorization", secrets[0].value),
    ]
    r = OutgoingRequest(
        "s0",
        "api.openai.com",
        "/v1/chat/completions",
        headers,
        body,
        url="https://api.openai.com/v1/chat/completions",
        injected=[Injected("Authorization", "o", secrets[0].scope, "s0")],
    )
    assert checker.check(r) == []  # its speed is measured by scripts/bench, not asserted here


def test_rpc_url_keys_are_secrets() -> None:
    from llmitm.leaks import _rpc_url_secrets

    assert _rpc_url_secrets("https://mainnet.helius-rpc.com/?api-key=abcdef0123456789") == [
        "abcdef0123456789"]
    assert _rpc_url_secrets("https://x.solana-mainnet.quiknode.pro/0123456789abcdef0123/") == [
        "0123456789abcdef0123"]
    assert _rpc_url_secrets("https://user:s3cretpass@rpc.example/") == ["s3cretpass"]
    assert _rpc_url_secrets("https://api.mainnet-beta.solana.com") == []
