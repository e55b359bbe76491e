"""x402 wire models, strict 402 parsing, header encoding, config and wallet (no network)."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from solders.keypair import Keypair

from llmitm.x402 import constants
from llmitm.x402.config import X402Config
from llmitm.x402.models import (
    PaymentRefused,
    encode_payment_header,
    parse_amount,
    parse_requirements,
    parse_settlement,
)
from llmitm.x402.wallet import Wallet, WalletError, load_wallet, write_keypair_file

DEVNET = constants.SOLANA_DEVNET_CAIP2
MINT = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"
PAY_TO = str(Keypair().pubkey())
FEE_PAYER = str(Keypair().pubkey())


def v2_entry(**over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "scheme": "exact",
        "network": DEVNET,
        "asset": MINT,
        "amount": "10000",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"feePayer": FEE_PAYER},
    }
    entry.update(over)
    return entry


def v1_entry(**over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "scheme": "exact",
        "network": "solana-devnet",
        "maxAmountRequired": "10000",
        "resource": "https://paid.example.test/v1/chat/completions",
        "description": "chat",
        "mimeType": "application/json",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "asset": MINT,
        "extra": {"feePayer": FEE_PAYER},
    }
    entry.update(over)
    return entry


def v2_headers(*entries: Any, **doc: Any) -> dict[str, str]:
    body = {
        "x402Version": 2,
        "error": "Payment required",
        "resource": {"url": "https://paid.example.test/v1/chat/completions"},
        "accepts": list(entries),
        **doc,
    }
    return {"payment-required": base64.b64encode(json.dumps(body).encode()).decode()}


def v1_body(*entries: Any) -> bytes:
    return json.dumps({"x402Version": 1, "error": "pay", "accepts": list(entries)}).encode()


# --- constants are the SDK's ---------------------------------------------------------------------


def test_constants_match_the_installed_sdk() -> None:
    from x402.mechanisms.svm import constants as sdk
    from x402.mechanisms.svm.default_assets import DEFAULT_ASSETS

    for name in (
        "SCHEME_EXACT",
        "TOKEN_PROGRAM_ADDRESS",
        "TOKEN_2022_PROGRAM_ADDRESS",
        "COMPUTE_BUDGET_PROGRAM_ADDRESS",
        "MEMO_PROGRAM_ADDRESS",
        "DEFAULT_COMPUTE_UNIT_LIMIT",
        "DEFAULT_COMPUTE_UNIT_PRICE_MICROLAMPORTS",
        "MAX_MEMO_BYTES",
        "SOLANA_MAINNET_CAIP2",
        "SOLANA_DEVNET_CAIP2",
        "SOLANA_TESTNET_CAIP2",
        "V1_TO_V2_NETWORK_MAP",
        "USDC_MAINNET_ADDRESS",
        "USDC_DEVNET_ADDRESS",
    ):
        assert getattr(constants, name) == getattr(sdk, name), name
    sdk_assets = {a["asset"]: (a["decimals"], a["token_program"]) for v in DEFAULT_ASSETS.values()
                  for a in v}
    for mint, known in constants.KNOWN_MINTS.items():
        assert sdk_assets[mint] == known


# --- v2 and v1 parsing ---------------------------------------------------------------------------


def test_parses_an_sdk_encoded_v2_header() -> None:
    from x402.http.utils import encode_payment_required_header
    from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

    sdk_doc = PaymentRequired(
        error="Payment required",
        resource=ResourceInfo(url="https://paid.example.test/x", description="d"),
        accepts=[
            PaymentRequirements(
                scheme="exact",
                network=DEVNET,
                asset=MINT,
                amount="12345",
                pay_to=PAY_TO,
                max_timeout_seconds=300,
                extra={"feePayer": FEE_PAYER, "memo": "order-1"},
            )
        ],
    )
    headers = {"PAYMENT-REQUIRED": encode_payment_required_header(sdk_doc)}
    parsed = parse_requirements(402, headers, b"{}")
    assert parsed.version == 2 and not parsed.rejected
    (req,) = parsed.accepts
    assert (req.amount, req.pay_to, req.fee_payer, req.memo) == (12345, PAY_TO, FEE_PAYER, "order-1")
    assert req.caip2 == DEVNET and req.max_timeout_seconds == 300
    assert parsed.resource == {"url": "https://paid.example.test/x", "description": "d"}


def test_parses_v1_body_and_normalizes_network() -> None:
    parsed = parse_requirements(402, {"content-type": "application/json"}, v1_body(v1_entry()))
    assert parsed.version == 1
    (req,) = parsed.accepts
    assert req.network == "solana-devnet" and req.caip2 == DEVNET and req.amount == 10000


def test_header_wins_over_body_and_lookup_is_case_insensitive() -> None:
    headers = {"Payment-Required": v2_headers(v2_entry())["payment-required"]}
    parsed = parse_requirements(402, headers, v1_body(v1_entry()))
    assert parsed.version == 2


@pytest.mark.parametrize(
    ("status", "headers", "body", "reason"),
    [
        (200, {}, b"", "not 402"),
        (402, {}, b"", "no PAYMENT-REQUIRED"),
        (402, {"PAYMENT-REQUIRED": "%%%"}, b"", "not base64"),
        (402, {"PAYMENT-REQUIRED": base64.b64encode(b"nope").decode()}, b"", "not JSON"),
        (402, {"PAYMENT-REQUIRED": base64.b64encode(b"[1]").decode()}, b"", "not a JSON object"),
        (
            402,
            {"PAYMENT-REQUIRED": base64.b64encode(json.dumps({"x402Version": 1}).encode()).decode()},
            b"",
            "x402Version 2",
        ),
        (402, {}, b"<html>pay</html>", "not JSON"),
        (402, {}, json.dumps({"x402Version": 2, "accepts": [v2_entry()]}).encode(), "header"),
        (402, {}, json.dumps({"x402Version": 3, "accepts": []}).encode(), "not an x402 v1"),
        (402, {}, json.dumps({"x402Version": True, "accepts": [v1_entry()]}).encode(), "v1"),
        (402, {}, json.dumps({"x402Version": 1.0, "accepts": [v1_entry()]}).encode(), "v1"),
        (
            402,
            {"PAYMENT-REQUIRED": base64.b64encode(
                json.dumps({"x402Version": 2.0, "accepts": [v2_entry()]}).encode()).decode()},
            b"",
            "x402Version 2",
        ),
        (402, {}, json.dumps({"x402Version": 1, "accepts": []}).encode(), "accepts is empty"),
        (402, {}, json.dumps({"x402Version": 1, "accepts": "x"}).encode(), "accepts"),
        (402, {}, v1_body(*[v1_entry()] * 33), "more than 32"),
    ],
)
def test_malformed_documents_are_refused(
    status: int, headers: dict[str, str], body: bytes, reason: str
) -> None:
    with pytest.raises(PaymentRefused) as err:
        parse_requirements(status, headers, body)
    assert reason in err.value.reason


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("-1", "plain integer"),
        ("+5", "plain integer"),
        (" 5", "plain integer"),
        ("5 ", "plain integer"),
        ("1.5", "plain integer"),
        ("1e3", "plain integer"),
        ("0x10", "plain integer"),
        ("\u0661\u0662", "plain integer"),  # Arabic-Indic digits: int() would accept them
        ("1_000", "plain integer"),
        ("0", "positive"),
        ("007", "leading zeros"),
        (str(10**18 + 1), "absurdly large"),
        ("9" * 40, "plain integer"),
        (10000, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_amounts_are_strict(value: object, reason: str) -> None:
    with pytest.raises(PaymentRefused) as err:
        parse_amount(value)
    assert reason in err.value.reason
    # and inside a document the entry is rejected, never selectable
    parsed = parse_requirements(402, v2_headers(v2_entry(amount=value), v2_entry()), b"")
    assert [i for i, _ in parsed.rejected] == [0]
    assert [r.index for r in parsed.accepts] == [1]


def test_amount_bounds_accepted() -> None:
    assert parse_amount("1") == 1
    assert parse_amount(str(10**18)) == 10**18


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (v2_entry(network="solana:mainnet"), "unknown network"),
        (v2_entry(network="eip155:8453"), "unknown network"),
        (v2_entry(network="solana-devnet "), "unknown network"),
        (v2_entry(extra={}), "feePayer is missing"),
        (v2_entry(extra=None), "feePayer is missing"),
        (v2_entry(extra={"feePayer": "not-an-address"}), "feePayer is not"),
        (v2_entry(extra={"feePayer": FEE_PAYER, "memo": "x" * 257}), "memo"),
        (v2_entry(payTo="0x" + "ab" * 20), "payTo"),
        (v2_entry(asset="USDC"), "asset"),
        (v2_entry(maxTimeoutSeconds=0), "maxTimeoutSeconds"),
        (v2_entry(maxTimeoutSeconds="60"), "maxTimeoutSeconds"),
        ({k: v for k, v in v2_entry().items() if k != "amount"} | {"maxAmountRequired": "5"},
         "amount"),
        ("not an object", "not a JSON object"),
    ],
)
def test_bad_v2_entries_are_rejected_with_a_reason(entry: Any, reason: str) -> None:
    parsed = parse_requirements(402, v2_headers(entry), b"")
    assert parsed.accepts == ()
    ((index, why),) = parsed.rejected
    assert index == 0 and reason in why


def test_v1_entry_rules() -> None:
    bad_caip2 = v1_entry(network=DEVNET)
    v2_style = {k: v for k, v in v1_entry().items() if k != "maxAmountRequired"} | {"amount": "5"}
    parsed = parse_requirements(402, {}, v1_body(bad_caip2, v2_style, v1_entry()))
    reasons = dict(parsed.rejected)
    assert "v1 way" in reasons[0]
    assert "maxAmountRequired" in reasons[1]
    assert [r.index for r in parsed.accepts] == [2]


def test_an_unusable_blockhash_hint_is_dropped_not_trusted() -> None:
    good = str(Keypair().pubkey())
    parsed = parse_requirements(
        402,
        v2_headers(
            v2_entry(extra={"feePayer": FEE_PAYER, "recentBlockhash": good}),
            v2_entry(extra={"feePayer": FEE_PAYER, "recentBlockhash": "zz"}),
        ),
        b"",
    )
    assert [r.recent_blockhash for r in parsed.accepts] == [good, None]


# --- encoding the payment, decoding the receipt -------------------------------------------------


def test_v2_payment_header_echoes_the_requirement_verbatim() -> None:
    from x402.http.utils import decode_payment_signature_header

    entry = v2_entry(extra={"feePayer": FEE_PAYER, "custom": {"k": [1, 2]}}, vendorField="x")
    parsed = parse_requirements(402, v2_headers(entry, extensions={"bazaar": {"a": 1}}), b"")
    name, value = encode_payment_header(parsed, parsed.accepts[0], "dHg=")
    assert name == "PAYMENT-SIGNATURE"
    doc = json.loads(base64.b64decode(value))
    assert doc["accepted"] == entry
    assert doc["resource"] == {"url": "https://paid.example.test/v1/chat/completions"}
    assert doc["extensions"] == {"bazaar": {"a": 1}}
    sdk = decode_payment_signature_header(value)
    assert sdk.x402_version == 2 and sdk.payload == {"transaction": "dHg="}
    assert sdk.accepted.amount == "10000"  # type: ignore[union-attr]


def test_v1_payment_header() -> None:
    from x402.http.utils import decode_payment_signature_header

    parsed = parse_requirements(402, {}, v1_body(v1_entry()))
    name, value = encode_payment_header(parsed, parsed.accepts[0], "dHg=")
    assert name == "X-PAYMENT"
    sdk = decode_payment_signature_header(value)
    assert sdk.x402_version == 1
    assert (sdk.scheme, sdk.network, sdk.payload) == (  # type: ignore[union-attr]
        "exact", "solana-devnet", {"transaction": "dHg="}
    )


def test_settlement_receipts() -> None:
    from x402.http.utils import encode_payment_response_header
    from x402.schemas import SettleResponse

    ok = encode_payment_response_header(
        SettleResponse(success=True, transaction="sig", network=DEVNET, payer=PAY_TO)
    )
    receipt = parse_settlement({"payment-response": ok})
    assert receipt is not None and receipt.success and receipt.transaction == "sig"
    v1 = parse_settlement({"X-PAYMENT-RESPONSE": ok})
    assert v1 is not None and v1.payer == PAY_TO
    assert parse_settlement({"content-type": "x"}) is None
    for bad in ("%%", base64.b64encode(b"[]").decode(),
                base64.b64encode(b'{"success": "yes"}').decode()):
        with pytest.raises(PaymentRefused):
            parse_settlement({"PAYMENT-RESPONSE": bad})


# --- config ----------------------------------------------------------------------------------------


def config_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "wallet": "~/.config/solana/id.json",
        "rpc_url": "https://api.devnet.solana.com",
        "pay_hosts": ["paid.example.test"],
        "networks": ["solana-devnet"],
        "assets": [MINT],
        "limits": {"per_request": "0.05", "per_session_per_day": "1", "total_per_day": "5"},
    }
    doc.update(over)
    return doc


def test_config_valid_and_secret_hidden() -> None:
    secret = "5" * 88
    cfg = X402Config.model_validate(config_doc(wallet=secret, presign=True))
    assert secret not in repr(cfg) and secret not in str(cfg.model_dump())
    assert str(cfg.limits.per_request) == "0.05"
    assert cfg.caip2_networks == {DEVNET}


@pytest.mark.parametrize(
    ("over", "where"),
    [
        ({"limits": {"per_request": 0.05, "per_session_per_day": "1", "total_per_day": "5"}},
         "quoted decimal"),
        ({"limits": {"per_request": "1e3", "per_session_per_day": "1", "total_per_day": "5"}},
         "plain decimal"),
        ({"limits": {"per_request": "-1", "per_session_per_day": "1", "total_per_day": "5"}},
         "negative"),
        ({"limits": {"per_request": "0.0000000001", "per_session_per_day": "1",
                     "total_per_day": "5"}}, "at most 9 digits"),
        ({"limits": {"per_request": "NaN", "per_session_per_day": "1", "total_per_day": "5"}},
         "plain decimal"),
        ({"limits": {"per_request": "1", "per_session_per_day": "1"}}, "total_per_day"),
        ({"networks": ["ethereum"]}, "unknown network"),
        ({"assets": ["USDC"]}, "mint address"),
        ({"pay_to": ["nope"]}, "Solana address"),
        ({"rpc_url": "ftp://x"}, "http"),
        ({"budget": 1}, "budget"),
        ({"limits": None}, "limits"),
    ],
)
def test_config_errors_name_the_problem(over: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as err:
        X402Config.model_validate(config_doc(**over))
    assert where in str(err.value)


# --- wallet --------------------------------------------------------------------------------------


def test_wallet_from_file_and_secret_never_shown(tmp_path: Path) -> None:
    kp = Keypair()
    path = tmp_path / "id.json"
    write_keypair_file(path, kp)
    wallet, warnings = load_wallet(str(path))
    assert wallet.pubkey == kp.pubkey() and warnings == []
    secret_b58 = str(kp)
    for text in (repr(wallet), str(wallet), f"{wallet}"):
        assert secret_b58 not in text and str(kp.pubkey()) in text
    with pytest.raises(TypeError):
        pickle.dumps(wallet)
    wallet2, _ = load_wallet(secret_b58)
    assert wallet2.address == wallet.address and wallet2.source == "secret"
    sig = wallet.sign_message(b"m")
    assert sig.verify(kp.pubkey(), b"m")


def test_wallet_warns_about_loose_permissions(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    write_keypair_file(path, Keypair())
    os.chmod(path, 0o644)
    _, warnings = load_wallet(str(path))
    assert len(warnings) == 1 and "chmod 600" in warnings[0]


def test_wallet_errors_never_quote_the_secret(tmp_path: Path) -> None:
    kp = Keypair()
    bad_secret = str(kp)[:-3] + "111"  # right length, wrong key
    with pytest.raises(WalletError) as err:
        load_wallet(bad_secret)
    assert bad_secret not in str(err.value)
    short = str(kp)[:40]
    with pytest.raises(WalletError) as err:
        load_wallet(short)
    assert short not in str(err.value)
    for content in ("[1,2,3]", "not json", json.dumps(list(range(64))), json.dumps([True] * 64)):
        path = tmp_path / "k.json"
        path.write_text(content)
        os.chmod(path, 0o600)
        with pytest.raises(WalletError):
            load_wallet(str(path))
    with pytest.raises(WalletError) as err:
        load_wallet(str(tmp_path / "missing.json"))
    assert "missing.json" in str(err.value)


def test_wallet_type_is_opaque() -> None:
    assert not hasattr(Wallet(Keypair()), "__dict__")


def test_the_package_imports_neither_mitmproxy_nor_the_x402_sdk() -> None:
    import subprocess
    import sys

    code = (
        "import sys, llmitm.x402, llmitm.x402.payer; "
        "bad = [m for m in ('mitmproxy', 'x402', 'solana') if m in sys.modules]; "
        "assert not bad, bad"
    )
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo / "addons"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
