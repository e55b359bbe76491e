"""Measure what streamed tool-call repair costs: SSE burst throughput and per-frame lag.

Three routes to the same local fake provider (loopback, TLS both sides), each a real mitmdump:

- ``passthrough``: bare mitmdump with scripts/bench_stream_true.py (``flow.response.stream = True``
  for ``text/event-stream``), the baseline;
- ``repair off``: ``-s addons/gateway.py --set llmitm_repair=false`` (llmitm's pipeline, no repair);
- ``repair on``: ``-s addons/gateway.py``, default configuration.

The fake provider replays tool-call streams written here (``x-fake-sse-file``): chat completions
with four parallel calls whose arguments arrive in small fragments (healthy, and the same stream
with ``index`` missing from every tool-call fragment, so that every frame is repaired), Responses
and Anthropic Messages. Burst: ~5,000 frames sent back to back: the MB/s the client receives, and
the proxy's CPU time per frame (Linux /proc); in each round every route gets ``BURST_REPEATS``
bursts of each stream, alternately with the other routes, and the round's figure is their
median. Lag: ~25 frames 20 ms apart, each stamped with its send time in an SSE comment line
(``x-fake-stamp``), median of (arrival - send) per stream. Rounds are interleaved (route order
rotates), ratios and differences are taken within a round, then medians (min-max over rounds).
Everything listens on 127.0.0.1, all loops are bounded, every process is stopped.

``python scripts/bench_repair.py [--rounds N]`` prints a markdown table (``LLMITM_BENCH_BURST_FRAMES``
and ``LLMITM_BENCH_BURST_REPEATS`` set the burst length and the bursts per round: longer and
more average out a drifting machine); ``run(rounds)`` returns it (scripts/bench.py calls it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "addons"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.harness.certs import make_test_certs  # noqa: E402
from tests.harness.gateway import SYSTEM_CA_FILES, Gateway  # noqa: E402
from tests.harness.procs import Proc  # noqa: E402

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
BURST_FRAMES = int(os.environ.get("LLMITM_BENCH_BURST_FRAMES", "5000"))
# bursts per route and stream in a round, interleaved route by route (A B C A B C ...): on this
# kind of shared VM the speed drifts within a second, so a round's figure for a route is the
# median of several bursts taken alternately with the other routes'
BURST_REPEATS = int(os.environ.get("LLMITM_BENCH_BURST_REPEATS", "3"))
LAG_FRAMES = 25
LAG_DELAY = 0.02
TARGET_THROUGHPUT = 0.8  # repair on / passthrough, at least
TARGET_LAG_MS = 0.5  # repair on - passthrough, at most

ROUTES = ("passthrough", "repair off", "repair on")


# --- the streams ----------------------------------------------------------------------------------


def _sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode()


def _arguments(call: int, fragments: int) -> list[str]:
    """A JSON arguments object cut into (at most) ``fragments`` pieces, a few characters each."""
    words = " ".join(f"line {i} of file {call}" for i in range(fragments))
    text = json.dumps({"path": f"src/module_{call}.py", "content": words})
    size = math.ceil(len(text) / fragments)
    return [text[i:i + size] for i in range(0, len(text), size)]


def chat_stream(frames: int, calls: int = 4, drop_index: bool = False) -> bytes:
    """OpenAI chat completions: role chunk, ``calls`` parallel calls in fragments, finish, [DONE].
    ``drop_index`` leaves ``index`` out of every tool-call fragment (defect class 1)."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-bench", "system_fingerprint": "fp_bench"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]})

    def call_delta(index: int, fragment: dict[str, Any]) -> dict[str, Any]:
        return fragment if drop_index else {"index": index, **fragment}

    out = [chunk({"role": "assistant", "content": None})]
    per_call = max(2, (frames - 3) // calls)
    for c in range(calls):
        out.append(chunk({"tool_calls": [call_delta(c, {
            "id": f"call_bench{c}", "type": "function",
            "function": {"name": "write_file", "arguments": ""}})]}))
        out += [chunk({"tool_calls": [call_delta(c, {"function": {"arguments": piece}})]})
                for piece in _arguments(c, per_call - 1)]
    out.append(chunk({}, "tool_calls"))
    out.append(_sse("[DONE]"))
    return b"".join(out)


def responses_stream(frames: int, calls: int = 4) -> bytes:
    """OpenAI Responses: ``calls`` function calls, arguments in ``function_call_arguments.delta``."""
    seq = iter(range(1_000_000))
    resp = {"id": "resp_bench", "object": "response", "created_at": 1700000000, "model": "gpt-bench",
            "status": "in_progress", "output": [], "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": []}

    def event(kind: str, **data: Any) -> bytes:
        return _sse({"type": kind, **data, "sequence_number": next(seq)}, kind)

    out = [event("response.created", response=resp), event("response.in_progress", response=resp)]
    per_call = max(2, (frames - 3) // calls - 3)
    items = []
    for c in range(calls):
        item = {"id": f"fc_bench{c}", "type": "function_call", "status": "in_progress",
                "call_id": f"call_bench{c}", "name": "write_file", "arguments": ""}
        out.append(event("response.output_item.added", output_index=c, item=item))
        pieces = _arguments(c, per_call)
        out += [event("response.function_call_arguments.delta", item_id=item["id"], output_index=c,
                      delta=p) for p in pieces]
        args = "".join(pieces)
        out.append(event("response.function_call_arguments.done", item_id=item["id"],
                         output_index=c, arguments=args))
        done = {**item, "status": "completed", "arguments": args}
        out.append(event("response.output_item.done", output_index=c, item=done))
        items.append(done)
    out.append(event("response.completed", response={**resp, "status": "completed", "output": items}))
    return b"".join(out)


def messages_stream(frames: int, calls: int = 4) -> bytes:
    """Anthropic Messages: ``calls`` tool_use blocks, input in ``input_json_delta`` fragments."""
    out = [_sse({"type": "message_start", "message": {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-bench",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1}}}, "message_start")]
    per_call = max(2, (frames - 3) // calls - 2)
    for c in range(calls):
        out.append(_sse({"type": "content_block_start", "index": c, "content_block": {
            "type": "tool_use", "id": f"toolu_bench{c}", "name": "write_file", "input": {}}},
            "content_block_start"))
        out += [_sse({"type": "content_block_delta", "index": c,
                      "delta": {"type": "input_json_delta", "partial_json": p}}, "content_block_delta")
                for p in _arguments(c, per_call)]
        out.append(_sse({"type": "content_block_stop", "index": c}, "content_block_stop"))
    out.append(_sse({"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                          "stop_sequence": None},
                     "usage": {"output_tokens": 100}}, "message_delta"))
    out.append(_sse({"type": "message_stop"}, "message_stop"))
    return b"".join(out)


@dataclass(frozen=True)
class Kind:
    name: str
    endpoint: str  # llmitm's endpoint kind
    host: str
    path: str
    make: Callable[[int], bytes]
    body: dict[str, Any]


CHAT_BODY = {"model": "gpt-bench", "stream": True, "messages": [{"role": "user", "content": "go"}],
             "tools": [{"type": "function", "function": {"name": "write_file"}}]}
KINDS = (
    Kind("chat, healthy", "chat_completions", "api.openai.com", "/v1/chat/completions",
         chat_stream, CHAT_BODY),
    Kind("chat, every frame repaired", "chat_completions", "api.openai.com",
         "/v1/chat/completions", lambda n: chat_stream(n, drop_index=True), CHAT_BODY),
    Kind("responses, healthy", "responses", "api.openai.com", "/v1/responses", responses_stream,
         {"model": "gpt-bench", "stream": True, "input": "go"}),
    Kind("messages, healthy", "messages", "api.anthropic.com", "/v1/messages", messages_stream,
         {"model": "claude-bench", "stream": True, "max_tokens": 100,
          "messages": [{"role": "user", "content": "go"}]}),
)


def frame_count(body: bytes) -> int:
    return body.count(b"\n\n")


Costs = dict[str, tuple[int, int, float, float, int]]


def _repair_frames(endpoint: str, frames: list[bytes], fast: bool) -> tuple[bytes, Any, float]:
    """Feed a stream frame by frame (as the burst arrives): (output, repairer, µs per frame)."""
    from llmitm.repair import stream_repairer_for

    repairer = stream_repairer_for(endpoint, None)
    assert repairer is not None
    repairer.fast_path = fast
    t0 = time.perf_counter()
    repaired = b"".join(b"".join(repairer.feed(f)) for f in frames)
    repaired += b"".join(repairer.finish())
    return repaired, repairer, (time.perf_counter() - t0) / len(frames) * 1e6


def check_streams(files: dict[tuple[str, str], Path]) -> Costs:
    """Each stream is what it claims: the official SDK accumulators read the same calls from the
    healthy streams and from the repaired defective one, and the repairer leaves healthy streams
    alone. Returns per kind (frames, repairs, in-process µs per frame with the fast path and
    without it, frames that took the full path)."""
    from llmitm.sse import SSEParser

    # the official SDK accumulators (imported by name: a test helper, not type-checked here)
    accumulate = importlib.import_module("tests.accumulate")
    readers: dict[str, Callable[[bytes], list[dict[str, Any]]]] = {
        "chat_completions": accumulate.openai_chat_tool_calls,
        "responses": accumulate.openai_responses_tool_calls,
        "messages": accumulate.anthropic_tool_uses}
    out: Costs = {}
    reference = None
    for kind in KINDS:
        body = files[(kind.name, "burst")].read_bytes()
        frames = [f.raw for f in SSEParser().feed(body)]
        repaired, repairer, per_frame_us = _repair_frames(kind.endpoint, frames, fast=True)
        full, _, full_us = _repair_frames(kind.endpoint, frames, fast=False)
        assert full == repaired, kind.name  # the fast path changes nothing
        repairs = sum(repairer.repairs.values())
        calls = [(c["name"], json.loads(c["arguments"])) for c in readers[kind.endpoint](repaired)]
        assert len(calls) == 4 and all(name == "write_file" for name, _ in calls), kind
        if kind.endpoint == "chat_completions":
            if reference is None:
                reference = calls
            assert calls == reference, kind.name
        assert (repairs == 0) == ("healthy" in kind.name) and (repaired == body) == (repairs == 0)
        out[kind.name] = (len(frames), repairs, per_frame_us, full_us, repairer.full_frames)
    return out


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Route:
    name: str
    proxy: str
    verify: str
    pid: int  # the mitmdump process, for its CPU time
    named: bool  # True: https://<provider host> routed by llmitm_resolve (llmitm decides by
    #              where a connection goes, not by the Host header); False: the fake's address


def cpu_seconds(pid: int) -> float | None:
    """CPU time of every thread of ``pid`` (ns resolution, Linux); None where unavailable."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Results:
    values: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)

    def add(self, measure: str, kind: str, route: str, value: float) -> None:
        self.values.setdefault((measure, kind), {}).setdefault(route, []).append(value)

    def get(self, measure: str, kind: str) -> dict[str, list[float]]:
        return self.values[(measure, kind)]


class Bench:
    def __init__(self, upstream_port: int, files: dict[tuple[str, str], Path]) -> None:
        self.base = f"https://127.0.0.1:{upstream_port}"
        self.files = files

    @staticmethod
    def client(route: Route) -> httpx.Client:
        transport = httpx.HTTPTransport(proxy=route.proxy, verify=route.verify,
                                        socket_options=NODELAY)
        return httpx.Client(transport=transport, trust_env=False, timeout=30)

    def url(self, route: Route, kind: Kind, path: str) -> str:
        return f"https://{kind.host}{path}" if route.named else f"{self.base}{path}"

    def _stream(self, c: httpx.Client, route: Route, kind: Kind,
                headers: dict[str, str]) -> httpx.Response:
        request = c.build_request("POST", self.url(route, kind, kind.path), json=kind.body,
                                  headers={"host": kind.host, **headers})
        return c.send(request, stream=True)

    def burst(self, route: Route, kind: Kind) -> tuple[float, float | None]:
        """A tool-call stream of BURST_FRAMES sent back to back: (MB/s the client receives it at,
        CPU µs the proxy spent per frame)."""
        path = self.files[(kind.name, "burst")]
        with self.client(route) as c:
            c.get(self.url(route, kind, "/v1/models"), headers={"host": kind.host})  # connect
            cpu0 = cpu_seconds(route.pid)
            t0 = time.perf_counter()
            resp = self._stream(c, route, kind, {"x-fake-sse-file": str(path)})
            try:
                total = sum(len(chunk) for chunk in resp.iter_raw())
            finally:
                resp.close()
            elapsed = time.perf_counter() - t0
            cpu1 = cpu_seconds(route.pid)
        assert resp.status_code == 200 and total >= path.stat().st_size, (route.name, total)
        frames = frame_count(path.read_bytes())
        cpu = (cpu1 - cpu0) / frames * 1e6 if cpu0 is not None and cpu1 is not None else None
        return total / elapsed / 1e6, cpu

    def lag_ms(self, route: Route, kind: Kind) -> float:
        """Median of (arrival - send time) over a stream of frames ``LAG_DELAY`` apart."""
        path = self.files[(kind.name, "lag")]
        headers = {"x-fake-sse-file": str(path), "x-fake-stamp": "1",
                   "x-fake-frame-delay": str(LAG_DELAY)}
        lags: list[float] = []
        with self.client(route) as c:
            c.get(self.url(route, kind, "/v1/models"), headers={"host": kind.host})
            resp = self._stream(c, route, kind, headers)
            buf = b""
            try:
                for chunk in resp.iter_raw():
                    now = time.time()
                    buf += chunk
                    while b"\n\n" in buf:
                        frame, buf = buf.split(b"\n\n", 1)
                        if frame.startswith(b": t="):
                            lags.append((now - float(frame[4:frame.index(b"\n")])) * 1000)
            finally:
                resp.close()
        assert len(lags) == frame_count(path.read_bytes()), (route.name, kind.name, len(lags))
        return statistics.median(lags)


def run_round(bench: Bench, routes: list[Route], results: Results) -> None:
    for kind in KINDS:
        samples: dict[str, list[tuple[float, float | None]]] = {r.name: [] for r in routes}
        for _ in range(BURST_REPEATS):
            for route in routes:
                samples[route.name].append(bench.burst(route, kind))
        for route in routes:
            results.add("burst", kind.name, route.name,
                        statistics.median(mbs for mbs, _ in samples[route.name]))
            cpus = [cpu for _, cpu in samples[route.name] if cpu is not None]
            if cpus:
                results.add("cpu", kind.name, route.name, statistics.median(cpus))
    for kind in KINDS:
        for route in routes:
            results.add("lag", kind.name, route.name, bench.lag_ms(route, kind))


# --- the report -------------------------------------------------------------------------------------


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def table(results: Results, costs: Costs,
          files: dict[tuple[str, str], Path]) -> str:
    head = ["stream", "measure", *ROUTES, "on / passthrough", "on / off", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in KINDS:
        per = results.get("burst", kind.name)
        on_pt = [a / b for a, b in zip(per["repair on"], per["passthrough"], strict=True)]
        on_off = [a / b for a, b in zip(per["repair on"], per["repair off"], strict=True)]
        ok = statistics.median(on_pt) >= TARGET_THROUGHPUT
        lines.append("| " + " | ".join([
            kind.name, f"burst of {costs[kind.name][0]:,} frames (MB/s)",
            *(spread(per[r], lambda v: f"{v:.2f}") for r in ROUTES),
            spread(on_pt, lambda v: f"{v:.2f}x"), spread(on_off, lambda v: f"{v:.2f}x"),
            f"≥ {TARGET_THROUGHPUT}x {'met' if ok else 'MISSED'}"]) + " |")
    for kind in KINDS:
        if ("cpu", kind.name) not in results.values:
            continue
        per = results.get("cpu", kind.name)
        on_pt = [b / a for a, b in zip(per["repair on"], per["passthrough"], strict=True)]
        on_off = [b / a for a, b in zip(per["repair on"], per["repair off"], strict=True)]
        ok = statistics.median(on_pt) >= TARGET_THROUGHPUT
        lines.append("| " + " | ".join([
            kind.name, "proxy CPU per frame in the burst (µs; ratios: frames per CPU-second)",
            *(spread(per[r], lambda v: f"{v:.1f}") for r in ROUTES),
            spread(on_pt, lambda v: f"{v:.2f}x"), spread(on_off, lambda v: f"{v:.2f}x"),
            f"≥ {TARGET_THROUGHPUT}x {'met' if ok else 'MISSED'}"]) + " |")
    for kind in KINDS:
        per = results.get("lag", kind.name)
        on_pt = [a - b for a, b in zip(per["repair on"], per["passthrough"], strict=True)]
        on_off = [a - b for a, b in zip(per["repair on"], per["repair off"], strict=True)]
        ok = statistics.median(on_pt) <= TARGET_LAG_MS
        lines.append("| " + " | ".join([
            kind.name, f"per-frame lag, {frame_count(files[(kind.name, 'lag')].read_bytes())} "
            f"frames {LAG_DELAY * 1000:.0f} ms apart (ms)",
            *(spread(per[r], lambda v: f"{v:.3f}") for r in ROUTES),
            spread(on_pt, lambda v: f"{v:+.3f} ms"), spread(on_off, lambda v: f"{v:+.3f} ms"),
            f"≤ +{TARGET_LAG_MS} ms {'met' if ok else 'MISSED'}"]) + " |")
    lines += ["", "| in-process repairer, frame by frame (no network) | frames | repairs | "
              "µs per frame | frames on the full path | µs per frame, fast path off |",
              "|---|---|---|---|---|---|"]
    for name, (frames, repairs, us, full_us, full_frames) in costs.items():
        lines.append(f"| {name} | {frames:,} | {repairs:,} | {us:.1f} | {full_frames:,} | "
                     f"{full_us:.1f} |")
    return "\n".join(lines)


def proc_pid(gw: Gateway) -> int:
    assert gw.proc is not None
    return gw.proc.popen.pid


def write_streams(tmp: Path) -> dict[tuple[str, str], Path]:
    files = {}
    for i, kind in enumerate(KINDS):
        for use, frames in (("burst", BURST_FRAMES), ("lag", LAG_FRAMES)):
            path = tmp / f"stream-{i}-{use}.sse"
            path.write_bytes(kind.make(frames))
            files[(kind.name, use)] = path
    return files


def run(rounds: int = 5) -> str:
    """Start the fake provider and the three routes, measure ``rounds`` interleaved rounds, stop
    everything; returns the markdown report."""
    tmp = Path(tempfile.mkdtemp(prefix="llmitm-bench-repair-"))
    procs: list[Proc] = []
    gateways: list[Gateway] = []
    try:
        files = write_streams(tmp)
        costs = check_streams(files)
        certs = make_test_certs(tmp / "testca")
        fake = Proc([sys.executable, "-m", "tests.harness.fake_provider", "--no-record",
                     "--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key)])
        procs.append(fake)
        port = json.loads(fake.wait_for(lambda s: s.startswith("{")))["port"]
        quiet = ["--set", "flow_detail=0"]
        gateway, stream_true = REPO / "addons" / "gateway.py", REPO / "scripts" / "bench_stream_true.py"
        specs: list[tuple[str, Path, list[str]]] = [
            ("passthrough", stream_true, []),
            ("repair off", gateway, ["--set", "llmitm_repair=false"]),
            ("repair on", gateway, []),
        ]
        started: dict[str, Gateway] = {}
        for name, script, args in specs:
            workdir = tmp / name.replace(" ", "-")
            workdir.mkdir()
            resolve = ({} if script == stream_true else
                       {"api.openai.com:443": port, "api.anthropic.com:443": port})
            gw = Gateway(confdir=tmp / "conf", workdir=workdir, upstream_ca=certs.ca_pem,
                         script=script, extra_args=quiet + args, resolve=resolve)
            gateways.append(gw)
            started[name] = gw.start()
        bundle = tmp / "bundle.pem"
        bundle.write_bytes(b"\n".join(
            [Path(p).read_bytes() for p in SYSTEM_CA_FILES if Path(p).exists()]
            + [certs.ca_pem.read_bytes(), started["repair on"].mitm_ca.read_bytes()]))
        routes = [Route(name, started[name].url, str(bundle), proc_pid(started[name]),
                        named=name != "passthrough")
                  for name in ROUTES]
        bench = Bench(port, files)
        for kind in KINDS:  # warm up every route and stream once, unrecorded
            for route in routes:
                bench.burst(route, kind)
                bench.lag_ms(route, kind)
        results = Results()
        for i in range(rounds):
            order = routes[i % len(routes):] + routes[:i % len(routes)]
            t0 = time.perf_counter()
            run_round(bench, order, results)
            print(f"repair bench: round {i + 1}/{rounds} in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr)
        stamp = (f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
                 f"Python {platform.python_version()}, {rounds} rounds; "
                 "median (min–max over rounds); ratios and differences within rounds")
        return f"Streamed tool-call repair: {stamp}\n\n{table(results, costs, files)}\n"
    finally:
        for gw in gateways:
            gw.stop()
        for proc in procs:
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(run(args.rounds))


if __name__ == "__main__":
    main()
