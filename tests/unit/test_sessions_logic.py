from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmitm.sessions import (
    AuthFailure,
    HeaderError,
    Injection,
    Overlay,
    SessionStore,
    combine,
    compile_scopes,
    parse_turn_headers,
    resolve_identity,
    session_injections,
)

TOKENS = {"team-a": "tok-a", "open": None}


def test_identity_order_and_tokens() -> None:
    assert resolve_identity(("team-a", "tok-a"), "open", TOKENS).session == "team-a"
    assert resolve_identity(("team-a", "tok-a"), None, TOKENS).verified
    assert resolve_identity(None, "open", TOKENS).session == "open"
    assert resolve_identity(None, None, TOKENS).session == "default"
    assert resolve_identity(("someone", "x"), None, TOKENS).verified is False
    for creds, header in [(("team-a", "bad"), None), (None, "team-a"), (("team-a", ""), None)]:
        with pytest.raises(AuthFailure) as info:
            resolve_identity(creds, header, TOKENS)
        assert "tok-a" not in str(info.value)
    with pytest.raises(AuthFailure):
        resolve_identity(None, None, {"default": "t"})
    with pytest.raises(AuthFailure) as info:  # HTTPS_PROXY=http://tok-a@host
        resolve_identity(("tok-a", ""), None, TOKENS)
    assert "tok-a" not in str(info.value)
    for bad in ("a b", "x/y", "", "../etc"):
        with pytest.raises(AuthFailure):
            resolve_identity((bad, "p"), None, TOKENS) if bad else resolve_identity(None, " ", TOKENS)
        with pytest.raises(AuthFailure):
            resolve_identity(None, bad or " ", TOKENS)


SESSION = [Injection("X-Tenant", "a", "session", "api.openai.com"),
           Injection("Authorization", "Bearer k", "session", "api.openai.com")]


def names(injections: list[Injection]) -> dict[str, str]:
    return {i.name: i.value for i in injections}


def test_combine_rows_of_spec() -> None:
    assert names(combine(SESSION, None, "override")) == {"X-Tenant": "a", "Authorization": "Bearer k"}
    assert combine(SESSION, {}, "override") == []
    assert names(combine(SESSION, {"X-T": "1"}, "override")) == {"X-T": "1"}
    assert names(combine(SESSION, {}, "merge")) == names(SESSION)
    assert names(combine(SESSION, {"x-tenant": "t"}, "merge")) == {
        "Authorization": "Bearer k", "x-tenant": "t"}


@pytest.mark.parametrize("text", ['{"a":', "[]", '"x"', '{"A": 1}', '{"A": null}',
                                  '{"A": "x\\ny"}', '{"A B": "x"}', '{"a": "1", "A": "2"}',
                                  '{"X-Llmitm-Session": "x"}'])
def test_bad_turn_headers(text: str) -> None:
    with pytest.raises(HeaderError):
        parse_turn_headers(text)


def test_empty_turn_is_a_real_value() -> None:
    assert parse_turn_headers("{}") == {}


def test_scopes_match_host_and_path() -> None:
    scopes = compile_scopes({"api.anthropic.com/v1/*": {"x-api-key": "k"},
                             "*.openai.com": {"X": "1"}})
    assert names(session_injections(scopes, "api.anthropic.com", 443, "/v1/messages?beta=true")) == {
        "x-api-key": "k"}
    assert session_injections(scopes, "api.anthropic.com", 443, "/api/event_logging") == []
    assert names(session_injections(scopes, "api.openai.com", 443, "/anything")) == {"X": "1"}
    assert session_injections(scopes, "chatgpt.com", 443, "/v1/x") == []


def test_overlay_partial_update_and_clear() -> None:
    configured = {"api.openai.com": {"Authorization": "k", "X-Tenant": "a"}, "other": {"Y": "1"}}
    store = SessionStore()
    store.patch("s", {"api.openai.com": {"x-tenant": "b"}})
    headers, sources = store.overlays["s"].effective(configured)
    assert headers == {"api.openai.com": {"Authorization": "k", "x-tenant": "b"}, "other": {"Y": "1"}}
    assert sources["api.openai.com\0x-tenant"] == "runtime"
    assert sources["api.openai.com\0authorization"] == "config"
    store.patch("s", {"api.openai.com": {"Authorization": ""}, "other": {}})
    headers, _ = store.overlays["s"].effective(configured)
    assert headers == {"api.openai.com": {"x-tenant": "b"}}
    store.patch("s", None)  # nothing given: nothing changes
    assert store.overlays["s"].effective(configured)[0] == headers
    store.patch("s", {})
    assert store.overlays["s"].effective(configured)[0] == {}
    before = store.version
    with pytest.raises(HeaderError):
        store.patch("s", {"x": {"Bad Name": "v"}})
    assert store.version == before  # an invalid patch changes nothing


header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,10}", fullmatch=True)


@given(st.dictionaries(header_names, st.text("abc", max_size=3), max_size=4),
       st.dictionaries(header_names, st.text("xyz", max_size=3), max_size=4))
def test_merge_turn_always_wins_and_session_survives(session: dict[str, str],
                                                     turn: dict[str, str]) -> None:
    lowered_turn = {k.lower() for k in turn}
    if len(lowered_turn) != len(turn) or len({k.lower() for k in session}) != len(session):
        return
    injected = [Injection(k, v, "session", "s") for k, v in session.items()]
    out = combine(injected, turn, "merge")
    got = {i.name.lower(): i.value for i in out}
    assert len(got) == len(out)  # never two values for one name
    for k, v in turn.items():
        assert got[k.lower()] == v
    for k, v in session.items():
        if k.lower() not in lowered_turn:
            assert got[k.lower()] == v
    assert not Overlay().effective({})[0]
