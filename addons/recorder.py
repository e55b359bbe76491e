"""Addon: record every finished flow, redacted, one file per session and UTC day (SPEC §9).

``record.dir`` (default ``recordings``, relative to mitmdump's working directory; ``null`` turns
recording off) gets ``<session>-<YYYY-MM-DD>.mitm`` files that ``mitmweb -r`` opens and
``scripts/replay`` (or ``--server-replay``) serves. Each finished HTTP flow (``response``), error
(``error``) and WebSocket flow (``websocket_end``) is serialised whole and appended with one
``write`` to a file opened with ``O_APPEND``, so a ``kill -9`` loses at most the flows still in
progress; a partial record left at a file's end by a crash mid-write is cut off before the next
append, so the file stays readable.

Streamed bodies are kept as the client received them (a tap on the StreamPipeline), with their
timing in ``llmitm.stream_timing``; when a repair changed the stream, the upstream's bytes (seen
by a pass-through stage put first in the pipeline) are kept in ``llmitm.upstream_original_body``
(see llmitm/recording.py). Bodies are bounded by ``record.max_body``.

Redaction works on a copy of the flow, never the live one: header names that are always secret
(Authorization, cookies, API-key headers, payment headers, ``record.redact``) and headers the
gateway injected are replaced whole by ``[redacted:<8 hex of sha256>]``; every secret value of the
configuration (session tokens and secret header values, runtime headers from the control API, the
admin token, an inline x402 wallet) and every value of those headers on this flow (the client's
own key, payment payloads) is replaced wherever it appears: header values, URL, request and
response bodies, WebSocket messages, error text, comments and metadata.
"""

from __future__ import annotations

import contextlib
import io as pyio
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mitmproxy import http, io
from mitmproxy.net import encoding

from glue import current_config
from guard import current_secrets, injected_of, session_of
from llmitm import flowmeta
from llmitm.recording import (
    TRUNCATED,
    UPSTREAM_ORIGINAL_BODY,
    UPSTREAM_ORIGINAL_TIMING,
    RecordConfig,
    StreamCapture,
    recording_path,
    timing_of,
    valid_prefix,
)
from llmitm.redact import SecretSet, redacted
from llmitm.streaming import StreamPipeline
from llmitm.x402 import PAYMENT_HEADERS

logger = logging.getLogger(__name__)

MAX_OPEN_FILES = 32
_COOKIE_HEADERS = frozenset({"cookie", "set-cookie"})


class _Observe:
    """A pass-through stage, first in the pipeline: sees the upstream's bytes before any repair."""

    __slots__ = ("capture",)

    def __init__(self, capture: StreamCapture) -> None:
        self.capture = capture

    def feed(self, chunk: bytes) -> list[bytes]:
        self.capture.add(chunk)
        return [chunk]

    def finish(self) -> list[bytes]:
        return []


class _Capture:
    __slots__ = ("client", "stages", "upstream")

    def __init__(self, client: StreamCapture) -> None:
        self.client = client
        self.upstream: StreamCapture | None = None
        self.stages: list[Any] = []

    @property
    def upstream_changed(self) -> bool:
        return any(getattr(stage, "upstream_changed", False) is True for stage in self.stages)


# -- redaction of a flow copy ------------------------------------------------------------------
def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _redact_headers(headers: http.Headers, secrets: SecretSet, extra: Iterable[str]) -> http.Headers:
    pairs = [(_text(k), _text(v)) for k, v in headers.fields]
    return http.Headers([(_raw(k), _raw(v)) for k, v in secrets.redact_headers(pairs, extra)])


def _redact_body(
    message: http.Message,
    secrets: SecretSet,
    max_body: int,
    raw: bytes | None,
    ends: list[tuple[float, int]] | None = None,
) -> tuple[int | None, list[list[float | int]] | None]:
    """Redact and bound ``raw`` (default: the message's own body) into ``message``; returns the
    length before a cut (None when not cut) and, for ``ends``, the timing of the stored body."""
    if raw is None:
        return None, None
    enc = message.headers.get("content-encoding", "").strip().lower()
    timing: list[list[float | int]] | None = None
    if enc and enc != "identity":
        try:
            decoded = encoding.decode(raw, enc)
        except ValueError:
            decoded = None  # undecodable (or cut mid-stream): only plain text can hold a secret
        if isinstance(decoded, bytes):
            red = secrets.redact_bytes(decoded)
            if red == decoded and len(raw) <= max_body:
                body, cut = raw, None
                mapped = [end for _, end in ends or ()]
            else:  # store it decoded: a redacted or cut body cannot stay compressed
                del message.headers["content-encoding"]
                cut = len(red) if len(red) > max_body else None
                body = red[:max_body]
                # Chunk ends of the compressed stream, scaled onto the decoded body.
                mapped = [end * len(red) // max(len(raw), 1) for _, end in ends or ()]
        else:
            red = secrets.redact_bytes(raw)
            cut = len(red) if len(red) > max_body else None
            body = red[:max_body]
            mapped = [end for _, end in ends or ()]
        if ends is not None:
            timing = timing_of(ends, mapped, len(body))
    else:
        if ends is not None:
            red, mapped = secrets.redact_bytes_mapped(raw, [end for _, end in ends])
        else:
            red, mapped = secrets.redact_bytes(raw), []
        cut = len(red) if len(red) > max_body else None
        body = red[:max_body]
        if ends is not None:
            timing = timing_of(ends, mapped, len(body))
    changed = body != message.raw_content
    message.raw_content = body
    if changed and "content-length" in message.headers:
        message.headers["content-length"] = str(len(body))
    return cut, timing


def _plain(value: Any, secrets: SecretSet) -> Any:
    """Metadata as plain data (what FlowWriter can write), with secrets redacted."""
    if isinstance(value, str):
        return secrets.redact_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return secrets.redact_bytes(bytes(value))
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, secrets) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, secrets) for k, v in value.items()}
    return f"<{type(value).__name__}>"


