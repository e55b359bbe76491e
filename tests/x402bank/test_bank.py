"""The test bed itself, as a subprocess, paid by the official x402 httpx client."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from solders.keypair import Keypair

from tests.harness.procs import Proc

# the official SVM client builds solana-py's sync Client, which warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:Client is deprecated:FutureWarning")

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def start_bank(*args: str) -> tuple[Proc, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    proc = Proc([sys.executable, "-m", "tests.x402bank.server", "--port", "0", *args], env=env)
    try:
        line = proc.wait_for(lambda s: s.startswith("{") and '"ready"' in s, timeout=30)
    except BaseException:
        proc.stop()
        raise
    return proc, json.loads(line)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stop_and_check(proc: Proc, info: dict[str, Any]) -> None:
    fac_port = int(info["facilitator_url"].rsplit(":", 1)[1])
    proc.stop()
    assert proc.popen.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(proc.popen.pid, 0)
    assert not listening(info["port"]) and not listening(fac_port)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    keyfile = tmp_path_factory.mktemp("bank") / "payer.json"
    proc, info = start_bank("--payer-keypair", str(keyfile), "--interval", "0.02")
    info["keyfile"] = keyfile
    info["base"] = f"http://127.0.0.1:{info['port']}"
    try:
        yield info
    finally:
        stop_and_check(proc, info)


def official_client(info: dict[str, Any]) -> httpx.AsyncClient:
    from x402 import x402Client
    from x402.http.clients.httpx import x402_httpx_transport
    from x402.mechanisms.svm.exact.register import register_exact_svm_client
    from x402.mechanisms.svm.signers import KeypairSigner

    keypair = Keypair.from_bytes(bytes(json.loads(Path(info["keyfile"]).read_text())))
    client = x402Client()
    register_exact_svm_client(client, KeypairSigner(keypair), rpc_url=info["rpc_url"])
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": net, "asset": info["mint"], "max_amount_per_payment": "1000000"}
                for net in (info["network"], "solana-devnet")
            ]
        }
    )
    return httpx.AsyncClient(
        transport=x402_httpx_transport(client), trust_env=False, timeout=30
    )


def balances(info: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.get(f"{info['base']}/_bank/balances", trust_env=False, timeout=10)
    resp.raise_for_status()
    return resp.json()


def test_ready_line_and_payer_keypair_file(bank: dict[str, Any]) -> None:
    for key in ("port", "mint", "pay_to", "fee_payer", "network", "rpc_url", "payer", "price"):
        assert bank[key]
    keyfile: Path = bank["keyfile"]
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    kp = Keypair.from_bytes(bytes(json.loads(keyfile.read_text())))
    assert str(kp.pubkey()) == bank["payer"]
    assert balances(bank)["payer"] == 1_000 * 10**6


async def test_unpaid_request_gets_a_v2_402(bank: dict[str, Any]) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        resp = await http.post(f"{bank['base']}/v1/chat/completions", json={"model": "m"})
        free = await http.get(f"{bank['base']}/v1/models")
    assert resp.status_code == 402 and "payment-required" in resp.headers
    assert free.status_code == 200


@pytest.mark.parametrize(
    ("path", "charged"),
    [
        ("/v1/chat/completions", 1),
        ("/x402v1/v1/chat/completions", 1),
        # the official client pays the FIRST acceptable entry, here the dearer one
        ("/cheap/v1/chat/completions", 2),
    ],
)
async def test_official_client_pays_and_balances_move_by_the_price(
    bank: dict[str, Any], path: str, charged: int
) -> None:
    before = balances(bank)
    async with official_client(bank) as http:
        resp = await http.post(f"{bank['base']}{path}", json={"model": "m", "messages": []})
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "chat.completion"
    receipt = resp.headers.get("payment-response") or resp.headers.get("x-payment-response")
    assert receipt
    after = balances(bank)
    price = bank["price"] * charged
    assert before["payer"] - after["payer"] == price
    assert after["pay_to"] - before["pay_to"] == price
    assert after["settlements"] == before["settlements"] + 1


async def test_official_client_pays_the_streaming_endpoint(bank: dict[str, Any]) -> None:
    before = balances(bank)
    async with official_client(bank) as http:
        resp = await http.post(
            f"{bank['base']}/stream/v1/chat/completions", json={"model": "m", "stream": True}
        )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    frames = [ln for ln in resp.text.split("\n\n") if ln.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    content = "".join(
        json.loads(f[6:])["choices"][0]["delta"].get("content", "") for f in frames[:-1]
    )
    assert content == "Paid streamed answer."
    assert "payment-response" in resp.headers
    assert before["payer"] - balances(bank)["payer"] == bank["price"]


async def test_frames_are_spaced_in_time(bank: dict[str, Any]) -> None:
    """The SSE endpoint really streams (the client sees frames before the end)."""
    async with official_client(bank) as http:
        async with http.stream(
            "POST", f"{bank['base']}/stream/v1/chat/completions", json={"stream": True}
        ) as resp:
            assert resp.status_code == 200
            stamps = []
            async for chunk in resp.aiter_raw():
                if chunk.strip():
                    stamps.append(time.monotonic())
    assert len(stamps) >= 3
    assert stamps[-1] - stamps[0] >= 0.05


def test_https_mode_reuses_the_keypair_and_stops_cleanly(
    bank: dict[str, Any], tmp_path: Path
) -> None:
    from tests.harness.certs import make_test_certs

    certs = make_test_certs(tmp_path / "certs")
    proc, info = start_bank(
        "--payer-keypair", str(bank["keyfile"]),
        "--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key),
    )
    try:
        assert info["scheme"] == "https" and info["payer"] == bank["payer"]
        resp = httpx.post(
            f"https://127.0.0.1:{info['port']}/v1/chat/completions",
            json={}, verify=str(certs.ca_pem), trust_env=False, timeout=10,
        )
        assert resp.status_code == 402
    finally:
        stop_and_check(proc, info)
