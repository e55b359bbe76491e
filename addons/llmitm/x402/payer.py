"""The composition the mitmproxy addon calls: parse -> select -> reserve -> sign -> header.

Typical use from an addon (all methods are ``async`` and never block the event loop: SQLite
runs in ``asyncio.to_thread``, RPC over ``httpx.AsyncClient``, signing is ~0.1 ms in-line)::

    payer, warnings = X402Payer.from_config(config.x402)          # in configure/running
    # request hook, presign on:
    prep = await payer.prepare_presigned(url=..., method=..., session=...)
    if prep: flow.request.headers[prep.header_name] = prep.header_value
    # response(headers) hook, a 402:
    result = await payer.prepare_payment(url=..., method=..., session=..., status=402,
                                         headers=resp.headers, body=resp.content)
    if isinstance(result, Refusal): resp.headers["X-Llmitm-Payment-Refused"] = result.header_value
    else: resend the request with result.header_name: result.header_value
    # the paid response:
    await payer.record_outcome(prep, status=resp.status_code, headers=resp.headers)
    # the paid request failed at the transport level:
    await payer.record_error(prep, "connection reset")

At most one payment per client request, except that a presigned request answered with a 402
may be paid once more from that 402 (``presign.PaymentAttempt`` on ``flow.metadata``; call
``forget_route`` first). A 402 to a paid request is recorded ``failed`` (not counted) and
goes back to the client with ``X-Llmitm-Payment-Refused``.

The ledger row is committed (``reserved``) before ``prepare_*`` returns, i.e. before the paid
request can leave.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from .chain import ChainClient, ChainError, MintInfo
from .config import X402Config
from .ledger import Ledger, Reservation, SpendLimits, SqliteLedger, fmt_tokens
from .models import (
    ParsedRequirements,
    PaymentRefused,
    Requirement,
    encode_payment_header,
    parse_requirements,
    parse_settlement,
)
from .policy import Policy, Refusal, host_allowed, select
from .presign import BLOCKHASH_HINT_MAX_AGE, PresignCache, RouteKey
from .solana import build_payment_transaction, encode_transaction
from .wallet import Wallet, load_wallet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedPayment:
    """A signed payment ready to go out, already reserved in the ledger."""

    header_name: str  # PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1)
    header_value: str = field(repr=False)
    payment_id: str
    requirement: Requirement
    decimals: int
    presigned: bool

    def metadata(self) -> dict[str, Any]:
        """Plain data for ``flow.metadata`` and logs (no header value, no secret)."""
        req = self.requirement
        return {
            "payment_id": self.payment_id,
            "version": req.version,
            "network": req.network,
            "asset": req.asset,
            "pay_to": req.pay_to,
            "amount": str(req.amount),
            "amount_tokens": fmt_tokens(Decimal(req.amount).scaleb(-self.decimals)),
            "presigned": self.presigned,
        }


class X402Payer:
    def __init__(
        self,
        config: X402Config,
        *,
        wallet: Wallet,
        ledger: Ledger,
        chain: ChainClient,
        presign: PresignCache | None = None,
    ) -> None:
        self.config = config
        self.wallet = wallet
        self.ledger = ledger
        self.chain = chain
        self.policy = Policy.from_config(config)
        self.limits = SpendLimits.from_config(config.limits)
        self.presign = presign if presign is not None else (
            PresignCache() if config.presign else None
        )

    @classmethod
    def from_config(cls, config: X402Config) -> tuple[X402Payer, list[str]]:
        """Load the wallet, open the ledger (recovering stale rows), create the RPC client.
        Returns the payer and warnings to log. Raises ``WalletError`` (never quoting the secret)
        or ``sqlite3.Error``."""
        wallet, warnings = load_wallet(config.wallet)
        ledger = SqliteLedger(config.ledger)
        if ledger.recovered:
            warnings.append(
                f"x402 ledger: {ledger.recovered} payment(s) left in flight by an earlier run "
                "are now 'unknown' (still counted against the limits)"
            )
        chain = ChainClient(config.rpc_url, timeout=config.rpc_timeout_seconds)
        return cls(config, wallet=wallet, ledger=ledger, chain=chain), warnings

    async def aclose(self) -> None:
        await self.chain.aclose()
        await asyncio.to_thread(self.ledger.close)

    # --- helpers ------------------------------------------------------------------------------

    def is_pay_host(self, host: str) -> bool:
        return host_allowed(host, self.policy.pay_hosts)

    async def _mint_infos(self, parsed: ParsedRequirements) -> dict[str, MintInfo]:
        assets = sorted({r.asset for r in parsed.accepts if r.asset in self.policy.assets})
        infos: dict[str, MintInfo] = {}
        results = await asyncio.gather(
            *(self.chain.mint_info(a) for a in assets), return_exceptions=True
        )
        for asset, result in zip(assets, results, strict=True):
            if isinstance(result, MintInfo):
                infos[asset] = result
            elif isinstance(result, ChainError):
                log.warning("x402: cannot read mint %s: %s", asset, result)
            elif isinstance(result, BaseException):
                raise result
        return infos

    async def _pay(
        self,
        parsed: ParsedRequirements,
        *,
        url: str,
        session: str,
        presigned: bool,
        hint_usable: bool = True,
    ) -> PreparedPayment | Refusal:
        host = urlsplit(url).hostname or ""
        if not self.is_pay_host(host):
            return Refusal("host", f"host {host[:128]} is not in x402.pay_hosts")
        infos = await self._mint_infos(parsed)
        decimals = {asset: info.decimals for asset, info in infos.items()}
        chosen = select(
            parsed, host=host, policy=self.policy, decimals=decimals, payer=self.wallet.address
        )
        if isinstance(chosen, Refusal):
            return chosen
        info = infos[chosen.asset]
        try:
            blockhash = (
                chosen.recent_blockhash
                if chosen.recent_blockhash and hint_usable
                else await self.chain.latest_blockhash()
            )
        except ChainError as err:
            return Refusal("chain", f"cannot get a recent blockhash: {err}")
        try:
            reservation = await asyncio.to_thread(
                self.ledger.reserve,
                session=session,
                host=host,
                resource=url,
                network=chosen.network,
                asset=chosen.asset,
                pay_to=chosen.pay_to,
                amount=chosen.amount,
                decimals=info.decimals,
                limits=self.limits,
            )
        except sqlite3.Error as err:
            log.error("x402 ledger: reserve failed: %s", err)
            return Refusal("ledger", "the payment ledger is unavailable")
        if isinstance(reservation, Refusal):
            return reservation
        try:
            name, value = self.sign(parsed, chosen, info, blockhash)
        except Exception as err:  # nothing left the process: the reservation is released
            await self._ledger(self.ledger.mark_failed, reservation.id, f"signing: {err}")
            return Refusal("sign", f"could not build the payment: {err}")
        return self._prepared(name, value, reservation, chosen, info, presigned)

    async def _ledger(self, fn: Callable[..., bool], *args: str | None) -> bool:
        """An outcome update in a worker thread. A failure is logged, not raised: the row then
        stays in a counted state, which can only over-count."""
        try:
            return await asyncio.to_thread(fn, *args)
        except sqlite3.Error as err:
            log.error("x402 ledger: %s failed: %s", getattr(fn, "__name__", "update"), err)
            return False

    def sign(
        self, parsed: ParsedRequirements, chosen: Requirement, info: MintInfo, blockhash: str
    ) -> tuple[str, str]:
        """Build, sign and encode: (header name, header value). Pure CPU, ~0.1-0.2 ms."""
        tx = build_payment_transaction(
            owner=self.wallet.pubkey,
            sign=self.wallet.sign_message,
            fee_payer=chosen.fee_payer,
            mint=chosen.asset,
            pay_to=chosen.pay_to,
            amount=chosen.amount,
            decimals=info.decimals,
            token_program=info.token_program,
            blockhash=blockhash,
            memo=chosen.memo,
        )
        return encode_payment_header(parsed, chosen, encode_transaction(tx))

    @staticmethod
    def _prepared(
        name: str,
        value: str,
        reservation: Reservation,
        chosen: Requirement,
        info: MintInfo,
        presigned: bool,
    ) -> PreparedPayment:
        return PreparedPayment(
            header_name=name,
            header_value=value,
            payment_id=reservation.id,
            requirement=chosen,
            decimals=info.decimals,
            presigned=presigned,
        )

    # --- the public entry points --------------------------------------------------------------

    async def prepare_payment(
        self,
        *,
        url: str,
        method: str,
        session: str,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> PreparedPayment | Refusal:
        """Answer a 402: the payment header to resend the request with, or why not."""
        host = urlsplit(url).hostname or ""
        if not self.is_pay_host(host):
            return Refusal("host", f"host {host[:128]} is not in x402.pay_hosts")
        try:
            parsed = parse_requirements(status, headers, body)
        except PaymentRefused as refused:
            return Refusal("malformed", f"malformed x402 requirements: {refused.reason}")
        result = await self._pay(parsed, url=url, session=session, presigned=False)
        if self.presign is not None and not isinstance(result, Refusal):
            self.presign.remember(RouteKey.from_url(method, url), parsed)
        return result

    async def prepare_presigned(
        self, *, url: str, method: str, session: str
    ) -> PreparedPayment | None:
        """With ``presign``: a payment for a request to a route whose requirements are cached
        and still valid, so it can be paid before it leaves; ``None`` otherwise (send it
        unpaid; a refusal here is only logged)."""
        if self.presign is None:
            return None
        key = RouteKey.from_url(method, url)
        entry = self.presign.lookup(key)
        if entry is None:
            return None
        result = await self._pay(
            entry.parsed,
            url=url,
            session=session,
            presigned=True,
            hint_usable=self.presign.age(entry) < BLOCKHASH_HINT_MAX_AGE,
        )
        if isinstance(result, Refusal):
            log.info("x402: not presigning %s %s: %s", method, url.split("?", 1)[0], result.reason)
            return None
        return result

    def forget_route(self, *, url: str, method: str) -> None:
        """Drop cached requirements (call when a presigned request still got a 402)."""
        if self.presign is not None:
            self.presign.forget(RouteKey.from_url(method, url))

    async def mark_sent(self, prep: PreparedPayment) -> None:
        """Optional: the paid request is leaving now (``reserved`` -> ``sent``)."""
        await self._ledger(self.ledger.mark_sent, prep.payment_id)

    async def record_outcome(
        self, prep: PreparedPayment, *, status: int, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        """Record what the paid request's response says about the payment; returns plain data
        for ``flow.metadata``: ``state`` (settled/failed/unknown), ``tx_signature``, ``reason``.

        - receipt ``success: true``: settled with its transaction signature;
        - receipt ``success: false``: failed (not counted);
        - 402 without a receipt: failed (the seller did not accept the payment);
        - anything else without a receipt, or a malformed receipt: unknown (still counted).
        """
        outcome: dict[str, Any] = {"payment_id": prep.payment_id, "status": status}
        try:
            receipt = parse_settlement(headers)
        except PaymentRefused as bad:
            outcome.update(state="unknown", reason=bad.reason)
        else:
            if receipt is not None and receipt.success:
                outcome.update(
                    state="settled", tx_signature=receipt.transaction, payer=receipt.payer
                )
            elif receipt is not None:
                why = receipt.error_reason or "settlement failed"
                outcome.update(state="failed", reason=f"settlement failed: {why}"[:300])
            elif status == 402:
                outcome.update(state="failed", reason="402 again: the payment was not accepted")
            else:
                outcome.update(state="unknown", reason=f"HTTP {status} without a payment receipt")
        state = outcome["state"]
        if state == "settled":
            await self._ledger(
                self.ledger.mark_settled,
                prep.payment_id,
                outcome["tx_signature"],
                outcome.get("payer"),
            )
        elif state == "failed":
            await self._ledger(self.ledger.mark_failed, prep.payment_id, outcome["reason"])
        else:
            await self._ledger(self.ledger.mark_unknown, prep.payment_id, outcome["reason"])
        return outcome

    async def record_error(self, prep: PreparedPayment, reason: str) -> None:
        """The paid request failed in transport: the payment may or may not have arrived."""
        await self._ledger(self.ledger.mark_unknown, prep.payment_id, reason)

    async def release(self, prep: PreparedPayment, reason: str) -> None:
        """The paid request was never sent (e.g. the client went away first): not counted."""
        await self._ledger(self.ledger.mark_failed, prep.payment_id, reason)

    async def list_payments(self, **filters: Any) -> list[dict[str, Any]]:
        """For ``GET /payments``: plain dicts, newest first, no secrets."""
        return await asyncio.to_thread(lambda: self.ledger.list_payments(**filters))
