"""X402Payer end to end in-process: the bank's JSON-RPC (served to httpx in-process), real
signing, the official facilitator settling on LiteSVM, the SQLite ledger."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.http.utils import decode_payment_signature_header, encode_payment_response_header
from x402.schemas import PaymentRequirements, SettleResponse

from llmitm.x402 import PaymentAttempt, PreparedPayment, Refusal, X402Config, X402Payer
from llmitm.x402.chain import ChainClient
from llmitm.x402.presign import PresignCache
from llmitm.x402.wallet import write_keypair_file
from tests.x402bank.bank import Bank, make_facilitator

URL = "https://paid.example.test/v1/chat/completions"
PRICE = 10_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rpc_transport(bank: Bank, fail: dict[str, int] | None = None) -> httpx.MockTransport:
    """The bank's Solana JSON-RPC, answered in-process (real accounts, real blockhashes)."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if fail and body["method"] in fail:
            return httpx.Response(fail[body["method"]], text="down")
        return httpx.Response(200, json=bank.rpc(body))

    return httpx.MockTransport(handle)


def make_payer(
    bank: Bank,
    tmp_path: Path,
    *,
    limits: tuple[str, str, str] = ("0.05", "0.03", "1"),
    fail: dict[str, int] | None = None,
    clock: Clock | None = None,
    **over: Any,
) -> X402Payer:
    key = tmp_path / "payer.json"
    write_keypair_file(key, bank.payer)
    doc: dict[str, Any] = {
        "wallet": str(key),
        "rpc_url": "http://rpc.invalid/",
        "pay_hosts": ["paid.example.test"],
        "networks": ["solana-devnet"],
        "assets": [str(bank.mint)],
        "limits": dict(zip(("per_request", "per_session_per_day", "total_per_day"), limits,
                           strict=True)),
        "presign": True,
        "ledger": str(tmp_path / "ledger.db"),
        **over,
    }
    config = X402Config.model_validate(doc)
    payer, warnings = X402Payer.from_config(config)
    assert warnings == []
    payer.chain = ChainClient(
        config.rpc_url, client=httpx.AsyncClient(transport=rpc_transport(bank, fail))
    )
    if clock is not None:
        payer.presign = PresignCache(clock=clock)
    return payer


def sdk_402(bank: Bank, *amounts: int, **extra: Any) -> tuple[dict[str, str], bytes]:
    info = bank.info()
    accepts = [
        {
            "scheme": "exact",
            "network": info.network,
            "asset": info.mint,
            "amount": str(a),
            "payTo": info.pay_to,
            "maxTimeoutSeconds": 60,
            "extra": {"feePayer": info.fee_payer, **extra},
        }
        for a in (amounts or (PRICE,))
    ]
    doc = {"x402Version": 2, "error": "pay", "resource": {"url": URL}, "accepts": accepts}
    return {"PAYMENT-REQUIRED": base64.b64encode(json.dumps(doc).encode()).decode()}, b"{}"


async def settle(bank: Bank, prep: PreparedPayment) -> dict[str, str]:
    """What the seller does with the header: the official facilitator verifies and settles."""
    facilitator, _ = make_facilitator(bank)
    payload = decode_payment_signature_header(prep.header_value)
    reqs = PaymentRequirements.model_validate(dict(prep.requirement.raw))
    verified = await facilitator.verify(payload, reqs)
    assert verified.is_valid, verified
    result = await facilitator.settle(payload, reqs)
    return {"PAYMENT-RESPONSE": encode_payment_response_header(result)}


async def pay(payer: X402Payer, bank: Bank, session: str = "s1", **kw: Any) -> Any:
    headers, body = sdk_402(bank, *kw.pop("amounts", ()), **kw)
    return await payer.prepare_payment(
        url=URL, method="POST", session=session, status=402, headers=headers, body=body
    )