def _state_of(flow: http.HTTPFlow) -> dict[str, Any]:
    try:
        state = flow.get_state()
    except Exception:  # metadata that cannot be deep-copied: take it apart ourselves
        metadata = flow.metadata
        flow.metadata = {}
        try:
            state = flow.get_state()
        finally:
            flow.metadata = metadata
        state["metadata"] = dict(metadata)
    state["backup"] = None  # an edited flow's backup holds the unredacted original
    return state


def _flow_values(flow: http.HTTPFlow, names: frozenset[str], injected: frozenset[str]) -> set[str]:
    """Values of this flow's secret headers (the client's own key, payment payloads, injected
    headers), to be redacted wherever else they appear in the flow."""
    out: set[str] = set()
    for message in (flow.request, flow.response):
        if message is None:
            continue
        for name, value in message.headers.items(multi=True):
            lname = name.lower()
            if lname not in names and lname not in injected:
                continue
            out.add(value)
            if lname in _COOKIE_HEADERS:
                for part in value.split(";"):
                    _, _, v = part.partition("=")
                    if v.strip():
                        out.add(v.strip())
    auth = flow.metadata.get("proxyauth")
    if isinstance(auth, list | tuple) and len(auth) == 2 and isinstance(auth[1], str) and auth[1]:
        out.add(auth[1])
    return out


def redacted_copy(
    flow: http.HTTPFlow,
    secrets: SecretSet,
    config: RecordConfig,
    capture: _Capture | None = None,
    values_to_set: Callable[[set[str]], SecretSet] | None = None,
) -> http.HTTPFlow:
    """A copy of ``flow`` fit to be written: secrets redacted, bodies bounded, streamed bodies
    filled in from ``capture``, metadata plain."""
    injected = frozenset(i.name.lower() for i in injected_of(flow))
    values = _flow_values(flow, secrets.names, injected) - secrets.values
    if values:
        secrets = values_to_set(values) if values_to_set else secrets.with_values(values)
    copy = http.HTTPFlow.from_state(_state_of(flow))
    assert isinstance(copy, http.HTTPFlow)
    max_body = config.max_body
    truncated: dict[str, int] = {}
    timing: list[list[float | int]] | None = None

    req = copy.request
    req.path = secrets.redact_text(req.path)
    req.headers = _redact_headers(req.headers, secrets, injected)
    cut, _ = _redact_body(req, secrets, max_body, req.raw_content)
    if cut is not None:
        truncated["request"] = cut
    if req.trailers:
        req.trailers = _redact_headers(req.trailers, secrets, injected)

    resp = copy.response
    original: tuple[bytes, list[list[float | int]] | None, int | None] | None = None
    if resp is not None:
        resp.headers = _redact_headers(resp.headers, secrets, ())
        if resp.trailers:
            resp.trailers = _redact_headers(resp.trailers, secrets, ())
        if capture is not None and resp.raw_content is None:
            cut, timing = _redact_body(resp, secrets, max_body, capture.client.body, capture.client.ends)
        else:
            cut, _ = _redact_body(resp, secrets, max_body, resp.raw_content)
        if cut is not None:
            truncated["response"] = cut
        if capture is not None and capture.upstream is not None and capture.upstream_changed:
            holder = http.Response.make(200, b"")
            if "content-encoding" in resp.headers:
                holder.headers["content-encoding"] = resp.headers["content-encoding"]
            upstream = capture.upstream
            ocut, otiming = _redact_body(holder, secrets, max_body, upstream.body, upstream.ends)
            original = (holder.raw_content or b"", otiming, ocut)

    if copy.websocket is not None:
        for message in copy.websocket.messages:
            content = secrets.redact_bytes(message.content)
            if len(content) > max_body:
                truncated["websocket"] = max(truncated.get("websocket", 0), len(content))
                content = content[:max_body]
            message.content = content
        if copy.websocket.close_reason:
            copy.websocket.close_reason = secrets.redact_text(copy.websocket.close_reason)

    if copy.error is not None:
        copy.error.msg = secrets.redact_text(copy.error.msg)
    copy.comment = secrets.redact_text(copy.comment)

    metadata: dict[str, Any] = {}
    for key, value in copy.metadata.items():
        if key == "proxyauth" and isinstance(value, list | tuple) and len(value) == 2:
            user, password = value
            metadata[key] = [secrets.redact_text(str(user)), redacted(str(password)) if password else ""]
        else:
            metadata[str(key)] = _plain(value, secrets)
    if timing is not None:
        metadata[flowmeta.STREAM_TIMING] = timing
    if original is not None:
        body, otiming, ocut = original
        metadata[flowmeta.UPSTREAM_ORIGINAL] = True
        metadata[UPSTREAM_ORIGINAL_BODY] = body
        if otiming is not None:
            metadata[UPSTREAM_ORIGINAL_TIMING] = otiming
        if ocut is not None:
            truncated["upstream_original"] = ocut
    if truncated:
        metadata[TRUNCATED] = truncated
    copy.metadata = metadata
    return copy


