"""Addon: x402 payments on Solana (SPEC §4), thin glue over ``llmitm.x402.X402Payer``.

Two ways a request gets paid, both at most once per client request (``PaymentAttempt``):

- **presign** (one upstream round trip): in ``request``, a request to a route whose x402
  requirements are cached is signed before it leaves.
- **402 -> 307 -> paid resend**: a 402 with acceptable requirements from a pay host is paid
  (ledger row committed first) and the client gets ``307 Temporary Redirect`` to the same path
  plus a one-time ``llmitm-pay=<token>`` query parameter. HTTP clients (httpx in the openai and
  anthropic SDKs, undici, reqwest, ``curl -L``) re-send method and body on a 307 by themselves;
  the addon strips the parameter, attaches the payment header and the request goes upstream
  again. The paid response is the upstream's own, so a streamed one stays streamed (retrying
  from inside mitmproxy would have to buffer it). Trade-off: the 307 is visible to the client
  (one extra local hop, no extra upstream one) and a client that does not follow redirects
  sees it; its payment is released after ``REDIRECT_TTL`` and never counted.

Why a forged redirect cannot buy anything: a token is 192 random bits, known only to the
client that got the 307, used once, and valid only for the same session, method, URL and body
(SHA-256) within its lifetime. A request with an unknown, reused, expired or mismatching token is
sent on unpaid and is never paid for (its 402 comes back with ``X-Llmitm-Payment-Refused``), so
no redirect can lead to another redirect.

Outcomes come from ``PAYMENT-RESPONSE``/``X-PAYMENT-RESPONSE`` in ``responseheaders``, before a
stream starts. A paid request that never reached a server (the gateway answered it itself) is
released; one whose transport failed is ``unknown`` (still counted). Header values never reach
logs, flow metadata, comments or errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import exceptions, http

from glue import PAYMENTS_ADDON_NAME, add_comment, current_config, for_control_host
from llmitm import flowmeta
from llmitm.x402 import (
    PAYMENT_SIGNATURE_HEADER,
    REFUSED_HEADER,
    X_PAYMENT_HEADER,
    PaymentAttempt,
    PreparedPayment,
    Refusal,
    X402Config,
    X402Payer,
)

logger = logging.getLogger(__name__)

PAY_PARAM = "llmitm-pay"
#: seconds a client has to follow the 307 before its payment is released (never sent)
REDIRECT_TTL = 30.0
SWEEP_SECONDS = 2.0
#: a retired payer (after a config change) is closed once nothing uses it, or after this long
RETIRE_GRACE = 600.0


class _QuietRpcLog(logging.Filter):
    """httpx logs every request URL at INFO; an RPC URL often carries an API key, so the
    payer's own RPC calls are left out of the log."""

    def __init__(self) -> None:
        super().__init__()
        self.origins: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.origins or not isinstance(record.args, tuple):
            return True
        return not any(str(arg).startswith(origin) for arg in record.args for origin in self.origins)


_RPC_LOG_FILTER = _QuietRpcLog()


def _rpc_origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def split_pay_param(path: str) -> tuple[str, list[str]]:
    """The path without any ``llmitm-pay`` query parameter, and the values that were there.
    Every other byte of the path stays as it was."""
    base, sep, query = path.partition("?")
    if not sep or PAY_PARAM not in query:
        return path, []
    kept, tokens = [], []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if name == PAY_PARAM:
            tokens.append(value if eq else "")
        else:
            kept.append(part)
    return (f"{base}?{'&'.join(kept)}" if kept else base), tokens


def with_pay_param(path: str, token: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}{PAY_PARAM}={token}"


class _Pending:
    """A payment made for a 402, waiting for the client to follow the 307.

    (Plain classes, not dataclasses: mitmproxy runs an ``-s`` script without registering it in
    ``sys.modules``, where ``dataclasses`` looks string annotations up.)"""

    __slots__ = ("attempt", "body_sha256", "expires", "method", "payer", "prep", "session", "url")

    def __init__(self, *, payer: X402Payer, prep: PreparedPayment, session: str, method: str,
                 url: str, body_sha256: str, attempt: PaymentAttempt, expires: float) -> None:
        self.payer, self.prep, self.session, self.method = payer, prep, session, method
        self.url, self.body_sha256, self.attempt, self.expires = url, body_sha256, attempt, expires


