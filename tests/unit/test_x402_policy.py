"""Which requirement is signed: rules, cheapest choice, and a property test over hostile 402s."""

from __future__ import annotations

import base64
import json
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from solders.keypair import Keypair

from llmitm.x402 import constants
from llmitm.x402.models import PaymentRefused, Requirement, parse_requirements
from llmitm.x402.policy import Policy, Refusal, host_allowed, select

DEVNET = constants.SOLANA_DEVNET_CAIP2
MAINNET = constants.SOLANA_MAINNET_CAIP2
MINT_A = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"  # 6 decimals
MINT_B = str(Keypair().pubkey())  # 9 decimals
MINT_X = str(Keypair().pubkey())  # not allowed
PAY_OK = str(Keypair().pubkey())
PAY_OTHER = str(Keypair().pubkey())
FEE = str(Keypair().pubkey())
WALLET = str(Keypair().pubkey())
DECIMALS = {MINT_A: 6, MINT_B: 9, MINT_X: 6}
PER_REQUEST = Decimal("0.05")

POLICY = Policy(
    pay_hosts=("paid.example.test", "*.x402.test"),
    networks=frozenset({DEVNET}),
    assets=frozenset({MINT_A, MINT_B}),
    pay_to=frozenset({PAY_OK}),
    per_request=PER_REQUEST,
)


def entry(version: int = 2, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scheme": "exact",
        "network": DEVNET if version == 2 else "solana-devnet",
        "asset": MINT_A,
        "payTo": PAY_OK,
        "maxTimeoutSeconds": 60,
        "extra": {"feePayer": FEE},
    }
    if version == 2:
        base["amount"] = "10000"
    else:
        base |= {"maxAmountRequired": "10000", "resource": "https://paid.example.test/"}
    base.update(over)
    return base


def as_response(version: int, entries: list[Any]) -> tuple[dict[str, str], bytes]:
    doc = {"x402Version": version, "accepts": entries}
    if version == 2:
        return {"PAYMENT-REQUIRED": base64.b64encode(json.dumps(doc).encode()).decode()}, b"{}"
    return {}, json.dumps(doc).encode()


def choose(version: int, *entries: Any, host: str = "paid.example.test") -> Requirement | Refusal:
    headers, body = as_response(version, list(entries))
    parsed = parse_requirements(402, headers, body)
    return select(parsed, host=host, policy=POLICY, decimals=DECIMALS, payer=WALLET)


def test_cheapest_acceptable_wins_not_the_first() -> None:
    got = choose(2, entry(amount="40000"), entry(amount="30000"), entry(amount="35000"))
    assert isinstance(got, Requirement) and got.amount == 30000 and got.index == 1


def test_cheapest_compares_token_units_across_decimals() -> None:
    # 0.02 of MINT_A (6 decimals) vs 0.01 of MINT_B (9 decimals): MINT_B is cheaper
    got = choose(2, entry(amount="20000"), entry(asset=MINT_B, amount="10000000"))
    assert isinstance(got, Requirement) and got.asset == MINT_B


def test_ties_keep_advertised_order() -> None:
    got = choose(2, entry(amount="10000", payTo=PAY_OK), entry(amount="10000"))
    assert isinstance(got, Requirement) and got.index == 0


def test_per_request_boundary_is_exact() -> None:
    at_limit = choose(2, entry(amount="50000"))
    assert isinstance(at_limit, Requirement)
    over = choose(2, entry(amount="50001"))
    assert isinstance(over, Refusal) and over.rule == "per_request"
    assert "0.050001" in over.reason


def test_v1_names_and_caip2_both_accepted() -> None:
    assert isinstance(choose(1, entry(1)), Requirement)
    assert isinstance(choose(2, entry(network="solana-devnet")), Requirement)
    refused = choose(2, entry(network=MAINNET))
    assert isinstance(refused, Refusal) and refused.rule == "network"


@pytest.mark.parametrize(
    ("over", "rule"),
    [
        ({"scheme": "upto"}, "scheme"),
        ({"asset": MINT_X}, "asset"),
        ({"payTo": PAY_OTHER}, "pay_to"),
        ({"extra": {"feePayer": WALLET}}, "fee_payer"),
        ({"amount": "-5"}, "malformed"),
    ],
)
def test_each_rule_refuses_with_its_name(over: dict[str, Any], rule: str) -> None:
    got = choose(2, entry(**over))
    assert isinstance(got, Refusal) and got.rule == rule
    assert "\n" not in got.header_value


