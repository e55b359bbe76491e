"""Addon: record every finished flow, redacted, one file per session and UTC day (SPEC §9).

``record.dir`` (default ``recordings``, relative to mitmdump's working directory; ``null`` turns
recording off) gets ``<session>-<YYYY-MM-DD>.mitm`` files that ``mitmweb -r`` opens and
``scripts/replay`` (or ``--server-replay``) serves. Each finished HTTP flow (``response``), error
(``error``) and WebSocket flow (``websocket_end``) is serialised whole and appended with one
``write`` to a file opened with ``O_APPEND``; a partial record left at a file's end by a crash
mid-write is cut off before the next append, so the file stays readable.

Two processes share the work, so that a response never waits for its recording. On mitmproxy's
event loop the addon only takes a snapshot of the finished flow (its state, with metadata as
plain data and connections named by id, their states sent once per connection; the names and
values of its secret headers; the captured stream) and writes it, pickled, to a pipe: well under
0.1 ms per flow, in batches ``BATCH_DELAY`` after the first flow finished (or at ``BATCH_MAX``),
so never in a response's way. A long-lived child process, the recording writer (this file run
with ``--writer``, started when mitmdump is running), rebuilds the flow, redacts, serialises and
appends it: the ~0.7 ms of CPU per flow this took on the event loop, in the path of every
response, before the split. The writer reads in batches (it pauses briefly after a small read;
what waits stays in the pipe), so it wakes up once per batch rather than once per flow. It
ignores SIGINT and SIGTERM (meant for mitmdump, whose process group it shares) and, at the end
of its pipe, writes everything it was handed before it exits: a ``kill -9`` of mitmdump alone
loses only the flows still in progress, those finished in the last ``BATCH_DELAY`` and any the
pipe could not take yet. The pipe never blocks the loop: what it cannot take at once waits in
the addon, at most ``MAX_BACKLOG`` bytes (beyond that flows are dropped, counted and logged),
and is written when the pipe has room. ``Recorder.flush()`` waits until everything handed over
is written; ``done`` closes the pipe and waits for the writer to finish. The writer's log lines
come back over a second pipe and are logged by the addon (never flow content: paths, counts,
exception names). A writer that dies is replaced with the next flow; if none can run, the addon
writes in-process as before. The pipes and the child process are llmitm/childproc.py; the files
(appends, partial tails) are ``RecordingFiles`` in llmitm/recording.py.

Streamed bodies are kept as the client received them, with their timing in
``llmitm.stream_timing``; when a repair changed the stream, the upstream's bytes are kept in
``llmitm.upstream_original_body`` (see llmitm/recording.py). Both come from the StreamPipeline's
``ChunkLog`` (lists of the chunks, appended to on the hot path; the writer joins them and
merges the chunk timing). Bodies are bounded by ``record.max_body``.

Redaction works on a copy of the flow, never the live one: header names that are always secret
(Authorization, cookies, API-key headers, payment headers, ``record.redact``) and headers the
gateway injected are replaced whole by ``[redacted:<8 hex of sha256>]``; every secret value of the
configuration (session tokens and secret header values, runtime headers from the control API, the
admin token, an inline x402 wallet) and every value of those headers on this flow (the client's
own key, payment payloads) is replaced wherever it appears: header values, URL, request and
response bodies, WebSocket messages, error text, comments and metadata.
"""

from __future__ import annotations

import dataclasses
import io as pyio
import logging
import pickle
import signal
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple, cast

from mitmproxy import connection, http, io
from mitmproxy.io import tnetstring
from mitmproxy.net import encoding

from glue import current_config
from guard import current_secrets, session_of
from llmitm import flowmeta
from llmitm.childproc import (
    WAIT_TIMEOUT,
    Child,
    LogRelay,
    Message,
    Replies,
    frame,
    read_frames,
    running_loop,
)
from llmitm.recording import (
    SLACK,
    TRUNCATED,
    UPSTREAM_ORIGINAL_BODY,
    UPSTREAM_ORIGINAL_TIMING,
    RawChunks,
    RecordingFiles,
    StreamCapture,
    captured_from_log,
    joined,
    recording_path,
    timing_of,
)
from llmitm.redact import SecretSet, is_marker, redacted
from llmitm.streaming import ChunkLog, pipeline_of
from llmitm.x402 import PAYMENT_HEADERS

