"""Which provider a host belongs to and what kind of endpoint a path is.

All protocol recognition lives here, so no hook ever branches on a host name. The two public
providers are built in; more OpenAI-compatible (or Anthropic-compatible) hosts come from the
``providers`` config section.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ProviderStyle = Literal["openai", "anthropic"]
EndpointKind = Literal["chat_completions", "responses", "messages", "models", "other"]


class ProviderConfig(BaseModel):
    """``providers.<name>``: an extra provider recognised by host."""

    model_config = ConfigDict(extra="forbid")

    hosts: list[str] = Field(min_length=1, description="host names or fnmatch patterns")
    style: ProviderStyle = "openai"


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    style: ProviderStyle
    hosts: tuple[str, ...]


BUILTIN_PROVIDERS: tuple[Provider, ...] = (
    Provider("openai", "openai", ("api.openai.com",)),
    Provider("anthropic", "anthropic", ("api.anthropic.com",)),
)


def _is_pattern(host: str) -> bool:
    return any(c in host for c in "*?[")


class ProviderTable:
    """Host -> Provider. Exact names are a dict lookup; patterns are tried in config order."""

    __slots__ = ("_exact", "_patterns")

    def __init__(self, configured: dict[str, ProviderConfig] | None = None) -> None:
        providers = list(BUILTIN_PROVIDERS)
        for name, cfg in (configured or {}).items():
            providers.append(Provider(name, cfg.style, tuple(h.lower() for h in cfg.hosts)))
        self._exact: dict[str, Provider] = {}
        self._patterns: list[tuple[str, Provider]] = []
        # Configured providers come last but win on an exact host they name explicitly.
        for provider in providers:
            for host in provider.hosts:
                if _is_pattern(host):
                    self._patterns.append((host, provider))
                else:
                    self._exact[host] = provider

    def match(self, host: str) -> Provider | None:
        host = host.lower()
        found = self._exact.get(host)
        if found is not None:
            return found
        for pattern, provider in self._patterns:
            if fnmatch.fnmatchcase(host, pattern):
                return provider
        return None


# Path suffixes, so "/v1/chat/completions", Azure's "/openai/deployments/x/chat/completions" and
# gateways with their own prefixes all classify alike.
_SUFFIXES: tuple[tuple[str, EndpointKind], ...] = (
    ("/chat/completions", "chat_completions"),
    ("/responses", "responses"),
    ("/messages", "messages"),
    ("/models", "models"),
)


def classify_endpoint(path: str) -> EndpointKind:
    """Endpoint kind of a request path (query string ignored, trailing slash tolerated)."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, kind in _SUFFIXES:
        if path.endswith(suffix):
            return kind
    return "other"
