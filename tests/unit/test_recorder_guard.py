"""Recorder and guard addons with mitmproxy's own test helpers: redaction on a copy, streamed
bodies and the upstream original, crash-safe appends, the recording writer process (never
blocking the event loop, surviving mitmdump), the guard's findings."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http, io
from mitmproxy.test import taddons, tflow, tutils
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

import recorder as recorder_module
from configuration import Configuration
from guard import Guard
from llmitm import flowmeta
from llmitm.recording import (
    TRUNCATED,
    UPSTREAM_ORIGINAL_BODY,
    UPSTREAM_ORIGINAL_TIMING,
    StreamCapture,
    joined,
    recording_name,
    safe_session,
    timing_of,
    valid_prefix,
)
from llmitm.redact import SecretSet, redacted
from llmitm.streaming import StreamPipeline
from recorder import Recorder, serialize
from tests.harness.procs import REPO

KEY = "sk-proj-unit-Q1w2E3r4T5y6U7i8"
TOKEN = "unit-token-0a1b2c3d"
CONFIG = f"""
sessions:
  team-a:
    token: {TOKEN}
    headers:
      api.openai.com:
        Authorization: Bearer {KEY}
record:
  dir: {{dir}}
  max_body: {{max_body}}
  redact: [X-Private]
guard:
  action: {{action}}
