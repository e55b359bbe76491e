"""x402 payments end to end: a real mitmdump with addons/gateway.py, the official openai SDK, the
paid test bed (LiteSVM bank + official facilitator + official-SDK seller) and a hostile seller.
Nothing is mocked: every payment is a real signed Solana transaction; the bank's balances move.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import io as mitmio
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction

from tests.conftest import GatewayFactory
from tests.e2e import x402_fixtures
from tests.e2e.x402_fixtures import (
    ADMIN_TOKEN,
    HOSTILE_BLOCKHASH,
    HOSTILE_MINTS,
    PAID_HOST,
    HostileSeller,
    PaidBed,
    control_payments,
    ledger_rows,
    paying_gateway,
    start_hostile,
    x402_yaml,
)
from tests.harness.certs import CertFiles
from tests.harness.gateway import Gateway

paid_bed = x402_fixtures.paid_bed  # the module's paid test bed, a fixture used by name

REFUSED = "x-llmitm-payment-refused"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def sdk(base: str = f"https://{PAID_HOST}/v1", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=base, max_retries=0, **kw)


def moved(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int]:
    return before["payer"] - after["payer"], after["pay_to"] - before["pay_to"]


# --- the official-SDK seller through the gateway -----------------------------------------------

def test_openai_sdk_pays_v2_v1_and_the_cheapest(paid_bed: PaidBed, gateway_factory: GatewayFactory,
                                               client_env, tmp_path: Path) -> None:
    ledger, flows = tmp_path / "ledger.sqlite3", tmp_path / "flows.mitm"
    gw = paying_gateway(gateway_factory, paid_bed, ledger, extra_args=["-w", str(flows)])
    client_env(gw)
    price = paid_bed.price
    for prefix, text in (("", "paid answer"), ("/x402v1", "paid answer (v1)"),
                         ("/cheap", "paid answer")):
        before = paid_bed.state()
        reply = sdk(f"https://{PAID_HOST}{prefix}/v1").chat.completions.create(**CHAT)
        assert reply.choices[0].message.content == text
        after = paid_bed.state()
        # exactly the price, also where the dearer (2x) requirement is advertised first
        assert moved(before, after) == (price, price), prefix
        assert after["settlements"] == before["settlements"] + 1
    rows = ledger_rows(ledger)
    assert [r["state"] for r in rows] == ["settled"] * 3
    assert [r["amount"] for r in rows] == [price] * 3
    assert all(r["tx_signature"] and r["payer"] == paid_bed.info["payer"] for r in rows)

    gw.stop()
    with flows.open("rb") as fh:
        recorded = [f for f in mitmio.FlowReader(fh).stream() if f.type == "http"]
    paid = [f for f in recorded if f.metadata.get("llmitm.payment", {}).get("decision") == "paid"]
    redirects = [f for f in recorded if f.response and f.response.status_code == 307]
    assert len(paid) == 3 and len(redirects) == 3
    for flow in paid:
        meta = flow.metadata["llmitm.payment"]
        assert meta["payment"]["state"] == "settled" and meta["payment"]["tx_signature"]
        assert "llmitm-pay" not in flow.request.path  # the token never went upstream
        header = flow.request.headers.get("payment-signature") or flow.request.headers["x-payment"]
        # the decision is plain data without the payment, and nothing logged it
        assert header not in json.dumps(meta) and header not in (flow.comment or "")
        assert header not in gw.proc.output
        assert "settled" in flow.comment
    for flow in redirects:
        assert flow.metadata["llmitm.payment"]["decision"] == "redirect"
        assert "307" in flow.comment
    secret = bytes(json.loads(paid_bed.keyfile.read_text()))
    assert str(Keypair.from_bytes(secret)) not in gw.proc.output
    assert paid_bed.info["rpc_url"] not in gw.proc.output  # RPC URLs often carry an API key


def test_presign_costs_one_upstream_round_trip(paid_bed: PaidBed, gateway_factory: GatewayFactory,
                                               client_env, tmp_path: Path) -> None:
    gw = paying_gateway(gateway_factory, paid_bed, tmp_path / "ledger.sqlite3", presign=True)
    client_env(gw)
    client = sdk()
    path = "/v1/chat/completions"

    def hits() -> int:
        return int(paid_bed.state()["requests"].get(path, 0))

    start, before = hits(), paid_bed.state()
    client.chat.completions.create(**CHAT)
    assert hits() - start == 2  # the first request learns the requirements: 402, then paid
    for _ in range(5):
        mark = hits()
        assert client.chat.completions.create(**CHAT).choices[0].message.content == "paid answer"
        assert hits() - mark == 1  # presigned: one upstream round trip
    assert moved(before, paid_bed.state()) == (6 * paid_bed.price, 6 * paid_bed.price)
    payments = control_payments(gw).json()["payments"]
    assert [p["state"] for p in payments] == ["settled"] * 6


@pytest.mark.parametrize("presign", [False, True])
def test_streamed_paid_response_stays_incremental(paid_bed: PaidBed, gateway_factory: GatewayFactory,
                                                  client_env, tmp_path: Path, presign: bool) -> None:
    gw = paying_gateway(gateway_factory, paid_bed, tmp_path / "ledger.sqlite3", presign=presign)
    client_env(gw)
    client = sdk(f"https://{PAID_HOST}/stream/v1")
    rounds = 2 if presign else 1  # with presign, the second stream is paid before it leaves
    for _ in range(rounds):
        before = paid_bed.state()
        arrivals, text = [], ""
        stream = client.chat.completions.create(**CHAT, stream=True,
                                                extra_headers={"X-Bank-Interval": "0.25"})
        for chunk in stream:
            arrivals.append(time.time())
            text += "".join(c.delta.content or "" for c in chunk.choices)
        after = paid_bed.state()
        sent = after["streams"][-1]
        assert text == "Paid streamed answer."
        # frames are 0.25 s apart upstream; a gateway that held the stream back would deliver
        # the first frame only after the last one was sent
        assert sent["last"] - sent["first"] > 1.0
        assert arrivals[0] < sent["last"] - 0.75, (arrivals, sent)
        assert moved(before, after) == (paid_bed.price, paid_bed.price)
    if presign:
        assert paid_bed.state()["requests"]["/stream/v1/chat/completions"] >= 3
    assert {p["state"] for p in control_payments(gw).json()["payments"]} == {"settled"}


def test_a_402_to_a_presigned_request_gets_one_fresh_attempt(
        paid_bed: PaidBed, gateway_factory: GatewayFactory, client_env, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    gw = paying_gateway(gateway_factory, paid_bed, ledger, presign=True)
    client_env(gw)
    client = sdk(f"https://{PAID_HOST}/stream/v1")

    def paid_stream() -> str:
        return "".join(c.delta.content or "" for chunk in client.chat.completions.create(
            **CHAT, stream=True, extra_headers={"X-Bank-Interval": "0"}) for c in chunk.choices)

    assert paid_stream() == "Paid streamed answer."  # 402, paid; requirements now cached
    before = paid_bed.state()
    # the cached requirements carry the seller's blockhash; the bank moves on, so the next
    # presigned payment is refused by the seller: one fresh payment from the new 402, no more
    httpx.post(f"https://127.0.0.1:{paid_bed.port}/_bank/expire_blockhash",
               verify=str(paid_bed.ca), trust_env=False, timeout=10).raise_for_status()
    assert paid_stream() == "Paid streamed answer."
    after = paid_bed.state()
    assert moved(before, after) == (paid_bed.price, paid_bed.price)
    assert after["requests"]["/stream/v1/chat/completions"] - \
        before["requests"]["/stream/v1/chat/completions"] == 2  # presigned (402), then paid
    rows = ledger_rows(ledger)
    assert [r["state"] for r in rows] == ["settled", "failed", "settled"]
    assert "402 again" in rows[1]["reason"]


def test_refusals_limits_and_the_control_api(paid_bed: PaidBed, gateway_factory: GatewayFactory,
                                             client_env, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    price = Decimal(paid_bed.price).scaleb(-6)
    sessions = "sessions:\n  alice:\n    token: tok-alice\n  bob:\n    token: tok-bob\n"
    gw = paying_gateway(gateway_factory, paid_bed, ledger, per_session=str(price),
                        total=str(2 * price), extra=sessions)
    env = client_env(gw)
    proxy = env["HTTPS_PROXY"]

    def as_session(name: str) -> openai.OpenAI:
        # DefaultHttpxClient keeps the SDK's follow_redirects=True (a bare httpx.Client would not)
        http_client = openai.DefaultHttpxClient(
            proxy=proxy.replace("http://", f"http://{name}:tok-{name}@"),
            verify=env["SSL_CERT_FILE"], trust_env=False, timeout=30)
        return sdk(http_client=http_client)

    before = paid_bed.state()
    assert as_session("alice").chat.completions.create(**CHAT).choices[0].message.content
    with pytest.raises(openai.APIStatusError) as again:
        as_session("alice").chat.completions.create(**CHAT)
    assert again.value.status_code == 402
    assert "per_session_per_day" in again.value.response.headers[REFUSED]
    assert again.value.response.headers["payment-required"]  # the upstream's 402, unchanged
    assert again.value.response.content == b"{}"
    assert as_session("bob").chat.completions.create(**CHAT).choices[0].message.content
    with pytest.raises(openai.APIStatusError) as third:
        sdk(default_headers={"X-Llmitm-Session": "carol"}).chat.completions.create(**CHAT)
    assert "total_per_day" in third.value.response.headers[REFUSED]
    assert moved(before, paid_bed.state()) == (2 * paid_bed.price, 2 * paid_bed.price)

    # GET /payments: the admin sees everything (or one session), a session only its own
    listing = control_payments(gw)
    assert listing.status_code == 200 and listing.json()["enabled"] is True
    payments = listing.json()["payments"]
    assert sorted(p["session"] for p in payments) == ["alice", "bob"]
    assert all(p["state"] == "settled" and p["counted"] and p["tx_signature"] for p in payments)
    assert [p["session"] for p in control_payments(gw, session="bob").json()["payments"]] == ["bob"]
    with httpx.Client(proxy=proxy.replace("http://", "http://alice:tok-alice@"),
                      trust_env=False, timeout=10) as alice:
        own = alice.get("http://llmitm.internal/payments", params={"session": "bob"}).json()
    assert [p["session"] for p in own["payments"]] == ["alice"]
    assert control_payments(gw, token="wrong").status_code == 401
    text = listing.text
    keyfile_secret = str(Keypair.from_bytes(bytes(json.loads(paid_bed.keyfile.read_text()))))
    assert keyfile_secret not in text and str(paid_bed.keyfile) not in text
    assert "transaction" not in text  # no payment header content, only its on-chain signature


def test_pay_hosts_per_request_cap_and_config_reloads(paid_bed: PaidBed,
                                                      gateway_factory: GatewayFactory,
                                                      client_env, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    gw = paying_gateway(gateway_factory, paid_bed, ledger, pay_hosts=("other.example.test",))
    client_env(gw)
    assert gw.proc is not None
    before = paid_bed.state()
    with pytest.raises(openai.APIStatusError) as host:
        sdk().chat.completions.create(**CHAT)
    assert "pay_hosts" in host.value.response.headers[REFUSED]
    # a reload rebuilds the payer with the new section
    gw.config_path.write_text(x402_yaml(paid_bed, ledger, per_request="0.005"))
    gw.proc.wait_for(lambda s: "configuration reloaded" in s, timeout=10)
    with pytest.raises(openai.APIStatusError) as cap:
        sdk().chat.completions.create(**CHAT)
    assert "per_request" in cap.value.response.headers[REFUSED]
    assert moved(before, paid_bed.state()) == (0, 0)
    gw.config_path.write_text(x402_yaml(paid_bed, ledger, per_request="0.01"))
    gw.proc.wait_for(lambda s: "configuration reloaded" in s, timeout=10)
    assert sdk().chat.completions.create(**CHAT).choices[0].message.content == "paid answer"
    assert moved(before, paid_bed.state()) == (paid_bed.price, paid_bed.price)
    # a wallet that stops loading turns payments off instead of keeping the old policy
    broken = x402_yaml(paid_bed, ledger).replace(str(paid_bed.keyfile), str(tmp_path / "gone.json"))
    gw.config_path.write_text(broken)
    gw.proc.wait_for(lambda s: "configuration reloaded" in s, timeout=10)
    with pytest.raises(openai.APIStatusError) as off:
        sdk().chat.completions.create(**CHAT)
    assert "x402 is not available" in off.value.response.headers[REFUSED]
    assert moved(before, paid_bed.state()) == (paid_bed.price, paid_bed.price)


def test_an_unusable_wallet_stops_the_gateway_at_start(paid_bed: PaidBed,
                                                       gateway_factory: GatewayFactory,
                                                       tmp_path: Path) -> None:
    secret = "3" * 87  # base58, the length of a secret, not a valid keypair
    text = x402_yaml(paid_bed, tmp_path / "l.sqlite3").replace(str(paid_bed.keyfile), f"'{secret}'")
    gw = gateway_factory(config_text=text, expect_failure=True, extra_args=paid_bed.resolve_args())
    assert gw.proc is not None and gw.proc.popen.returncode != 0
    assert "x402: x402.wallet is not a valid base58 keypair secret" in gw.proc.output
    assert secret not in gw.proc.output


def test_fifty_concurrent_requests_with_budget_for_ten(paid_bed: PaidBed,
                                                       gateway_factory: GatewayFactory,
                                                       client_env, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    ten = Decimal(10 * paid_bed.price).scaleb(-6)
    gw = paying_gateway(gateway_factory, paid_bed, ledger, total=str(ten), per_session="1")
    client_env(gw)
    before = paid_bed.state()

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(api_key="sk", base_url=f"https://{PAID_HOST}/v1",
                                    max_retries=0, timeout=60)
        async with client:
            return await asyncio.gather(
                *(client.chat.completions.create(**CHAT) for _ in range(50)),
                return_exceptions=True)

    results = asyncio.run(run())
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(ok) == 10 and len(refused) == 40, [type(r) for r in results]
    assert all(r.status_code == 402 and "total_per_day" in r.response.headers[REFUSED]
               for r in refused)
    after = paid_bed.state()
    assert moved(before, after) == (10 * paid_bed.price, 10 * paid_bed.price)
    assert after["settlements"] - before["settlements"] == 10
    rows = ledger_rows(ledger)
    assert [r["state"] for r in rows] == ["settled"] * 10
    assert sum(r["units_nano"] for r in rows) == int(ten * 10**9)


def test_restart_and_kill9_mid_payment_keep_the_ledger_and_limits(
        paid_bed: PaidBed, gateway_factory: GatewayFactory, client_env, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    two = Decimal(2 * paid_bed.price).scaleb(-6)
    start = paid_bed.state()

    def gateway() -> Gateway:
        gw = paying_gateway(gateway_factory, paid_bed, ledger, total=str(two), per_session="1")
        client_env(gw)
        return gw

    def states() -> list[str]:
        return [r["state"] for r in ledger_rows(ledger)]

    # 1: the gateway is killed with SIGKILL while a paid request is upstream (the seller is
    # between verifying and settling it)
    gw1 = gateway()
    outcome: list[Any] = []

    def slow_paid_request() -> None:
        try:
            outcome.append(sdk().chat.completions.create(
                **CHAT, extra_headers={"X-Bank-Delay": "1.0"}))
        except Exception as err:
            outcome.append(err)

    worker = threading.Thread(target=slow_paid_request, daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    while (not ledger.exists() or states() != ["sent"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert states() == ["sent"]  # written before the paid request left
    assert gw1.proc is not None
    gw1.proc.kill9()
    worker.join(20)
    assert isinstance(outcome[0], openai.APIConnectionError)
    # Whether the seller still settles a payment whose client vanished is up to the seller (the
    # SDK middleware does not); the ledger must count it either way ('unknown' is counted).
    time.sleep(2.0)
    killed_settled = paid_bed.state()["settlements"] - start["settlements"]
    assert killed_settled in (0, 1)

    gw2 = gateway()  # same ledger: the dead process's row becomes 'unknown', still counted
    assert "left in flight by an earlier run are now 'unknown'" in gw2.proc.output
    assert states() == ["unknown"]

    # 2: a payment signed for a 402 whose client never re-sends, then a graceful stop: released
    with httpx.Client(timeout=30) as raw:
        first = raw.post(f"https://{PAID_HOST}/v1/chat/completions", json=CHAT)
    assert first.status_code == 307 and "llmitm-pay=" in first.headers["location"]
    assert states() == ["unknown", "reserved"]
    gw2.stop()
    assert states() == ["unknown", "failed"]
    gw3 = gateway()
    with httpx.Client(timeout=30) as raw:  # the old token died with the old process
        stale = raw.post(f"https://{PAID_HOST}{first.headers['location']}", json=CHAT)
    assert stale.status_code == 402 and "token" in stale.headers[REFUSED]

    # 3: limits after a kill -9 and a restart: exactly one more payment fits
    assert sdk().chat.completions.create(**CHAT).choices[0].message.content == "paid answer"
    with pytest.raises(openai.APIStatusError) as over:
        sdk().chat.completions.create(**CHAT)
    assert "total_per_day" in over.value.response.headers[REFUSED]
    end = paid_bed.state()
    expected_moved = (1 + killed_settled) * paid_bed.price  # never more than the ledger counts
    assert moved(start, end) == (expected_moved, expected_moved)
    assert end["settlements"] - start["settlements"] == 1 + killed_settled
    rows = ledger_rows(ledger)
    assert [r["state"] for r in rows] == ["unknown", "failed", "settled"]
    assert sum(r["amount"] for r in rows if r["state"] != "failed") == 2 * paid_bed.price
    listed = control_payments(gw3).json()["payments"]
    assert [(p["state"], p["counted"]) for p in listed] == [
        ("settled", True), ("failed", False), ("unknown", True)]


# --- forged, replayed and mismatching redirect tokens ------------------------------------------

def test_redirect_tokens_cannot_be_forged_replayed_or_moved(paid_bed: PaidBed,
                                                            gateway_factory: GatewayFactory,
                                                            client_env, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    gw = paying_gateway(gateway_factory, paid_bed, ledger)
    client_env(gw)
    url = f"https://{PAID_HOST}/v1/chat/completions"
    before = paid_bed.state()
    with httpx.Client(timeout=30) as raw:
        forged = raw.post(f"{url}?llmitm-pay=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", json=CHAT)
        assert forged.status_code == 402 and "token" in forged.headers[REFUSED]

        first = raw.post(url, json=CHAT)
        location = first.headers["location"]
        other_body = raw.post(f"https://{PAID_HOST}{location}", json={**CHAT, "model": "x"})
        assert other_body.status_code == 402 and "does not match" in other_body.headers[REFUSED]
        # a token is used up by its first use, even a mismatching one
        replay = raw.post(f"https://{PAID_HOST}{location}", json=CHAT)
        assert replay.status_code == 402 and "token" in replay.headers[REFUSED]

        second = raw.post(url, json=CHAT)
        other_session = raw.post(f"https://{PAID_HOST}{second.headers['location']}", json=CHAT,
                                 headers={"X-Llmitm-Session": "mallory"})
        assert other_session.status_code == 402

        third = raw.post(url, json=CHAT)
        good = raw.post(f"https://{PAID_HOST}{third.headers['location']}", json=CHAT)
        assert good.status_code == 200
        again = raw.post(f"https://{PAID_HOST}{third.headers['location']}", json=CHAT)
        assert again.status_code == 402 and REFUSED in again.headers
    assert moved(before, paid_bed.state()) == (paid_bed.price, paid_bed.price)
    states = Counter(r["state"] for r in ledger_rows(ledger))
    assert states == {"failed": 2, "settled": 1}  # the two misused tokens were released


# --- hostile 402s, property-based, through one long-lived gateway ------------------------------

DEVNET = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
MAINNET = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
USDC_DEVNET = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"  # 6 decimals, known without RPC
USDC_MAINNET = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"  # valid, not allowed
NINE = next(iter(HOSTILE_MINTS))  # 9 decimals, from the hostile RPC
NO_DECIMALS = "J2xccRtuG43drESLYznHhLhQkLTdfepcKYbiQ9BsJVaf"  # allowed, but no such mint
DECIMALS = {USDC_DEVNET: 6, NINE: 9}
PAY_TO = ("5Z6Ay5NEcbg3xhopc522sBCRXQujkTiuDRnHGfQdcnSf", "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin")
STRANGER = str(Keypair.from_seed(bytes([42]) * 32).pubkey())
FEE_PAYER = str(Keypair.from_seed(bytes([43]) * 32).pubkey())
HOSTILE_WALLET = Keypair.from_seed(bytes([44]) * 32)
PER_REQUEST, PER_SESSION, TOTAL = Decimal("0.05"), Decimal("0.3"), Decimal("2")
TOKEN_PROGRAM = Pubkey.from_string("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA")
ATA_PROGRAM = Pubkey.from_string("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL")


_INTS: dict[tuple[int, int], st.SearchStrategy[int]] = {}


def _int(draw: Any, lo: int, hi: int) -> int:
    # strategies are built once per range (building them per draw dominated the run time)
    strategy = _INTS.get((lo, hi))
    if strategy is None:
        strategy = _INTS[(lo, hi)] = st.integers(lo, hi)
    return int(draw(strategy))


def _choose(draw: Any, seq: list[Any]) -> Any:
    return seq[_int(draw, 0, len(seq) - 1)]


def _pick(draw: Any, good: list[Any], bad: list[Any], p_good: int = 88) -> tuple[Any, bool]:
    if not bad or _int(draw, 0, 99) < p_good:
        return _choose(draw, good), True
    return _choose(draw, bad), False


MISSING = object()


@st.composite
def hostile_entry(draw: Any, version: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One advertised requirement and, when every field is acceptable, what paying it costs."""
    ok = True

    def field(good: list[Any], bad: list[Any], p_good: int = 88) -> Any:
        nonlocal ok
        value, good_pick = _pick(draw, good, bad, p_good)
        ok = ok and good_pick
        return value

    asset = field([USDC_DEVNET, NINE], [USDC_MAINNET, NO_DECIMALS, "not-a-mint", 7, MISSING])
    dec = DECIMALS.get(asset, 6) if isinstance(asset, str) else 6
    cap = int(PER_REQUEST.scaleb(dec))
    amount_int = (_choose(draw, [1, cap - 1, cap, cap + 1, 2 * cap]) if _int(draw, 0, 1)
                  else _int(draw, 1, 2 * cap))
    ok = ok and amount_int <= cap
    amount = field([str(amount_int)], ["", "0", "-1", "1.5", "1e3", f" {amount_int}",
                                       f"0{amount_int}", amount_int, "9" * 25, MISSING], 90)
    entry: dict[str, Any] = {
        "scheme": field(["exact"], ["upto", "Exact", "", 5]),
        "network": field([DEVNET, "solana-devnet"] if version == 2 else ["solana-devnet"],
                         ["solana", MAINNET, "solana:evil", "base-sepolia", MISSING]
                         + ([DEVNET] if version == 1 else [])),
        "asset": asset,
        "payTo": field(list(PAY_TO), [STRANGER, "x", MISSING]),
        "maxTimeoutSeconds": field([60, 1, 86_400], [0, 86_401, "60", -5, 60.5]),
    }
    entry["amount" if version == 2 else "maxAmountRequired"] = amount
    if version == 1:
        entry.update(resource=field(["https://paid.example.test/x"], [MISSING, 3]),
                     description="hostile", mimeType="application/json")
    extra: dict[str, Any] = {
        "feePayer": field([FEE_PAYER], [MISSING, "bad", str(HOSTILE_WALLET.pubkey())]),
        "memo": field([MISSING, "order-17"], ["m" * 300, 5], 92),
        "recentBlockhash": _choose(draw, [MISSING, "junk", HOSTILE_BLOCKHASH]),
    }
    entry["extra"] = {k: v for k, v in extra.items() if v is not MISSING}
    entry = {k: v for k, v in entry.items() if v is not MISSING}
    if not ok:
        return entry, None
    return entry, {"amount": amount_int, "asset": asset, "pay_to": entry["payTo"],
                   "decimals": dec, "fee_payer": FEE_PAYER, "raw": entry}


