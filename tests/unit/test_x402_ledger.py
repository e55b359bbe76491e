"""The SQLite ledger: atomic limits under threads and processes, crash safety, kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from llmitm.x402.ledger import (
    Reservation,
    SpendLimits,
    SqliteLedger,
    limit_nano,
    units_nano,
    utc_day,
)
from llmitm.x402.policy import Refusal

REPO = Path(__file__).resolve().parents[2]
MINT = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"
# 10 payments of 0.01 fit the day, the 11th does not
LIMITS = SpendLimits(Decimal("0.05"), Decimal("0.1"), Decimal("0.1"))


def reserve(
    ledger: SqliteLedger,
    session: str = "s1",
    amount: int = 10_000,
    limits: SpendLimits = LIMITS,
    now: float | None = None,
) -> Reservation | Refusal:
    return ledger.reserve(
        session=session,
        host="paid.example.test",
        resource="https://paid.example.test/v1/chat/completions",
        network="solana-devnet",
        asset=MINT,
        pay_to="payee",
        amount=amount,
        decimals=6,
        limits=limits,
        now=now,
    )


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "addons"), str(REPO)])
    return env


def integrity_ok(path: Path) -> bool:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_units_and_limits_round_conservatively() -> None:
    assert units_nano(10_000, 6) == 10_000_000
    assert units_nano(1, 12) == 1  # 10**-12 tokens rounds up to 1 nano, never to 0
    assert units_nano(1_000, 12) == 1
    assert units_nano(1_001, 12) == 2
    assert limit_nano(Decimal("0.05")) == 50_000_000
    assert limit_nano(Decimal("0.0000000015")) == 1


def test_limits_per_request_session_and_total(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    over = reserve(ledger, amount=50_001)
    assert isinstance(over, Refusal) and over.rule == "per_request"
    limits = SpendLimits(Decimal("0.05"), Decimal("0.03"), Decimal("0.05"))
    for _ in range(3):
        assert isinstance(reserve(ledger, "a", limits=limits), Reservation)
    refused = reserve(ledger, "a", limits=limits)
    assert isinstance(refused, Refusal) and refused.rule == "per_session_per_day"
    assert "0.04" in refused.reason and "0.03" in refused.reason
    assert isinstance(reserve(ledger, "b", limits=limits), Reservation)
    assert isinstance(reserve(ledger, "b", limits=limits), Reservation)
    refused = reserve(ledger, "c", limits=limits)
    assert isinstance(refused, Refusal) and refused.rule == "total_per_day"
    day = utc_day(time.time())
    assert ledger.spent(day=day) == Decimal("0.05")
    assert ledger.spent(day=day, session="a") == Decimal("0.03")
    ledger.close()


def test_failed_rows_free_the_budget_other_states_do_not(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    limits = SpendLimits(Decimal("1"), Decimal("0.02"), Decimal("1"))
    r1, r2 = reserve(ledger, limits=limits), reserve(ledger, limits=limits)
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    assert isinstance(reserve(ledger, limits=limits), Refusal)
    assert ledger.mark_sent(r1.id) and not ledger.mark_sent(r1.id)
    assert ledger.mark_settled(r1.id, "sig1", "payer")
    assert ledger.mark_unknown(r2.id, "no receipt")
    assert isinstance(reserve(ledger, limits=limits), Refusal)  # unknown still counts
    assert ledger.mark_failed(r2.id, "402 again")
    assert not ledger.mark_failed(r1.id, "too late")  # settled is final
    r3 = reserve(ledger, limits=limits)
    assert isinstance(r3, Reservation)
    rows = {p["id"]: p for p in ledger.list_payments()}
    assert rows[r1.id]["state"] == "settled" and rows[r1.id]["tx_signature"] == "sig1"
    assert rows[r2.id]["state"] == "failed" and not rows[r2.id]["counted"]
    assert rows[r3.id]["amount"] == "10000" and rows[r3.id]["amount_tokens"] == "0.01"
    json.dumps(ledger.list_payments(session="s1", state="failed"))  # plain data
    assert [p["id"] for p in ledger.list_payments(state="failed")] == [r2.id]
    ledger.close()


def test_days_are_utc_calendar_days(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    limits = SpendLimits(Decimal("1"), Decimal("0.01"), Decimal("1"))
    midnight = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    assert isinstance(reserve(ledger, limits=limits, now=midnight - 1), Reservation)
    assert isinstance(reserve(ledger, limits=limits, now=midnight - 0.5), Refusal)
    assert isinstance(reserve(ledger, limits=limits, now=midnight), Reservation)
    assert utc_day(midnight - 1) == "2025-12-31" and utc_day(midnight) == "2026-01-01"
    ledger.close()


def test_fifty_threads_budget_for_ten(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    barrier = threading.Barrier(50)
    results: list[Reservation | Refusal] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait(timeout=10)
        result = reserve(ledger, session=f"s{threading.get_ident() % 3}",
                         limits=SpendLimits(Decimal("1"), Decimal("1"), Decimal("0.1")))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 50
    reserved = [r for r in results if isinstance(r, Reservation)]
    assert len(reserved) == 10
    assert all(r.rule == "total_per_day" for r in results if isinstance(r, Refusal))
    assert len(ledger.list_payments(limit=1000)) == 10
    ledger.close()


_CHILD_RESERVER = textwrap.dedent(
    """
    import sys, time
    from decimal import Decimal
    from llmitm.x402.ledger import SqliteLedger, SpendLimits, Reservation
    path, start_at = sys.argv[1], float(sys.argv[2])
    ledger = SqliteLedger(path)
    while time.time() < start_at:
        time.sleep(0.001)
    ok = 0
    for _ in range(25):
        r = ledger.reserve(session="child", host="h", resource="r", network="n", asset="a",
                           pay_to="p", amount=10_000, decimals=6,
                           limits=SpendLimits(Decimal(1), Decimal(1), Decimal("0.1")))
        ok += isinstance(r, Reservation)
    print(ok, flush=True)
    """
)


def test_a_second_process_cannot_jointly_pass_a_limit(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    ledger = SqliteLedger(path)
    start_at = time.time() + 1.0
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_RESERVER, str(path), str(start_at)],
        env=child_env(), stdout=subprocess.PIPE, text=True,
    )
    ok = 0

    def worker() -> None:
        nonlocal ok
        for _ in range(5):
            r = reserve(ledger, session="parent",
                        limits=SpendLimits(Decimal(1), Decimal(1), Decimal("0.1")))
            if isinstance(r, Reservation):
                with lock:
                    ok += 1

    lock = threading.Lock()
    while time.time() < start_at:
        time.sleep(0.001)
    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    assert ok + int(out.strip()) == 10
    assert ledger.spent(day=utc_day(time.time())) == Decimal("0.1")
    ledger.close()


def test_reopen_after_a_simulated_crash_keeps_limits(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    ledger = SqliteLedger(path)
    limits = SpendLimits(Decimal("1"), Decimal("0.03"), Decimal("1"))
    ids = []
    for _ in range(3):
        r = reserve(ledger, limits=limits)
        assert isinstance(r, Reservation)
        ids.append(r.id)
    ledger.mark_sent(ids[1])
    ledger.mark_settled(ids[2], "sig")
    del ledger  # "crash": no close, no outcome recorded for two of them

    again = SqliteLedger(path, stale_after=3600)
    assert again.recovered == 0  # owner (this process) is alive and the rows are fresh
    assert isinstance(reserve(again, limits=limits), Refusal)
    again.close()

    stale = SqliteLedger(path, stale_after=0)
    assert stale.recovered == 2
    states = {p["id"]: p["state"] for p in stale.list_payments()}
    assert states == {ids[0]: "unknown", ids[1]: "unknown", ids[2]: "settled"}
    assert isinstance(reserve(stale, limits=limits), Refusal)  # unknown still counted
    stale.close()


_CHILD_IN_TRANSACTION = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO payments (id, created_at, updated_at, day, session, host, resource, "
        "network, asset, pay_to, amount, decimals, units_nano, state, owner_host, owner_pid) "
        "VALUES ('half', 0, 0, '2026-01-01', 's', 'h', 'r', 'n', 'a', 'p', 5, 6, 5000, "
        "'reserved', 'x', 1)"
    )
    print("in-transaction", flush=True)
    time.sleep(60)
    """
)


