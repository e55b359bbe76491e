"""Requirements remembered per route, so the next request to that route is paid up-front.

A route is (method, host[:port], path with query). After a 402 from a route, its parsed
requirements are kept for the shortest ``maxTimeoutSeconds`` among them, capped by
``max_ttl``. A later request to the route is signed before it leaves (one upstream round trip
instead of two). A seller's ``recentBlockhash`` hint is only used while it is young
(``BLOCKHASH_HINT_MAX_AGE``); after that the payer uses its own fresh blockhash.

If a presigned request still gets a 402 (price or terms changed, entry outdated), the entry is
dropped and the request may be paid once more from that new 402: ``PaymentAttempt`` tracks
this per client request and never allows more (no loops).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .models import ParsedRequirements

#: a seller-supplied recentBlockhash older than this is not used (Solana blockhashes live ~60 s)
BLOCKHASH_HINT_MAX_AGE = 20.0


@dataclass(frozen=True)
class RouteKey:
    method: str
    host: str
    path: str

    @classmethod
    def from_url(cls, method: str, url: str) -> RouteKey:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return cls(method.upper(), host, path)


@dataclass(frozen=True)
class CachedRequirements:
    parsed: ParsedRequirements
    stored_at: float
    expires_at: float


class PresignCache:
    def __init__(
        self,
        *,
        max_entries: int = 1024,
        max_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[RouteKey, CachedRequirements] = OrderedDict()
        self._max_entries = max_entries
        self._max_ttl = max_ttl
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, key: RouteKey, parsed: ParsedRequirements) -> None:
        if not parsed.accepts:
            return
        ttl = min(self._max_ttl, *(float(r.max_timeout_seconds) for r in parsed.accepts))
        now = self._clock()
        self._entries[key] = CachedRequirements(parsed, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def lookup(self, key: RouteKey) -> CachedRequirements | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires_at:
            del self._entries[key]
            return None
        return entry

    def age(self, entry: CachedRequirements) -> float:
        return self._clock() - entry.stored_at

    def forget(self, key: RouteKey) -> None:
        self._entries.pop(key, None)


@dataclass
class PaymentAttempt:
    """Per client request: how many payments were made and whether the first was presigned.
    Kept on ``flow.metadata`` as a plain dict (``as_dict``/``from_dict``)."""

    payments: int = 0
    presigned: bool = False

    def may_pay_after_402(self) -> bool:
        """Pay (again) in answer to a 402? Once for a request that was not paid yet; once more
        only when the single earlier payment was a presigned one."""
        if self.payments == 0:
            return True
        return self.payments == 1 and self.presigned

    def record(self, *, presigned: bool) -> None:
        if self.payments == 0:
            self.presigned = presigned
        self.payments += 1

    def as_dict(self) -> dict[str, Any]:
        return {"payments": self.payments, "presigned": self.presigned}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PaymentAttempt:
        if not data:
            return cls()
        return cls(int(data.get("payments", 0)), bool(data.get("presigned", False)))
