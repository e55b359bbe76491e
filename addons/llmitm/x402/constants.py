"""Solana/x402 constants, copied from the x402 SDK (``x402/mechanisms/svm/constants.py`` and
``default_assets.py``, x402 2.25.0).

Why copied instead of imported: importing anything under ``x402.mechanisms.svm`` executes the
``x402`` package ``__init__`` and ``solana.rpc.api`` (~0.4 s and a large import graph) although
these are a handful of strings. ``tests/unit/test_x402_models.py`` asserts that every value here
equals the installed SDK's, so a drift fails the suite instead of going unnoticed.
"""

from __future__ import annotations

from typing import Final

SCHEME_EXACT: Final = "exact"

TOKEN_PROGRAM_ADDRESS: Final = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"
TOKEN_2022_PROGRAM_ADDRESS: Final = "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb"
COMPUTE_BUDGET_PROGRAM_ADDRESS: Final = "ComputeBudget111111111111111111111111111111"
MEMO_PROGRAM_ADDRESS: Final = "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr"
ASSOCIATED_TOKEN_PROGRAM_ADDRESS: Final = "ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL"

DEFAULT_COMPUTE_UNIT_LIMIT: Final = 20000
DEFAULT_COMPUTE_UNIT_PRICE_MICROLAMPORTS: Final = 1
MAX_MEMO_BYTES: Final = 256

SOLANA_MAINNET_CAIP2: Final = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
SOLANA_DEVNET_CAIP2: Final = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
SOLANA_TESTNET_CAIP2: Final = "solana:4uhcVJyU9pJkvQyS88uRDiswHXSCkY3z"

#: v1 network names -> CAIP-2 (the only Solana networks the official facilitator accepts)
V1_TO_V2_NETWORK_MAP: Final[dict[str, str]] = {
    "solana": SOLANA_MAINNET_CAIP2,
    "solana-devnet": SOLANA_DEVNET_CAIP2,
    "solana-testnet": SOLANA_TESTNET_CAIP2,
}
CAIP2_NETWORKS: Final = frozenset(V1_TO_V2_NETWORK_MAP.values())

USDC_MAINNET_ADDRESS: Final = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
USDC_DEVNET_ADDRESS: Final = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"

#: mints whose decimals and token program are known without an RPC call
#: (mint -> (decimals, token program)); a mint address is unique across networks.
KNOWN_MINTS: Final[dict[str, tuple[int, str]]] = {
    USDC_MAINNET_ADDRESS: (6, TOKEN_PROGRAM_ADDRESS),
    USDC_DEVNET_ADDRESS: (6, TOKEN_PROGRAM_ADDRESS),
    # USDT mainnet
    "Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB": (6, TOKEN_PROGRAM_ADDRESS),
}


def normalize_network(network: str) -> str | None:
    """CAIP-2 id for a CAIP-2 id or v1 name the SDK knows; ``None`` for anything else."""
    if network in CAIP2_NETWORKS:
        return network
    return V1_TO_V2_NETWORK_MAP.get(network)