def _b64(doc: Any) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


@st.composite
def hostile_case(draw: Any) -> dict[str, Any]:
    version = _choose(draw, [1, 2, 2])
    count = _choose(draw, [1, 2, 3, 4, 1, 2, 3, 4, 0, 33])
    drawn = [draw(hostile_entry(version)) for _ in range(min(count, 4))]
    if count == 33:  # too many: the whole document is refused
        drawn = [drawn[0]] * 33 if drawn else [draw(hostile_entry(version))] * 33
    accepts = [e for e, _ in drawn]
    good = [(i, c) for i, (_, c) in enumerate(drawn) if c is not None]
    doc_ok = 1 <= len(accepts) <= 32
    corruption = _choose(draw, ["none"] * 8 + ["not_base64", "array", "wrong_version",
                                               "accepts_obj", "resource_junk", "v2_in_body",
                                               "body_not_json"])
    doc: dict[str, Any] = {"x402Version": version, "error": "pay up", "accepts": accepts}
    if version == 2:
        doc["resource"] = {"url": "https://paid.example.test/case"}
    headers: dict[str, str] = {"content-type": "application/json"}
    body: bytes = b"{}"
    breaks = ({"not_base64", "array", "wrong_version", "accepts_obj", "resource_junk", "v2_in_body"}
              if version == 2 else
              {"body_not_json", "array", "wrong_version", "accepts_obj", "not_base64", "v2_in_body"})
    if corruption in breaks:  # the others do not touch what the version reads
        doc_ok = False
    if corruption == "accepts_obj":
        doc["accepts"] = {"0": accepts}
    if corruption == "resource_junk":
        doc["resource"] = 5
    if corruption == "wrong_version":
        doc["x402Version"] = 3 - version
    if version == 2:
        if corruption == "not_base64":
            headers["PAYMENT-REQUIRED"] = "%%not base64%%"
        elif corruption == "array":
            headers["PAYMENT-REQUIRED"] = _b64([doc])
        elif corruption == "v2_in_body":
            body = json.dumps(doc).encode()
        else:
            headers["PAYMENT-REQUIRED"] = _b64(doc)
            if corruption == "body_not_json":
                body = b"<html>402</html>"  # ignored: the header decides
    else:
        if corruption == "body_not_json":
            body = b"<html>402</html>"
        elif corruption == "array":
            body = json.dumps([doc]).encode()
        elif corruption in ("not_base64", "v2_in_body"):
            body = b""
        else:
            body = json.dumps(doc).encode()
    pay_host = _int(draw, 0, 99) < 90
    expected = None
    if doc_ok and pay_host and good:
        # the cheapest acceptable requirement in token units; ties: the first advertised
        expected = min(good, key=lambda ic: (Decimal(ic[1]["amount"]).scaleb(-ic[1]["decimals"]),
                                              ic[0]))[1]
    return {"version": version, "headers": headers, "body": body, "pay_host": pay_host,
            "expected": expected, "session": f"s{_int(draw, 0, 5)}",
            "outcome": _choose(draw, ["settle", "none", "fail", "again", "fail", "again",
                                      "settle"])}