logger = logging.getLogger(__name__)

MAX_BACKLOG = 64 * 1024 * 1024  # bytes waiting in mitmdump for the writer; beyond: drop flows
BATCH_PAUSE = 0.1  # the writer's pause after a read: flows are written in batches (see _frames)
QUICK_DEATH = 10.0  # a writer that dies this soon after its start, three times: write in-process
BATCH_DELAY = 0.05  # finished flows wait this long on the event loop, to be snapshot together
BATCH_MAX = 64  # ... or until this many are due
_COOKIE_HEADERS = frozenset({b"cookie", b"set-cookie"})

# Messages are tuples of plain data (no class of ours: the writer runs this file as __main__).
# To the writer: ("secrets", values, names), ("conns", fresh states by id, ids gone),
# ("flow", path, state, injected, values, captured, max_body), ("close",) when record.dir
# changed, ("sync", n). Back: ("log", level, text), ("synced", n).


class Captured(NamedTuple):
    """A streamed body as the client received it, and the upstream's when a repair changed it
    (else None), each as its chunks with their arrival times (``RawChunks``, joined by the
    writer). Plain data: it crosses the pipe."""

    client: RawChunks
    upstream: RawChunks | None = None


class _Capture:
    """A streamed body being captured: through the flow's StreamPipeline log (with what the
    upstream sent), or by ``client`` for a stream that is another addon's callable."""

    __slots__ = ("client", "log", "stages", "start", "upstream")

    def __init__(self, start: float, client: StreamCapture | None = None,
                 log: ChunkLog | None = None) -> None:
        self.start = start
        self.client = client
        self.log = log
        self.upstream = False  # keep the upstream's bytes if a stage changed them
        self.stages: list[Any] = []

    @property
    def upstream_changed(self) -> bool:
        return any(getattr(stage, "upstream_changed", False) is True for stage in self.stages)

    def snapshot(self) -> Captured:
        """What the writer needs, taken now: the stages stay behind with the live flow."""
        if self.log is not None:
            return Captured(*captured_from_log(self.log, self.start,
                                               self.upstream and self.upstream_changed))
        assert self.client is not None
        return Captured(self.client.raw)


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


def _plain(value: Any, secrets: SecretSet | None) -> Any:
    """Metadata as plain data (what FlowWriter can write and pickle carries without importing
    anything), with secrets redacted (not when ``secrets`` is None: the writer does that)."""
    if isinstance(value, str):
        return secrets.redact_text(value) if secrets is not None else value
    if isinstance(value, bytes | bytearray | memoryview):
        return secrets.redact_bytes(bytes(value)) if secrets is not None else bytes(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, secrets) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, secrets) for k, v in value.items()}
    return f"<{type(value).__name__}>"


class _Held:
    """A connection's state standing in for the connection on a flow: ``Flow.get_state`` and
    ``set_state`` take it as it is, so the connection is never rebuilt or taken apart again."""

    __slots__ = ("state",)

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state

    def get_state(self) -> dict[str, Any] | None:
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.state = state


_Getter = Callable[[Any], tuple[Any, ...]]


def _field_getters(conn: connection.Connection) -> tuple[_Getter, _Getter]:
    """Getters of a connection class's fields: the plain ones, and the sequences (lists may
    change in place, so they are compared as copies)."""
    fields = dataclasses.fields(conn)
    sequences = [f.name for f in fields if "Sequence[" in str(f.type) or "list[" in str(f.type)]
    plain = [f.name for f in fields if f.name not in sequences]

    def getter(names: list[str]) -> _Getter:
        if len(names) == 1:  # attrgetter of one name gives the value, not a 1-tuple
            name = names[0]
            return lambda obj: (getattr(obj, name),)
        return attrgetter(*names) if names else (lambda _obj: ())

    return getter(plain), getter(sequences)


