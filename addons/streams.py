"""Addon: stream every ``text/event-stream`` response instead of holding it to the end.

Bare mitmdump buffers a response until it is complete, so an SSE client would see its first
token with its last. This installs one ``StreamPipeline`` per SSE response; later addons (repair,
recorder) add their stages and taps to it in their own ``responseheaders`` hooks.
"""

from __future__ import annotations

from mitmproxy import http

from llmitm.streaming import StreamPipeline, pipeline_of


def is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


def stream_pipeline(flow: http.HTTPFlow) -> StreamPipeline | None:
    """The flow's pipeline, for addons that add stages or taps."""
    return pipeline_of(flow.response.stream) if flow.response else None


class Streams:
    name = "llmitm-streams"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not is_event_stream(response):
            return
        response.stream = StreamPipeline().feed
        # Reverse proxies in front of the client (nginx and friends) must not buffer either.
        response.headers["X-Accel-Buffering"] = "no"
        # A stage may change the length; SSE is delimited by the connection/chunks, not a length.
        if "content-length" in response.headers:
            del response.headers["content-length"]


addons = [Streams()]