"""


def configured(tctx: taddons.context, cfg: Configuration, tmp_path: Path, *, action: str = "mark",
               max_body: int = 100_000) -> Path:
    rec = tmp_path / "rec"
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.format(dir=rec, max_body=max_body, action=action))
    tctx.configure(cfg, llmitm_config=str(path))
    return rec


def openai_flow(body: bytes = b"{}", session: str = "team-a") -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.request.host = "api.openai.com"
    flow.request.port = 443
    flow.request.scheme = "https"
    flow.request.path = "/v1/chat/completions"
    flow.request.headers["Authorization"] = f"Bearer {KEY}"
    flow.request.content = body
    flow.metadata[flowmeta.SESSION] = session
    flow.metadata[flowmeta.INJECTED] = [{"name": "Authorization", "origin": "session",
                                         "scope": "api.openai.com", "session": "team-a"}]
    return flow


def read(rec: Path, recorder: Recorder | None = None) -> list[http.HTTPFlow]:
    """The flows recorded in ``rec`` (once ``recorder``'s writer has written all it was handed)."""
    if recorder is not None:
        assert recorder.flush()
    out = []
    for path in sorted(rec.glob("*.mitm")):
        with open(path, "rb") as fh:
            out += [f for f in io.FlowReader(fh).stream() if isinstance(f, http.HTTPFlow)]
    return out


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (reaped, or a zombie nobody reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    """A Recorder whose writer process is stopped (and checked gone) after the test."""
    rec = Recorder()
    yield rec
    pid = rec.writer_pid
    rec.done()
    assert pid is None or wait_gone(pid)


# -- recorder ----------------------------------------------------------------------------------
def test_redacts_a_copy_never_the_live_flow(tmp_path: Path, recorder: Recorder) -> None:
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec = configured(tctx, cfg, tmp_path)
        flow = openai_flow(json.dumps({"k": KEY, "p": "priv-value-123"}).encode())
        flow.request.path += f"?token={TOKEN}"
        flow.request.headers["X-Private"] = "priv-value-123"
        flow.request.headers["PAYMENT-SIGNATURE"] = "eyJwYXlsb2FkIjoic2lnbmVkIn0="
        flow.response.headers["set-cookie"] = "sid=cookie-secret-987; Path=/"
        flow.response.content = b'{"echo": "cookie-secret-987 eyJwYXlsb2FkIjoic2lnbmVkIn0="}'
        flow.metadata["proxyauth"] = ("team-a", TOKEN)
        flow.metadata["odd"] = bytearray(KEY.encode())  # would break FlowWriter as it is
        flow.comment = f"note {KEY}"
        flow.backup()
        before = flow.get_state()
        recorder.response(flow)
        assert flow.get_state() == before  # the live flow is untouched
        (got,) = read(rec, recorder)
    data = next(rec.glob("*.mitm")).read_bytes()
    for secret in (KEY, TOKEN, "priv-value-123", "cookie-secret-987", "eyJwYXlsb2FkIjoic2lnbmVkIn0="):
        assert secret.encode() not in data
    assert got.id == flow.id
    assert got.request.headers["authorization"] == redacted(f"Bearer {KEY}")
    assert got.request.headers["x-private"] == redacted("priv-value-123")
    assert got.request.headers["payment-signature"] == redacted("eyJwYXlsb2FkIjoic2lnbmVkIn0=")
    assert got.request.path.endswith(f"?token={redacted(TOKEN)}")
    assert json.loads(got.request.content) == {"k": redacted(KEY), "p": redacted("priv-value-123")}
    assert got.request.headers["content-length"] == str(len(got.request.raw_content))
    assert got.response.content == (
        f'{{"echo": "{redacted("cookie-secret-987")} {redacted("eyJwYXlsb2FkIjoic2lnbmVkIn0=")}"}}'
    ).encode()
    assert got.metadata["proxyauth"] == ["team-a", redacted(TOKEN)]
    assert got.metadata["odd"] == redacted(KEY).encode()
    assert got.comment == f"note {redacted(KEY)}"


def test_recording_file_per_session_and_day(tmp_path: Path, recorder: Recorder) -> None:
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec = configured(tctx, cfg, tmp_path)
        for session in ("team-a", "team-b", "../evil"):
            flow = openai_flow(session=session)
            flow.timestamp_created = 1_700_000_000.0  # 2023-11-14 UTC
            recorder.response(flow)
            recorder.error(flow)  # a flow is written once
    assert recorder.flush()
    names = sorted(p.name for p in rec.iterdir())
    assert names == ["_evil-2023-11-14.mitm", "team-a-2023-11-14.mitm", "team-b-2023-11-14.mitm"]
    assert len(read(rec)) == 3
    assert safe_session("..") == "_" and recording_name("a b", 0) == "a_b-1970-01-01.mitm"


class _Uppercase:
    """A stand-in repair stage that changes every byte it sees."""

    def __init__(self) -> None:
        self.upstream_changed = False

    def feed(self, chunk: bytes) -> list[bytes]:
        self.upstream_changed = True
        return [chunk.upper()]

    def finish(self) -> list[bytes]:
        return []


def test_streamed_body_timing_and_upstream_original(tmp_path: Path, recorder: Recorder) -> None:
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec = configured(tctx, cfg, tmp_path)
        flow = openai_flow()
        flow.response = tutils.tresp(headers=[(b"content-type", b"text/event-stream")], content=None)
        pipeline = StreamPipeline()
        pipeline.add_stage(_Uppercase())
        flow.response.stream = pipeline
        recorder.responseheaders(flow)
        frames = [b"data: a\n\n", f"data: {KEY}\n\n".encode(), b"data: [done]\n\n"]
        sent = [piece for frame in frames for piece in pipeline(frame)] + pipeline(b"")
        flow.response.raw_content = None  # what mitmproxy leaves on a streamed response
        recorder.response(flow)
        (got,) = read(rec, recorder)
    client = b"".join(sent)
    assert client == b"".join(frames).upper()
    assert got.response.raw_content == client  # the upper-cased key is no configured secret
    assert sum(n for _, n in got.metadata[flowmeta.STREAM_TIMING]) == len(client)
    assert got.metadata[flowmeta.UPSTREAM_ORIGINAL] is True
    original = got.metadata[UPSTREAM_ORIGINAL_BODY]
    assert original == b"data: a\n\n" + f"data: {redacted(KEY)}\n\n".encode() + b"data: [done]\n\n"
    assert sum(n for _, n in got.metadata[UPSTREAM_ORIGINAL_TIMING]) == len(original)


def test_max_body_cuts_and_says_so(tmp_path: Path, recorder: Recorder) -> None:
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec = configured(tctx, cfg, tmp_path, max_body=10)
        flow = openai_flow(b"x" * 50)
        recorder.response(flow)
        (got,) = read(rec, recorder)
    assert got.request.raw_content == b"x" * 10
    assert got.metadata[TRUNCATED]["request"] == 50


def test_partial_tail_is_cut_before_appending(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              recorder: Recorder) -> None:
    path = tmp_path / "rec" / "team-a-2023-11-14.mitm"
    path.parent.mkdir()
    whole = serialize(openai_flow())
    path.write_bytes(whole + whole[: len(whole) // 2])  # killed in the middle of a write
    assert valid_prefix(path) == len(whole)
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        configured(tctx, cfg, tmp_path)
        flow = openai_flow()
        flow.timestamp_created = 1_700_000_000.0
        recorder.response(flow)
        assert recorder.flush()
    assert "partial flow" in caplog.text  # logged by the writer, relayed to mitmdump's log
    assert len(read(path.parent)) == 2


# -- the recording writer process ---------------------------------------------------------------
def started_writer(tctx: taddons.context, cfg: Configuration, recorder: Recorder,
                   tmp_path: Path) -> tuple[Path, int]:
    """Configured, one flow written: the recordings directory and the writer's pid."""
    rec = configured(tctx, cfg, tmp_path)
    recorder.response(openai_flow())
    assert recorder.flush()
    pid = recorder.writer_pid
    assert pid is not None
    return rec, pid


async def test_finished_flows_are_handed_over_in_batches(tmp_path: Path, recorder: Recorder,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the event loop running, response() leaves the snapshot for later: BATCH_DELAY after
    the first flow of a batch, or at once when BATCH_MAX are due."""
    monkeypatch.setattr(recorder_module, "BATCH_MAX", 3)
    recorded: list[http.HTTPFlow] = []
    record = recorder.record

    def spy(flow: http.HTTPFlow) -> None:
        recorded.append(flow)
        record(flow)

    monkeypatch.setattr(recorder, "record", spy)
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec = configured(tctx, cfg, tmp_path)
        flows = [openai_flow() for _ in range(5)]
        for flow in flows[:2]:
            recorder.response(flow)
        assert recorded == []  # the hook returned without a snapshot
        await asyncio.sleep(recorder_module.BATCH_DELAY * 4)
        assert recorded == flows[:2]  # the timer took the batch
        for flow in flows[2:]:
            recorder.response(flow)
        assert recorded == flows  # BATCH_MAX due: taken at once
        assert len(read(rec, recorder)) == 5


async def test_record_never_waits_for_the_writer(tmp_path: Path, recorder: Recorder,
                                                 caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With the event loop running (as in mitmdump), a stopped writer never blocks record(): what
    the pipe cannot take waits in the addon, up to MAX_BACKLOG, and beyond it flows are dropped,
    counted and logged once. Nothing is written until the writer runs again."""
    monkeypatch.setattr(recorder_module, "MAX_BACKLOG", 2_000_000)
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec, pid = started_writer(tctx, cfg, recorder, tmp_path)
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(30):  # 6 MB: more than the pipe (1 MB at most) and the backlog hold
                recorder.record(openai_flow(b"x" * 200_000))  # handed over now, not in a batch
            assert len(read(rec)) == 1  # handed over, not written: the writer is stopped
        finally:
            os.kill(pid, signal.SIGCONT)
        assert recorder.flush()  # the writer catches up...
        recorder.response(openai_flow())  # ...and the next flow sums the drops up, once
        got = len(read(rec, recorder))
    assert caplog.text.count("flows are not recorded until it catches up") == 1
    assert caplog.text.count("flow(s) were not recorded") == 1
    dropped = int(caplog.text.split(" flow(s) were not recorded")[0].rsplit(" ", 1)[1])
    assert 0 < dropped < 30 and got == 1 + 30 - dropped + 1


def test_writer_is_replaced_when_it_dies(tmp_path: Path, recorder: Recorder,
                                         caplog: pytest.LogCaptureFixture) -> None:
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec, first = started_writer(tctx, cfg, recorder, tmp_path)
        os.kill(first, signal.SIGKILL)
        assert wait_gone(first)
        for _ in range(2):
            recorder.response(openai_flow())
        assert len(read(rec, recorder)) == 3
        assert recorder.writer_pid not in (None, first)
    assert caplog.text.count("recording writer (pid") == 1


CRASH = """
import json, os, signal, sys
from mitmproxy.test import taddons, tflow
from configuration import Configuration
from llmitm import flowmeta
from recorder import Recorder

cfg, recorder = Configuration(), Recorder()
with taddons.context(cfg, recorder) as tctx:
    tctx.configure(cfg, llmitm_config=sys.argv[1])
    flows = [tflow.tflow(resp=True) for _ in range(4)]
    for n, flow in enumerate(flows):
        flow.metadata[flowmeta.SESSION] = "team-a"
        flow.request.content = json.dumps({"n": n}).encode()
    recorder.response(flows[0])
    assert recorder.flush()
    os.kill(recorder.writer_pid, signal.SIGSTOP)  # the next flows stay in the pipe
    for flow in flows[1:]:
        recorder.response(flow)
    print("writer-pid", recorder.writer_pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # mitmdump killed: no done(), no flush
"""


def test_flows_handed_over_survive_mitmdump_killed(tmp_path: Path) -> None:
    """kill -9 of mitmdump (not of its process group): the writer writes what is in the pipe,
    then sees its end and exits."""
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.format(dir=tmp_path / "rec", max_body=1000, action="mark"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "addons"), str(REPO)])}
    out = tmp_path / "out.txt"
    with open(out, "w") as fh:  # a file, not a pipe: the writer keeps it open after the crash
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH), str(path)], env=env,
                              stdout=fh, stderr=subprocess.STDOUT, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, out.read_text()
    pid = int(out.read_text().split("writer-pid ", 1)[1].split()[0])
    try:
        os.kill(pid, signal.SIGCONT)
        assert wait_gone(pid), "the writer did not exit at the end of its pipe"
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    got = read(tmp_path / "rec")
    assert [json.loads(f.request.content or b"")["n"] for f in got] == [0, 1, 2, 3]