class _ConnStates:
    """The addon's side of the connection states: ``get_state()`` of each live connection, kept
    while its fields stay the same (a keep-alive connection serves many flows, and its state,
    TLS details and certificates, is most of a flow's; ``get_state`` depends on the fields only,
    so equal fields give an equal state; lists are compared as copies: one appended to in place
    counts as changed), and which of them the writer holds. A flow's state names its
    connections by id; a connection's state crosses the pipe only when the writer does not hold
    it yet (new, changed, or a new writer), and the writer forgets it when the connection is
    gone. Pickling it again with every flow cost more than the rest of the flow."""

    def __init__(self) -> None:
        self._fields: dict[str, tuple[Any, ...]] = {}  # by connection id
        self._states: dict[str, dict[str, Any]] = {}
        self._sent: set[str] = set()  # ids whose current state the writer holds
        self._gone: list[str] = []  # ids of connections collected since the last take_gone()
        self._getters: dict[type, tuple[_Getter, _Getter]] = {}

    def reference(self, conn: connection.Connection) -> str:
        """``conn``'s id, its state taken (again) if its fields changed."""
        getters = self._getters.get(type(conn))
        if getters is None:
            getters = self._getters[type(conn)] = _field_getters(conn)
        scalars, sequences = getters
        fields = (scalars(conn), tuple(None if v is None else tuple(v) for v in sequences(conn)))
        cid = conn.id
        known = self._fields.get(cid)
        if known is None:
            weakref.finalize(conn, self._gone.append, cid)
        elif known == fields:
            return cid
        self._fields[cid] = fields
        self._states[cid] = conn.get_state()
        self._sent.discard(cid)
        return cid

    def unsent(self, ids: Iterable[str]) -> tuple[tuple[str, dict[str, Any]], ...]:
        """The states of ``ids`` the writer does not hold, now counted as held."""
        fresh = tuple((cid, self._states[cid]) for cid in dict.fromkeys(ids) if cid not in self._sent)
        self._sent.update(cid for cid, _ in fresh)
        return fresh

    def take_gone(self) -> tuple[str, ...]:
        """Ids of the connections collected since the last call: the writer may forget them."""
        gone: list[str] = []
        while self._gone:  # pop by pop: a finalizer may append meanwhile
            gone.append(self._gone.pop())
        for cid in gone:
            self._fields.pop(cid, None)
            self._states.pop(cid, None)
            self._sent.discard(cid)
        return tuple(gone)

    def none_sent(self) -> None:
        """A new writer holds no state: every connection's goes with its next flow."""
        self._sent.clear()


def _state_of(flow: http.HTTPFlow, conns: _ConnStates) -> dict[str, Any]:
    """The flow's state, sharing nothing the writer may change with the live flow: metadata is
    taken apart by ``_plain`` (new containers, so no deep copy; it also copes with values that
    deepcopy or pickle refuse); the connections are their ids in ``conns`` (the writer puts
    their states back: ``_WriterConns.resolve``)."""
    client, server, metadata = flow.client_conn, flow.server_conn, flow.metadata
    flow.client_conn = cast(connection.Client, _Held(None))
    flow.server_conn = cast(connection.Server, _Held(None))
    flow.metadata = {}
    try:
        state = flow.get_state()
    finally:
        flow.client_conn, flow.server_conn, flow.metadata = client, server, metadata
    state["client_conn"] = conns.reference(client)
    state["server_conn"] = conns.reference(server)
    state["metadata"] = {str(k): _plain(v, None) for k, v in metadata.items()}
    state["backup"] = None  # an edited flow's backup holds the unredacted original
    return state


def _injected_names(flow: http.HTTPFlow) -> frozenset[str]:
    """Names of the headers the gateway injected. Only the names are read (injected_of would
    parse each entry's scope on the event loop); an entry it would refuse still gets its header
    redacted whole, which errs on the safe side."""
    entries = flow.metadata.get(flowmeta.INJECTED)
    if not isinstance(entries, list):
        return frozenset()
    return frozenset(e["name"].lower() for e in entries
                     if isinstance(e, dict) and isinstance(e.get("name"), str))


