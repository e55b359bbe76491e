"""A local fake provider for end-to-end tests: HTTPS on 127.0.0.1, real wire formats.

Run as ``python -m tests.harness.fake_provider --certfile C --keyfile K``; it prints one JSON line
``{"ready": true, "port": N}``. Provider requests (any path) get what the real API would answer,
unless a script was queued with ``POST /_fake/script``: a list of replies, each used for one
request (FIFO), optionally only for a path suffix:

    {"status": 429, "headers": {...}, "json": {...}}             # a JSON body
    {"body_b64": "..."}                                          # raw bytes
    {"sse_frames": ["data: ...\\n\\n", ...]} / {"sse_file": path}  # SSE, frames as given
    {"frame_delay": 0.1, "split_seed": 7, "frames": 20}          # spacing, random byte splits

Every request is recorded (``GET /_fake/requests``, ``DELETE /_fake/requests``) with its headers,
body and the times the first and last bytes of the response were sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.harness.wire import default_reply

SCRIPTS: list[dict[str, Any]] = []
RECORDED: list[dict[str, Any]] = []
RECORDING = True  # the benchmark turns recording off (--no-record) to keep memory flat


def split_frames(frames: list[bytes], seed: int | None) -> list[bytes]:
    """Cut the byte stream at random positions (frames and even UTF-8 characters split)."""
    if seed is None:
        return frames
    data = b"".join(frames)
    rng = random.Random(seed)
    pieces, pos = [], 0
    while pos < len(data):
        step = rng.randint(1, 40)
        pieces.append(data[pos:pos + step])
        pos += step
    return pieces


def sse_file_frames(path: str) -> list[bytes]:
    """Frames of a recorded .sse file, each ending with its blank line (LF or CRLF kept)."""
    data = Path(path).read_bytes()
    frames: list[bytes] = []
    start = 0
    for sep in (b"\r\n\r\n", b"\n\n"):
        if sep in data:
            while True:
                end = data.find(sep, start)
                if end < 0:
                    break
                frames.append(data[start:end + len(sep)])
                start = end + len(sep)
            break
    if start < len(data):
        frames.append(data[start:])
    return frames


def header_script(request: Request) -> dict[str, Any]:
    """The reply the ``x-fake-*`` request headers ask for (when no script is queued).

    ``x-fake-frames: N``, ``x-fake-frame-delay: S`` and ``x-fake-stamp: 1`` steer the built-in
    text frames. ``x-fake-sse-file: PATH`` (an ``.sse`` file) replays that file's frames instead,
    spaced by ``x-fake-frame-delay`` and, with ``x-fake-split-seed: N``, cut at random byte
    positions; ``x-fake-stamp: 1`` then prefixes each frame with a ``: t=...`` comment line (no
    splitting) rather than replacing it.
    """
    script: dict[str, Any] = {}
    headers = request.headers
    if "x-fake-frames" in headers:
        script["frames"] = int(headers["x-fake-frames"])
    if "x-fake-frame-delay" in headers:
        script["frame_delay"] = float(headers["x-fake-frame-delay"])
    sse_file = headers.get("x-fake-sse-file")
    if sse_file and sse_file.endswith(".sse"):
        script["sse_file"] = sse_file
        if "x-fake-stamp" in headers:
            script["stamp"] = "comment"  # the recorded frame stays, a ": t=..." line is added
        elif "x-fake-split-seed" in headers:
            script["split_seed"] = int(headers["x-fake-split-seed"])
    elif "x-fake-stamp" in headers:
        script["stamp"] = "data"  # built-in frames are replaced by {"seq", "t"} data frames
    return script


def take_script(path: str) -> dict[str, Any] | None:
    for i, script in enumerate(SCRIPTS):
        suffix = script.get("path_suffix")
        if suffix is None or path.split("?", 1)[0].endswith(suffix):
            return SCRIPTS.pop(i)
    return None


async def control_script(request: Request) -> Response:
    body = await request.json()
    SCRIPTS.extend(body if isinstance(body, list) else [body])
    return JSONResponse({"queued": len(SCRIPTS)})


async def control_requests(request: Request) -> Response:
    if request.method == "DELETE":
        RECORDED.clear()
        SCRIPTS.clear()
        return JSONResponse({"cleared": True})
    return JSONResponse(RECORDED)


async def provider(request: Request) -> Response:
    raw = await request.body()
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    record: dict[str, Any] = {
        "method": request.method, "path": path, "host": request.headers.get("host"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw],
        "body_b64": base64.b64encode(raw).decode(), "received_at": time.time(),
        "first_sent_at": None, "last_sent_at": None, "http_version": request.scope.get("http_version"),
    }
    if RECORDING:
        RECORDED.append(record)
    try:
        parsed: dict[str, Any] = json.loads(raw) if raw else {}
        if not isinstance(parsed, dict):
            parsed = {}
    except ValueError:
        parsed = {}
    # Without a queued script, x-fake-* request headers steer the reply (used by scripts/bench).
    script = take_script(path) or header_script(request)
    status = int(script.get("status", 200))
    headers = dict(script.get("headers", {}))
    frames_n = int(script.get("frames", 5))
    json_body, frames = default_reply(path, parsed, frames_n)
    if "json" in script:
        json_body, frames = script["json"], None
    if "body_b64" in script:
        body = base64.b64decode(script["body_b64"])
        record["first_sent_at"] = record["last_sent_at"] = time.time()
        return Response(body, status, headers=headers)
    if "sse_frames" in script:
        frames = [f.encode() if isinstance(f, str) else f for f in script["sse_frames"]]
    if "sse_file" in script:
        frames = sse_file_frames(script["sse_file"])
    if frames is None:
        record["first_sent_at"] = record["last_sent_at"] = time.time()
        return Response(json.dumps(json_body).encode(), status,
                        headers={"content-type": "application/json", **headers})
    pieces = split_frames(frames, script.get("split_seed"))
    delay = float(script.get("frame_delay", 0.0))
    stamp = script.get("stamp")  # None, "data" or "comment": frames carry their send time

    async def body_iter() -> AsyncIterator[bytes]:
        for i, piece in enumerate(pieces):
            if i and delay:
                await asyncio.sleep(delay)
            now = time.time()
            if stamp == "data":
                piece = b'data: {"seq":%d,"t":%.6f}\n\n' % (i, now)
            elif stamp == "comment":
                piece = b": t=%.6f\n" % now + piece
            if record["first_sent_at"] is None:
                record["first_sent_at"] = now
            record["last_sent_at"] = now
            yield piece

    headers.setdefault("content-type", "text/event-stream; charset=utf-8")
    headers.setdefault("cache-control", "no-cache")
    return StreamingResponse(body_iter(), status, headers=headers)


app = Starlette(routes=[
    Route("/_fake/script", control_script, methods=["POST"]),
    Route("/_fake/requests", control_requests, methods=["GET", "DELETE"]),
    Route("/{path:path}", provider, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    global RECORDING
    RECORDING = not args.no_record
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else Nagle adds ~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(app, log_level="warning", ssl_certfile=args.certfile,
                            ssl_keyfile=args.keyfile, timeout_keep_alive=30, access_log=False)
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.02)
        print(json.dumps({"ready": True, "port": sock.getsockname()[1]}), flush=True)
        await task

    asyncio.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
