"""The addon glue with mitmproxy's own test helpers (taddons/tflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from configuration import Configuration
from glue import CONTROL_HOST, for_control_host
from identify import Identify, take_control_headers
from llmitm import flowmeta
from llmitm.streaming import StreamPipeline, pipeline_of
from resolve import Resolve
from streams import Streams


def test_identify_classifies_and_strips_control_headers() -> None:
    identify = Identify()
    with taddons.context(identify):
        flow = tflow.tflow()
        flow.request.host = "api.anthropic.com"
        flow.request.path = "/v1/messages?beta=true"
        flow.request.headers["X-Llmitm-Bypass"] = "1"
        flow.request.headers["x-llmitm-turn-headers"] = "{}"
        flow.request.headers["X-LLMITM-Whatever"] = "x"
        identify.request(flow)
        assert flow.metadata[flowmeta.PROVIDER] == "anthropic"
        assert flow.metadata[flowmeta.PROVIDER_STYLE] == "anthropic"
        assert flow.metadata[flowmeta.ENDPOINT] == "messages"
        assert flow.metadata[flowmeta.BYPASS] is True
        assert not [k for k in flow.request.headers if k.lower().startswith("x-llmitm")]


def test_take_control_headers_folds_repeats_and_keeps_the_rest() -> None:
    headers = http.Headers([(b"X-Llmitm-Session", b"a"), (b"Accept", b"*/*"),
                            (b"x-llmitm-session", b"b"), (b"Proxy-Authorization", b"Basic eA=="),
                            (b"X-LLMITM-Turn-Headers", "{\"é\": 1}".encode()), (b"X-Other", b"o")])
    taken = take_control_headers(headers)
    assert taken == {"x-llmitm-session": "a, b", "proxy-authorization": "Basic eA==",
                     "x-llmitm-turn-headers": '{"é": 1}'}
    assert headers.fields == ((b"Accept", b"*/*"), (b"X-Other", b"o"))
    assert take_control_headers(headers) == {} and len(headers.fields) == 2


@pytest.mark.parametrize("host,host_header,expected", [
    ("llmitm.internal", None, True),
    ("api.openai.com", "llmitm.internal", True),  # as mitmproxy's ASGI apps decide (Host header)
    ("10.0.0.1", "LLMITM.INTERNAL:80", False),  # pretty_host keeps the case: no match there
    ("api.openai.com", None, False),
    ("llmitm.internal.example", None, False),
])
def test_for_control_host_agrees_with_pretty_host(host: str, host_header: str | None,
                                                  expected: bool) -> None:
    flow = tflow.tflow()
    flow.request.host = host
    if host_header is None:
        flow.request.headers.pop("host", None)
    else:
        flow.request.headers["host"] = host_header
    assert for_control_host(flow) is (flow.request.pretty_host == CONTROL_HOST) is expected


def test_streams_installs_pipeline_only_for_sse() -> None:
    streams = Streams()
    with taddons.context(streams):
        sse = tflow.tflow(resp=tutils.tresp(headers=[(b"content-type", b"text/event-stream"),
                                                     (b"content-length", b"10")]))
        streams.responseheaders(sse)
        assert isinstance(pipeline_of(sse.response.stream), StreamPipeline)
        assert sse.response.headers["x-accel-buffering"] == "no"
        assert "content-length" not in sse.response.headers
        plain = tflow.tflow(resp=True)
        streams.responseheaders(plain)
        assert plain.response.stream is False


def test_configuration_rejects_invalid_file_and_keeps_previous_on_edit(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("providers: {x: {hosts: [a.example]}}\n")
    config = Configuration()
    with taddons.context(config) as tctx:
        tctx.configure(config, llmitm_config=str(path))
        assert "x" in config.config.providers
        path.write_text("providers: {x: {hosts: [b.example]}}\n# changed size\n")
        assert config.reload_if_changed()
        assert config.config.providers["x"].hosts == ["b.example"]
        path.write_text("providers: {x: {bad: 1}}\n")
        assert not config.reload_if_changed()
        assert config.config.providers["x"].hosts == ["b.example"]


def test_configuration_refuses_invalid_file_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("whatever: 1\n")
    config = Configuration()
    with taddons.context(config) as tctx:
        with pytest.raises(exceptions.OptionsError, match="whatever: unknown key"):
            tctx.configure(config, llmitm_config=str(bad))


def test_resolve_rejects_bad_entries() -> None:
    resolve = Resolve()
    with taddons.context(resolve) as tctx:
        with pytest.raises(exceptions.OptionsError, match="HOST:PORT=ADDR:PORT"):
            tctx.configure(resolve, llmitm_resolve=["nonsense"])
        tctx.configure(resolve, llmitm_resolve=["api.openai.com:443=127.0.0.1:9"])
        assert resolve.table == {("api.openai.com", 443): ("127.0.0.1", 9)}