def _flow_values(flow: http.HTTPFlow, names: frozenset[str], injected: frozenset[str]) -> set[str]:
    """Values of this flow's secret headers (the client's own key, payment payloads, injected
    headers), to be redacted wherever else they appear in the flow. ``names`` (lower case)
    and ``injected``: the secret header names. Read from the raw fields: this runs per flow."""
    secret = {n.encode() for n in names | injected}
    out: set[str] = set()
    for message in (flow.request, flow.response):
        if message is None:
            continue
        for name, raw in message.headers.fields:
            lname = name.lower()
            if lname not in secret:
                continue
            value = raw.decode("utf-8", "surrogateescape")
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
    state: dict[str, Any],
    secrets: SecretSet,
    max_body: int,
    injected: frozenset[str] = frozenset(),
    captured: Captured | None = None,
) -> http.HTTPFlow:
    """The flow of ``state`` (from ``_state_of``) fit to be written: secrets redacted (``secrets``
    holds the flow's own header values too), bodies bounded, a streamed body filled in from
    ``captured``, metadata plain. ``injected``: names of the headers the gateway injected.
    Its connections stay states (nothing in them is redacted): ``serialize`` writes them."""
    copy = http.HTTPFlow(cast(connection.Client, _Held()), cast(connection.Server, _Held()))
    copy.set_state(state)  # HTTPFlow.from_state, minus rebuilding both connections
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
        if captured is not None and resp.raw_content is None:
            cut, timing = _redact_body(resp, secrets, max_body, *joined(captured.client))
        else:
            cut, _ = _redact_body(resp, secrets, max_body, resp.raw_content)
        if cut is not None:
            truncated["response"] = cut
        if captured is not None and captured.upstream is not None:
            holder = http.Response.make(200, b"")
            if "content-encoding" in resp.headers:
                holder.headers["content-encoding"] = resp.headers["content-encoding"]
            ocut, otiming = _redact_body(holder, secrets, max_body, *joined(captured.upstream))
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


# -- the writer's side: files and messages -------------------------------------------------------
_CONNS = ("client_conn", "server_conn")