def check_transaction(value: str, version: int, expected: dict[str, Any]) -> None:
    """Decode the payment with solders (independently of llmitm) and check what it pays."""
    doc = json.loads(base64.b64decode(value))
    assert doc["x402Version"] == version
    if version == 2:
        assert doc["accepted"] == expected["raw"]  # the requirement signed, verbatim
    tx = VersionedTransaction.from_bytes(base64.b64decode(doc["payload"]["transaction"]))
    msg = tx.message
    keys = list(msg.account_keys)
    assert str(keys[0]) == expected["fee_payer"]
    owner = HOSTILE_WALLET.pubkey()
    assert tx.signatures[1].verify(owner, b"\x80" + bytes(msg))
    transfers = [ix for ix in msg.instructions if keys[ix.program_id_index] == TOKEN_PROGRAM]
    assert len(transfers) == 1
    ix = transfers[0]
    data = bytes(ix.data)
    assert data[0] == 12  # TransferChecked
    assert int.from_bytes(data[1:9], "little") == expected["amount"]
    assert data[9] == expected["decimals"]
    mint = Pubkey.from_string(expected["asset"])
    dest = Pubkey.find_program_address(
        [bytes(Pubkey.from_string(expected["pay_to"])), bytes(TOKEN_PROGRAM), bytes(mint)],
        ATA_PROGRAM)[0]
    accounts = [keys[i] for i in bytes(ix.accounts)]
    assert accounts[1] == mint and accounts[2] == dest and accounts[3] == owner


