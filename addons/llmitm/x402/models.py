"""x402 wire formats (v1 and v2) and strict parsing of 402 responses.

Parsing never guesses: a document that is not exactly one of the two formats is refused as a
whole (``PaymentRefused``); inside a valid document each advertised requirement is either parsed
into a ``Requirement`` (every field checked) or listed in ``ParsedRequirements.rejected`` with the
reason, and can then never be selected. There is no ``amount``/``maxAmountRequired`` fallback:
v2 entries need ``amount``, v1 entries ``maxAmountRequired``.

v2: a 402 with header ``PAYMENT-REQUIRED`` = base64 of camelCase JSON ``{x402Version: 2, error,
resource, accepts, extensions}``; payment header ``PAYMENT-SIGNATURE``; receipt
``PAYMENT-RESPONSE``. v1: the 402 body is ``{x402Version: 1, error, accepts}``; payment header
``X-PAYMENT``; receipt ``X-PAYMENT-RESPONSE``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic.alias_generators import to_camel

from .constants import MAX_MEMO_BYTES, normalize_network

PAYMENT_REQUIRED_HEADER = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE_HEADER = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE_HEADER = "PAYMENT-RESPONSE"
X_PAYMENT_HEADER = "X-PAYMENT"
X_PAYMENT_RESPONSE_HEADER = "X-PAYMENT-RESPONSE"

#: refuse absurd amounts outright (more than 10**18 base units is no real price)
MAX_AMOUNT = 10**18
MAX_TIMEOUT_SECONDS = 86_400
MAX_ACCEPTS = 32
MAX_HEADER_BYTES = 32 * 1024
MAX_BODY_BYTES = 256 * 1024

_AMOUNT_RE = re.compile(r"[0-9]{1,19}")
_BASE58_ADDRESS_RE = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,44}")


class PaymentRefused(Exception):
    """A 402 (or one of its parts) that llmitm will not pay; ``reason`` says why and is safe to
    show to the client (it never holds a secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- wire models ------------------------------------------------------------------------------


class _Wire(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are kept (forward compatible),
    types are strict (a JSON number is not a string)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="allow", frozen=True
    )


class ResourceInfo(_Wire):
    url: StrictStr
    description: StrictStr | None = None
    mime_type: StrictStr | None = None


class RequirementV2(_Wire):
    """One entry of v2 ``accepts``."""

    scheme: StrictStr
    network: StrictStr
    asset: StrictStr
    amount: StrictStr
    pay_to: StrictStr
    max_timeout_seconds: StrictInt
    extra: dict[str, Any] | None = None


class RequirementV1(_Wire):
    """One entry of v1 ``accepts``."""

    scheme: StrictStr
    network: StrictStr
    max_amount_required: StrictStr
    resource: StrictStr
    description: StrictStr | None = None
    mime_type: StrictStr | None = None
    pay_to: StrictStr
    max_timeout_seconds: StrictInt
    asset: StrictStr
    output_schema: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None


class PaymentRequiredV2(_Wire):
    """The decoded ``PAYMENT-REQUIRED`` header. ``accepts`` stays raw: entries are validated one
    by one so that one bad entry does not hide the others (it just cannot be chosen)."""

    x402_version: Literal[2]
    error: StrictStr | None = None
    resource: ResourceInfo | None = None
    accepts: list[Any]
    extensions: dict[str, Any] | None = None


class PaymentRequiredV1(_Wire):
    """The v1 402 body."""

    x402_version: Literal[1]
    error: StrictStr | None = None
    accepts: list[Any]


class ExactSvmPayload(_Wire):
    transaction: StrictStr


class PaymentPayloadV2(_Wire):
    """``PAYMENT-SIGNATURE``: ``accepted`` is the chosen requirement exactly as advertised."""

    x402_version: Literal[2] = 2
    payload: ExactSvmPayload
    accepted: dict[str, Any]
    resource: dict[str, Any] | None = None
    extensions: dict[str, Any] | None = None


class PaymentPayloadV1(_Wire):
    """``X-PAYMENT``."""

    x402_version: Literal[1] = 1
    scheme: StrictStr
    network: StrictStr
    payload: ExactSvmPayload


class SettlementResponse(_Wire):
    """``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``."""

    success: StrictBool
    error_reason: StrictStr | None = None
    error_message: StrictStr | None = None
    payer: StrictStr | None = None
    transaction: StrictStr = ""
    network: StrictStr | None = None
    amount: StrictStr | None = None


# --- the normalized form the policy and signer work with -----------------------------------------


@dataclass(frozen=True)
class Requirement:
    """A well-formed Solana requirement, either version. ``raw`` is the entry exactly as the
    server sent it (echoed as ``accepted`` in v2)."""

    version: Literal[1, 2]
    index: int
    scheme: str
    network: str  # as advertised (CAIP-2 or v1 name)
    caip2: str  # normalized
    asset: str
    amount: int  # base units, 1..MAX_AMOUNT
    pay_to: str
    max_timeout_seconds: int
    fee_payer: str
    memo: str | None
    recent_blockhash: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False)