class _Dumper:
    """A flow state as tnetstring, byte for byte what FlowWriter writes, with the connections'
    parts kept while they repeat (every flow of a keep-alive connection): tnetstring is pure
    Python and the connections are most of a flow."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._conns: OrderedDict[str, tuple[dict[str, Any], bytes]] = OrderedDict()

    def dumps(self, state: dict[str, Any]) -> bytes:
        parts: list[bytes] = []
        for key, value in reversed(state.items()):  # tnetstring.dumps writes a dict's items last first
            parts.append(tnetstring.dumps(key))
            parts.append(self._conn(value) if key in _CONNS and isinstance(value, dict)
                         else tnetstring.dumps(value))
        payload = b"".join(parts)
        return b"%d:%s}" % (len(payload), payload)

    def _conn(self, state: dict[str, Any]) -> bytes:
        key = str(state.get("id"))
        known = self._conns.get(key)
        if known is not None and known[0] == state:
            self._conns.move_to_end(key)
            return known[1]
        data = tnetstring.dumps(state)
        self._conns[key] = (state, data)
        if len(self._conns) > self._size:
            self._conns.popitem(last=False)
        return data


class _WriterConns:
    """The writer's side of ``_ConnStates``: the states it was handed, by connection id."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, Any]] = {}

    def update(self, fresh: Iterable[tuple[str, dict[str, Any]]], gone: Iterable[str]) -> None:
        for cid in gone:
            self._states.pop(cid, None)
        self._states.update(fresh)

    def resolve(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` (from ``_state_of``) with its connections' states in place of their ids."""
        for key in _CONNS:
            if isinstance(state.get(key), str):
                state[key] = self._states[state[key]]
        return state


class _Writer:
    """What the recording writer does with each message (in the child; in-process as a fallback)."""

    def __init__(self, synced: Callable[[int], None] = lambda _n: None) -> None:
        self._conns = _WriterConns()
        self._files = RecordingFiles()
        self._dumper = _Dumper()
        self._secrets = SecretSet(header_names=PAYMENT_HEADERS)
        self._with_values: OrderedDict[frozenset[str], SecretSet] = OrderedDict()
        self._failed: set[str] = set()
        self._synced = synced

    def handle(self, message: Message) -> None:
        kind = message[0]
        if kind == "flow":
            self._record(*message[1:])
        elif kind == "conns":
            self._conns.update(message[1], message[2])
        elif kind == "secrets":
            _, values, names = message
            # The names already hold the always-secret ones: the same set as
            # ConfigSecrets.secret_set(extra_names=PAYMENT_HEADERS) builds.
            self._secrets = SecretSet(values, names, always_redacted=False)
            self._with_values.clear()
        elif kind == "close":
            self._files.close_all()
        elif kind == "sync":
            self._synced(message[1])

    def close(self) -> None:
        self._files.close_all()

    def _secrets_with(self, values: frozenset[str]) -> SecretSet:
        found = self._with_values.get(values)
        if found is None:
            found = self._secrets.with_values(values)
            self._with_values[values] = found
            if len(self._with_values) > 256:
                self._with_values.popitem(last=False)
        else:
            self._with_values.move_to_end(values)
        return found

    def _record(self, path: str, state: dict[str, Any], injected: tuple[str, ...],
                values: tuple[str, ...], captured: tuple[Any, ...] | None, max_body: int) -> None:
        try:
            secrets = self._secrets_with(frozenset(values)) if values else self._secrets
            copy = redacted_copy(self._conns.resolve(state), secrets, max_body, frozenset(injected),
                                 Captured(*captured) if captured is not None else None)
            self._files.append(Path(path), self._dumper.dumps(copy.get_state()))
        except Exception as e:  # one bad flow never stops the others; name the file, never the content
            key = f"{path}:{type(e).__name__}"
            if key not in self._failed:
                self._failed.add(key)
                logger.error("llmitm recorder: cannot record to %s: %s", path, type(e).__name__)


def _writer_main(argv: list[str]) -> int:
    """The recording writer: messages from stdin until its end, then exit."""
    if len(argv) != 2 or argv[0] != "--writer" or not argv[1].isdigit():
        print("usage: recorder.py --writer REPLY_FD  (started by the recorder addon)", file=sys.stderr)
        return 2
    # Ctrl-C and the harness signal the whole process group: mitmdump shuts down and closes the
    # pipe, and the writer finishes what it was handed first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    replies = Replies(int(argv[1]))
    root = logging.getLogger()
    root.handlers[:] = [LogRelay(replies)]
    root.setLevel(logging.INFO)

    def synced(n: int) -> None:
        replies.send(("synced", n))

    writer = _Writer(synced)
    bad: set[str] = set()
    for body in read_frames(0, BATCH_PAUSE):
        try:
            message = pickle.loads(body)
        except Exception as e:
            if type(e).__name__ not in bad:
                bad.add(type(e).__name__)
                logger.error("llmitm recorder: unreadable message from mitmdump: %s", type(e).__name__)
            continue
        writer.handle(message)
    writer.close()
    return 0


# -- the addon -----------------------------------------------------------------------------------
class Recorder:
    name = "llmitm-recorder"

    def __init__(self) -> None:
        self._captures: weakref.WeakKeyDictionary[http.HTTPFlow, _Capture] = weakref.WeakKeyDictionary()
        self._written: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._due: list[http.HTTPFlow] = []  # finished flows waiting for their batch
        self._conns = _ConnStates()
        self._paths: dict[tuple[str, str, int], str] = {}
        self._dir: str | None = None
        # The configuration's secrets, by generation (current_secrets); the writer gets them too.
        self._generation = -1
        self._names: frozenset[str] = SecretSet(header_names=PAYMENT_HEADERS).names
        self._values: frozenset[str] = frozenset()
        self._child: Child | None = None
        self._child_generation = -1  # of the secrets the writer has
        self._quick_deaths = 0
        self._local: _Writer | None = None  # in-process writing when no writer process runs
        self._failed: set[str] = set()
        self._dropped = 0
        self._syncs = 0

    @property
    def writer_pid(self) -> int | None:
        """The recording writer's process id (None before the first flow or when in-process)."""
        return self._child.pid if self._child is not None and self._child.alive else None

    # -- hooks -----------------------------------------------------------------------------------
    def running(self) -> None:
        if current_config().record.dir is not None:
            self._writer()  # start it now: it imports while mitmdump waits for its first client

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not response.stream:
            return
        config = current_config().record
        if config.dir is None:
            return
        start = response.timestamp_start or time.time()
        stream = response.stream
        pipeline = pipeline_of(stream)
        if pipeline is not None:
            capture = _Capture(start, log=pipeline.start_log(config.max_body + SLACK))
            capture.upstream = config.upstream_original
            capture.stages = pipeline.stages
            self._captures[flow] = capture
            return
        client = StreamCapture(config.max_body, start)
        capture = _Capture(start, client)
        if callable(stream):
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
            self._record_soon(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record_soon(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._record_soon(flow)

    def done(self) -> None:
        self._record_due()
        self._caught_up()
        child, self._child = self._child, None
        if child is not None:
            child.close(WAIT_TIMEOUT)
        if self._local is not None:
            self._local.close()

    # -- handing flows to the writer ---------------------------------------------------------
    def _record_soon(self, flow: http.HTTPFlow) -> None:
        """Record ``flow`` shortly, with the others that finish meanwhile: mitmproxy sends the
        response on as soon as the hook returns, so the snapshot is never in its way (nothing
        changes a finished flow in between), and a batch of snapshots takes less CPU than the
        same snapshots one by one between other work. Without a running loop, at once."""
        loop = running_loop()
        if loop is None:
            self.record(flow)
            return
        self._due.append(flow)
        if len(self._due) == 1:
            loop.call_later(BATCH_DELAY, self._record_due)
        elif len(self._due) >= BATCH_MAX:
            self._record_due()

    def _record_due(self) -> None:
        due, self._due = self._due, []  # a timer that finds it empty (taken early) does nothing
        for flow in due:
            self.record(flow)

    def record(self, flow: http.HTTPFlow) -> None:
        """Snapshot a finished flow and hand it to the writer (never blocks the event loop)."""
        config = current_config().record
        if config.dir is None or flow in self._written or flow.request.method.upper() == "CONNECT":
            return
        self._written.add(flow)
        path = self._path(config.dir, session_of(flow), flow.timestamp_created)
        capture = self._captures.pop(flow, None) if self._captures else None
        try:
            self._refresh_secrets()
            injected = _injected_names(flow)
            values = _flow_values(flow, self._names, injected) - self._values
            state = _state_of(flow, self._conns)
            message: Message = (
                "flow", path, state, tuple(injected), tuple(values),
                tuple(capture.snapshot()) if capture is not None else None, config.max_body,
            )
            if config.dir != self._dir:
                if self._dir is not None:
                    self._deliver(("close",), force=True)  # files of the old directory
                self._dir = config.dir
            sent = self._deliver(message, conn_ids=(state["client_conn"], state["server_conn"]))
        except Exception as e:  # never break the flow; name the file, never the content
            key = f"{path}:{type(e).__name__}"
            if key not in self._failed:
                self._failed.add(key)
                logger.error("llmitm recorder: cannot record to %s: %s", path, type(e).__name__)
            return
        if sent:
            self._caught_up()
        else:
            if not self._dropped:
                logger.warning("llmitm recorder: the recording writer is %d MB behind; flows are "
                               "not recorded until it catches up", MAX_BACKLOG >> 20)
            self._dropped += 1

    def flush(self, timeout: float = WAIT_TIMEOUT) -> bool:
        """Block until every flow handed over so far is written (to the files, not fsync'd);
        False on timeout or when the writer died. For tests and tools: it blocks the caller."""
        self._record_due()
        child = self._child
        if child is None or not child.alive:
            return child is None
        self._syncs += 1
        child.send(frame(("sync", self._syncs)), force=True)
        return child.wait_synced(self._syncs, timeout)

    def _path(self, directory: str, session: str, timestamp: float) -> str:
        key = (directory, session, int(timestamp // 86400))  # the UTC day (POSIX days are 86400 s)
        path = self._paths.get(key)
        if path is None:
            if len(self._paths) > 1024:
                self._paths.clear()
            path = self._paths[key] = str(recording_path(directory, session, timestamp))
        return path

    def _refresh_secrets(self) -> None:
        generation, config_secrets = current_secrets()
        if generation != self._generation:
            # What config_secrets.secret_set(extra_names=PAYMENT_HEADERS) holds, without
            # compiling its matchers here: the writer builds the SecretSet.
            self._names = SecretSet((), [*config_secrets.redact_names, *PAYMENT_HEADERS]).names
            self._values = frozenset(v for v in config_secrets.values if v and not is_marker(v))
            self._generation = generation

    def _deliver(self, message: Message, force: bool = False, conn_ids: tuple[str, ...] = ()) -> bool:
        """Hand ``message`` to the writer, preceded by the secrets when they changed and by the
        states of the connections ``conn_ids`` it does not hold yet; False when dropped
        because the writer is too far behind."""
        parts = frame(message)
        for _ in range(2):  # a writer found dead is replaced once, and gets the message again
            child = self._writer()
            conns = self._conns.unsent(conn_ids), self._conns.take_gone()
            if child is None:
                assert self._local is not None
                # Copies, as the child would get: states are shared with _conns and the flow.
                self._local.handle(pickle.loads(frame(("conns", *conns))[1]))
                self._local.handle(pickle.loads(parts[1]))
                return True
            if self._child_generation != self._generation:
                secrets = ("secrets", tuple(self._values), tuple(self._names))
                if child.send(frame(secrets), force=True) != "sent":
                    continue
                self._child_generation = self._generation
            if any(conns) and child.send(frame(("conns", *conns)), force=True) != "sent":
                continue  # died: the next writer gets every state again
            status = child.send(parts, force)
            if status != "dead":
                return status == "sent"
        return False

    def _writer(self) -> Child | None:
        """The live writer process, started when needed; None when writing in-process."""
        if self._local is not None:
            if self._generation != self._child_generation:
                self._local.handle(("secrets", tuple(self._values), tuple(self._names)))
                self._child_generation = self._generation
            return None
        child = self._child
        if child is not None and not child.alive:
            child.discard()
            quick = time.monotonic() - child.started < QUICK_DEATH
            self._quick_deaths = self._quick_deaths + 1 if quick else 0
            child = self._child = None
        if child is None:
            try:
                if self._quick_deaths >= 3:
                    raise RuntimeError("the recording writer keeps dying")
                child = self._child = Child(
                    [sys.executable, str(Path(__file__).resolve()), "--writer"], self._relayed,
                    "llmitm recorder: the recording writer", MAX_BACKLOG)
            except Exception as e:
                logger.error("llmitm recorder: cannot run the recording writer (%s); writing "
                             "in-process, on the event loop", type(e).__name__)
                self._local = _Writer()
                self._child_generation = -1
                self._conns.none_sent()
                return self._writer()
            self._child_generation = -1
            self._conns.none_sent()
        return child

    def _relayed(self, message: Message) -> None:
        if message[0] == "log":
            logger.log(int(message[1]), "%s", message[2])

    def _caught_up(self) -> None:
        if self._dropped:
            logger.warning("llmitm recorder: %d flow(s) were not recorded: the recording writer "
                           "was behind", self._dropped)
            self._dropped = 0


addons = [Recorder()]

if __name__ == "__main__":
    sys.exit(_writer_main(sys.argv[1:]))
