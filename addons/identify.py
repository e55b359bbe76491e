"""Addon: what a request is — provider, endpoint kind, bypass — before anything else acts on it.

It reads every ``X-Llmitm-*`` request header it needs into ``flow.metadata`` and then strips
them all, so none ever goes upstream, whatever later addons decide.
"""

from __future__ import annotations

from mitmproxy import http

from glue import current_config
from llmitm import flowmeta
from llmitm.providers import ProviderTable, classify_endpoint

CONTROL_PREFIX = "x-llmitm-"


class Identify:
    name = "llmitm-identify"

    def __init__(self) -> None:
        self._table_for: object = None
        self._table = ProviderTable()

    def _providers(self) -> ProviderTable:
        config = current_config()
        if config.providers is not self._table_for:
            self._table = ProviderTable(config.providers)
            self._table_for = config.providers
        return self._table

    def request(self, flow: http.HTTPFlow) -> None:
        self.classify(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        # The upgrade request went through `request` already; nothing more to read.
        pass

    def classify(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        provider = self._providers().match(request.pretty_host)
        metadata = flow.metadata
        if provider is not None:
            metadata[flowmeta.PROVIDER] = provider.name
            metadata[flowmeta.PROVIDER_STYLE] = provider.style
            metadata[flowmeta.ENDPOINT] = classify_endpoint(request.path)
        else:
            metadata[flowmeta.PROVIDER] = None
            metadata[flowmeta.ENDPOINT] = "other"
        headers = request.headers
        metadata[flowmeta.BYPASS] = headers.get("x-llmitm-bypass", "").strip() in ("1", "true")
        strip_control_headers(headers)


def strip_control_headers(headers: http.Headers) -> None:
    for name in {k.lower() for k in headers if k.lower().startswith(CONTROL_PREFIX)}:
        del headers[name]


addons = [Identify()]