@dataclass(frozen=True)
class ParsedRequirements:
    version: Literal[1, 2]
    accepts: tuple[Requirement, ...]
    rejected: tuple[tuple[int, str], ...]  # (index in accepts, reason)
    resource: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    extensions: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    error: str | None = None


# --- helpers ----------------------------------------------------------------------------------


def get_header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup on any mapping (a plain dict or mitmproxy's Headers)."""
    value = headers.get(name)
    if value is not None:
        return value
    lname = name.lower()
    for key, val in headers.items():
        if key.lower() == lname:
            return val
    return None


def parse_amount(value: object, field_name: str = "amount") -> int:
    """A base-unit amount: a JSON string of ASCII digits, no sign, no whitespace, no decimals or
    exponent, no leading zeros, between 1 and 10**18."""
    if not isinstance(value, str):
        raise PaymentRefused(f"{field_name} must be a string of base units")
    if value == "":
        raise PaymentRefused(f"{field_name} is empty")
    if not _AMOUNT_RE.fullmatch(value):
        shown = value if len(value) <= 24 else value[:24] + "..."
        raise PaymentRefused(f"{field_name} {shown!r} is not a plain integer of base units")
    if len(value) > 1 and value[0] == "0":
        raise PaymentRefused(f"{field_name} {value!r} has leading zeros")
    amount = int(value)
    if amount <= 0:
        raise PaymentRefused(f"{field_name} must be positive")
    if amount > MAX_AMOUNT:
        raise PaymentRefused(f"{field_name} {value} is absurdly large")
    return amount


def is_address(value: object) -> bool:
    """A base58 Solana address that decodes to exactly 32 bytes."""
    if not isinstance(value, str) or not _BASE58_ADDRESS_RE.fullmatch(value):
        return False
    from solders.pubkey import Pubkey

    try:
        Pubkey.from_string(value)
    except ValueError:
        return False
    return True


def _is_blockhash(value: object) -> bool:
    return is_address(value)  # same encoding: base58 of 32 bytes


def _validation_reason(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "document"
    return f"{loc}: {first.get('msg', 'invalid')}"


def _requirement(version: Literal[1, 2], index: int, entry: object) -> Requirement:
    if not isinstance(entry, dict):
        raise PaymentRefused("not a JSON object")
    model: RequirementV2 | RequirementV1
    try:
        if version == 2:
            model = RequirementV2.model_validate(entry)
            amount = parse_amount(model.amount, "amount")
        else:
            model = RequirementV1.model_validate(entry)
            amount = parse_amount(model.max_amount_required, "maxAmountRequired")
    except ValidationError as err:
        raise PaymentRefused(_validation_reason(err)) from None
    caip2 = normalize_network(model.network)
    if caip2 is None:
        raise PaymentRefused(f"unknown network {model.network[:64]!r}")
    if version == 1 and ":" in model.network:
        raise PaymentRefused("a v1 requirement must name its network the v1 way")
    if not is_address(model.asset):
        raise PaymentRefused("asset is not a Solana mint address")
    if not is_address(model.pay_to):
        raise PaymentRefused("payTo is not a Solana address")
    if not 1 <= model.max_timeout_seconds <= MAX_TIMEOUT_SECONDS:
        raise PaymentRefused("maxTimeoutSeconds out of range")
    extra = model.extra or {}
    fee_payer = extra.get("feePayer")
    if fee_payer is None:
        raise PaymentRefused("extra.feePayer is missing (required on Solana)")
    if not is_address(fee_payer):
        raise PaymentRefused("extra.feePayer is not a Solana address")
    memo = extra.get("memo")
    if memo is not None and (
        not isinstance(memo, str) or len(memo.encode("utf-8")) > MAX_MEMO_BYTES
    ):
        raise PaymentRefused(f"extra.memo must be a string of at most {MAX_MEMO_BYTES} bytes")
    blockhash = extra.get("recentBlockhash")
    return Requirement(
        version=version,
        index=index,
        scheme=model.scheme,
        network=model.network,
        caip2=caip2,
        asset=model.asset,
        amount=amount,
        pay_to=model.pay_to,
        max_timeout_seconds=model.max_timeout_seconds,
        fee_payer=fee_payer,
        memo=memo or None,
        # an unusable hint is dropped, not an error: the payer then fetches its own blockhash
        recent_blockhash=blockhash if _is_blockhash(blockhash) else None,
        raw=entry,
    )


def _entries(
    version: Literal[1, 2], accepts: list[Any]
) -> tuple[tuple[Requirement, ...], tuple[tuple[int, str], ...]]:
    if not accepts:
        raise PaymentRefused("accepts is empty")
    if len(accepts) > MAX_ACCEPTS:
        raise PaymentRefused(f"more than {MAX_ACCEPTS} accepted requirements")
    good: list[Requirement] = []
    bad: list[tuple[int, str]] = []
    for i, entry in enumerate(accepts):
        try:
            good.append(_requirement(version, i, entry))
        except PaymentRefused as refused:
            bad.append((i, refused.reason))
    return tuple(good), tuple(bad)


def _version(doc: Mapping[str, Any]) -> int | None:
    """``x402Version`` only when it is exactly a JSON integer (``true`` and ``1.0`` are not)."""
    version = doc.get("x402Version")
    return version if type(version) is int else None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise PaymentRefused(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise PaymentRefused(f"{what} is not a JSON object")
    return doc


def parse_requirements(status: int, headers: Mapping[str, str], body: bytes) -> ParsedRequirements:
    """Parse the x402 requirements of a 402 response, or raise ``PaymentRefused``.

    A ``PAYMENT-REQUIRED`` header makes it v2 (then the body is ignored, even when it is
    malformed); otherwise the body must be a v1 document.
    """
    if status != 402:
        raise PaymentRefused(f"status {status} is not 402")
    header = get_header(headers, PAYMENT_REQUIRED_HEADER)
    if header is not None:
        if len(header) > MAX_HEADER_BYTES:
            raise PaymentRefused("PAYMENT-REQUIRED header is too large")
        try:
            decoded = base64.b64decode(header.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise PaymentRefused("PAYMENT-REQUIRED header is not base64") from None
        doc = _json_object(decoded, "PAYMENT-REQUIRED header")
        if _version(doc) != 2:
            raise PaymentRefused("PAYMENT-REQUIRED header does not carry x402Version 2")
        try:
            v2 = PaymentRequiredV2.model_validate(doc)
        except ValidationError as err:
            raise PaymentRefused(f"PAYMENT-REQUIRED {_validation_reason(err)}") from None
        good, bad = _entries(2, v2.accepts)
        resource = doc.get("resource")
        extensions = doc.get("extensions")
        return ParsedRequirements(
            version=2,
            accepts=good,
            rejected=bad,
            resource=resource if isinstance(resource, dict) else None,
            extensions=extensions if isinstance(extensions, dict) else None,
            error=v2.error,
        )
    if not body:
        raise PaymentRefused("402 without x402 requirements (no PAYMENT-REQUIRED header, no body)")
    if len(body) > MAX_BODY_BYTES:
        raise PaymentRefused("402 body is too large for x402 requirements")
    doc = _json_object(body, "402 body")
    version = _version(doc)
    if version == 2:
        raise PaymentRefused("x402Version 2 requirements must come in the PAYMENT-REQUIRED header")
    if version != 1:
        raise PaymentRefused("402 body is not an x402 v1 document")
    try:
        v1 = PaymentRequiredV1.model_validate(doc)
    except ValidationError as err:
        raise PaymentRefused(f"402 body {_validation_reason(err)}") from None
    good, bad = _entries(1, v1.accepts)
    return ParsedRequirements(version=1, accepts=good, rejected=bad, error=v1.error)


# --- encoding the payment and decoding the receipt --------------------------------------------


def _b64json(doc: Mapping[str, Any]) -> str:
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


def encode_payment_header(
    parsed: ParsedRequirements, requirement: Requirement, transaction_b64: str
) -> tuple[str, str]:
    """(header name, value) carrying the signed transaction for ``requirement``.

    v2: ``PAYMENT-SIGNATURE`` with ``accepted`` = the requirement verbatim and the server's
    ``resource`` and ``extensions`` echoed; v1: ``X-PAYMENT``.
    """
    if requirement.version == 2:
        doc: dict[str, Any] = {
            "x402Version": 2,
            "payload": {"transaction": transaction_b64},
            "accepted": dict(requirement.raw),
        }
        if parsed.resource is not None:
            doc["resource"] = dict(parsed.resource)
        if parsed.extensions:
            doc["extensions"] = dict(parsed.extensions)
        return PAYMENT_SIGNATURE_HEADER, _b64json(doc)
    doc = {
        "x402Version": 1,
        "scheme": requirement.scheme,
        "network": requirement.network,
        "payload": {"transaction": transaction_b64},
    }
    return X_PAYMENT_HEADER, _b64json(doc)


def decode_payment_header(value: str) -> PaymentPayloadV2 | PaymentPayloadV1:
    """Decode a ``PAYMENT-SIGNATURE`` / ``X-PAYMENT`` value (for tests and the test bed)."""
    try:
        doc = _json_object(base64.b64decode(value, validate=True), "payment header")
    except (binascii.Error, ValueError):
        raise PaymentRefused("payment header is not base64") from None
    try:
        if _version(doc) == 1:
            return PaymentPayloadV1.model_validate(doc)
        return PaymentPayloadV2.model_validate(doc)
    except ValidationError as err:
        raise PaymentRefused(f"payment header {_validation_reason(err)}") from None


def parse_settlement(headers: Mapping[str, str]) -> SettlementResponse | None:
    """The ``PAYMENT-RESPONSE`` (or v1 ``X-PAYMENT-RESPONSE``) receipt; ``None`` when absent.
    Raises ``PaymentRefused`` when present but malformed."""
    value = get_header(headers, PAYMENT_RESPONSE_HEADER)
    if value is None:
        value = get_header(headers, X_PAYMENT_RESPONSE_HEADER)
    if value is None:
        return None
    if len(value) > MAX_HEADER_BYTES:
        raise PaymentRefused("PAYMENT-RESPONSE header is too large")
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise PaymentRefused("PAYMENT-RESPONSE header is not base64") from None
    doc = _json_object(decoded, "PAYMENT-RESPONSE header")
    try:
        return SettlementResponse.model_validate(doc)
    except ValidationError as err:
        raise PaymentRefused(f"PAYMENT-RESPONSE {_validation_reason(err)}") from None
