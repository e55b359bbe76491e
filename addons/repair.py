"""Addon: repair streamed tool-call frames (and the same defects in JSON bodies) while they flow.

For SSE responses of chat completions, Responses and Messages (of any recognised provider) a
repairer joins the flow's StreamPipeline: healthy frames pass byte-identical, a defective frame is
re-serialised, nothing is held back beyond the frame being assembled, and a stream the parser does
not understand passes through unchanged. Non-streamed JSON bodies get the same repairs in
``response``. Skipped under bypass; option ``llmitm_repair`` turns it off.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import Counter
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from glue import add_comment
from llmitm import flowmeta
from llmitm.repair import (
    StreamRepairer,
    may_need_json_repair,
    repair_json_response,
    stream_repairer_for,
)
from streams import stream_pipeline

logger = logging.getLogger(__name__)

REPAIRED_ENDPOINTS = frozenset({"chat_completions", "responses", "messages"})


def request_facts(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """What repairs need from the request (``tool_choice``). Parsing a long agent conversation
    costs milliseconds, so the body is parsed only when it mentions ``tool_choice`` at all."""
    body = flow.request.get_content(strict=False) or b""
    if body.find(b'"tool_choice"') < 0:  # not `in`: see llmitm/repair/_shapes.py
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return {"tool_choice": parsed.get("tool_choice")} if isinstance(parsed, dict) else None


class Repair:
    name = "llmitm-repair"

    def __init__(self) -> None:
        self.enabled = True
        self._streams: weakref.WeakKeyDictionary[http.HTTPFlow, StreamRepairer] = (
            weakref.WeakKeyDictionary()
        )

    def load(self, loader: Loader) -> None:
        loader.add_option("llmitm_repair", bool, True,
                          "Repair streamed tool-call frames that strict clients choke on.")

    def configure(self, updated: set[str]) -> None:
        if "llmitm_repair" in updated:
            self.enabled = ctx.options.llmitm_repair  # read once: options are deep-copied on read

    def _applies(self, flow: http.HTTPFlow) -> bool:
        return bool(
            self.enabled
            and not flow.metadata.get(flowmeta.BYPASS)
            and flow.metadata.get(flowmeta.ENDPOINT) in REPAIRED_ENDPOINTS
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        pipeline = stream_pipeline(flow)
        if pipeline is None or not self._applies(flow):
            return
        endpoint = str(flow.metadata[flowmeta.ENDPOINT])
        repairer = stream_repairer_for(endpoint, request_facts(flow))
        if repairer is not None:
            pipeline.add_stage(repairer)
            self._streams[flow] = repairer

    def response(self, flow: http.HTTPFlow) -> None:
        repairer = self._streams.pop(flow, None) if self._streams else None
        if repairer is not None:
            self._report(flow, repairer.repairs)
            return
        response = flow.response
        if (response is None or response.stream or not self._applies(flow)
                or response.status_code != 200
                or "json" not in response.headers.get("content-type", "")):
            return
        body = response.get_content(strict=False)
        endpoint = str(flow.metadata[flowmeta.ENDPOINT])
        # repair_json_response checks this too; asked here first, it also spares request_facts
        # for the usual response with no tool call (a substring scan of a small body)
        if not body or not may_need_json_repair(endpoint, body):
            return
        repaired, repairs = repair_json_response(endpoint, body, request_facts(flow))
        if repaired is not None:
            response.content = repaired  # re-encodes and fixes Content-Length
        self._report(flow, repairs)

    def error(self, flow: http.HTTPFlow) -> None:
        repairer = self._streams.pop(flow, None) if self._streams else None
        if repairer is not None:
            self._report(flow, repairer.repairs)

    @staticmethod
    def _report(flow: http.HTTPFlow, repairs: Counter[str]) -> None:
        if not repairs:
            return
        counts = dict(sorted(repairs.items()))
        flow.metadata[flowmeta.REPAIRS] = counts
        summary = ", ".join(f"{name}={n}" for name, n in counts.items())
        add_comment(flow, f"llmitm: repaired tool-call frames: {summary}")
        logger.info("llmitm: repaired %s %s: %s", flow.request.method,
                    flow.request.pretty_url.split("?", 1)[0], summary)


addons = [Repair()]
