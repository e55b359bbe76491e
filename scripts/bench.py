"""Measure what the gateway costs: direct vs bare mitmdump vs llmitm, on loopback, TLS both sides.

Every route sends the same requests to the same local fake provider: direct and bare mitmdump to
``https://127.0.0.1:PORT`` (with ``Host: api.openai.com``), llmitm to ``https://api.openai.com``
routed to the fake with ``llmitm_resolve`` (llmitm decides by where a connection goes, never by
the Host header, so it needs the real name to recognise provider traffic).
The 1-client latency takes the routes in turn, request by request; other measures run route by
route. Rounds are interleaved (the route order rotates each round) and ratios are
computed within each round before taking medians, so drift on a shared machine cancels out.
All loops are bounded; everything listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness.certs import make_test_certs  # noqa: E402
from tests.harness.gateway import SYSTEM_CA_FILES, Gateway  # noqa: E402
from tests.harness.procs import Proc  # noqa: E402

# httpx writes headers and body separately; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
# A session configuration whose headers apply to every benchmark request (default session,
# scope api.openai.com), plus other sessions and scopes the matcher has to skip.
HEADERS_CONFIG = """
sessions:
  default:
    headers:
      api.openai.com: {Authorization: Bearer sk-bench-0123456789, X-Tenant: bench, X-Env: prod}
      "api.anthropic.com/v1/*": {x-api-key: sk-ant-bench}
      "*.example.test": {X-Other: o}
  team-a:
    token: tok
    headers:
      api.openai.com: {X-Tenant: a}