class HostileBed:
    def __init__(self, seller: HostileSeller, gw: Gateway, ledger: Path) -> None:
        self.seller, self.gw, self.ledger = seller, gw, ledger
        bundle = gw.bundle()
        self.client = httpx.Client(proxy=gw.url, verify=str(bundle), trust_env=False,
                                   follow_redirects=True, timeout=30)
        self.ids = itertools.count()
        self.spent: Counter[str] = Counter()  # nano token units counted, per session
        self.expect_paid: dict[str, dict[str, Any]] = {}  # case path -> expected payment
        self.cases = 0


@pytest.fixture(scope="module")
def hostile(test_certs: CertFiles, mitm_confdir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileBed]:
    from llmitm.x402.wallet import write_keypair_file

    work = tmp_path_factory.mktemp("hostile")
    seller = start_hostile(test_certs)
    write_keypair_file(work / "wallet.json", HOSTILE_WALLET)
    ledger = work / "ledger.sqlite3"
    config = (
        f"control:\n  admin_token: {ADMIN_TOKEN}\n"
        "x402:\n"
        f"  wallet: {work / 'wallet.json'}\n"
        f"  rpc_url: http://127.0.0.1:{seller.rpc_port}/rpc\n"
        f"  pay_hosts: [{PAID_HOST}]\n"
        "  networks: [solana-devnet]\n"
        f"  assets: [{USDC_DEVNET}, {NINE}, {NO_DECIMALS}]\n"
        f"  pay_to: [{PAY_TO[0]}, {PAY_TO[1]}]\n"
        f"  limits: {{per_request: '{PER_REQUEST}', per_session_per_day: '{PER_SESSION}', "
        f"total_per_day: '{TOTAL}'}}\n"
        f"  ledger: {ledger}\n"
    )
    gw = Gateway(confdir=mitm_confdir, workdir=work, upstream_ca=test_certs.ca_pem,
                 resolve={f"{PAID_HOST}:443": seller.port,
                          "telemetry.example.test:443": seller.port},
                 config_text=config)
    gw.start()
    bed = HostileBed(seller, gw, ledger)
    try:
        yield bed
    finally:
        bed.client.close()
        gw.stop()
        seller.stop()


