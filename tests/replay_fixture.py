"""Run ``scripts/replay`` from tests, and write small flow files to feed it.

    from tests.replay_fixture import replay_server  # noqa: F401  (the fixture)

    def test_x(replay_server, tmp_path):
        port = replay_server(path, certfile=..., keyfile=..., speed=2)
        # point mitmdump's llmitm_resolve at 127.0.0.1:{port}

Options become flags (``speed=2`` -> ``--speed 2``, ``compress=True`` -> ``--compress``,
``ignore_param=["a", "b"]`` -> ``--ignore-param a --ignore-param b``). The server listens on a
free port of 127.0.0.1 (``port=0``) and is stopped by PID when the test ends.
``run_replay(path, **opts)`` is the same as a context manager yielding a ``ReplayServer``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http, io

REPO = Path(__file__).resolve().parents[1]
REPLAY = REPO / "scripts" / "replay"


def _flags(opts: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                out += [flag, str(item)]
        else:
            out += [flag, str(value)]
    return out


class ReplayServer:
    """A running ``scripts/replay``; ``port`` is where it listens, ``log()`` its stderr."""

    def __init__(self, flow_file: str | os.PathLike[str], timeout: float = 30.0, **opts: Any) -> None:
        opts.setdefault("port", 0)
        self.args = [str(REPLAY), str(flow_file), *_flags(opts)]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self._wait_ready(timeout)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def _wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                code = self.proc.wait(5)
                raise RuntimeError(f"replay exited with {code}:\n{self.log()}")
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("ready"):
                    return int(msg["port"])
        self.stop()
        raise TimeoutError(f"replay not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the server's process group (its own, by PID), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self._reader.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@contextlib.contextmanager
def run_replay(flow_file: str | os.PathLike[str], **opts: Any) -> Iterator[ReplayServer]:
    server = ReplayServer(flow_file, **opts)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def replay_server() -> Iterator[Callable[..., int]]:
    """Factory: ``replay_server(flow_file, **opts) -> port``; every server stops at teardown."""
    servers: list[ReplayServer] = []

    def start(flow_file: str | os.PathLike[str], **opts: Any) -> int:
        server = ReplayServer(flow_file, **opts)
        servers.append(server)
        return server.port

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


# -- building flow files -----------------------------------------------------------------------
def make_flow(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    request_headers: Iterable[tuple[str, str]] = (),
    status: int = 200,
    response_body: bytes = b"",
    response_headers: Iterable[tuple[str, str]] = (("content-type", "application/json"),),
    metadata: dict[str, Any] | None = None,
) -> http.HTTPFlow:
    """An HTTP flow as a recording would hold it (response body stored raw)."""
    from mitmproxy.test import tflow

    def fields(pairs: Iterable[tuple[str, str]]) -> http.Headers:
        return http.Headers([(k.encode(), v.encode()) for k, v in pairs])

    req = http.Request.make(method, url, body, fields(request_headers))
    resp = http.Response.make(status, b"", fields(response_headers))
    resp.raw_content = response_body
    if "transfer-encoding" not in resp.headers:
        resp.headers["content-length"] = str(len(response_body))
    flow = tflow.tflow(req=req, resp=resp)
    flow.metadata.update(metadata or {})
    return flow


def write_flows(path: str | os.PathLike[str], flows: Iterable[http.HTTPFlow]) -> Path:
    with open(path, "wb") as fh:
        writer = io.FlowWriter(fh)
        for flow in flows:
            writer.add(flow)
    return Path(path)