async def test_pays_the_cheapest_and_records_the_settlement(tmp_path: Path) -> None:
    bank = Bank()
    payer = make_payer(bank, tmp_path)
    prep = await pay(payer, bank, amounts=(30_000, PRICE, 20_000))
    assert isinstance(prep, PreparedPayment)
    assert prep.header_name == "PAYMENT-SIGNATURE" and prep.requirement.amount == PRICE
    assert prep.metadata()["amount_tokens"] == "0.01"
    (row,) = await payer.list_payments()
    assert row["state"] == "reserved"  # committed before the request can leave
    await payer.mark_sent(prep)
    receipt = await settle(bank, prep)
    outcome = await payer.record_outcome(prep, status=200, headers=receipt)
    assert outcome["state"] == "settled" and outcome["tx_signature"]
    (row,) = await payer.list_payments()
    assert row["state"] == "settled" and row["tx_signature"] == outcome["tx_signature"]
    assert bank.balances()["pay_to"] == PRICE
    await payer.aclose()


async def test_presign_reuses_requirements_then_expires(tmp_path: Path) -> None:
    bank = Bank()
    clock = Clock()
    payer = make_payer(bank, tmp_path, limits=("0.05", "1", "1"), clock=clock)
    assert await payer.prepare_presigned(url=URL, method="POST", session="s1") is None
    first = await pay(payer, bank)
    assert isinstance(first, PreparedPayment)
    await payer.record_outcome(first, status=200, headers=await settle(bank, first))
    calls = payer.chain.rpc_calls
    pre = await payer.prepare_presigned(url=URL, method="POST", session="s1")
    assert isinstance(pre, PreparedPayment) and pre.presigned
    assert payer.chain.rpc_calls == calls  # mint and blockhash cached: no RPC round trip
    await payer.record_outcome(pre, status=200, headers=await settle(bank, pre))
    assert bank.balances()["pay_to"] == 2 * PRICE
    assert await payer.prepare_presigned(url=URL, method="GET", session="s1") is None
    clock.now += 61  # maxTimeoutSeconds passed
    assert await payer.prepare_presigned(url=URL, method="POST", session="s1") is None
    # and a presigned request that still gets a 402: forget, pay once more, never again
    again = await pay(payer, bank)
    assert isinstance(again, PreparedPayment)
    payer.forget_route(url=URL, method="POST")
    assert await payer.prepare_presigned(url=URL, method="POST", session="s1") is None
    await payer.aclose()


async def test_stale_blockhash_hint_is_replaced_by_a_fresh_one(tmp_path: Path) -> None:
    bank = Bank()
    clock = Clock()
    payer = make_payer(bank, tmp_path, limits=("0.05", "1", "1"), clock=clock)
    old = str(bank.latest_blockhash())
    first = await pay(payer, bank, recentBlockhash=old)
    assert isinstance(first, PreparedPayment)
    await payer.release(first, "test: never sent")
    bank.expire_blockhash()
    clock.now += 30  # the hint is older than BLOCKHASH_HINT_MAX_AGE
    payer.chain._blockhash = None  # the payer's own cache is separate (few seconds)
    pre = await payer.prepare_presigned(url=URL, method="POST", session="s1")
    assert isinstance(pre, PreparedPayment)
    await settle(bank, pre)  # would fail simulation with the expired hint
    await payer.aclose()


async def test_limits_refuse_before_signing(tmp_path: Path) -> None:
    bank = Bank()
    payer = make_payer(bank, tmp_path)  # per_session_per_day 0.03
    for _ in range(3):
        assert isinstance(await pay(payer, bank), PreparedPayment)
    refused = await pay(payer, bank)
    assert isinstance(refused, Refusal) and refused.rule == "per_session_per_day"
    other = await pay(payer, bank, session="s2")
    assert isinstance(other, PreparedPayment)
    too_much = await pay(payer, bank, session="s3", amounts=(60_000,))
    assert isinstance(too_much, Refusal) and too_much.rule == "per_request"
    assert len(await payer.list_payments()) == 4
    await payer.aclose()


