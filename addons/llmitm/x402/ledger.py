"""The payment ledger: spending limits enforced atomically, every payment recorded before it
leaves, nothing lost on a crash.

``Ledger`` is the interface (a shared store such as Redis could implement it); ``SqliteLedger``
is the embedded default.

Life of a payment row::

    reserve() -> reserved -> mark_sent() -> sent -> mark_settled(tx) -> settled
                                                 -> mark_failed(why)  -> failed
                                                 -> mark_unknown(why) -> unknown

Every state except ``failed`` counts against the limits, so a crash or ``kill -9`` at any
point can only over-count, never under-count. ``failed`` means there is evidence that no money
moved (the server answered with a failed settlement receipt, or signing never happened).
On open, rows left ``reserved``/``sent`` by a process that no longer runs (or older than
``stale_after`` seconds) become ``unknown`` (still counted) so the control API shows them.

Limits are in token units. All allowed assets draw on the same budget: each row stores its
amount in nano token units (``units_nano`` = ceil(amount * 10**9 / 10**decimals)), so a token
with more than 9 decimals is rounded up, never down.

Blocking: every method does SQLite I/O. ``reserve`` commits with ``synchronous=FULL`` (one
fsync, typically well under a few ms, but it may wait up to ``busy_timeout`` for another
writer), so an async caller must use ``asyncio.to_thread``; the mark_* calls are single
statements of the same kind. ``x402.payer.X402Payer`` already does this.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any, Protocol

from .config import X402Limits
from .policy import Refusal

NANO = 10**9
COUNTED_STATES = ("reserved", "sent", "settled", "unknown")
ALL_STATES = (*COUNTED_STATES, "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    id           TEXT PRIMARY KEY,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    day          TEXT NOT NULL,
    session      TEXT NOT NULL,
    host         TEXT NOT NULL,
    resource     TEXT NOT NULL,
    network      TEXT NOT NULL,
    asset        TEXT NOT NULL,
    pay_to       TEXT NOT NULL,
    amount       INTEGER NOT NULL CHECK (amount > 0),
    decimals     INTEGER NOT NULL CHECK (decimals BETWEEN 0 AND 255),
    units_nano   INTEGER NOT NULL CHECK (units_nano > 0),
    state        TEXT NOT NULL
                 CHECK (state IN ('reserved', 'sent', 'settled', 'failed', 'unknown')),
    tx_signature TEXT,
    payer        TEXT,
    reason       TEXT,
    owner_host   TEXT NOT NULL,
    owner_pid    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_day ON payments (day, session);
"""


@dataclass(frozen=True)
class SpendLimits:
    """Limits in token units (``Decimal``, at most 9 fractional digits)."""

    per_request: Decimal
    per_session_per_day: Decimal
    total_per_day: Decimal

    @classmethod
    def from_config(cls, limits: X402Limits) -> SpendLimits:
        return cls(limits.per_request, limits.per_session_per_day, limits.total_per_day)


@dataclass(frozen=True)
class Reservation:
    id: str
    day: str
    session: str
    amount: int
    decimals: int
    units_nano: int


