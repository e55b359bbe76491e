"""Replay matching: mitmproxy's server-replay key, order, reuse, and redacted recordings."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from mitmproxy import http
from mitmproxy.addons.serverplayback import ServerPlayback
from mitmproxy.test import taddons, tflow

from llmitm.redact import SecretSet, redacted
from llmitm.replaykeys import MatchOptions, ReplayIndex, RequestView, request_key

KEY = "sk-proj-replay-0123456789abcdef"
OTHER = "sk-proj-someone-else-987654321"


def view(
    method: str = "POST",
    path: str = "/v1/chat/completions",
    body: bytes = b"{}",
    host: str = "api.openai.com",
    port: int = 443,
    scheme: str = "https",
) -> RequestView:
    return RequestView(method, scheme, host, port, path, body)


PAIRS = [
    (view(), view()),
    (view(), view(method="GET")),
    (view(), view(body=b'{"a":1}')),
    (view(), view(host="api.anthropic.com")),
    (view(), view(port=8443)),
    (view(), view(scheme="http")),
    (view(path="/v1/x?a=1&b=2"), view(path="/v1/x?a=1&b=2")),
    (view(path="/v1/x?a=1&b=2"), view(path="/v1/x?b=2&a=1")),
    (view(path="/v1/x?a=1"), view(path="/v1/x?a=2")),
    (view(path="/v1/x?a=b%20c"), view(path="/v1/x?a=b+c")),
    (view(path="/v1/x?a="), view(path="/v1/x?a")),
    (view(path="/v1/x"), view(path="/v1/y")),
]


def _mitm_flow(v: RequestView) -> http.HTTPFlow:
    req = http.Request.make(v.method, f"{v.scheme}://{v.host}:{v.port}{v.path}", v.body)
    return tflow.tflow(req=req)


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_key_agrees_with_mitmproxy_server_replay(a: RequestView, b: RequestView) -> None:
    sp = ServerPlayback()
    with taddons.context(sp):
        same_mitm = sp._hash(_mitm_flow(a)) == sp._hash(_mitm_flow(b))
    assert (request_key(a) == request_key(b)) is same_mitm


def test_headers_are_not_part_of_the_key_and_options() -> None:
    a, b = view(path="/v1/x?a=1&t=5"), view(path="/v1/x?a=1&t=9", body=b"other")
    assert request_key(a) != request_key(b)
    opts = MatchOptions(ignore_content=True, ignore_params=frozenset({"t"}))
    assert request_key(a, opts) == request_key(b, opts)
    opts = MatchOptions(ignore_host=True, ignore_port=True, ignore_scheme=True)
    assert request_key(view(), opts) == request_key(view("POST", host="h", port=1, scheme="http"), opts)


def test_served_once_in_order_then_none() -> None:
    idx: ReplayIndex[str] = ReplayIndex()
    idx.add(view(), "first")
    idx.add(view(), "second")
    idx.add(view(body=b"x"), "other")
    assert len(idx) == 3
    assert idx.match(view()) == "first"
    assert idx.match(view()) == "second"
    assert idx.match(view()) is None
    assert idx.match(view(body=b"x")) == "other"
    assert len(idx) == 0


def test_reuse_serves_the_first_match_again() -> None:
    idx: ReplayIndex[str] = ReplayIndex(reuse=True)
    idx.add(view(), "first")
    idx.add(view(), "second")
    assert [idx.match(view()) for _ in range(3)] == ["first"] * 3


def _body(secret: str) -> bytes:
    return json.dumps({"model": "m", "input": f"key {secret} here", "n": 1}).encode()


def test_with_secrets_both_sides_are_redacted() -> None:
    secrets = SecretSet([KEY])
    idx: ReplayIndex[str] = ReplayIndex(secrets=secrets)
    # Recorded redacted; the live request carries the key (body and URL).
    idx.add(view(path=f"/v1/x?k={redacted(KEY)}", body=secrets.redact_bytes(_body(KEY))), "hit")
    assert idx.match(view(path=f"/v1/x?k={OTHER}", body=_body(OTHER))) is None
    assert idx.match(view(path=f"/v1/x?k={quote(KEY)}", body=_body(KEY))) == "hit"


def test_without_secrets_markers_match_their_own_value_only() -> None:
    idx: ReplayIndex[str] = ReplayIndex()
    rec_body = _body(redacted(KEY))
    idx.add(view(body=rec_body), "body")
    idx.add(view(path=f"/v1/files/{redacted(KEY)}/content", method="GET", body=b""), "path")
    idx.add(view(path=f"/v1/q?key={redacted(KEY)}&x=1", method="GET", body=b""), "query")
    assert idx.match(view(body=_body(OTHER))) is None
    assert idx.match(view(body=_body(KEY))) == "body"
    assert idx.match(view(body=_body(KEY))) is None  # served once
    get = "GET"
    assert idx.match(view(get, f"/v1/files/{quote(KEY, safe='')}/content", b"")) == "path"
    assert idx.match(view(get, f"/v1/q?key={OTHER}&x=1", b"")) is None
    assert idx.match(view(get, f"/v1/q?key={KEY}&x=2", b"")) is None
    assert idx.match(view(get, f"/v1/q?key={KEY}&x=1", b"")) == "query"


def test_marker_patterns_handle_several_markers_and_live_markers() -> None:
    a, b = "first-secret-value-1", "second-secret-value-2"
    idx: ReplayIndex[str] = ReplayIndex()
    idx.add(view(body=f'{{"a":"{redacted(a)}","b":"{redacted(b)}"}}'.encode()), "two")
    idx.add(view(body=f'{{"c":"{redacted(a)}"}}'.encode()), "already-redacted")
    assert idx.match(view(body=f'{{"a":"{b}","b":"{a}"}}'.encode())) is None
    assert idx.match(view(body=f'{{"a":"{a}","b":"{b}"}}'.encode())) == "two"
    # A live request that is itself redacted (e.g. recorded twice) matches too.
    assert idx.match(view(body=f'{{"c":"{redacted(a)}"}}'.encode())) == "already-redacted"


def test_exact_match_preferred_and_shared_consumption() -> None:
    secrets = SecretSet([KEY])
    idx: ReplayIndex[str] = ReplayIndex(secrets=secrets)
    idx.add(view(body=_body(redacted(KEY))), "redacted")
    idx.add(view(body=_body(KEY)), "raw-recording")  # redacted on load: same key
    assert idx.match(view(body=_body(KEY))) == "redacted"
    assert idx.match(view(body=_body(KEY))) == "raw-recording"
    assert idx.match(view(body=_body(KEY))) is None