async def test_refusals_need_no_rpc_and_hold_no_secret(tmp_path: Path) -> None:
    bank = Bank()
    payer = make_payer(bank, tmp_path)
    headers, body = sdk_402(bank)
    not_ours = await payer.prepare_payment(
        url="https://api.openai.com/v1/chat/completions", method="POST", session="s",
        status=402, headers=headers, body=body,
    )
    assert isinstance(not_ours, Refusal) and not_ours.rule == "host"
    bad = await payer.prepare_payment(
        url=URL, method="POST", session="s", status=402,
        headers={"PAYMENT-REQUIRED": "garbage!"}, body=b"",
    )
    assert isinstance(bad, Refusal) and bad.rule == "malformed"
    assert payer.chain.rpc_calls == 0
    secret = str(bank.payer)
    for refusal in (not_ours, bad):
        assert secret not in refusal.reason and secret not in repr(refusal)
    assert secret not in repr(payer.wallet)
    await payer.aclose()


async def test_chain_failures_refuse(tmp_path: Path) -> None:
    bank = Bank()
    payer = make_payer(bank, tmp_path, fail={"getLatestBlockhash": 503})
    refused = await pay(payer, bank)
    assert isinstance(refused, Refusal) and refused.rule == "chain"
    assert "rpc.invalid" not in refused.reason  # the RPC URL may carry an API key
    assert await payer.list_payments() == []  # nothing reserved
    await payer.aclose()
    payer = make_payer(bank, tmp_path / "b", fail={"getAccountInfo": 500})
    refused = await pay(payer, bank)
    assert isinstance(refused, Refusal) and refused.rule == "decimals"
    await payer.aclose()


@pytest.mark.parametrize(
    ("status", "receipt", "state"),
    [
        (402, None, "failed"),
        (200, None, "unknown"),
        (500, None, "unknown"),
        (402, SettleResponse(success=False, error_reason="boom", transaction="",
                             network="solana-devnet"), "failed"),
        (200, "%%%", "unknown"),
    ],
)
async def test_outcomes(tmp_path: Path, status: int, receipt: Any, state: str) -> None:
    bank = Bank()
    payer = make_payer(bank, tmp_path)
    prep = await pay(payer, bank)
    assert isinstance(prep, PreparedPayment)
    headers: dict[str, str] = {}
    if isinstance(receipt, SettleResponse):
        headers["PAYMENT-RESPONSE"] = encode_payment_response_header(receipt)
    elif isinstance(receipt, str):
        headers["PAYMENT-RESPONSE"] = receipt
    outcome = await payer.record_outcome(prep, status=status, headers=headers)
    assert outcome["state"] == state
    (row,) = await payer.list_payments()
    assert row["state"] == state and row["counted"] == (state != "failed")
    await payer.aclose()


def test_payment_attempt_allows_one_retry_only_after_a_presigned_payment() -> None:
    fresh = PaymentAttempt()
    assert fresh.may_pay_after_402()
    fresh.record(presigned=False)
    assert not fresh.may_pay_after_402()
    pre = PaymentAttempt.from_dict(PaymentAttempt().as_dict())
    pre.record(presigned=True)
    assert pre.may_pay_after_402()
    pre.record(presigned=False)
    assert not pre.may_pay_after_402()
    assert PaymentAttempt.from_dict(pre.as_dict()) == pre


async def test_chain_client_caches_and_shares_requests() -> None:
    bank = Bank()
    clock = Clock()
    chain = ChainClient(
        "http://rpc.invalid/", client=httpx.AsyncClient(transport=rpc_transport(bank)),
        clock=clock,
    )
    results = await asyncio.gather(*(chain.latest_blockhash() for _ in range(10)))
    assert len(set(results)) == 1 and chain.rpc_calls == 1
    clock.now += 10
    bank.expire_blockhash()
    assert await chain.latest_blockhash() != results[0] and chain.rpc_calls == 2
    infos = await asyncio.gather(*(chain.mint_info(str(bank.mint)) for _ in range(5)))
    assert {(i.decimals, i.token_program) for i in infos} == {(6, str(bank.token_program))}
    assert chain.rpc_calls == 3
    usdc = await chain.mint_info("EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v")
    assert usdc.decimals == 6 and chain.rpc_calls == 3  # known mint: no RPC
    await chain.aclose()
