"""``mitmdump -s scripts/bench_stream_true.py``: the plain streaming baseline of scripts/bench_repair.py.

Every ``text/event-stream`` response is streamed with ``flow.response.stream = True`` (bytes pass
as they arrive, nothing else runs), which is what a bare mitmproxy user would do for SSE.
"""

from __future__ import annotations

from mitmproxy import http


def responseheaders(flow: http.HTTPFlow) -> None:
    response = flow.response
    if response is not None and response.headers.get("content-type", "").lower().startswith(
            "text/event-stream"):
        response.stream = True
