"""Serve a recording as a local upstream (run through ``scripts/replay``).

    scripts/replay FILE [--port N] [--certfile C --keyfile K] [--speed X] [--compress]
                        [--reuse] [--config gateway.yaml] [...]

Requests are matched the way mitmproxy's server replay matches them (method, scheme, host,
port, path, query and body; headers ignored), over redacted forms so a redacted recording
matches live requests that carry the real secrets (see ``llmitm.replaykeys``). Each recorded
flow is served once, in order (``--reuse``: keep serving the first match). Streamed bodies are
sent chunk by chunk with their recorded pacing (``llmitm.stream_timing``); other SSE bodies frame
by frame ``--frame-gap`` apart. Where a repair changed a stream, the recording keeps the
upstream's bytes too; ``--upstream-original`` serves those instead of what the client received.
Unmatched requests get a 404 JSON error of type
``replay_miss``. Prints ``{"ready": true, "port": N}`` on stdout once listening; logs to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import socket
import sys
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from mitmproxy import http, io
from mitmproxy.exceptions import FlowReadException
from mitmproxy.net import encoding

from llmitm import flowmeta
from llmitm.leaks import load_config_secrets
from llmitm.recording import UPSTREAM_ORIGINAL_BODY, UPSTREAM_ORIGINAL_TIMING
from llmitm.redact import SecretSet
from llmitm.replaykeys import MatchOptions, ReplayIndex, RequestView

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

HOP_BY_HOP = frozenset({b"transfer-encoding", b"connection", b"keep-alive", b"content-length", b"upgrade"})


def log(message: str) -> None:
    print(f"replay: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Served:
    """One recorded response, ready to send."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    schedule: list[tuple[float, int]] | None  # (seconds after headers, nbytes), or None
    label: str


def decoded_body(raw: bytes | None, content_encoding: str | None) -> bytes:
    if not raw:
        return b""
    if content_encoding:
        try:
            out = encoding.decode(raw, content_encoding)
        except ValueError:
            return raw
        if isinstance(out, bytes):
            return out
    return raw


def _timing(meta: Any) -> list[tuple[float, int]] | None:
    if not isinstance(meta, list) or not meta:
        return None
    out: list[tuple[float, int]] = []
    for item in meta:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            try:
                out.append((float(item[0]), int(item[1])))
            except (TypeError, ValueError):
                return None
    return out or None


def sse_schedule(body: bytes, gap: float) -> list[tuple[float, int]]:
    """Split an SSE body after each blank line, ``gap`` seconds apart."""
    out: list[tuple[float, int]] = []
    start = 0
    i = 0
    while start < len(body):
        cut = len(body)
        for sep in (b"\n\n", b"\r\n\r\n"):
            pos = body.find(sep, start)
            if pos != -1:
                cut = min(cut, pos + len(sep))
        out.append((i * gap, cut - start))
        start = cut
        i += 1
    return out


def served_from(flow: http.HTTPFlow, frame_gap: float, upstream_original: bool = False) -> Served | None:
    """What the client received (the recorded body and its timing), or with
    ``upstream_original`` what the upstream sent, where a repair changed the stream and the
    recorder kept the original beside it (``llmitm.upstream_original_body``)."""
    resp = flow.response
    if resp is None:
        return None
    body = resp.raw_content or b""
    headers = [(k, v) for k, v in resp.headers.fields if k.lower() not in HOP_BY_HOP]
    schedule = _timing(flow.metadata.get(flowmeta.STREAM_TIMING))
    original = flow.metadata.get(UPSTREAM_ORIGINAL_BODY)
    if upstream_original and isinstance(original, bytes):
        body = original
        schedule = _timing(flow.metadata.get(UPSTREAM_ORIGINAL_TIMING))
    if schedule is None and "text/event-stream" in resp.headers.get("content-type", ""):
        schedule = sse_schedule(body, frame_gap)
    return Served(resp.status_code, headers, body, schedule, f"{flow.request.method} {flow.request.url}")


def request_view(flow: http.HTTPFlow) -> RequestView:
    req = flow.request
    body = decoded_body(req.raw_content, req.headers.get("content-encoding"))
    return RequestView(req.method, req.scheme, req.pretty_host, req.port, req.path, body)


def load(path: str, frame_gap: float, upstream_original: bool = False) -> list[tuple[RequestView, Served]]:
    out: list[tuple[RequestView, Served]] = []
    with open(path, "rb") as fh:
        for flow in io.FlowReader(fh).stream():
            if isinstance(flow, http.HTTPFlow) and flow.websocket is None:
                served = served_from(flow, frame_gap, upstream_original)
                if served is not None:
                    out.append((request_view(flow), served))
    return out


def split_host(host_header: str, default_port: int) -> tuple[str, int]:
    host, port = host_header, default_port
    if host_header.startswith("["):
        end = host_header.find("]")
        host = host_header[1:end] if end != -1 else host_header
        rest = host_header[end + 1 :] if end != -1 else ""
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif host_header.count(":") == 1:
        name, _, p = host_header.partition(":")
        if p.isdigit():
            host, port = name, int(p)
    return host, port


