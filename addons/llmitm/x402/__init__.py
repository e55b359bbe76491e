"""x402 payments on Solana: wire models, spending policy, transaction signing, ledger, presign.

Pure logic (no mitmproxy import). The addon should only need ``X402Payer`` and the types below.
"""

from __future__ import annotations

from .config import X402Config, X402Limits
from .ledger import Ledger, Reservation, SpendLimits, SqliteLedger
from .models import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    X_PAYMENT_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
    ParsedRequirements,
    PaymentRefused,
    Requirement,
    SettlementResponse,
    encode_payment_header,
    parse_requirements,
    parse_settlement,
)
from .payer import PreparedPayment, X402Payer
from .policy import Policy, Refusal, select
from .presign import PaymentAttempt, PresignCache, RouteKey
from .wallet import Wallet, WalletError, load_wallet

#: response header that tells the client why llmitm did not pay a 402
REFUSED_HEADER = "X-Llmitm-Payment-Refused"
#: every header that carries payment data (for redaction in recordings)
PAYMENT_HEADERS = (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    PAYMENT_RESPONSE_HEADER,
    X_PAYMENT_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
)

__all__ = [
    "PAYMENT_HEADERS",
    "PAYMENT_REQUIRED_HEADER",
    "PAYMENT_RESPONSE_HEADER",
    "PAYMENT_SIGNATURE_HEADER",
    "REFUSED_HEADER",
    "X_PAYMENT_HEADER",
    "X_PAYMENT_RESPONSE_HEADER",
    "Ledger",
    "ParsedRequirements",
    "PaymentAttempt",
    "PaymentRefused",
    "Policy",
    "PreparedPayment",
    "PresignCache",
    "Refusal",
    "Requirement",
    "Reservation",
    "RouteKey",
    "SettlementResponse",
    "SpendLimits",
    "SqliteLedger",
    "Wallet",
    "WalletError",
    "X402Config",
    "X402Limits",
    "X402Payer",
    "encode_payment_header",
    "load_wallet",
    "parse_requirements",
    "parse_settlement",
    "select",
]