def serialize(flow: http.HTTPFlow) -> bytes:
    buf = pyio.BytesIO()
    io.FlowWriter(buf).add(flow)
    return buf.getvalue()


# -- the addon -----------------------------------------------------------------------------------
class Recorder:
    name = "llmitm-recorder"

    def __init__(self) -> None:
        self._captures: weakref.WeakKeyDictionary[http.HTTPFlow, _Capture] = weakref.WeakKeyDictionary()
        self._written: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._dir: str | None = None
        self._generation = -1
        self._secrets = SecretSet(header_names=PAYMENT_HEADERS)
        self._with_values: OrderedDict[frozenset[str], SecretSet] = OrderedDict()
        self._failed: set[str] = set()

    # -- secrets ---------------------------------------------------------------------------------
    def secrets(self) -> SecretSet:
        generation, config_secrets = current_secrets()
        if generation != self._generation:
            self._secrets = config_secrets.secret_set(extra_names=PAYMENT_HEADERS)
            self._with_values.clear()
            self._generation = generation
        return self._secrets

    def _secrets_with(self, values: set[str]) -> SecretSet:
        key = frozenset(values)
        found = self._with_values.get(key)
        if found is None:
            found = self._secrets.with_values(values)
            self._with_values[key] = found
            if len(self._with_values) > 256:
                self._with_values.popitem(last=False)
        else:
            self._with_values.move_to_end(key)
        return found

    # -- hooks -----------------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not response.stream:
            return
        config = current_config().record
        if config.dir is None:
            return
        start = response.timestamp_start or time.time()
        client = StreamCapture(config.max_body, start)
        capture = _Capture(client)
        stream = response.stream
        if isinstance(stream, StreamPipeline):
            if config.upstream_original:
                capture.upstream = StreamCapture(config.max_body, start)
                stream.stages.insert(0, _Observe(capture.upstream))
                capture.stages = stream.stages
            stream.add_tap(client.add)
        elif callable(stream):
            inner = stream

            def tapped(data: bytes) -> bytes | Iterable[bytes]:
                out = inner(data)
                if isinstance(out, bytes):
                    client.add(out)
                    return out
                pieces = list(out)
                for piece in pieces:
                    client.add(piece)
                return pieces

            response.stream = tapped
        else:

            def passthrough(data: bytes) -> list[bytes]:
                client.add(data)
                return [data] if data else []

            response.stream = passthrough
        self._captures[flow] = capture

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:  # a WebSocket flow is recorded when it ends
            self.record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.record(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.record(flow)

    def done(self) -> None:
        self._close_all()

    # -- writing ---------------------------------------------------------------------------------
    def record(self, flow: http.HTTPFlow) -> None:
        config = current_config().record
        if config.dir is None or flow in self._written or flow.request.method.upper() == "CONNECT":
            return
        self._written.add(flow)
        if config.dir != self._dir:
            self._close_all()
            self._dir = config.dir
        path = recording_path(config.dir, session_of(flow), flow.timestamp_created)
        try:
            copy = redacted_copy(flow, self.secrets(), config, self._captures.pop(flow, None),
                                 self._secrets_with)
            self._append(path, serialize(copy))
        except Exception as e:  # never break the flow; name the file, never the content
            key = f"{path}:{type(e).__name__}"
            if key not in self._failed:
                self._failed.add(key)
                logger.error("llmitm recorder: cannot record to %s: %s", path, type(e).__name__)

    def _append(self, path: Path, data: bytes) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._open(path)
        else:
            self._fds.move_to_end(path)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _open(self, path: Path) -> int:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            good = valid_prefix(path)
            size = path.stat().st_size
            if good < size:
                os.truncate(path, good)
                logger.warning(
                    "llmitm recorder: %s ended in a partial flow (killed mid-write?); cut %d bytes",
                    path, size - good,
                )
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fds[path] = fd
        logger.info("llmitm recorder: recording to %s", path)
        while len(self._fds) > MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _close_all(self) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            with contextlib.suppress(OSError):
                os.close(fd)


addons = [Recorder()]