class ReplayApp:
    """A bare ASGI app over a ``ReplayIndex``."""

    def __init__(self, index: ReplayIndex[Served], args: argparse.Namespace) -> None:
        self.index = index
        self.speed: float = args.speed
        self.compress: bool = args.compress
        self.scheme_override: str | None = args.scheme
        self.redactor: SecretSet | None = index.secrets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scheme = self.scheme_override or scope.get("scheme", "http")
        host, port = split_host(headers.get("host", ""), 443 if scheme in ("https", "wss") else 80)
        target = scope.get("raw_path") or scope["path"].encode()
        path = target.decode("utf-8", "surrogateescape")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("utf-8", "surrogateescape")
        view = RequestView(
            scope["method"],
            scheme,
            host,
            port,
            path,
            decoded_body(bytes(body), headers.get("content-encoding")),
        )
        served = self.index.match(view)
        shown = f"{view.method} {scheme}://{host}:{port}{path.split('?', 1)[0]}"
        if self.redactor is not None:
            shown = self.redactor.redact_text(shown)
        if served is None:
            log(f"miss {shown}")
            await self.miss(send, shown)
            return
        log(f"hit {shown} -> {served.status}")
        await self.serve(send, served, "gzip" in headers.get("accept-encoding", ""))

    async def miss(self, send: Send, shown: str) -> None:
        payload = json.dumps(
            {
                "error": {
                    "message": f"no recorded flow matches {shown} ({len(self.index)} recorded flows left)",
                    "type": "replay_miss",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def serve(self, send: Send, served: Served, client_gzip: bool) -> None:
        headers = list(served.headers)
        recorded_encoding = any(k.lower() == b"content-encoding" for k, _ in headers)
        gzip_it = self.compress and client_gzip and not recorded_encoding and bool(served.body)
        if gzip_it:
            headers.append((b"content-encoding", b"gzip"))
        if served.schedule is None:
            body = gzip.compress(served.body, mtime=0) if gzip_it else served.body
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": served.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": served.status, "headers": headers})
        compressor = zlib.compressobj(wbits=31) if gzip_it else None
        loop = asyncio.get_running_loop()
        start = loop.time()
        pos = 0
        data = served.body
        for index, (at, size) in enumerate(served.schedule):
            if pos >= len(data):
                break
            last = index == len(served.schedule) - 1
            chunk = data[pos:] if last else data[pos : pos + size]
            pos += len(chunk)
            if self.speed > 0:
                delay = start + at / self.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if compressor is not None:
                chunk = compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        tail = data[pos:]
        if compressor is not None:
            tail = compressor.compress(tail) + compressor.flush()
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="replay", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a mitmproxy flow file (e.g. a llmitm recording)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    p.add_argument("--certfile", help="PEM certificate (chain) to serve TLS with")
    p.add_argument("--keyfile", help="PEM private key for --certfile")
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="pacing factor: 2 plays twice as fast, 0 sends without delays",
    )
    p.add_argument(
        "--frame-gap",
        type=float,
        default=0.01,
        help="seconds between SSE frames of a recording without timing",
    )
    p.add_argument(
        "--compress",
        action="store_true",
        help="gzip bodies recorded without Content-Encoding when the client accepts it",
    )
    p.add_argument(
        "--reuse", action="store_true", help="keep serving a matched flow (mitmproxy's server_replay_reuse)"
    )
    p.add_argument("--config", help="gateway YAML whose secrets are redacted before matching")
    p.add_argument(
        "--upstream-original",
        action="store_true",
        help="serve what the upstream sent where a repair changed a stream (default: what the "
        "client received)",
    )
    p.add_argument(
        "--scheme",
        choices=["http", "https"],
        help="scheme of incoming requests (default: https with TLS, else http)",
    )
    p.add_argument("--ignore-host", action="store_true")
    p.add_argument("--ignore-port", action="store_true")
    p.add_argument("--ignore-scheme", action="store_true")
    p.add_argument("--ignore-content", action="store_true")
    p.add_argument(
        "--ignore-param",
        action="append",
        default=[],
        metavar="NAME",
        help="query parameter to ignore (repeatable)",
    )
    args = p.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        p.error("--certfile and --keyfile go together")
    return args


async def run(args: argparse.Namespace, index: ReplayIndex[Served]) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    config = uvicorn.Config(
        ReplayApp(index, args),
        http="h11",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(1000):  # bounded: at most ~10 s to start
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        if task.done():
            await task
        raise SystemExit("replay: server did not start")
    port = sock.getsockname()[1]
    print(json.dumps({"ready": True, "port": port}), flush=True)
    log(f"serving {len(index)} recorded flows from {args.file} on {args.host}:{port}")
    await task


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    secrets: SecretSet | None = None
    if args.config:
        try:
            secrets = load_config_secrets(args.config, os.environ).secret_set()
        except ValueError as e:
            log(str(e))
            return 2
    try:
        pairs = load(args.file, args.frame_gap, args.upstream_original)
    except (OSError, FlowReadException) as e:
        log(f"cannot read {args.file}: {e}")
        return 2
    opts = MatchOptions(
        ignore_scheme=args.ignore_scheme,
        ignore_host=args.ignore_host,
        ignore_port=args.ignore_port,
        ignore_content=args.ignore_content,
        ignore_params=frozenset(args.ignore_param),
    )
    index: ReplayIndex[Served] = ReplayIndex(opts, secrets, reuse=args.reuse)
    index.add_all(pairs)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args, index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
