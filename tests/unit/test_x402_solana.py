"""Payments built by llmitm's solana.py, verified and settled by the official x402 facilitator
executing on LiteSVM. Nothing is mocked: real signatures, real SPL token programs."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from x402.http.utils import decode_payment_signature_header
from x402.schemas import PaymentRequirements, PaymentRequirementsV1

from llmitm.x402.models import encode_payment_header, parse_requirements
from llmitm.x402.solana import (
    TOKEN_2022_PROGRAM,
    TOKEN_PROGRAM,
    build_payment_transaction,
    derive_ata,
    encode_transaction,
)
from tests.x402bank.bank import Bank, ata_address, make_facilitator

PRICE = 10_000


def requirement_v2(bank: Bank, amount: int = PRICE, **extra: Any) -> dict[str, Any]:
    info = bank.info()
    return {
        "scheme": "exact",
        "network": info.network,
        "asset": info.mint,
        "amount": str(amount),
        "payTo": info.pay_to,
        "maxTimeoutSeconds": 60,
        "extra": {"feePayer": info.fee_payer, **extra},
    }


def requirement_v1(bank: Bank, amount: int = PRICE) -> dict[str, Any]:
    info = bank.info()
    return {
        "scheme": "exact",
        "network": "solana-devnet",
        "maxAmountRequired": str(amount),
        "resource": "https://paid.example.test/v1/chat/completions",
        "payTo": info.pay_to,
        "maxTimeoutSeconds": 60,
        "asset": info.mint,
        "extra": {"feePayer": info.fee_payer},
    }


def pay_header(
    bank: Bank,
    req: dict[str, Any],
    version: int = 2,
    *,
    amount: int | None = None,
    pay_to: Pubkey | None = None,
) -> str:
    """Parse the 402 the way the gateway does, sign with solana.py, encode the header."""
    doc = {"x402Version": version, "accepts": [req]}
    if version == 2:
        doc["resource"] = {"url": "https://paid.example.test/v1/chat/completions"}
        headers = {"PAYMENT-REQUIRED": base64.b64encode(json.dumps(doc).encode()).decode()}
        parsed = parse_requirements(402, headers, b"{}")
    else:
        parsed = parse_requirements(402, {}, json.dumps(doc).encode())
    (chosen,) = parsed.accepts
    tx = build_payment_transaction(
        owner=bank.payer.pubkey(),
        sign=bank.payer.sign_message,
        fee_payer=chosen.fee_payer,
        mint=chosen.asset,
        pay_to=pay_to or chosen.pay_to,
        amount=amount if amount is not None else chosen.amount,
        decimals=bank.decimals,
        token_program=bank.token_program,
        blockhash=bank.latest_blockhash(),
        memo=chosen.memo,
    )
    _, value = encode_payment_header(parsed, chosen, encode_transaction(tx))
    return value


@pytest.fixture
def bank() -> Bank:
    return Bank()


async def verify_and_settle(bank: Bank, header: str, req: dict[str, Any]) -> tuple[Any, Any]:
    facilitator, _ = make_facilitator(bank)
    payload = decode_payment_signature_header(header)
    requirements = (
        PaymentRequirementsV1.model_validate(req)
        if payload.x402_version == 1
        else PaymentRequirements.model_validate(req)
    )
    verified = await facilitator.verify(payload, requirements)
    settled = await facilitator.settle(payload, requirements) if verified.is_valid else None
    return verified, settled


@pytest.mark.parametrize("program", [TOKEN_PROGRAM, TOKEN_2022_PROGRAM], ids=["token", "token22"])
async def test_v2_payment_verifies_and_settles(program: Pubkey) -> None:
    bank = Bank(token_program=program)
    before = bank.balances()
    req = requirement_v2(bank)
    verified, settled = await verify_and_settle(bank, pay_header(bank, req), req)
    assert verified.is_valid, verified
    assert settled.success, settled
    assert settled.payer == str(bank.payer.pubkey())
    after = bank.balances()
    assert before["payer"] - after["payer"] == PRICE
    assert after["pay_to"] - before["pay_to"] == PRICE
    landed = bank.svm.get_transaction(Signature.from_string(settled.transaction))
    assert landed is not None


async def test_v1_payment_verifies_and_settles(bank: Bank) -> None:
    req = requirement_v1(bank)
    verified, settled = await verify_and_settle(bank, pay_header(bank, req, 1), req)
    assert verified.is_valid and settled.success
    assert bank.balances()["pay_to"] == PRICE


async def test_seller_memo_is_used(bank: Bank) -> None:
    req = requirement_v2(bank, memo="invoice-42")
    header = pay_header(bank, req)
    tx = VersionedTransaction.from_bytes(
        base64.b64decode(decode_payment_signature_header(header).payload["transaction"])
    )
    memo_ix = tx.message.instructions[3]
    assert bytes(memo_ix.data) == b"invoice-42"
    verified, settled = await verify_and_settle(bank, header, req)
    assert verified.is_valid and settled.success


async def test_underpayment_is_rejected(bank: Bank) -> None:
    req = requirement_v2(bank)
    verified, _ = await verify_and_settle(bank, pay_header(bank, req, amount=PRICE - 1), req)
    assert not verified.is_valid
    assert verified.invalid_reason == "invalid_exact_svm_payload_amount_insufficient"
    assert bank.balances()["pay_to"] == 0


async def test_wrong_pay_to_is_rejected(bank: Bank) -> None:
    other = Keypair().pubkey()
    bank.create_ata(other)
    req = requirement_v2(bank)
    verified, _ = await verify_and_settle(bank, pay_header(bank, req, pay_to=other), req)
    assert not verified.is_valid
    assert verified.invalid_reason == "invalid_exact_svm_payload_recipient_mismatch"
    assert bank.token_balance(other) == 0


async def test_replay_and_insufficient_funds_are_rejected() -> None:
    bank = Bank(fund_base_units=PRICE)
    req = requirement_v2(bank)
    header = pay_header(bank, req)
    verified, settled = await verify_and_settle(bank, header, req)
    assert settled.success
    facilitator, _ = make_facilitator(bank)
    payload = decode_payment_signature_header(header)
    again = await facilitator.settle(payload, PaymentRequirements.model_validate(req))
    assert not again.success
    # a fresh payment with an empty wallet fails simulation
    verified, _ = await verify_and_settle(bank, pay_header(bank, req), req)
    assert not verified.is_valid and verified.invalid_reason == "transaction_simulation_failed"
    assert bank.balances() == {"payer": 0, "pay_to": PRICE}


async def test_expired_blockhash_is_rejected(bank: Bank) -> None:
    req = requirement_v2(bank)
    header = pay_header(bank, req)
    bank.expire_blockhash()
    verified, _ = await verify_and_settle(bank, header, req)
    assert not verified.is_valid
    assert bank.balances()["pay_to"] == 0


def test_ata_derivation_matches_the_sdk_and_the_bank() -> None:
    from x402.mechanisms.svm.utils import derive_ata as sdk_derive_ata

    owner, mint = Keypair().pubkey(), Keypair().pubkey()
    for program in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM):
        ours = derive_ata(owner, mint, program)
        assert str(ours) == sdk_derive_ata(str(owner), str(mint), str(program))
        assert ours == ata_address(owner, mint, program)
    assert derive_ata(owner, mint, TOKEN_PROGRAM) != derive_ata(owner, mint, TOKEN_2022_PROGRAM)
    with pytest.raises(ValueError):
        derive_ata(owner, mint, Keypair().pubkey())


def test_transaction_layout(bank: Bank) -> None:
    info = bank.info()
    tx = build_payment_transaction(
        owner=bank.payer.pubkey(),
        sign=bank.payer.sign_message,
        fee_payer=info.fee_payer,
        mint=info.mint,
        pay_to=info.pay_to,
        amount=123,
        decimals=6,
        token_program=TOKEN_PROGRAM,
        blockhash=bank.latest_blockhash(),
    )
    msg = tx.message
    keys = list(msg.account_keys)
    assert keys[0] == Pubkey.from_string(info.fee_payer)
    assert keys[1] == bank.payer.pubkey()
    data = [bytes(ix.data) for ix in msg.instructions]
    assert data[0] == bytes([2]) + (20000).to_bytes(4, "little")
    assert data[1] == bytes([3]) + (1).to_bytes(8, "little")
    assert data[2] == bytes([12]) + (123).to_bytes(8, "little") + bytes([6])
    assert len(data[3]) == 32  # 16 random bytes as hex
    assert tx.signatures[0] == tx.signatures[0].default()
    assert tx.signatures[1].verify(bank.payer.pubkey(), b"\x80" + bytes(msg))
    with pytest.raises(ValueError, match="fee payer"):
        build_payment_transaction(
            owner=bank.payer.pubkey(), sign=bank.payer.sign_message,
            fee_payer=bank.payer.pubkey(), mint=info.mint, pay_to=info.pay_to, amount=1,
            decimals=6, token_program=TOKEN_PROGRAM, blockhash=bank.latest_blockhash(),
        )
    for amount in (0, -1, 2**64):
        with pytest.raises(ValueError, match="amount"):
            build_payment_transaction(
                owner=bank.payer.pubkey(), sign=bank.payer.sign_message,
                fee_payer=info.fee_payer, mint=info.mint, pay_to=info.pay_to, amount=amount,
                decimals=6, token_program=TOKEN_PROGRAM, blockhash=bank.latest_blockhash(),
            )
