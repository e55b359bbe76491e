"""Fixtures for the x402 end-to-end tests: the paid test bed (LiteSVM bank + official facilitator
+ official-SDK seller, over HTTPS with the test CA) and gateways configured to pay it.

Test modules import the fixtures they use by name.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.harness.certs import CertFiles
from tests.harness.gateway import Gateway
from tests.harness.procs import Proc

PAID_HOST = "paid.example.test"
ADMIN_TOKEN = "adm-x402-test-token"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@dataclass
class PaidBed:
    proc: Proc
    info: dict[str, Any]
    keyfile: Path
    ca: Path

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def price(self) -> int:
        return int(self.info["price"])

    def state(self) -> dict[str, Any]:
        """Balances, settlements and per-path request counts, straight from the bank."""
        resp = httpx.get(f"https://127.0.0.1:{self.port}/_bank/balances", verify=str(self.ca),
                         trust_env=False, timeout=10)
        resp.raise_for_status()
        return dict(resp.json())

    def resolve_args(self) -> list[str]:
        return ["--set", f"llmitm_resolve={PAID_HOST}:443=127.0.0.1:{self.port}"]


def start_paid_bed(certs: CertFiles, keyfile: Path, *args: str) -> PaidBed:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    proc = Proc([sys.executable, "-m", "tests.x402bank.server", "--port", "0",
                 "--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key),
                 "--payer-keypair", str(keyfile), *args], env=env)
    try:
        line = proc.wait_for(lambda s: s.startswith("{") and '"ready"' in s, timeout=60)
    except BaseException:
        proc.stop()
        raise
    return PaidBed(proc, json.loads(line), keyfile, certs.ca_pem)


@pytest.fixture(scope="module")
def paid_bed(test_certs: CertFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidBed]:
    keyfile = tmp_path_factory.mktemp("x402bed") / "payer.json"
    bed = start_paid_bed(test_certs, keyfile, "--interval", "0.25")
    yield bed
    bed.proc.stop()


def x402_yaml(bed: PaidBed, ledger: Path, *, per_request: str = "0.05",
              per_session: str = "1", total: str = "5", presign: bool = False,
              pay_hosts: tuple[str, ...] = (PAID_HOST,), extra: str = "") -> str:
    info = bed.info
    return (
        f"control:\n  admin_token: {ADMIN_TOKEN}\n"
        "x402:\n"
        f"  wallet: {bed.keyfile}\n"
        f"  rpc_url: {info['rpc_url']}\n"
        f"  pay_hosts: {json.dumps(list(pay_hosts))}\n"
        "  networks: [solana-devnet]\n"
        f"  assets: [{info['mint']}]\n"
        f"  pay_to: [{info['pay_to']}]\n"
        f"  limits: {{per_request: \"{per_request}\", per_session_per_day: \"{per_session}\", "
        f"total_per_day: \"{total}\"}}\n"
        f"  presign: {'true' if presign else 'false'}\n"
        f"  ledger: {ledger}\n"
        + extra
    )


def paying_gateway(gateway_factory: GatewayFactory, bed: PaidBed, ledger: Path,
                   extra_args: list[str] | None = None, **config: Any) -> Gateway:
    return gateway_factory(config_text=x402_yaml(bed, ledger, **config),
                           extra_args=[*bed.resolve_args(), *(extra_args or [])])


def ledger_rows(path: Path) -> list[dict[str, Any]]:
    """The ledger read directly with sqlite3 (not through the code under test)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM payments ORDER BY created_at")]
    finally:
        conn.close()


def control_payments(gw: Gateway, token: str = ADMIN_TOKEN, **params: Any) -> httpx.Response:
    with httpx.Client(proxy=gw.url, trust_env=False, timeout=10) as client:
        return client.get("http://llmitm.internal/payments", params=params,
                          headers={"Authorization": f"Bearer {token}"})


# --- a hostile x402 seller ------------------------------------------------------------------------
#
# ``python -m tests.e2e.x402_fixtures --certfile C --keyfile K`` prints one JSON line
# ``{"ready": true, "port": N, "rpc_port": M}``. Every ``POST /case/<id>`` carries, in its JSON
# body, the 402 to answer with (``case``: status, headers, body_b64) and what to do with a payment
# (``outcome``): ``settle`` (200 + a success receipt), ``none`` (200 without a receipt),
# ``fail`` (402 + a failed receipt) or ``again`` (the same 402 again). Every request that carries a
# payment header is recorded (``GET /_hostile/paid``); every answer says in ``x-hostile-paid`` how
# many paid requests reached that path, and a paid one echoes the payment (``x-hostile-*``).
# ``POST /rpc`` on the plain-HTTP ``rpc_port`` is a Solana JSON-RPC with a fixed blockhash and the
# mints in ``HOSTILE_MINTS``.

HOSTILE_BLOCKHASH = "GmaDrppBC7P5ARKV8g3djiwP89vz1jLK23V2GBjuAEGB"
#: mint -> decimals the hostile RPC reports (owner: the SPL Token program)
HOSTILE_MINTS = {"2KW2XRd9kwqet15Aha2oK3tYvd3nWbTFH1MBiRAv1BE1": 9}