class _FlowState:
    """What this addon knows about one flow (kept off ``flow.metadata``: it holds live objects)."""

    __slots__ = ("attempt", "body_sha256", "client_paid", "method", "no_pay", "path", "payer",
                 "prep", "recorded", "session", "url")

    def __init__(self, *, session: str, method: str, url: str, path: str,
                 body_sha256: str) -> None:
        self.session, self.method = session, method
        self.url = url  # as seen by this addon, without the pay parameter
        self.path, self.body_sha256 = path, body_sha256
        self.attempt = PaymentAttempt()
        self.payer: X402Payer | None = None
        self.prep: PreparedPayment | None = None
        self.recorded = False
        self.no_pay: str | None = None  # why a 402 to this request must not be paid
        self.client_paid = False


def _summary(prep: PreparedPayment) -> str:
    req = prep.requirement
    return f"{prep.metadata()['amount_tokens']} of {req.asset[:8]}… to {req.pay_to[:8]}… on {req.network}"


class Payments:
    name = PAYMENTS_ADDON_NAME

    def __init__(self) -> None:
        self.payer: X402Payer | None = None
        self._config: X402Config | None = None
        self._config_seen: object = None  # identity of the last x402 section looked at
        self._unavailable: str | None = None  # why x402 is configured but not usable
        self._lock: asyncio.Lock | None = None
        self._pending: dict[str, _Pending] = {}
        self._flows: dict[str, _FlowState] = {}
        self._retired: list[tuple[X402Payer, float]] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the payer and config reloads ---------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if "llmitm_config" not in updated:
            return
        config = current_config().x402
        if config == self._config and config is not None and self.payer is not None:
            self._config_seen = config
            return
        try:
            payer = self._build(config)
        except _BuildError as err:
            raise exceptions.OptionsError(f"x402: {err}") from None
        self._install(config, payer)

    @staticmethod
    def _build(config: X402Config | None) -> X402Payer | None:
        if config is None:
            return None
        httpx_log = logging.getLogger("httpx")
        if _RPC_LOG_FILTER not in httpx_log.filters:
            httpx_log.addFilter(_RPC_LOG_FILTER)
        _RPC_LOG_FILTER.origins.add(_rpc_origin(config.rpc_url))
        try:
            payer, warnings = X402Payer.from_config(config)
        except Exception as err:  # WalletError never quotes the secret; others name files only
            raise _BuildError(str(err) or type(err).__name__) from None
        for warning in warnings:
            logger.warning("llmitm: %s", warning)
        logger.info(
            "llmitm: x402 payments on for %s from wallet %s (presign %s, ledger %s)",
            ", ".join(config.pay_hosts) or "no hosts", payer.wallet.address,
            "on" if config.presign else "off", config.ledger,
        )
        return payer

    def _install(self, config: X402Config | None, payer: X402Payer | None,
                 unavailable: str | None = None) -> None:
        old = self.payer
        self.payer, self._config, self._config_seen = payer, config, config
        self._unavailable = unavailable
        if old is not None and old is not payer:
            self._retired.append((old, time.monotonic()))
            self._close_retired()

    async def current_payer(self) -> X402Payer | None:
        """The payer for the configuration in force now; rebuilt when the ``x402`` section
        changed (in a worker thread: it opens files)."""
        config = current_config().x402
        if config is self._config_seen:
            return self.payer
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            config = current_config().x402
            if config is self._config_seen:
                return self.payer
            if config == self._config and (config is None or self.payer is not None):
                self._config_seen = config
                return self.payer
            try:
                payer = await asyncio.to_thread(self._build, config)
            except _BuildError as err:
                # fail closed: never keep paying under a policy the user has replaced
                logger.error("llmitm: x402 disabled, the new x402 section cannot be used: %s", err)
                self._install(config, None, f"x402 is not available: {err}")
                return None
            if config is None and self.payer is not None:
                logger.info("llmitm: x402 payments off (no x402 section any more)")
            self._install(config, payer)
            return payer

    def _in_use(self, payer: X402Payer) -> bool:
        return any(p.payer is payer for p in self._pending.values()) or any(
            s.payer is payer and not s.recorded for s in self._flows.values()
        )

    def _close_retired(self) -> None:
        keep = []
        now = time.monotonic()
        for payer, since in self._retired:
            if not self._in_use(payer) or now - since > RETIRE_GRACE:
                self._spawn(payer.aclose())
            else:
                keep.append((payer, since))
        self._retired = keep

    def _spawn(self, coro: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- lifecycle ----------------------------------------------------------------------------

    def running(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def done(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        pending, self._pending = self._pending, {}
        for entry in pending.values():  # signed but never sent: not counted
            await entry.payer.release(entry.prep, "gateway stopped before the client re-sent")
        # payments in flight stay 'sent'; the next start marks them 'unknown' (still counted)
        payers = {id(p): p for p, _ in self._retired}
        if self.payer is not None:
            payers[id(self.payer)] = self.payer
        self._retired = []
        for payer in payers.values():
            with contextlib.suppress(Exception):
                await payer.aclose()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            await self.sweep()

    async def sweep(self, now: float | None = None) -> int:
        """Release payments whose client did not follow the 307 in time."""
        now = time.monotonic() if now is None else now
        expired = [t for t, p in self._pending.items() if p.expires <= now]
        for token in expired:
            entry = self._pending.pop(token, None)
            if entry is not None:
                logger.info("llmitm: x402 payment %s released: the client did not follow the 307",
                            entry.prep.payment_id)
                await entry.payer.release(entry.prep, "the client did not follow the payment redirect")
        self._close_retired()
        return len(expired)

    # --- the control API ----------------------------------------------------------------------

    async def list_payments(self, session: str | None, limit: int) -> list[dict[str, Any]]:
        payer = await self.current_payer()
        if payer is None:
            return []
        return await payer.list_payments(session=session, limit=limit)

    # --- hooks --------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or for_control_host(flow):
            return
        request = flow.request
        path, tokens = split_pay_param(request.path)
        if tokens:
            request.path = path  # never forwarded, whatever happens next
        # the payer in force, without a coroutine in the common case that nothing changed
        payer = (self.payer if current_config().x402 is self._config_seen
                 else await self.current_payer())
        if payer is None and not tokens and self._unavailable is None:
            return  # x402 is off
        session = flow.metadata.get(flowmeta.SESSION)
        # the body binds a redirect token to its request; only a pay host can get one
        bound = bool(tokens) or (payer is not None and payer.is_pay_host(request.host))
        state = _FlowState(
            session=session if isinstance(session, str) else "default",
            method=request.method,
            url=request.url,
            path=path,
            body_sha256=hashlib.sha256(request.raw_content or b"").hexdigest() if bound else "",
        )
        self._flows[flow.id] = state
        client_paid = PAYMENT_SIGNATURE_HEADER in request.headers or X_PAYMENT_HEADER in request.headers
        if client_paid and not tokens:  # the client pays for itself: stay out of its way
            state.client_paid = True
            flow.metadata[flowmeta.PAYMENT] = {"decision": "client_paid"}
            return
        if tokens:
            await self._resend(flow, state, tokens)
        elif payer is not None and payer.presign is not None and payer.is_pay_host(request.host):
            prep = await payer.prepare_presigned(url=state.url, method=state.method,
                                                 session=state.session)
            if prep is not None:
                state.attempt.record(presigned=True)
                await self._attach(flow, state, payer, prep, "presigned")
                add_comment(flow, f"llmitm: x402 presigned {_summary(prep)} "
                                  f"(payment {prep.payment_id})")

    async def _resend(self, flow: http.HTTPFlow, state: _FlowState, tokens: list[str]) -> None:
        """The client followed our 307: attach the payment its token stands for, if it is real."""
        entry = self._pending.pop(tokens[0], None) if len(tokens) == 1 else None
        problem = None
        if entry is None:
            problem = "unknown, expired or already used payment redirect token"
        elif entry.expires <= time.monotonic():
            problem = "expired payment redirect token"
        elif (entry.session, entry.method, entry.url, entry.body_sha256) != (
                state.session, state.method, state.url, state.body_sha256):
            problem = "payment redirect token does not match this request"
        if problem is not None or entry is None:
            state.no_pay = problem
            if entry is not None:
                await entry.payer.release(entry.prep, problem or "unused")
            flow.metadata[flowmeta.PAYMENT] = {"decision": "no_pay", "reason": problem}
            add_comment(flow, f"llmitm: x402 not paying this request: {problem}")
            logger.warning("llmitm: x402 %s (%s %s)", problem, state.method,
                           state.url.split("?", 1)[0])  # a query may carry a key
            return
        state.attempt = entry.attempt
        await self._attach(flow, state, entry.payer, entry.prep, "paid")
        add_comment(flow, f"llmitm: x402 re-sent with payment {entry.prep.payment_id}")

    async def _attach(self, flow: http.HTTPFlow, state: _FlowState, payer: X402Payer,
                      prep: PreparedPayment, decision: str) -> None:
        flow.request.headers[prep.header_name] = prep.header_value
        state.payer, state.prep = payer, prep
        flow.metadata[flowmeta.PAYMENT] = {
            "decision": decision,
            "attempt": state.attempt.as_dict(),
            "payment": {**prep.metadata(), "state": "sent"},
        }
        # The row was committed ('reserved', counted) before this point; 'sent' is only a finer
        # state, so its write (one more fsync) does not hold the request back.
        self._spawn(payer.mark_sent(prep))
        logger.info("llmitm: x402 %s payment %s: %s", decision, prep.payment_id, _summary(prep))

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self._flows.get(flow.id)
        response = flow.response
        if state is None or state.prep is None or state.payer is None or state.recorded \
                or response is None:
            return
        state.recorded = True
        prep, payer = state.prep, state.payer
        meta = flow.metadata.get(flowmeta.PAYMENT) or {}
        if flow.metadata.get(flowmeta.ANSWERED_BY_GATEWAY) or flow.server_conn.timestamp_tcp_setup is None:
            # the gateway answered itself (guard 403, probe 502, ...): the payment never left
            await payer.release(prep, f"not sent: the gateway answered {response.status_code} itself")
            meta.setdefault("payment", {})["state"] = "released"
            add_comment(flow, f"llmitm: x402 payment {prep.payment_id} released (never sent)")
        else:
            outcome = await payer.record_outcome(prep, status=response.status_code,
                                                 headers=response.headers)
            meta.setdefault("payment", {}).update(
                {k: v for k, v in outcome.items() if k in ("state", "tx_signature", "reason")})
            detail = outcome.get("tx_signature") or outcome.get("reason") or ""
            add_comment(flow, f"llmitm: x402 payment {prep.payment_id} {outcome['state']}"
                              + (f": {detail}" if detail else ""))
            logger.info("llmitm: x402 payment %s %s", prep.payment_id, outcome["state"])
        flow.metadata[flowmeta.PAYMENT] = meta

    async def response(self, flow: http.HTTPFlow) -> None:
        state = self._flows.pop(flow.id, None)
        response = flow.response
        if response is None or response.status_code != 402:
            return
        if state is None:
            # x402 off, or a request this addon never saw (answered before it): unchanged
            return
        if state.client_paid:
            return
        payer = await self.current_payer()
        if state.no_pay is not None:
            return self._refuse(flow, Refusal("redirect", state.no_pay))
        if payer is None:
            return self._refuse(flow, Refusal("unavailable", self._unavailable or "x402 is off"))
        if not state.attempt.may_pay_after_402():
            why = (flow.metadata.get(flowmeta.PAYMENT) or {}).get("payment", {}).get("reason")
            return self._refuse(flow, Refusal(
                "already_paid", "this request was already paid once and got 402 again"
                + (f" ({why})" if why else "") + "; llmitm pays at most once per request"))
        if response.stream:  # already streamed to the client: nothing can replace it now
            return
        if state.attempt.payments:  # a presigned payment was not accepted: terms changed
            payer.forget_route(url=state.url, method=state.method)
        try:
            body = response.content or b""
        except ValueError:
            body = response.raw_content or b""
        result = await payer.prepare_payment(url=state.url, method=state.method,
                                             session=state.session, status=402,
                                             headers=response.headers, body=body)
        if isinstance(result, Refusal):
            return self._refuse(flow, result)
        state.attempt.record(presigned=False)
        token = secrets.token_urlsafe(24)
        self._pending[token] = _Pending(
            payer=payer, prep=result, session=state.session, method=state.method,
            url=state.url, body_sha256=state.body_sha256, attempt=state.attempt,
            expires=time.monotonic() + REDIRECT_TTL,
        )
        flow.response = http.Response.make(
            307,
            json.dumps({"llmitm": "x402 payment signed; re-send this request to the Location "
                                  "to complete it (HTTP clients do this on their own)",
                        "payment_id": result.payment_id}).encode(),
            {"Location": with_pay_param(state.path, token), "Cache-Control": "no-store",
             "content-type": "application/json", "X-Llmitm-Payment": "resend"},
        )
        previous = flow.metadata.get(flowmeta.PAYMENT) or {}
        flow.metadata[flowmeta.PAYMENT] = {
            "decision": "redirect",
            "attempt": state.attempt.as_dict(),
            "payment": {**result.metadata(), "state": "reserved"},
            **({"presigned_payment": previous["payment"]} if "payment" in previous else {}),
        }
        add_comment(flow, f"llmitm: x402 402 answered: signed {_summary(result)} "
                          f"(payment {result.payment_id}); 307 so the client re-sends it paid")
        logger.info("llmitm: x402 signed payment %s for a 402: %s", result.payment_id,
                    _summary(result))

    @staticmethod
    def _refuse(flow: http.HTTPFlow, refusal: Refusal) -> None:
        assert flow.response is not None
        flow.response.headers[REFUSED_HEADER] = refusal.header_value
        meta = dict(flow.metadata.get(flowmeta.PAYMENT) or {})
        meta.update(decision="refused", refused={"rule": refusal.rule, "reason": refusal.reason})
        flow.metadata[flowmeta.PAYMENT] = meta
        add_comment(flow, f"llmitm: x402 not paid: {refusal.header_value}")
        logger.info("llmitm: x402 refused %s: %s", flow.request.pretty_url.split("?", 1)[0],
                    refusal.header_value)

    async def error(self, flow: http.HTTPFlow) -> None:
        state = self._flows.pop(flow.id, None)
        if state is None or state.prep is None or state.payer is None or state.recorded:
            return
        state.recorded = True
        reason = (flow.error.msg if flow.error else "transport error")[:200]
        meta = flow.metadata.get(flowmeta.PAYMENT) or {}
        if flow.metadata.get(flowmeta.ANSWERED_BY_GATEWAY) or flow.server_conn.timestamp_tcp_setup is None:
            await state.payer.release(state.prep, f"not sent: {reason}")
            meta.setdefault("payment", {})["state"] = "released"
        else:  # it may have arrived: keep counting it
            await state.payer.record_error(state.prep, reason)
            meta.setdefault("payment", {}).update(state="unknown", reason=reason)
        flow.metadata[flowmeta.PAYMENT] = meta
        add_comment(flow, f"llmitm: x402 payment {state.prep.payment_id} "
                          f"{meta['payment']['state']}: {reason}")


class _BuildError(Exception):
    pass


addons = [Payments()]