"""
CHAT_BODY = {"model": "gpt-bench", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Route:
    name: str
    proxy: str | None
    verify: str
    base: str  # scheme://host:port the requests are sent to


@dataclass
class Results:
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # measure -> route

    def add(self, measure: str, route: str, value: float) -> None:
        self.values.setdefault(measure, {}).setdefault(route, []).append(value)


class Bench:
    def __init__(self) -> None:
        self.headers = {"host": "api.openai.com"}

    def client(self, route: Route) -> httpx.Client:
        transport = httpx.HTTPTransport(proxy=route.proxy, verify=route.verify,
                                        socket_options=NODELAY)
        return httpx.Client(transport=transport, trust_env=False, timeout=30)

    def latency_ms(self, routes: list[Route], n: int) -> dict[str, float]:
        """Median latency per route, the routes taking turns request by request (one client
        each, connections kept): every route is measured over the same stretch of time, so a
        machine that speeds up or slows down meanwhile affects them alike."""
        clients = {route.name: self.client(route) for route in routes}
        samples: dict[str, list[float]] = {route.name: [] for route in routes}
        try:
            for i in range(n + 10):  # the first 10 warm the connections up
                for route in routes:
                    c = clients[route.name]
                    t0 = time.perf_counter()
                    r = c.post(f"{route.base}/v1/chat/completions", json=CHAT_BODY,
                               headers=self.headers)
                    if i >= 10:
                        samples[route.name].append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200
        finally:
            for c in clients.values():
                c.close()
        return {name: statistics.median(values) for name, values in samples.items()}

    def requests_per_second(self, route: Route, clients: int, per_client: int) -> float:
        async def one(c: httpx.AsyncClient) -> None:
            for _ in range(per_client):
                r = await c.post(f"{route.base}/v1/chat/completions", json=CHAT_BODY,
                                 headers=self.headers)
                assert r.status_code == 200

        async def run() -> float:
            cs = [httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(proxy=route.proxy, verify=route.verify,
                                                   socket_options=NODELAY),
                trust_env=False, timeout=60) for _ in range(clients)]
            try:
                await asyncio.gather(*(c.post(f"{route.base}/v1/models", headers=self.headers)
                                       for c in cs))
                t0 = time.perf_counter()
                await asyncio.gather(*(one(c) for c in cs))
                return clients * per_client / (time.perf_counter() - t0)
            finally:
                await asyncio.gather(*(c.aclose() for c in cs))

        return asyncio.run(run())

    def sse_timing(self, route: Route, frames: int, delay: float) -> tuple[float, float]:
        """(first frame ms after the request, median per-frame lag ms after it was sent)."""
        with self.client(route) as c:
            c.get(f"{route.base}/v1/models", headers=self.headers)  # open the connection
            headers = {**self.headers, "x-fake-frames": str(frames),
                       "x-fake-frame-delay": str(delay), "x-fake-stamp": "1"}
            lags: list[float] = []
            first = None
            buf = b""
            t0 = time.perf_counter()
            with c.stream("POST", f"{route.base}/v1/chat/completions",
                          json={**CHAT_BODY, "stream": True}, headers=headers) as resp:
                for chunk in resp.iter_raw():
                    now = time.time()
                    if first is None:
                        first = (time.perf_counter() - t0) * 1000
                    buf += chunk
                    while b"\n\n" in buf:
                        frame, buf = buf.split(b"\n\n", 1)
                        if frame.startswith(b"data: {"):
                            lags.append((now - json.loads(frame[6:])["t"]) * 1000)
        assert first is not None and len(lags) == frames + 3, len(lags)  # role, words, finish, [DONE]
        return first, statistics.median(lags)

    def burst(self, route: Route, frames: int) -> tuple[float, float]:
        """(seconds to receive all frames, MB/s)."""
        with self.client(route) as c:
            c.get(f"{route.base}/v1/models", headers=self.headers)
            headers = {**self.headers, "x-fake-frames": str(frames)}
            t0 = time.perf_counter()
            total = 0
            with c.stream("POST", f"{route.base}/v1/chat/completions",
                          json={**CHAT_BODY, "stream": True}, headers=headers) as resp:
                for chunk in resp.iter_raw():
                    total += len(chunk)
            elapsed = time.perf_counter() - t0
        assert total > frames * 100
        return elapsed, total / elapsed / 1e6


MEASURES: list[tuple[str, str, bool]] = [
    # (key, label, lower is better)
    ("latency", "JSON POST latency, 1 client (ms, median)", True),
    ("rps", "JSON POST throughput, 16 clients (req/s)", False),
    ("first", "SSE first frame (ms)", True),
    ("lag", "SSE per-frame lag, frames 20 ms apart (ms, median)", True),
    ("burst_s", "SSE burst of 2,000 frames (s)", True),
    ("burst_mbs", "SSE burst throughput (MB/s)", False),
]


def run_round(bench: Bench, routes: list[Route], results: Results, quick: bool) -> None:
    for name, value in bench.latency_ms(routes, 60 if quick else 300).items():
        results.add("latency", name, value)
    for route in routes:
        results.add("rps", route.name, bench.requests_per_second(route, 16, 10 if quick else 40))
        first, lag = bench.sse_timing(route, 25, 0.02)
        results.add("first", route.name, first)
        results.add("lag", route.name, lag)
        seconds, mbs = bench.burst(route, 2000)
        results.add("burst_s", route.name, seconds)
        results.add("burst_mbs", route.name, mbs)


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def table(results: Results, routes: list[Route], ratios: list[tuple[str, str]]) -> str:
    names = [r.name for r in routes]
    head = ["measure", *names, *(f"{a}/{b}" for a, b in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _ in MEASURES:
        per_route = results.values[key]

        def fmt(v: float) -> str:
            return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"

        row = [label, *(spread(per_route[n], fmt) for n in names)]
        for a, b in ratios:
            within = [x / y for x, y in zip(per_route[a], per_route[b], strict=True)]
            row.append(spread(within, lambda v: f"{v:.2f}x"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def differences(results: Results, a: str, b: str, label: str) -> str:
    """Per-round latency differences a − b (ms): small costs that a ratio would hide."""
    per = results.values["latency"]
    deltas = [x - y for x, y in zip(per[a], per[b], strict=True)]
    return (f"{label}: {statistics.median(deltas):+.3f} ms median per request "
            f"({min(deltas):+.3f} to {max(deltas):+.3f} over rounds, {a} − {b}, 1-client latency)")


def hook_costs(n: int = 5000) -> str:
    """In-process cost per request of the request-path hooks (mitmproxy's taddons, no network):
    the precise answer to "what does header injection add", which loopback noise would hide."""
    sys.path.insert(0, str(REPO / "addons"))
    from mitmproxy.test import taddons, tflow

    from configuration import Configuration
    from identify import Identify
    from session_headers import SessionHeaders

    config_file = Path(tempfile.mkdtemp(prefix="llmitm-bench-")) / "gateway.yaml"
    config_file.write_text(HEADERS_CONFIG)
    configuration, identify, session_headers = Configuration(), Identify(), SessionHeaders()
    rows = []
    with taddons.context(configuration, identify, session_headers) as tctx:
        for label, path in (("default configuration", None), ("session headers", config_file)):
            if path is not None:
                tctx.configure(configuration, llmitm_config=str(path))
            flows = []
            for _ in range(n):
                flow = tflow.tflow()
                flow.request.host, flow.request.path = "api.openai.com", "/v1/chat/completions"
                flows.append(flow)
            t0 = time.perf_counter()
            for flow in flows:
                identify.request(flow)
            t1 = time.perf_counter()
            for flow in flows:
                session_headers.request(flow)
            t2 = time.perf_counter()
            rows.append(f"| {label} | {1e6 * (t1 - t0) / n:.1f} | {1e6 * (t2 - t1) / n:.1f} |")
    return "\n".join(["| in-process, per request | Identify (µs) | SessionHeaders (µs) |",
                      "|---|---|---|", *rows])


def spine(rounds: int, quick: bool) -> str:
    """direct vs bare mitmdump vs llmitm (default config) vs llmitm with session headers."""
    tmp = Path(tempfile.mkdtemp(prefix="llmitm-bench-"))
    certs = make_test_certs(tmp / "testca")
    fake = Proc([sys.executable, "-m", "tests.harness.fake_provider", "--no-record",
                 "--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key)])
    gateways: list[Gateway] = []
    try:
        port = json.loads(fake.wait_for(lambda s: s.startswith("{")))["port"]
        quiet = ["--set", "flow_detail=0"]
        bare = Gateway(confdir=tmp / "conf", workdir=tmp, upstream_ca=certs.ca_pem, script=None,
                       extra_args=quiet)
        gateways.append(bare.start())
        resolve = {"api.openai.com:443": port}
        llmitm = Gateway(confdir=tmp / "conf", workdir=tmp, upstream_ca=certs.ca_pem,
                         extra_args=quiet, resolve=resolve)
        gateways.append(llmitm.start())
        headers_dir = tmp / "headers"
        headers_dir.mkdir()
        with_headers = Gateway(confdir=tmp / "conf", workdir=headers_dir, upstream_ca=certs.ca_pem,
                               extra_args=quiet, config_text=HEADERS_CONFIG, resolve=resolve)
        gateways.append(with_headers.start())
        norec_dir = tmp / "no-recording"
        norec_dir.mkdir()
        no_recording = Gateway(confdir=tmp / "conf", workdir=norec_dir, upstream_ca=certs.ca_pem,
                               extra_args=quiet, config_text="record: {dir: null}\n",
                               resolve=resolve)
        gateways.append(no_recording.start())
        bundle = tmp / "bundle.pem"
        bundle.write_bytes(b"\n".join(
            [Path(p).read_bytes() for p in SYSTEM_CA_FILES if Path(p).exists()]
            + [certs.ca_pem.read_bytes(), bare.mitm_ca.read_bytes()]))
        local, named = f"https://127.0.0.1:{port}", "https://api.openai.com"
        routes = [Route("direct", None, str(bundle), local),
                  Route("mitmdump", bare.url, str(bundle), local),
                  Route("llmitm", llmitm.url, str(bundle), named),
                  Route("llmitm+headers", with_headers.url, str(bundle), named),
                  Route("llmitm-norec", no_recording.url, str(bundle), named)]
        bench = Bench()
        results = Results()
        for i in range(rounds):
            order = routes[i % len(routes):] + routes[:i % len(routes)]
            t0 = time.perf_counter()
            run_round(bench, order, results, quick)
            print(f"spine: round {i + 1}/{rounds} done in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr)
        text = table(results, routes, [("llmitm", "mitmdump"), ("llmitm-norec", "mitmdump"),
                                        ("llmitm", "direct"), ("mitmdump", "direct"),
                                        ("llmitm+headers", "llmitm")])
        text += "\n\n" + differences(results, "llmitm+headers", "llmitm",
                                      "session-header injection cost")
        return text + "\n\n" + hook_costs()
    finally:
        for gw in gateways:
            gw.stop()
        fake.stop()


SECTIONS = ("spine", "repair", "x402")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer requests per round")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only these sections (repeatable); default: all")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "latest.md")
    args = parser.parse_args()
    wanted = args.only or list(SECTIONS)
    parts = []
    if "spine" in wanted:
        parts.append("### Gateway overhead\n\n" + spine(args.rounds, args.quick))
    if "repair" in wanted:
        import bench_repair  # beside this file

        parts.append("### Streamed tool-call repair\n\n" + bench_repair.run(args.rounds))
    if "x402" in wanted:
        import bench_x402  # beside this file

        parts.append("### x402 payments\n\n" + bench_x402.run(args.rounds))
    stamp = (f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {args.rounds} rounds"
             f"{' (quick)' if args.quick else ''}; median (min–max over rounds)")
    report = stamp + "\n\n" + "\n\n".join(parts) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