def test_host_must_be_a_pay_host() -> None:
    got = choose(2, entry(), host="api.openai.com")
    assert isinstance(got, Refusal) and got.rule == "host"
    assert isinstance(choose(2, entry(), host="a.x402.test"), Requirement)
    assert host_allowed("PAID.example.test.", POLICY.pay_hosts)
    assert not host_allowed("paid.example.test.evil.com", POLICY.pay_hosts)


def test_unknown_decimals_are_never_guessed() -> None:
    headers, body = as_response(2, [entry()])
    parsed = parse_requirements(402, headers, body)
    got = select(parsed, host="paid.example.test", policy=POLICY, decimals={})
    assert isinstance(got, Refusal) and got.rule == "decimals"


def test_mixed_reasons_are_listed() -> None:
    got = choose(2, entry(scheme="upto"), entry(asset=MINT_X), entry(amount="1.5"))
    assert isinstance(got, Refusal) and got.rule == "no_acceptable_requirement"
    assert "#0" in got.reason and "#1" in got.reason and "#2" in got.reason


def test_header_value_is_printable_ascii() -> None:
    refusal = Refusal("x", "bad \r\n\x00 ünïcode " + "y" * 1000)
    value = refusal.header_value
    assert re.fullmatch(r"[ -~]{1,400}", value)


# --- the property: no selection outside the policy, and always the cheapest ----------------------

_AMOUNT_OK = re.compile(r"[1-9][0-9]{0,18}")

amounts = st.one_of(
    st.integers(min_value=1, max_value=80_000).map(str),  # around the 0.05 limit (6 dec)
    st.integers(min_value=1, max_value=80_000_000).map(str),  # around the limit for 9 decimals
    st.sampled_from(["", "0", "-1", "-10000", "+100", " 100", "100 ", "1.5", "1e3", "1E3",
                     "0x10", "007", "\u0661", str(10**18), str(10**18 + 1), "9" * 30, "NaN",
                     "Infinity", "1_0", "٣"]),
    st.integers(min_value=-5, max_value=10**6),  # a JSON number, not a string
    st.none(),
)
networks = st.sampled_from(
    [DEVNET, "solana-devnet", MAINNET, "solana", "solana-testnet", "solana:xyz", "eip155:8453",
     "SOLANA-DEVNET", "", 5]
)
assets = st.sampled_from([MINT_A, MINT_B, MINT_X, "USDC", "", MINT_A.lower()])
pay_tos = st.sampled_from([PAY_OK, PAY_OK, PAY_OTHER, "0xdeadbeef", ""])
schemes = st.sampled_from(["exact", "exact", "exact", "upto", "EXACT", "", "exact "])
extras = st.sampled_from(
    [{"feePayer": FEE}, {"feePayer": FEE}, {}, None, {"feePayer": "x"}, {"feePayer": WALLET},
     {"feePayer": FEE, "memo": 7}, "str"]
)


@st.composite
def hostile_entries(draw: st.DrawFn, version: int) -> Any:
    """A valid entry with 0-3 hostile mutations (wrong network/asset/payTo/scheme, bad or
    v1/v2-mixed amount fields, missing feePayer...), or now and then not an entry at all."""
    if draw(st.integers(0, 40)) == 0:
        return draw(st.sampled_from(["x", 1, None, [], {"scheme": "exact"}]))
    asset = draw(st.sampled_from([MINT_A, MINT_B]))
    good_amount = str(
        draw(st.integers(1, 80_000) if asset == MINT_A else st.integers(1, 80_000_000))
    )
    e = entry(version, asset=asset)
    e["amount" if version == 2 else "maxAmountRequired"] = good_amount
    if version == 2 and draw(st.booleans()):
        e["network"] = "solana-devnet"
    mutations = {
        "network": lambda: e.__setitem__("network", draw(networks)),
        "asset": lambda: e.__setitem__("asset", draw(assets)),
        "payTo": lambda: e.__setitem__("payTo", draw(pay_tos)),
        "scheme": lambda: e.__setitem__("scheme", draw(schemes)),
        "extra": lambda: e.__setitem__("extra", draw(extras)),
        "timeout": lambda: e.__setitem__(
            "maxTimeoutSeconds", draw(st.sampled_from([0, -1, "60", 10**9, None]))
        ),
        "amount": lambda: e.__setitem__(
            "amount" if version == 2 else "maxAmountRequired", draw(amounts)
        ),
        "other_amount_field": lambda: e.__setitem__(
            "maxAmountRequired" if version == 2 else "amount", draw(amounts)
        ),
        "drop_amount": lambda: e.pop("amount" if version == 2 else "maxAmountRequired"),
        "drop_resource": lambda: e.pop("resource", None),
    }
    for name in draw(st.lists(st.sampled_from(sorted(mutations)), max_size=3, unique=True)):
        mutations[name]()
    return e


