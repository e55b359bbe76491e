from __future__ import annotations

import pytest

from llmitm.config import ConfigError, GatewayConfig, parse_config
from llmitm.envexpand import ExpansionError, expand_string, expand_tree


@pytest.mark.parametrize("text,env,expected", [
    ("plain", {}, "plain"),
    ("${A}", {"A": "x"}, "x"),
    ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
    ("${A:-dflt}", {}, "dflt"),
    ("${A:-dflt}", {"A": "set"}, "set"),
    ("${A:-}", {}, ""),
    ("$${A}", {"A": "x"}, "${A}"),
    ("$${A} and ${A}", {"A": "x"}, "${A} and x"),
    ("cost $5", {}, "cost $5"),
])
def test_expand_string(text: str, env: dict[str, str], expected: str) -> None:
    assert expand_string(text, env) == expected


def test_unset_variable_names_variable_and_path() -> None:
    with pytest.raises(ExpansionError) as info:
        expand_tree({"sessions": {"a": {"token": "${TOKEN_A}"}}}, {})
    assert "sessions.a.token" in str(info.value) and "TOKEN_A" in str(info.value)


def test_malformed_reference_rejected() -> None:
    with pytest.raises(ExpansionError):
        expand_tree({"k": "${unterminated"}, {})


def test_expansion_reaches_lists_and_leaves_non_strings() -> None:
    tree = {"a": ["${X}", 3, True, None], "b": {"c": "${X}"}}
    assert expand_tree(tree, {"X": "1"}) == {"a": ["1", 3, True, None], "b": {"c": "1"}}


def test_empty_file_is_default_config() -> None:
    assert parse_config("") == GatewayConfig()
    assert parse_config("# only a comment\n") == GatewayConfig()


@pytest.mark.parametrize("text,needle", [
    ("providers: {x: {hosts: [a], extra: 1}}", "providers.x.extra: unknown key"),
    ("providers: {x: {hosts: []}}", "providers.x.hosts"),
    ("providers: {x: {hosts: [a], style: gemini}}", "providers.x.style"),
    ("limits: {concurrency: {'api.*': -1}}", "limits.concurrency.api.*"),
    ("- a list\n", "top level must be a mapping"),
    ("nope: 1", "nope: unknown key"),
])
def test_invalid_config_names_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, {})
    assert needle in str(info.value)


def test_yaml_errors_never_quote_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('sessions:\n  a:\n    token: "sk-SECRET-123\n', {})
    assert "sk-SECRET" not in str(info.value) and "line" in str(info.value)


@pytest.mark.parametrize("scope", ["/v1/*", "", "https:///x"])
def test_scope_needs_a_host(scope: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"sessions:\n  a:\n    headers:\n      '{scope}': {{X: y}}\n", {})
    assert "must start with a host" in str(info.value)
