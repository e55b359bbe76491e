"""The two chain reads a payment needs, over Solana JSON-RPC with ``httpx.AsyncClient``.

- ``latest_blockhash()``: ``getLatestBlockhash``, cached for a few seconds (a blockhash stays
  valid for ~60-90 s, so a few seconds of reuse costs nothing and saves a round trip per
  payment); concurrent callers share one request.
- ``mint_info(mint)``: decimals and token program (Token or Token-2022) of an SPL mint, from a
  table of well-known mints first, else ``getAccountInfo`` once per mint (mints do not change).

The client is created with ``trust_env=False`` so the gateway's own RPC calls never loop back
through ``HTTPS_PROXY``. Error messages never include the RPC URL (it often carries an API key).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from .constants import KNOWN_MINTS, TOKEN_2022_PROGRAM_ADDRESS, TOKEN_PROGRAM_ADDRESS

MINT_BASE_SIZE = 82


class ChainError(Exception):
    """An RPC call failed or returned something unusable."""


@dataclass(frozen=True)
class MintInfo:
    decimals: int
    token_program: str


class ChainClient:
    def __init__(
        self,
        rpc_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 5.0,
        blockhash_ttl: float = 5.0,
        known_mints: Mapping[str, tuple[int, str]] = KNOWN_MINTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = rpc_url
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(trust_env=False, timeout=timeout)
        self._timeout = timeout
        self._ttl = blockhash_ttl
        self._clock = clock
        self._ids = itertools.count(1)
        self._blockhash: tuple[str, float] | None = None
        self._blockhash_task: asyncio.Task[str] | None = None
        self._mints: dict[str, MintInfo] = {
            mint: MintInfo(decimals, program) for mint, (decimals, program) in known_mints.items()
        }
        self._mint_tasks: dict[str, asyncio.Task[MintInfo]] = {}
        self.rpc_calls = 0  # for tests and metrics

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def _call(self, method: str, params: list[Any]) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        self.rpc_calls += 1
        try:
            resp = await self._client.post(self._url, json=body, timeout=self._timeout)
        except httpx.HTTPError as err:
            raise ChainError(f"RPC {method} failed: {type(err).__name__}") from None
        if resp.status_code != 200:
            raise ChainError(f"RPC {method} answered HTTP {resp.status_code}")
        try:
            doc = resp.json()
        except ValueError:
            raise ChainError(f"RPC {method} answered non-JSON") from None
        if not isinstance(doc, dict):
            raise ChainError(f"RPC {method} answered an unexpected document")
        if doc.get("error") is not None:
            rpc_error = doc["error"]
            message = rpc_error.get("message") if isinstance(rpc_error, dict) else rpc_error
            raise ChainError(f"RPC {method} error: {str(message)[:200]}")
        if "result" not in doc:
            raise ChainError(f"RPC {method} answered without a result")
        return doc["result"]

    # --- blockhash ------------------------------------------------------------------------------

    def cached_blockhash(self) -> str | None:
        """The cached blockhash if still fresh (no I/O)."""
        if self._blockhash is not None and self._clock() - self._blockhash[1] < self._ttl:
            return self._blockhash[0]
        return None

    async def _fetch_blockhash(self) -> str:
        result = await self._call("getLatestBlockhash", [{"commitment": "confirmed"}])
        try:
            blockhash = result["value"]["blockhash"]
        except (TypeError, KeyError):
            raise ChainError("RPC getLatestBlockhash answered an unexpected document") from None
        if not isinstance(blockhash, str):
            raise ChainError("RPC getLatestBlockhash answered an unexpected document")
        self._blockhash = (blockhash, self._clock())
        return blockhash

    async def latest_blockhash(self) -> str:
        cached = self.cached_blockhash()
        if cached is not None:
            return cached
        task = self._blockhash_task
        if task is None or task.done():
            task = self._blockhash_task = asyncio.ensure_future(self._fetch_blockhash())
        return await asyncio.shield(task)

    # --- mints ----------------------------------------------------------------------------------

    def cached_mint_info(self, mint: str) -> MintInfo | None:
        return self._mints.get(mint)

    async def _fetch_mint(self, mint: str) -> MintInfo:
        result = await self._call(
            "getAccountInfo", [mint, {"encoding": "base64", "commitment": "confirmed"}]
        )
        value = result.get("value") if isinstance(result, dict) else None
        if value is None:
            raise ChainError(f"mint {mint} not found")
        owner = value.get("owner")
        if owner not in (TOKEN_PROGRAM_ADDRESS, TOKEN_2022_PROGRAM_ADDRESS):
            raise ChainError(f"account {mint} is not an SPL Token or Token-2022 mint")
        try:
            data = base64.b64decode(value["data"][0], validate=True)
        except (KeyError, IndexError, TypeError, ValueError):
            raise ChainError(f"RPC getAccountInfo({mint}) answered unreadable data") from None
        if len(data) < MINT_BASE_SIZE or data[45] != 1:
            raise ChainError(f"account {mint} is not an initialized mint")
        info = MintInfo(decimals=data[44], token_program=owner)
        self._mints[mint] = info
        return info

    async def mint_info(self, mint: str) -> MintInfo:
        cached = self._mints.get(mint)
        if cached is not None:
            return cached
        task = self._mint_tasks.get(mint)
        if task is None or task.done():
            task = self._mint_tasks[mint] = asyncio.ensure_future(self._fetch_mint(mint))
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._mint_tasks.pop(mint, None)