def units_nano(amount: int, decimals: int) -> int:
    """``amount`` base units in 10**-9 token units, rounded up."""
    if decimals <= 9:
        return amount * 10 ** (9 - decimals)
    div = 10 ** (decimals - 9)
    return -(-amount // div)


def limit_nano(limit: Decimal) -> int:
    """A token-unit limit in 10**-9 token units, rounded down."""
    return int(limit.scaleb(9).to_integral_value(rounding=ROUND_FLOOR))


def fmt_tokens(value: Decimal) -> str:
    """Plain decimal notation without trailing zeros: ``0.05``, ``100``."""
    text = format(value.normalize(), "f")
    return text


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class Ledger(Protocol):
    """What the payer needs from a store. Implementations must make ``reserve`` atomic across
    every process that shares the store."""

    def reserve(
        self,
        *,
        session: str,
        host: str,
        resource: str,
        network: str,
        asset: str,
        pay_to: str,
        amount: int,
        decimals: int,
        limits: SpendLimits,
        now: float | None = None,
    ) -> Reservation | Refusal: ...

    def mark_sent(self, payment_id: str) -> bool: ...

    def mark_settled(self, payment_id: str, tx_signature: str, payer: str | None = None) -> bool:
        ...

    def mark_failed(self, payment_id: str, reason: str) -> bool: ...

    def mark_unknown(self, payment_id: str, reason: str) -> bool: ...

    def list_payments(
        self,
        *,
        session: str | None = None,
        day: str | None = None,
        state: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]: ...

    def spent(self, *, day: str, session: str | None = None) -> Decimal: ...

    def close(self) -> None: ...


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SqliteLedger:
    """SQLite in WAL mode; one connection per thread; ``reserve`` in ``BEGIN IMMEDIATE``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        stale_after: float = 600.0,
        synchronous: str = "FULL",
    ) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._host = socket.gethostname()
        self._pid = os.getpid()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        self.recovered = self.recover(stale_after=stale_after)

    # --- connections --------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so close() can close every thread's connection;
            # each connection is otherwise used by the thread that opened it.
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # --- recovery -----------------------------------------------------------------------------

    def recover(self, *, stale_after: float = 600.0, now: float | None = None) -> int:
        """Mark ``reserved``/``sent`` rows of dead processes (on this host) or older than
        ``stale_after`` seconds as ``unknown``. Returns how many rows changed."""
        now = time.time() if now is None else now
        conn = self._conn()
        rows = conn.execute(
            "SELECT id, owner_host, owner_pid, updated_at FROM payments "
            "WHERE state IN ('reserved', 'sent')"
        ).fetchall()
        changed = 0
        for row in rows:
            dead = row["owner_host"] == self._host and not _pid_alive(row["owner_pid"])
            stale = now - row["updated_at"] > stale_after
            if dead or stale:
                why = "owner process ended before the outcome was known" if dead else "stale"
                cur = conn.execute(
                    "UPDATE payments SET state='unknown', reason=?, updated_at=? "
                    "WHERE id=? AND state IN ('reserved', 'sent')",
                    (why, now, row["id"]),
                )
                changed += cur.rowcount
        return changed

    # --- the atomic reservation ---------------------------------------------------------------

    def reserve(
        self,
        *,
        session: str,
        host: str,
        resource: str,
        network: str,
        asset: str,
        pay_to: str,
        amount: int,
        decimals: int,
        limits: SpendLimits,
        now: float | None = None,
    ) -> Reservation | Refusal:
        """Check all three limits and insert a ``reserved`` row in one ``BEGIN IMMEDIATE``
        transaction (committed, fsynced) or refuse. Concurrent callers in any thread or process
        are serialized by SQLite's write lock, so they cannot jointly pass a limit."""
        if amount <= 0:
            return Refusal("amount", "amount must be positive")
        now = time.time() if now is None else now
        day = utc_day(now)
        units = units_nano(amount, decimals)
        if units > limit_nano(limits.per_request):
            return Refusal(
                "per_request",
                f"amount {fmt_tokens(Decimal(units).scaleb(-9))} exceeds per_request limit "
                f"{limits.per_request}",
            )
        conn = self._conn()
        payment_id = uuid.uuid4().hex
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            return Refusal("ledger", f"ledger busy: {err}")
        try:
            total, mine = conn.execute(
                "SELECT COALESCE(SUM(units_nano), 0), "
                "COALESCE(SUM(CASE WHEN session = ? THEN units_nano ELSE 0 END), 0) "
                "FROM payments WHERE day = ? AND state != 'failed'",
                (session, day),
            ).fetchone()
            if mine + units > limit_nano(limits.per_session_per_day):
                conn.execute("ROLLBACK")
                return Refusal(
                    "per_session_per_day",
                    f"session {session[:64]!r} would spend "
                    f"{fmt_tokens(Decimal(mine + units).scaleb(-9))} "
                    f"today, over per_session_per_day limit {limits.per_session_per_day}",
                )
            if total + units > limit_nano(limits.total_per_day):
                conn.execute("ROLLBACK")
                return Refusal(
                    "total_per_day",
                    f"today's payments would reach "
                    f"{fmt_tokens(Decimal(total + units).scaleb(-9))}, "
                    f"over total_per_day limit {limits.total_per_day}",
                )
            conn.execute(
                "INSERT INTO payments (id, created_at, updated_at, day, session, host, resource, "
                "network, asset, pay_to, amount, decimals, units_nano, state, owner_host, "
                "owner_pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?, ?)",
                (
                    payment_id,
                    now,
                    now,
                    day,
                    session,
                    host,
                    resource,
                    network,
                    asset,
                    pay_to,
                    amount,
                    decimals,
                    units,
                    self._host,
                    self._pid,
                ),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Reservation(payment_id, day, session, amount, decimals, units)

    # --- outcomes -----------------------------------------------------------------------------

    def _transition(
        self, payment_id: str, to: str, from_states: tuple[str, ...], **fields: str | None
    ) -> bool:
        sets = ", ".join(f"{name} = ?" for name in fields)
        sql = (
            f"UPDATE payments SET state = ?, updated_at = ?{', ' + sets if sets else ''} "
            f"WHERE id = ? AND state IN ({', '.join('?' for _ in from_states)})"
        )
        params = (to, time.time(), *fields.values(), payment_id, *from_states)
        return self._conn().execute(sql, params).rowcount == 1

    def mark_sent(self, payment_id: str) -> bool:
        return self._transition(payment_id, "sent", ("reserved",))

    def mark_settled(self, payment_id: str, tx_signature: str, payer: str | None = None) -> bool:
        return self._transition(
            payment_id,
            "settled",
            ("reserved", "sent", "unknown"),
            tx_signature=tx_signature,
            payer=payer,
            reason=None,
        )

    def mark_failed(self, payment_id: str, reason: str) -> bool:
        return self._transition(
            payment_id, "failed", ("reserved", "sent", "unknown"), reason=reason[:500]
        )

    def mark_unknown(self, payment_id: str, reason: str) -> bool:
        return self._transition(payment_id, "unknown", ("reserved", "sent"), reason=reason[:500])

    # --- reads --------------------------------------------------------------------------------

    def spent(self, *, day: str, session: str | None = None) -> Decimal:
        """Token units counted against the limits on ``day`` (for ``session`` if given)."""
        sql = "SELECT COALESCE(SUM(units_nano), 0) FROM payments WHERE day = ? AND state != 'failed'"
        params: tuple[str, ...] = (day,)
        if session is not None:
            sql += " AND session = ?"
            params = (day, session)
        (total,) = self._conn().execute(sql, params).fetchone()
        return Decimal(total).scaleb(-9)

    def get(self, payment_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM payments WHERE id = ?", (payment_id,)).fetchone()
        return None if row is None else _public(row)

    def list_payments(
        self,
        *,
        session: str | None = None,
        day: str | None = None,
        state: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first, as plain JSON-able dicts (no secrets: the ledger never holds any)."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("session", session), ("day", day), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM payments"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id LIMIT ?"
        params.append(max(0, min(int(limit), 10_000)))
        return [_public(row) for row in self._conn().execute(sql, params).fetchall()]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _public(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "day": row["day"],
        "session": row["session"],
        "host": row["host"],
        "resource": row["resource"],
        "network": row["network"],
        "asset": row["asset"],
        "pay_to": row["pay_to"],
        "amount": str(row["amount"]),
        "decimals": row["decimals"],
        "amount_tokens": fmt_tokens(Decimal(row["amount"]).scaleb(-row["decimals"])),
        "state": row["state"],
        "counted": row["state"] != "failed",
        "tx_signature": row["tx_signature"],
        "payer": row["payer"],
        "reason": row["reason"],
    }
