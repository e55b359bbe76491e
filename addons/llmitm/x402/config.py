"""The ``x402`` section of the llmitm configuration (SPEC section 4).

```yaml
x402:
  wallet: ~/.config/solana/id.json        # a Solana CLI keypair file, or a base58 secret
  rpc_url: https://api.mainnet-beta.solana.com
  pay_hosts: ["api.example-llm.com", "*.paid.example"]
  networks: [solana]                     # CAIP-2 ids or v1 names
  assets: [EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v]
  pay_to: [...]                          # optional allowlist of recipients
  limits: {per_request: "0.05", per_session_per_day: "1", total_per_day: "5"}
  presign: true
  ledger: payments.sqlite3
```

Limits are in token units (``"0.05"`` USDC = 50000 base units), written as quoted decimal
strings so that no float ever touches money. They are required: there is no default budget.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator

from .constants import normalize_network
from .models import is_address

#: at most this many fractional digits in a limit (the ledger counts in 10**-9 token units)
LIMIT_MAX_FRACTION_DIGITS = 9
LIMIT_MAX = Decimal(10) ** 9


def _token_amount(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("write the amount as a quoted decimal string, e.g. '0.05'")
    text = str(value).strip()
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal number") from None
    if not amount.is_finite() or "e" in text.lower():
        raise ValueError(f"{text!r} is not a plain decimal number")
    if amount < 0:
        raise ValueError("must not be negative")
    if amount > LIMIT_MAX:
        raise ValueError(f"must not exceed {LIMIT_MAX}")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > LIMIT_MAX_FRACTION_DIGITS:
        raise ValueError(f"at most {LIMIT_MAX_FRACTION_DIGITS} digits after the decimal point")
    return amount


TokenAmount = Annotated[Decimal, BeforeValidator(_token_amount)]


class X402Limits(BaseModel):
    """Spending limits in token units; a day is a UTC calendar day."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_request: TokenAmount
    per_session_per_day: TokenAmount
    total_per_day: TokenAmount


class X402Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wallet: SecretStr = Field(description="Solana CLI keypair file path, or a base58 secret")
    rpc_url: str
    pay_hosts: list[str] = Field(default_factory=list, description="fnmatch host patterns")
    networks: list[str] = Field(min_length=1)
    assets: list[str] = Field(min_length=1, description="allowed SPL mint addresses")
    pay_to: list[str] | None = Field(default=None, description="allowed recipients, if set")
    limits: X402Limits
    presign: bool = False
    ledger: Path = Path("llmitm-payments.sqlite3")
    rpc_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    @field_validator("rpc_url")
    @classmethod
    def _rpc_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("pay_hosts")
    @classmethod
    def _pay_hosts(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or pattern != pattern.strip() or "/" in pattern:
                raise ValueError(f"{pattern!r} is not a host pattern")
        return [p.lower() for p in value]

    @field_validator("networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            if normalize_network(network) is None:
                raise ValueError(
                    f"unknown network {network!r}: use solana, solana-devnet, solana-testnet "
                    "or their CAIP-2 ids"
                )
        return value

    @field_validator("assets")
    @classmethod
    def _assets(cls, value: list[str]) -> list[str]:
        for mint in value:
            if not is_address(mint):
                raise ValueError(f"{mint!r} is not a Solana mint address")
        return value

    @field_validator("pay_to")
    @classmethod
    def _pay_to(cls, value: list[str] | None) -> list[str] | None:
        for address in value or ():
            if not is_address(address):
                raise ValueError(f"{address!r} is not a Solana address")
        return value

    @property
    def caip2_networks(self) -> frozenset[str]:
        return frozenset(n for n in map(normalize_network, self.networks) if n is not None)
