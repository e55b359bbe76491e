"""Redaction: markers, secret header names, secret values in headers, URLs and bodies."""

from __future__ import annotations

import hashlib
import os
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st

from llmitm.redact import (
    ALWAYS_REDACTED_HEADERS,
    SecretSet,
    bare_token,
    digest,
    is_marker,
    iter_marker_digests,
    needle_pattern,
    needle_pattern_bytes,
    redacted,
)

KEY = "sk-proj-AbCdEf0123456789xyz"


def test_marker_is_first_8_hex_of_sha256() -> None:
    want = hashlib.sha256(b"hello").hexdigest()[:8]
    assert redacted("hello") == f"[redacted:{want}]"
    assert redacted(b"hello") == redacted("hello")
    assert digest("hello") == want
    assert is_marker(redacted("x"))
    assert not is_marker("Bearer " + redacted("x"))


def test_always_redacted_names_case_insensitive() -> None:
    s = SecretSet()
    headers = [
        ("Authorization", "Bearer abc"),
        ("proxy-authorization", "Basic dGVhbTp0b2s="),
        ("X-API-Key", "k"),
        ("api-key", "k2"),
        ("Cookie", "a=b"),
        ("set-cookie", "c=d"),
        ("PAYMENT-SIGNATURE", "sig"),
        ("Payment-Response", "resp"),
        ("X-PAYMENT", "pay"),
        ("x-payment-response", "r"),
        ("PAYMENT-REQUIRED", "eyJwdWJsaWMiOnRydWV9"),
        ("content-type", "application/json"),
    ]
    out = dict(s.redact_headers(headers))
    for name, value in headers[:-2]:
        assert out[name] == redacted(value), name
    assert out["PAYMENT-REQUIRED"] == "eyJwdWJsaWMiOnRydWV9"
    assert out["content-type"] == "application/json"
    assert "payment-required" not in ALWAYS_REDACTED_HEADERS


def test_extra_names_and_injected_names() -> None:
    s = SecretSet(header_names=["X-Team-Secret"])
    assert s.redact_header("x-team-secret", "v") == redacted("v")
    assert s.redact_header("X-Other", "v") == "v"
    assert s.redact_header("X-Other", "v", extra_names=["x-other"]) == redacted("v")
    assert s.redact_headers([("X-Inj", "q")], extra_names=["X-INJ"]) == [("X-Inj", redacted("q"))]


def test_secret_values_in_headers_short_and_long() -> None:
    s = SecretSet(["abc12", KEY])
    # A short secret is redacted as a whole value, never inside other text.
    assert s.redact_header("X-Short", "abc12") == redacted("abc12")
    assert s.redact_header("X-Other", "xabc12x") == "xabc12x"
    assert s.redact_header("X-Custom", f"token={KEY};") == f"token={redacted(KEY)};"


def test_body_url_and_encoded_forms() -> None:
    slashy = "tok/with+plus=and/slash12"
    s = SecretSet([KEY, slashy, "short"])
    body = f'{{"k":"{KEY}","s":"short","j":"{slashy.replace("/", "\\/")}"}}'.encode()
    out = s.redact_bytes(body)
    assert KEY.encode() not in out
    assert out.count(redacted(KEY).encode()) == 1
    assert b'"short"' in out  # below min_len: left alone in bodies
    assert redacted(slashy).encode() in out  # JSON-escaped form found
    url = f"https://h.example/p/{KEY}?a={quote(slashy, safe='')}&b=1"
    red = s.redact_text(url)
    assert KEY not in red and quote(slashy, safe="") not in red
    assert red == f"https://h.example/p/{redacted(KEY)}?a={redacted(slashy)}&b=1"


def test_bearer_value_also_finds_its_token() -> None:
    value = f"Bearer {KEY}"
    assert bare_token(value) == KEY
    s = SecretSet([value])
    assert s.redact_header("X-Fwd", value) == redacted(value)
    assert s.redact_bytes(f"x {KEY} y".encode()) == f"x {redacted(KEY)} y".encode()
    # The whole value wins over the token inside it.
    assert s.redact_text(f"[{value}]") == f"[{redacted(value)}]"


def test_idempotent_and_binary_safe() -> None:
    s = SecretSet([KEY])
    once = s.redact_bytes(b"\xff\x00" + KEY.encode() + b"\xfe")
    assert once == b"\xff\x00" + redacted(KEY).encode() + b"\xfe"
    assert s.redact_bytes(once) == once
    assert s.redact_header("Authorization", redacted("x")) == redacted("x")
    assert SecretSet([redacted("x")]).values == frozenset()
    body = b"nothing secret here"
    assert s.redact_bytes(body) is body  # no copy when nothing matches


def test_marker_digests_literal_and_percent_encoded() -> None:
    d = digest(KEY)
    text = f"a {redacted(KEY)} b %5Bredacted%3A{d}%5D"
    assert [x for x, _ in iter_marker_digests(text)] == [d, d]
    assert [x for x, _ in iter_marker_digests(text.encode())] == [d, d]
    assert list(iter_marker_digests(b"plain")) == []


def test_with_values_and_contains() -> None:
    s = SecretSet([KEY]).with_values(["another-secret-value"])
    assert s.contains(b"xx another-secret-value")
    assert s.contains(KEY)
    assert not s.contains("nothing")
    assert s.redact_header("authorization", "x") == redacted("x")


TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
    min_size=8,
    max_size=64,
)


@given(secret=TOKEN, before=st.binary(max_size=200), after=st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_secret_anywhere_in_a_body_is_redacted(secret: str, before: bytes, after: bytes) -> None:
    s = SecretSet([secret])
    out = s.redact_bytes(before + secret.encode() + after)
    assert secret.encode() not in out
    assert redacted(secret).encode() in out


def test_redaction_of_a_1mb_body() -> None:
    secrets = [f"sk-{os.urandom(20).hex()}" for _ in range(10)] + [f"Bearer tok-{i:012d}" for i in range(10)]
    s = SecretSet(secrets)
    body = os.urandom(512 * 1024).hex().encode()  # 1 MiB, no secret
    leaky = body[:500_000] + secrets[3].encode() + body[500_000:]
    assert s.redact_bytes(body) == body
    out = s.redact_bytes(leaky)
    assert redacted(secrets[3]).encode() in out and secrets[3].encode() not in out


def test_needle_pattern_is_leftmost_longest_and_exact() -> None:
    words = ["abc", "abcdef", "abd", "xyz", "é-ü-key-1", "a.c"]
    rx = needle_pattern(words)
    assert [m.group(0) for m in rx.finditer("abcdef abc abd a.c abx é-ü-key-1")] == [
        "abcdef",
        "abc",
        "abd",
        "a.c",
        "é-ü-key-1",
    ]
    assert rx.search("axc") is None  # "." is literal
    rb = needle_pattern_bytes([w.encode() for w in words])
    assert [m.group(0) for m in rb.finditer("abcdef é-ü-key-1 é-ü".encode())] == [
        b"abcdef",
        "é-ü-key-1".encode(),
    ]
    long = "j" + "x" * 5000  # a long JWT-like needle must not hit the recursion limit
    assert needle_pattern([long, long[:10]]).search("--" + long).group(0) == long