def test_writer_exits_when_its_pipe_closes(tmp_path: Path, recorder: Recorder) -> None:
    """done() closes the pipe; the writer writes what it has and exits (the fixture checks it
    is gone); a flow after that starts a new writer."""
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec = configured(tctx, cfg, tmp_path)
        recorder.response(openai_flow())
        pid = recorder.writer_pid
        assert pid is not None
        recorder.done()  # no flush first
        assert gone(pid) and recorder.writer_pid is None
        assert len(read(rec)) == 1
        recorder.response(openai_flow())
        assert recorder.writer_pid not in (None, pid)
        assert len(read(rec, recorder)) == 2


def test_writer_bytes_are_flowwriter_bytes() -> None:
    """The writer's shortcuts (connections kept as states, their tnetstring cached) write what
    FlowWriter writes for the same flow; a connection that changed is taken again."""
    flow = openai_flow()
    conns = recorder_module._ConnStates()
    held = recorder_module._WriterConns()
    dumper = recorder_module._Dumper()
    nothing = SecretSet(always_redacted=False)  # redaction changes nothing: same bytes expected

    def snapshot() -> tuple[dict[str, Any], int]:
        """The state the writer rebuilds, and how many connection states crossed the pipe."""
        state = recorder_module._state_of(flow, conns)
        fresh = conns.unsent([state["client_conn"], state["server_conn"]])
        held.update(*pickle.loads(pickle.dumps((fresh, conns.take_gone()))))
        return held.resolve(pickle.loads(pickle.dumps(state))), len(fresh)

    for sent in (2, 0):  # the second time from the caches: no connection state is sent again
        state, fresh = snapshot()
        assert fresh == sent
        assert state["client_conn"] == flow.client_conn.get_state()
        reference = serialize(http.HTTPFlow.from_state(copy.deepcopy(state)))
        written = recorder_module.redacted_copy(state, nothing, 100_000)
        assert dumper.dumps(written.get_state()) == serialize(written) == reference
    flow.server_conn.timestamp_end = 1_700_000_123.0
    flow.server_conn.alpn_offers = [b"h2"]
    state, fresh = snapshot()
    assert fresh == 1  # the server connection changed
    assert state["server_conn"]["timestamp_end"] == 1_700_000_123.0
    assert state["server_conn"]["alpn_offers"] == flow.server_conn.get_state()["alpn_offers"]
    got = recorder_module.redacted_copy(copy.deepcopy(state), nothing, 100_000)
    assert dumper.dumps(got.get_state()) == serialize(http.HTTPFlow.from_state(state))
    conns.none_sent()  # a new writer: both go again
    assert snapshot()[1] == 2


