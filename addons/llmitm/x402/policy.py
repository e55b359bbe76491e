"""Which requirement, if any, llmitm signs: pure, no I/O.

Every rule is checked on the requirement that will actually be signed (never on the first one
advertised): scheme ``exact``; an allowed network (CAIP-2 and v1 names compare by their CAIP-2
id); an allowed asset; the host in ``pay_hosts``; ``payTo`` in the allowlist when there is one;
the amount within ``per_request`` after conversion with the mint's decimals. Among the entries
that pass, the cheapest in token units wins (ties: the first advertised).

Money is ``int`` base units and ``Decimal`` token units; a float never appears. The daily limits
are not checked here but atomically in the ledger: since all allowed assets count against the
same budget in token units, if the cheapest candidate does not fit the day's budget, no other
does either, so one ledger reservation decides.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from .config import X402Config
from .constants import SCHEME_EXACT, normalize_network
from .models import ParsedRequirements, Requirement


@dataclass(frozen=True)
class Refusal:
    """Why nothing is paid. ``rule`` is a stable identifier, ``reason`` a sentence that is safe
    to send to the client in ``X-Llmitm-Payment-Refused`` (no secrets, one line)."""

    rule: str
    reason: str

    def __str__(self) -> str:
        return self.reason

    @property
    def header_value(self) -> str:
        """``reason`` as a header value: printable ASCII only, at most 400 characters."""
        text = "".join(c if " " <= c <= "~" else "?" for c in self.reason)
        return text if len(text) <= 400 else text[:397] + "..."


@dataclass(frozen=True)
class Policy:
    pay_hosts: tuple[str, ...]
    networks: frozenset[str]  # CAIP-2
    assets: frozenset[str]
    pay_to: frozenset[str] | None
    per_request: Decimal

    @classmethod
    def from_config(cls, config: X402Config) -> Policy:
        return cls(
            pay_hosts=tuple(config.pay_hosts),
            networks=config.caip2_networks,
            assets=frozenset(config.assets),
            pay_to=frozenset(config.pay_to) if config.pay_to is not None else None,
            per_request=config.limits.per_request,
        )


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """fnmatch, case-insensitive, on the bare host (no port)."""
    host = host.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in patterns)


def token_units(amount: int, decimals: int) -> Decimal:
    """Exact: ``amount`` base units as token units."""
    return Decimal(amount).scaleb(-decimals)


def unacceptable(
    req: Requirement,
    policy: Policy,
    decimals: Mapping[str, int],
    payer: str | None = None,
) -> tuple[str, str] | None:
    """(rule, reason) when ``req`` must not be signed, else ``None``."""
    if req.scheme != SCHEME_EXACT:
        return "scheme", f"scheme {req.scheme[:32]!r} is not 'exact'"
    caip2 = normalize_network(req.network)
    if caip2 is None or caip2 not in policy.networks:
        return "network", f"network {req.network[:64]!r} is not allowed"
    if req.asset not in policy.assets:
        return "asset", f"asset {req.asset} is not allowed"
    if policy.pay_to is not None and req.pay_to not in policy.pay_to:
        return "pay_to", f"payTo {req.pay_to} is not in the allowlist"
    if payer is not None and req.fee_payer == payer:
        return "fee_payer", "feePayer is the paying wallet itself"
    dec = decimals.get(req.asset)
    if dec is None:
        return "decimals", f"decimals of mint {req.asset} are unknown"
    cost = token_units(req.amount, dec)
    if cost > policy.per_request:
        return "per_request", f"amount {cost} exceeds per_request limit {policy.per_request}"
    return None


def select(
    parsed: ParsedRequirements,
    *,
    host: str,
    policy: Policy,
    decimals: Mapping[str, int],
    payer: str | None = None,
) -> Requirement | Refusal:
    """The cheapest requirement that passes every rule, or a ``Refusal`` naming what failed."""
    if not host_allowed(host, policy.pay_hosts):
        return Refusal("host", f"host {host[:128]} is not in x402.pay_hosts")
    best: Requirement | None = None
    best_cost = Decimal(0)
    problems: list[tuple[int, str, str]] = [(i, "malformed", r) for i, r in parsed.rejected]
    for req in parsed.accepts:
        failed = unacceptable(req, policy, decimals, payer)
        if failed is not None:
            problems.append((req.index, *failed))
            continue
        cost = token_units(req.amount, decimals[req.asset])
        if best is None or cost < best_cost:
            best, best_cost = req, cost
    if best is not None:
        return best
    problems.sort()
    rules = {rule for _, rule, _ in problems}
    rule = rules.pop() if len(rules) == 1 else "no_acceptable_requirement"
    detail = "; ".join(f"#{i}: {why}" for i, _, why in problems[:8])
    return Refusal(rule, f"no acceptable x402 requirement ({detail})")
