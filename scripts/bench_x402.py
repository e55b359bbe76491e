"""Benchmark x402 payments: upstream round trips and latency per paid request.

Three payers against the same local paid endpoint (the test bed: official-SDK seller, official
facilitator, LiteSVM bank, over HTTPS on 127.0.0.1):

- llmitm with ``presign: true`` (a request to a known route is signed before it leaves),
- llmitm without presign (402, then the 307 that re-sends the request with the payment),
- the official x402 httpx client (``x402AsyncTransport``) straight to the seller, no proxy.

Each paid request settles on the bank (facilitator verify + settle), so these are whole paid
requests, not signing alone. Round trips are counted at the seller. Rounds are interleaved (the
route order rotates every round); each route is warmed up first (llmitm learns the requirements,
connections open), so the figures are steady state; the first request to a route always costs
two round trips. Everything listens on 127.0.0.1 and is stopped by PID at the end.

``python scripts/bench_x402.py [--rounds N] [--requests M]`` prints a markdown table;
``run(rounds)`` returns it (scripts/bench.py calls that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness.certs import make_test_certs  # noqa: E402
from tests.harness.gateway import SYSTEM_CA_FILES, Gateway  # noqa: E402
from tests.harness.procs import Proc  # noqa: E402

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
PAID_HOST = "paid.example.test"
PATH = "/v1/chat/completions"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Route:
    name: str
    url: str
    client: Callable[[], httpx.AsyncClient]
    method: str = "POST"
    latencies: list[float] = field(default_factory=list)  # per-round medians (ms)
    trips: list[float] = field(default_factory=list)  # per-round upstream requests per request


class Bed:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.certs = make_test_certs(tmp / "testca")
        self.keyfile = tmp / "payer.json"
        self.procs: list[Proc] = []
        self.gateways: list[Gateway] = []
        self.bank = Proc([sys.executable, "-m", "tests.x402bank.server", "--port", "0",
                          "--certfile", str(self.certs.server_cert),
                          "--keyfile", str(self.certs.server_key),
                          "--payer-keypair", str(self.keyfile)],
                         env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
        self.procs.append(self.bank)
        self.info = json.loads(self.bank.wait_for(lambda s: s.startswith("{"), timeout=60))
        self.control = httpx.Client(base_url=f"https://127.0.0.1:{self.info['port']}",
                                    verify=str(self.certs.ca_pem), trust_env=False, timeout=10)

    def gateway(self, name: str, presign: bool) -> Gateway:
        work = self.tmp / name
        work.mkdir()
        info = self.info
        config = (
            "x402:\n"
            f"  wallet: {self.keyfile}\n"
            f"  rpc_url: {info['rpc_url']}\n"
            f"  pay_hosts: [{PAID_HOST}]\n"
            "  networks: [solana-devnet]\n"
            f"  assets: [{info['mint']}]\n"
            "  limits: {per_request: '0.05', per_session_per_day: '100000', "
            "total_per_day: '100000'}\n"
            f"  presign: {'true' if presign else 'false'}\n"
            f"  ledger: {work / 'ledger.sqlite3'}\n"
        )
        gw = Gateway(confdir=self.tmp / "conf", workdir=work, upstream_ca=self.certs.ca_pem,
                     resolve={f"{PAID_HOST}:443": int(info["port"])}, config_text=config,
                     extra_args=["--set", "flow_detail=0"])
        self.gateways.append(gw)
        return gw.start()

    def seller_requests(self) -> int:
        return sum(self.control.get("/_bank/balances").json()["requests"].values())

    def bundle(self) -> Path:
        path = self.tmp / "bundle.pem"
        parts = [Path(p).read_bytes() for p in SYSTEM_CA_FILES if Path(p).exists()]
        parts.append((self.tmp / "conf" / "mitmproxy-ca-cert.pem").read_bytes())
        path.write_bytes(b"\n".join(parts))
        return path

    def official_client(self) -> httpx.AsyncClient:
        from solders.keypair import Keypair
        from x402 import x402Client
        from x402.http.clients.httpx import x402AsyncTransport
        from x402.mechanisms.svm.exact.register import register_exact_svm_client
        from x402.mechanisms.svm.signers import KeypairSigner

        keypair = Keypair.from_bytes(bytes(json.loads(self.keyfile.read_text())))
        client = x402Client()
        register_exact_svm_client(client, KeypairSigner(keypair), rpc_url=self.info["rpc_url"])
        client.set_spend_controls({"allowed_assets": [  # the bank's mint is not a default asset
            {"network": self.info["network"], "asset": self.info["mint"],
             "max_amount_per_payment": "1000000"}]})
        transport = httpx.AsyncHTTPTransport(verify=str(self.certs.ca_pem), socket_options=NODELAY)
        return httpx.AsyncClient(transport=x402AsyncTransport(client, transport),
                                 trust_env=False, timeout=60)

    def close(self) -> None:
        self.control.close()
        for gw in self.gateways:
            gw.stop()
        for proc in self.procs:
            proc.stop()


async def measure(route: Route, n: int, bed: Bed) -> tuple[float, float]:
    """(median ms per paid request, upstream requests per paid request) over ``n`` requests."""
    body = BODY if route.method == "POST" else None
    async with route.client() as client:
        for _ in range(2):  # warm-up: connections, and llmitm's presign cache
            (await client.request(route.method, route.url, json=body)).raise_for_status()
        before = bed.seller_requests()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            resp = await client.request(route.method, route.url, json=body)
            samples.append((time.perf_counter() - t0) * 1000)
            assert resp.status_code == 200, resp.text
        trips = (bed.seller_requests() - before) / n
    return statistics.median(samples), trips


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    def one(v: float) -> str:
        return f"{format(v, fmt)}{unit}"
    return f"{one(statistics.median(values))} ({one(min(values))}–{one(max(values))})"


def run(rounds: int = 5, requests: int = 20) -> str:
    """Start the test bed and two gateways, measure, stop everything; a markdown report."""
    # the official SVM client builds solana-py's sync Client, which warns that it is deprecated
    warnings.filterwarnings("ignore", category=FutureWarning)
    tmp = Path(tempfile.mkdtemp(prefix="llmitm-bench-x402-"))
    bed = Bed(tmp)
    try:
        presign = bed.gateway("presign", True)
        plain = bed.gateway("plain", False)
        bundle = str(bed.bundle())

        def via(gw: Gateway) -> Callable[[], httpx.AsyncClient]:
            def make() -> httpx.AsyncClient:
                transport = httpx.AsyncHTTPTransport(proxy=gw.url, verify=bundle,
                                                     socket_options=NODELAY)
                return httpx.AsyncClient(transport=transport, trust_env=False,
                                         follow_redirects=True, timeout=60)
            return make

        def direct() -> httpx.AsyncClient:
            transport = httpx.AsyncHTTPTransport(verify=str(bed.certs.ca_pem),
                                                 socket_options=NODELAY)
            return httpx.AsyncClient(transport=transport, trust_env=False, timeout=60)

        routes = [
            Route("llmitm, presign", f"https://{PAID_HOST}{PATH}", via(presign)),
            Route("llmitm, no presign (402 → 307)", f"https://{PAID_HOST}{PATH}", via(plain)),
            Route("official x402 httpx client, direct", f"https://127.0.0.1:{bed.info['port']}{PATH}",
                  bed.official_client),
            # references without a payment: what one round trip costs, direct and through llmitm
            Route("(reference) free GET, direct", f"https://127.0.0.1:{bed.info['port']}/v1/models",
                  direct, "GET"),
            Route("(reference) free GET via llmitm", f"https://{PAID_HOST}/v1/models", via(presign),
                  "GET"),
        ]
        for i in range(rounds):
            order = routes[i % len(routes):] + routes[:i % len(routes)]
            t0 = time.perf_counter()
            for route in order:
                latency, trips = asyncio.run(measure(route, requests, bed))
                route.latencies.append(latency)
                route.trips.append(trips)
            print(f"round {i + 1}/{rounds} done in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr)
    finally:
        bed.close()
    base = routes[2].latencies
    lines = [
        f"x402: {rounds} interleaved rounds x {requests} paid requests per payer, loopback, "
        "each payment verified and settled by the official facilitator on a LiteSVM bank; "
        "median (min–max over rounds)",
        "",
        "| payer | upstream round trips per request | latency per request (ms) "
        "| latency vs official client |",
        "|---|---|---|---|",
    ]
    for route in routes:
        ratio = [a / b for a, b in zip(route.latencies, base, strict=True)]
        lines.append(f"| {route.name} | {spread(route.trips, '.2f')} | "
                     f"{spread(route.latencies, '.1f')} | {spread(ratio, '.2f', 'x')} |")
    lines += ["", "A paid request's latency is mostly the seller's verify + settle through the "
              "facilitator; the reference rows show what one round trip costs without it."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20, help="paid requests per route and round")
    args = parser.parse_args()
    print(run(args.rounds, args.requests))


if __name__ == "__main__":
    main()