def test_writer_forgets_collected_connections() -> None:
    """A connection's state leaves both sides' tables once the connection is collected."""
    conns = recorder_module._ConnStates()
    held = recorder_module._WriterConns()
    flow = openai_flow()
    state = recorder_module._state_of(flow, conns)
    ids = (state["client_conn"], state["server_conn"])
    held.update(conns.unsent(ids), conns.take_gone())
    assert conns.take_gone() == ()
    del flow, state
    gc.collect()
    gone = conns.take_gone()
    assert sorted(gone) == sorted(ids)
    held.update((), gone)
    with pytest.raises(KeyError):
        held.resolve({"client_conn": ids[0]})
    with pytest.raises(KeyError):
        conns.unsent(ids[:1])  # the addon's side forgot it too


def test_in_process_when_no_writer_can_run(tmp_path: Path, recorder: Recorder,
                                            caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    cfg = Configuration()
    with taddons.context(cfg, recorder) as tctx:
        rec = configured(tctx, cfg, tmp_path)
        for _ in range(2):
            recorder.response(openai_flow(json.dumps({"k": KEY}).encode()))
        assert recorder.writer_pid is None
        got = read(rec, recorder)
    assert [json.loads(f.request.content or b"") for f in got] == [{"k": redacted(KEY)}] * 2
    assert caplog.text.count("cannot run the recording writer (FileNotFoundError)") == 1


def test_capture_and_timing_helpers() -> None:
    clock = iter([0.0, 0.5, 0.5004]).__next__
    cap = StreamCapture(limit=4, start=0.0, clock=clock)
    for chunk in (b"ab", b"cd", b"ef"):
        cap.add(chunk)
    body, ends = joined(cap.raw)
    assert ends == [(0.0, 2), (0.5, 6)]  # chunks within a millisecond are merged
    assert body == b"abcdef"  # kept up to limit + SLACK (cut after redaction)
    assert timing_of([(0.1, 3), (0.2, 6)], [3, 6], 4) == [[0.1, 3], [0.2, 1]]
    secrets = SecretSet(["secret-123456"])
    data = b"aa secret-123456 bb"
    out, mapped = secrets.redact_bytes_mapped(data, [5, len(data)])
    assert out == secrets.redact_bytes(data) and mapped == [3 + 19, len(out)]


# -- guard ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["mark", "block"])
def test_guard_finds_and_acts(tmp_path: Path, action: str, caplog: pytest.LogCaptureFixture) -> None:
    cfg, guard = Configuration(), Guard()
    with taddons.context(cfg, guard) as tctx:
        configured(tctx, cfg, tmp_path, action=action)
        ok = openai_flow()
        ok.response = None
        guard.request(ok)
        assert not ok.marked and ok.response is None
        leak = openai_flow()
        leak.response = None
        leak.request.host = "telemetry.example.test"
        leak.request.path = f"/collect?k={KEY}"
        leak.metadata.pop(flowmeta.INJECTED)
        guard.request(leak)
        kinds = sorted(x["kind"] for x in leak.metadata[flowmeta.LEAKS])
        assert kinds == ["in_url", "out_of_scope_host"]
        assert leak.marked == ":warning:" and "llmitm: LEAK" in leak.comment
        if action == "block":
            assert leak.response is not None and leak.response.status_code == 403
            assert KEY.encode() not in leak.response.content
            assert KEY not in leak.request.path  # nothing left, so scrubbed at once
        else:
            assert leak.response is None
            assert KEY in leak.request.path  # it goes upstream as the client sent it...
            leak.response = tutils.tresp()
            guard.response(leak)
            assert KEY not in leak.request.path  # ...and is scrubbed once the exchange is over
    assert "llmitm guard: session team-a" in caplog.text
    assert KEY not in caplog.text


def test_guard_websocket_message(tmp_path: Path) -> None:
    cfg, guard = Configuration(), Guard()
    with taddons.context(cfg, guard) as tctx:
        configured(tctx, cfg, tmp_path, action="block")
        flow = tflow.twebsocketflow()
        flow.metadata[flowmeta.SESSION] = "team-b"
        flow.websocket.messages.append(WebSocketMessage(Opcode.TEXT, True, f"k={KEY}".encode()))
        guard.websocket_message(flow)
        assert flow.websocket.messages[-1].dropped
        assert [x["where"] for x in flow.metadata[flowmeta.LEAKS]] == ["websocket"]