def run_case(bed: HostileBed, case: dict[str, Any]) -> None:
    n = next(bed.ids)
    host = PAID_HOST if case["pay_host"] else "telemetry.example.test"
    spec = {"status": 402, "headers": case["headers"],
            "body_b64": base64.b64encode(case["body"]).decode()}
    resp = bed.client.post(f"https://{host}/case/{n}", json={"case": spec, "outcome": case["outcome"]},
                           headers={"X-Llmitm-Session": case["session"]})
    expected = case["expected"]
    if expected is not None:
        units = expected["amount"] * 10 ** (9 - expected["decimals"])
        session = case["session"]
        fits = (bed.spent[session] + units <= int(PER_SESSION * 10**9)
                and sum(bed.spent.values()) + units <= int(TOTAL * 10**9))
        if not fits:
            expected = None
    bed.cases += 1
    seen = int(resp.headers["x-hostile-paid"])  # paid requests the seller got for this case
    if expected is None:
        assert seen == 0, case
        assert resp.status_code == 402 and REFUSED in resp.headers, (resp.status_code, case)
        assert resp.content == case["body"]
        assert resp.history == []
        return
    assert seen == 1, case  # exactly one payment, never a loop
    assert resp.headers["x-hostile-query"] == "" and resp.headers["x-hostile-both"] == "False"
    assert resp.headers["x-hostile-header"] == (
        "PAYMENT-SIGNATURE" if case["version"] == 2 else "X-PAYMENT")
    value = resp.headers["x-hostile-value"]
    check_transaction(value, case["version"], expected)
    assert [r.status_code for r in resp.history] == [307]
    if case["outcome"] in ("settle", "none"):
        assert resp.status_code == 200
        bed.spent[case["session"]] += units
    else:
        assert resp.status_code == 402 and "already paid" in resp.headers[REFUSED]
    bed.expect_paid[f"/case/{n}"] = {**expected, "outcome": case["outcome"],
                                     "session": case["session"], "value": value}


