"""Addon: ``limits.concurrency`` (SPEC §10): at most N requests in flight to matching hosts.

``limits.concurrency`` maps fnmatch host patterns (case-insensitive, bare host) to N. A request
to a host that matches takes a slot of every matching pattern (in config order, so two waiting
requests can never hold each other's slots); beyond N it waits, first come first served. A
request still waiting after ``limits.queue_timeout`` seconds gets a 503 JSON error in the
provider's shape and nothing goes upstream.

Where it waits: in ``requestheaders``, before any addon's ``request`` hook runs, so a queued
request holds no payment, no injected header and no upstream connection while it waits (a
presigned x402 payment signed before a long wait could go stale). A slot is held until the
flow's ``response`` hook, which for a streamed response runs when the stream has ended, or its
``error`` hook (killed, client or upstream gone); a flow dropped without either releases its
slots when it is garbage-collected. A config reload changes N at once: more room wakes waiters,
less room lets the excess finish and admits no new request until it is below N again.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
import time
import weakref

from mitmproxy import http

from glue import CONTROL_HOST, answer_error, current_config
from llmitm import flowmeta
from llmitm.config import GatewayConfig
from llmitm.providers import ProviderTable

logger = logging.getLogger(__name__)



class Limiter:
    """A FIFO counting semaphore whose capacity can change while it is in use."""

    def __init__(self, pattern: str, capacity: int) -> None:
        self.pattern = pattern
        self.capacity = capacity
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._wake()

    async def acquire(self, timeout: float) -> bool:
        """Take a slot within ``timeout`` seconds; False when the time ran out."""
        if self.in_flight < self.capacity and not self.waiting:
            self.in_flight += 1
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return True  # granted in the same instant: keep it
            waiter.cancel()
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            else:
                waiter.cancel()
            raise
        finally:
            self._drop_done()
        return True

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def _drop_done(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()


class _Held:
    """The slots one flow holds; released exactly once."""

    __slots__ = ("__weakref__", "limiters", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.limiters: list[Limiter] = []
        self.loop = loop

    def release(self) -> None:
        limiters, self.limiters = self.limiters, []
        for limiter in limiters:
            limiter.release()

    def release_threadsafe(self) -> None:
        """For the garbage-collection safety net, which may run in any thread."""
        if self.limiters and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.release)


class Concurrency:
    name = "llmitm-concurrency"

    def __init__(self) -> None:
        self.limiters: dict[str, Limiter] = {}
        self._config: GatewayConfig | None = None
        self._providers = ProviderTable()
        # flow id -> slots; weak so a flow's GC safety net also drops its entry
        self._held: weakref.WeakValueDictionary[str, _Held] = weakref.WeakValueDictionary()

    def _sync(self) -> GatewayConfig:
        config = current_config()
        if config is not self._config:
            wanted = config.limits.concurrency
            for pattern, limit in wanted.items():
                key = pattern.lower()
                if key in self.limiters:
                    self.limiters[key].set_capacity(limit)
                else:
                    self.limiters[key] = Limiter(key, limit)
            for key in [k for k in self.limiters if k not in {p.lower() for p in wanted}]:
                # unlimited now: let everyone waiting through; holders release into it harmlessly
                self.limiters.pop(key).set_capacity(1 << 30)
            self._providers = ProviderTable(config.providers)
            self._config = config
        return config

    def matching(self, host: str) -> list[Limiter]:
        host = host.lower().rstrip(".")
        return [lim for pattern, lim in self.limiters.items() if fnmatch.fnmatchcase(host, pattern)]

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.request.method == "CONNECT":
            return
        config = self._sync()
        if not self.limiters:
            return
        host = flow.request.host
        if host.lower() == CONTROL_HOST:
            return
        limiters = self.matching(host)
        if not limiters:
            return
        held = _Held(asyncio.get_running_loop())
        self._held[flow.id] = held
        weakref.finalize(flow, held.release_threadsafe)
        timeout = config.limits.queue_timeout
        deadline = time.monotonic() + timeout
        for limiter in limiters:
            ok = await limiter.acquire(max(0.0, deadline - time.monotonic()))
            if not ok:
                held.release()
                self._held.pop(flow.id, None)
                self._answer_timeout(flow, host, limiter, timeout)
                return
            held.limiters.append(limiter)

    def _answer_timeout(self, flow: http.HTTPFlow, host: str, limiter: Limiter,
                        timeout: float) -> None:
        provider = self._providers.match(flow.request.host)
        if provider is not None:  # Identify has not run yet: pick the error shape here
            flow.metadata[flowmeta.PROVIDER_STYLE] = provider.style
        logger.warning("llmitm: %s waited %.1fs for a slot of limits.concurrency %r (%d in flight)",
                       host, timeout, limiter.pattern, limiter.in_flight)
        answer_error(
            flow, 503,
            f"llmitm: too many requests in flight to {host}: limits.concurrency "
            f"{limiter.pattern!r} allows {limiter.capacity} at a time and this request waited "
            f"{timeout:g}s (limits.queue_timeout) without a free slot. Nothing was sent "
            "upstream; retry later, or raise the limit or the queue timeout.",
            "concurrency_queue_timeout",
            {"Retry-After": "1"},
        )

    def _release(self, flow: http.HTTPFlow) -> None:
        held = self._held.pop(flow.id, None)
        if held is not None:
            held.release()

    def response(self, flow: http.HTTPFlow) -> None:
        self._release(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._release(flow)


addons = [Concurrency()]
