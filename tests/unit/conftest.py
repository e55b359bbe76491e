"""Fixtures for the stream-repair tests (all named ``repair_*``)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmitm.repair import StreamRepairer, stream_repairer_for

DATA = Path(__file__).resolve().parents[1] / "data"

RepairRun = Callable[..., tuple[bytes, StreamRepairer]]


def run_repair(
    endpoint: str,
    body: bytes,
    request_json: dict[str, Any] | None = None,
    cuts: list[int] | None = None,
) -> tuple[bytes, StreamRepairer]:
    """Feed ``body`` (cut at ``cuts``) through a fresh repairer; returns (output, repairer)."""
    repairer = stream_repairer_for(endpoint, request_json)
    assert repairer is not None
    pieces: list[bytes] = []
    last = 0
    for cut in [*(cuts or []), len(body)]:
        if cut > last:
            pieces += repairer.feed(body[last:cut])
        last = max(last, cut)
    pieces += repairer.finish()
    assert all(isinstance(p, bytes) and p for p in pieces), "a stage must never return b''"
    return b"".join(pieces), repairer


def random_cuts(body: bytes, rng: random.Random, max_piece: int = 64) -> list[int]:
    cuts, pos = [], 0
    while pos < len(body):
        pos += rng.randint(1, max_piece)
        cuts.append(min(pos, len(body)))
    return cuts


def load_request(sse_path: Path) -> dict[str, Any] | None:
    req = sse_path.with_name(sse_path.name[: -len(".sse")] + ".request.json")
    return json.loads(req.read_text()) if req.exists() else None


@pytest.fixture
def repair_run() -> RepairRun:
    return run_repair


@pytest.fixture(scope="session")
def repair_data() -> Path:
    return DATA
