"""Helpers for the recording and guard end-to-end tests: clients per session, reading recordings."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import httpx
from mitmproxy import http, io

from tests.harness.gateway import Gateway


def session_client(gw: Gateway, session: str | None = None, token: str | None = None,
                   **kw: object) -> httpx.Client:
    """An httpx client through ``gw``, acting as ``session`` by proxy auth when given."""
    auth = f"{quote(session, safe='')}:{quote(token or '', safe='')}@" if session else ""
    return httpx.Client(proxy=f"http://{auth}127.0.0.1:{gw.port}", verify=str(gw.bundle()),
                        trust_env=False, timeout=20, **kw)  # type: ignore[arg-type]


def recording_files(gw: Gateway, session: str | None = None) -> list[Path]:
    pattern = f"{session}-*.mitm" if session else "*.mitm"
    return sorted((gw.workdir / "recordings").glob(pattern))


def read_flows(path: Path) -> list[http.HTTPFlow]:
    with open(path, "rb") as fh:
        return [f for f in io.FlowReader(fh).stream() if isinstance(f, http.HTTPFlow)]


def wait_flows(gw: Gateway, session: str, count: int, timeout: float = 10.0) -> list[http.HTTPFlow]:
    """The session's recorded flows once there are at least ``count`` (they are written when a
    flow ends, which can be a moment after the client saw its last byte)."""
    deadline = time.monotonic() + timeout
    flows: list[http.HTTPFlow] = []
    while time.monotonic() < deadline:
        flows = [f for p in recording_files(gw, session) for f in read_flows(p)]
        if len(flows) >= count:
            return flows
        time.sleep(0.05)
    raise AssertionError(f"{len(flows)} flow(s) recorded for {session}, wanted {count}:\n"
                         f"{gw.proc.output if gw.proc else ''}")


def secret_forms(secret: str) -> list[bytes]:
    """A secret as it could appear in a file: plain, percent-encoded and JSON-escaped."""
    return [f.encode() for f in {secret, quote(secret, safe=""), secret.replace("/", "\\/")}]


def assert_no_secrets(data: bytes | str, secrets: Iterable[str], where: str) -> None:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    for secret in secrets:
        for form in secret_forms(secret):
            assert form not in raw, f"a secret ({secret[:4]}...) appears in {where}"


def flow_texts(flow: http.HTTPFlow) -> list[bytes]:
    """Every decoded body of a recorded flow (request, response, WebSocket messages, metadata
    bytes), for secret scans that must see through Content-Encoding."""
    out: list[bytes] = [flow.request.get_content(strict=False) or b""]
    if flow.response is not None:
        out.append(flow.response.get_content(strict=False) or b"")
    if flow.websocket is not None:
        out += [m.content for m in flow.websocket.messages]
    out += [v for v in flow.metadata.values() if isinstance(v, bytes)]
    return out
