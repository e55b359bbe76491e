from __future__ import annotations

import pytest

from llmitm.providers import ProviderConfig, ProviderTable, classify_endpoint
from llmitm.resolve import parse_resolve_entries


@pytest.mark.parametrize("path,kind", [
    ("/v1/chat/completions", "chat_completions"),
    ("/openai/deployments/gpt/chat/completions?api-version=2024-10-21", "chat_completions"),
    ("/v1/responses", "responses"),
    ("/v1/responses/", "responses"),
    ("/v1/responses/resp_123", "other"),
    ("/v1/messages?beta=true", "messages"),
    ("/v1/messages/count_tokens", "other"),
    ("/v1/models", "models"),
    ("/api/event_logging/batch", "other"),
    ("/", "other"),
])
def test_classify_endpoint(path: str, kind: str) -> None:
    assert classify_endpoint(path) == kind


def test_builtin_and_configured_providers() -> None:
    table = ProviderTable({
        "groq": ProviderConfig(hosts=["api.groq.com"]),
        "azure": ProviderConfig(hosts=["*.openai.azure.com"]),
        "bedrock": ProviderConfig(hosts=["bedrock.example"], style="anthropic"),
    })
    assert (m := table.match("API.OPENAI.COM")) and m.name == "openai" and m.style == "openai"
    assert (m := table.match("api.anthropic.com")) and m.style == "anthropic"
    assert (m := table.match("api.groq.com")) and m.name == "groq"
    assert (m := table.match("myres.openai.azure.com")) and m.name == "azure"
    assert (m := table.match("bedrock.example")) and m.style == "anthropic"
    assert table.match("telemetry.example") is None
    assert table.match("chatgpt.com") is None


def test_resolve_entries() -> None:
    assert parse_resolve_entries(["api.openai.com:443=127.0.0.1:8443", "[::1]:1=[::1]:2"]) == {
        ("api.openai.com", 443): ("127.0.0.1", 8443), ("::1", 1): ("::1", 2)}
    for bad in ["api.openai.com=127.0.0.1:1", "a:1=b", "a:x=b:1", "a:1=b:70000"]:
        with pytest.raises(ValueError):
            parse_resolve_entries([bad])