def oracle_acceptable(version: int, raw: Any, host_ok: bool) -> Decimal | None:
    """Independent re-statement of the policy on the raw JSON entry: its cost in token units
    when it may be paid, else None."""
    if not host_ok or not isinstance(raw, dict):
        return None
    amount = raw.get("amount") if version == 2 else raw.get("maxAmountRequired")
    if not isinstance(amount, str) or not _AMOUNT_OK.fullmatch(amount):
        return None
    if int(amount) > 10**18:
        return None
    if raw.get("scheme") != "exact":
        return None
    allowed_names = {DEVNET} if version == 2 else {"solana-devnet"}
    if version == 2:
        allowed_names.add("solana-devnet")  # a v1 name inside v2 normalizes to devnet
    if raw.get("network") not in allowed_names:
        return None
    if raw.get("asset") not in (MINT_A, MINT_B) or raw.get("payTo") != PAY_OK:
        return None
    extra = raw.get("extra")
    if not isinstance(extra, dict) or extra.get("feePayer") != FEE:
        return None
    if "memo" in extra and not isinstance(extra["memo"], str):
        return None
    if raw.get("maxTimeoutSeconds") != 60:
        return None
    if version == 1 and not isinstance(raw.get("resource"), str):
        return None
    cost = Decimal(int(amount)).scaleb(-DECIMALS[raw["asset"]])
    return cost if cost <= PER_REQUEST else None


@settings(
    max_examples=1200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    version=st.sampled_from([1, 2]),
    host=st.sampled_from(["paid.example.test", "paid.example.test", "evil.example",
                          "a.x402.test"]),
    wrong_transport=st.integers(0, 9),
)
def test_property_no_selection_outside_policy_and_cheapest_wins(
    data: st.DataObject, version: int, host: str, wrong_transport: int
) -> None:
    entries = data.draw(st.lists(hostile_entries(version), min_size=1, max_size=6))
    # now and then a v2 document in the body or a v1 one in the header: refused, never guessed
    wrong_transport = wrong_transport == 0
    headers, body = as_response(version, entries)
    if wrong_transport:
        doc = json.dumps({"x402Version": version, "accepts": entries}).encode()
        if version == 2:
            headers, body = {}, doc
        else:
            headers, body = {"PAYMENT-REQUIRED": base64.b64encode(doc).decode()}, b""
    try:
        parsed = parse_requirements(402, headers, body)
    except PaymentRefused:
        parsed = None
    got: Requirement | Refusal | None = None
    if parsed is not None:
        got = select(parsed, host=host, policy=POLICY, decimals=DECIMALS, payer=WALLET)

    host_ok = host != "evil.example"
    transport_ok = not wrong_transport
    costs = [
        (c, i)
        for i, raw in enumerate(entries)
        if transport_ok and (c := oracle_acceptable(version, raw, host_ok)) is not None
    ]
    if not costs:
        assert not isinstance(got, Requirement), (got, entries)
        return
    assert isinstance(got, Requirement), (got, entries)
    best_cost, best_index = min(costs)
    assert got.index == best_index
    assert got.raw is entries[got.index] or got.raw == entries[got.index]
    chosen_cost = Decimal(got.amount).scaleb(-DECIMALS[got.asset])
    assert chosen_cost == best_cost <= PER_REQUEST
    assert got.scheme == "exact" and got.caip2 == DEVNET and got.pay_to == PAY_OK
    assert got.asset in (MINT_A, MINT_B) and got.fee_payer == FEE