def test_kill_9_mid_transaction_leaves_the_db_consistent(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    SqliteLedger(path).close()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_IN_TRANSACTION, str(path)],
        env=child_env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "in-transaction"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert integrity_ok(path)
    ledger = SqliteLedger(path, busy_timeout=2)
    assert ledger.get("half") is None  # the uncommitted row is gone
    assert isinstance(reserve(ledger), Reservation)  # and the write lock was released
    ledger.close()


_CHILD_LOOP = textwrap.dedent(
    """
    import sys
    from decimal import Decimal
    from llmitm.x402.ledger import SqliteLedger, SpendLimits, Reservation
    ledger = SqliteLedger(sys.argv[1])
    limits = SpendLimits(Decimal(1), Decimal(10**6), Decimal(10**6))
    for i in range(100_000):
        r = ledger.reserve(session="loop", host="h", resource="r", network="n", asset="a",
                           pay_to="p", amount=1, decimals=6, limits=limits)
        assert isinstance(r, Reservation)
        print(r.id, flush=True)
        if i % 3 == 1:
            ledger.mark_sent(r.id)
        elif i % 3 == 2:
            ledger.mark_settled(r.id, "sig")
    """
)


def test_kill_9_during_a_reserve_loop_never_loses_a_committed_payment(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    SqliteLedger(path).close()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_LOOP, str(path)],
        env=child_env(), stdout=subprocess.PIPE, text=True,
    )
    reported: list[str] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            reported.append(line.strip())
            if len(reported) >= 40:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    assert len(reported) >= 40, "the child did not run"
    assert integrity_ok(path)
    ledger = SqliteLedger(path)  # the owner is dead: its in-flight rows become unknown
    rows = {p["id"]: p for p in ledger.list_payments(limit=100_000)}
    assert set(reported) <= set(rows)  # every payment the child saw committed is there
    states = {p["state"] for p in rows.values()}
    assert states <= {"settled", "unknown"}
    assert ledger.recovered == sum(p["state"] == "unknown" for p in rows.values())
    counted = sum(int(p["amount"]) for p in rows.values())
    assert ledger.spent(day=utc_day(time.time())) == Decimal(counted).scaleb(-6)
    ledger.close()


def test_list_payments_is_plain_and_bounded(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    for _ in range(3):
        reserve(ledger, limits=SpendLimits(Decimal(1), Decimal(1), Decimal(1)))
    assert len(ledger.list_payments(limit=2)) == 2
    assert ledger.list_payments(session="nobody") == []
    (row,) = ledger.list_payments(limit=1)
    assert set(row) >= {"id", "state", "amount", "asset", "network", "pay_to", "session", "day"}
    assert all(isinstance(v, str | int | bool | type(None)) for v in row.values())
    ledger.close()


@pytest.mark.parametrize("amount", [0, -5])
def test_non_positive_amounts_refused(tmp_path: Path, amount: int) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    assert isinstance(reserve(ledger, amount=amount), Refusal)
    ledger.close()