@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=hostile_case())
def test_hostile_402s_property(hostile: HostileBed, case: dict[str, Any]) -> None:
    run_case(hostile, case)


def test_hostile_ledger_is_exact(hostile: HostileBed) -> None:
    """After the property run: the ledger holds exactly the payments the seller received."""
    assert hostile.cases >= 1000
    received = Counter(p["path"] for p in hostile.seller.paid())
    assert received == Counter(set(hostile.expect_paid))  # each once, nothing else
    rows = {r["resource"].split(PAID_HOST, 1)[1]: r for r in ledger_rows(hostile.ledger)}
    assert set(rows) == set(hostile.expect_paid)
    state_of = {"settle": "settled", "none": "unknown", "fail": "failed", "again": "failed"}
    for path, want in hostile.expect_paid.items():
        row = rows[path]
        assert (row["amount"], row["asset"], row["pay_to"], row["session"]) == (
            want["amount"], want["asset"], want["pay_to"], want["session"])
        assert row["state"] == state_of[want["outcome"]], (row, want)
    counted = Counter()
    for row in rows.values():
        if row["state"] != "failed":
            counted[row["session"]] += row["units_nano"]
    assert counted == +hostile.spent
    assert all(v <= PER_SESSION * 10**9 for v in counted.values())
    assert sum(counted.values()) <= TOTAL * 10**9
    output = hostile.gw.proc.output
    assert not any(want["value"] in output for want in hostile.expect_paid.values())
    kinds = Counter(w["outcome"] for w in hostile.expect_paid.values())
    assert len(hostile.expect_paid) >= 100 and len(kinds) == 4, kinds  # the run paid plenty