def _hostile_app() -> Any:
    import base64
    import time as _time

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    paid: list[dict[str, Any]] = []
    seen: list[str] = []
    token_program = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"

    def receipt(success: bool) -> str:
        doc = ({"success": True, "transaction": "5" * 64, "network": "solana-devnet",
                "payer": "hostile"} if success else
               {"success": False, "errorReason": "insufficient_funds", "transaction": ""})
        return base64.b64encode(json.dumps(doc).encode()).decode()

    async def case(request: Request) -> Response:
        raw = await request.body()
        seen.append(request.url.path)
        doc = json.loads(raw)
        spec = doc["case"]
        headers = {k: v for k, v in spec.get("headers", {}).items()}
        body = base64.b64decode(spec.get("body_b64", ""))
        sig = request.headers.get("payment-signature")
        xpay = request.headers.get("x-payment")
        mine = [p for p in paid if p["path"] == request.url.path]
        # what this seller has seen paid for this path so far, on every answer (saves a lookup)
        echo = {"x-hostile-paid": str(len(mine) + (sig is not None or xpay is not None))}
        unpaid = Response(body, int(spec.get("status", 402)), headers={**headers, **echo})
        if sig is None and xpay is None:
            return unpaid
        paid.append({"path": request.url.path, "query": request.url.query,
                     "host": request.headers.get("host"), "at": _time.time(),
                     "header": "PAYMENT-SIGNATURE" if sig is not None else "X-PAYMENT",
                     "value": sig if sig is not None else xpay, "both": sig is not None and xpay
                     is not None, "body": raw.decode()})
        outcome = doc.get("outcome", "settle")
        name = "PAYMENT-RESPONSE" if sig is not None else "X-PAYMENT-RESPONSE"
        echo.update({"x-hostile-header": paid[-1]["header"], "x-hostile-value": paid[-1]["value"],
                     "x-hostile-query": request.url.query, "x-hostile-both": str(paid[-1]["both"])})
        if outcome == "settle":
            return JSONResponse({"ok": True}, headers={name: receipt(True), **echo})
        if outcome == "none":
            return JSONResponse({"ok": True}, headers=echo)
        if outcome == "fail":
            return Response(body, 402, headers={**headers, name: receipt(False), **echo})
        return Response(body, 402, headers={**headers, **echo})

    async def paid_list(request: Request) -> Response:
        if request.method == "DELETE":
            paid.clear()
            seen.clear()
        path = request.query_params.get("path")
        if path is not None:
            return JSONResponse({"paid": [p for p in paid if p["path"] == path],
                                 "seen": [s for s in seen if s == path]})
        return JSONResponse({"paid": paid, "seen": seen})

    async def rpc(request: Request) -> Response:
        body = json.loads(await request.body())
        rid, method, params = body.get("id"), body.get("method"), body.get("params") or []
        ctx = {"slot": 1}
        if method == "getLatestBlockhash":
            value: Any = {"blockhash": HOSTILE_BLOCKHASH, "lastValidBlockHeight": 200}
        elif method == "getAccountInfo" and params and params[0] in HOSTILE_MINTS:
            data = bytearray(82)
            data[44], data[45] = HOSTILE_MINTS[params[0]], 1
            value = {"data": [base64.b64encode(bytes(data)).decode(), "base64"],
                     "owner": token_program, "lamports": 1, "executable": False, "rentEpoch": 0}
        elif method == "getAccountInfo":
            value = None
        else:
            return JSONResponse({"jsonrpc": "2.0", "id": rid,
                                 "error": {"code": -32601, "message": "no"}})
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"context": ctx, "value": value}})

    seller = Starlette(routes=[Route("/case/{n}", case, methods=["POST"]),
                               Route("/_hostile/paid", paid_list, methods=["GET", "DELETE"])])
    rpc_app = Starlette(routes=[Route("/rpc", rpc, methods=["POST"])])
    return seller, rpc_app


def _serve_hostile(certfile: str, keyfile: str) -> None:
    import asyncio
    import socket

    import uvicorn

    seller, rpc_app = _hostile_app()

    def sock() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s

    s1, s2 = sock(), sock()
    tls = uvicorn.Server(uvicorn.Config(seller, log_level="warning", access_log=False,
                                        ssl_certfile=certfile, ssl_keyfile=keyfile,
                                        timeout_keep_alive=30, lifespan="off"))
    plain = uvicorn.Server(uvicorn.Config(rpc_app, log_level="warning", access_log=False,
                                          lifespan="off"))

    async def main() -> None:
        tasks = [asyncio.create_task(tls.serve(sockets=[s1])),
                 asyncio.create_task(plain.serve(sockets=[s2]))]
        for _ in range(1000):
            if tls.started and plain.started:
                break
            await asyncio.sleep(0.01)
        print(json.dumps({"ready": True, "port": s1.getsockname()[1],
                          "rpc_port": s2.getsockname()[1]}), flush=True)
        await asyncio.gather(*tasks)

    asyncio.run(main())


@dataclass
class HostileSeller:
    proc: Proc
    port: int
    rpc_port: int
    ca: Path

    def __post_init__(self) -> None:
        self._control = httpx.Client(base_url=f"https://127.0.0.1:{self.port}",
                                     verify=str(self.ca), trust_env=False, timeout=10)

    def paid(self, path: str | None = None) -> list[dict[str, Any]]:
        params = {"path": path} if path is not None else {}
        return list(self._control.get("/_hostile/paid", params=params).json()["paid"])

    def stop(self) -> None:
        self._control.close()
        self.proc.stop()


def start_hostile(certs: CertFiles) -> HostileSeller:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    proc = Proc([sys.executable, "-m", "tests.e2e.x402_fixtures", "--certfile",
                 str(certs.server_cert), "--keyfile", str(certs.server_key)], env=env)
    try:
        line = proc.wait_for(lambda s: s.startswith("{") and '"ready"' in s, timeout=30)
    except BaseException:
        proc.stop()
        raise
    info = json.loads(line)
    return HostileSeller(proc, int(info["port"]), int(info["rpc_port"]), certs.ca_pem)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    args = parser.parse_args()
    for name in PROXY_VARS:
        os.environ.pop(name, None)
    _serve_hostile(args.certfile, args.keyfile)
