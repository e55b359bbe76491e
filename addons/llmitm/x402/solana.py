"""The x402 ``exact`` payment on Solana, built and signed with solders: pure and synchronous.

The transaction is exactly the one the official SDK client builds
(``x402/mechanisms/svm/exact/client.py``) and the official facilitator accepts: a v0 message
whose fee payer is ``extra.feePayer`` (the facilitator co-signs slot 0 at settlement), with
1. ComputeBudget SetComputeUnitLimit ``[2, u32 LE]`` = 20000,
2. ComputeBudget SetComputeUnitPrice ``[3, u64 LE]`` = 1 microlamport,
3. SPL TransferChecked ``[12, u64 amount LE, u8 decimals]`` with accounts (source ATA w, mint,
   destination ATA of payTo w, owner signer) on the Token or Token-2022 program,
4. Memo: ``extra.memo`` when the seller set one, else 16 random bytes as hex (keeps two
   otherwise identical payments distinct).
The owner signs ``0x80 || message``; signatures are ``[default, owner]``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from functools import lru_cache

from solders.hash import Hash
from solders.instruction import AccountMeta, Instruction
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction

from .constants import (
    ASSOCIATED_TOKEN_PROGRAM_ADDRESS,
    COMPUTE_BUDGET_PROGRAM_ADDRESS,
    DEFAULT_COMPUTE_UNIT_LIMIT,
    DEFAULT_COMPUTE_UNIT_PRICE_MICROLAMPORTS,
    MAX_MEMO_BYTES,
    MEMO_PROGRAM_ADDRESS,
    TOKEN_2022_PROGRAM_ADDRESS,
    TOKEN_PROGRAM_ADDRESS,
)

TOKEN_PROGRAM = Pubkey.from_string(TOKEN_PROGRAM_ADDRESS)
TOKEN_2022_PROGRAM = Pubkey.from_string(TOKEN_2022_PROGRAM_ADDRESS)
ASSOCIATED_TOKEN_PROGRAM = Pubkey.from_string(ASSOCIATED_TOKEN_PROGRAM_ADDRESS)
COMPUTE_BUDGET_PROGRAM = Pubkey.from_string(COMPUTE_BUDGET_PROGRAM_ADDRESS)
MEMO_PROGRAM = Pubkey.from_string(MEMO_PROGRAM_ADDRESS)
TOKEN_PROGRAMS = frozenset({TOKEN_PROGRAM, TOKEN_2022_PROGRAM})
U64_MAX = 2**64 - 1

_CU_LIMIT_IX = Instruction(
    COMPUTE_BUDGET_PROGRAM, bytes([2]) + DEFAULT_COMPUTE_UNIT_LIMIT.to_bytes(4, "little"), []
)
_CU_PRICE_IX = Instruction(
    COMPUTE_BUDGET_PROGRAM,
    bytes([3]) + DEFAULT_COMPUTE_UNIT_PRICE_MICROLAMPORTS.to_bytes(8, "little"),
    [],
)


@lru_cache(maxsize=4096)
def _ata(owner: Pubkey, mint: Pubkey, token_program: Pubkey) -> Pubkey:
    return Pubkey.find_program_address(
        [bytes(owner), bytes(token_program), bytes(mint)], ASSOCIATED_TOKEN_PROGRAM
    )[0]


def derive_ata(owner: Pubkey | str, mint: Pubkey | str, token_program: Pubkey | str) -> Pubkey:
    """The associated token account of ``owner`` for ``mint`` under ``token_program`` (Token or
    Token-2022; the program is one of the seeds, so the two give different addresses)."""
    owner_pk = owner if isinstance(owner, Pubkey) else Pubkey.from_string(owner)
    mint_pk = mint if isinstance(mint, Pubkey) else Pubkey.from_string(mint)
    program = token_program if isinstance(token_program, Pubkey) else Pubkey.from_string(
        token_program
    )
    if program not in TOKEN_PROGRAMS:
        raise ValueError(f"{program} is not the Token or Token-2022 program")
    return _ata(owner_pk, mint_pk, program)


def build_payment_transaction(
    *,
    owner: Pubkey,
    sign: Callable[[bytes], Signature],
    fee_payer: Pubkey | str,
    mint: Pubkey | str,
    pay_to: Pubkey | str,
    amount: int,
    decimals: int,
    token_program: Pubkey | str,
    blockhash: Hash | str,
    memo: str | None = None,
) -> VersionedTransaction:
    """The partially signed payment transaction (owner signed, fee payer slot left default).

    ``sign`` signs raw bytes with the owner's key (``Wallet.sign_message`` or
    ``Keypair.sign_message``); the key itself never has to be handed over.
    """
    fee_payer_pk = fee_payer if isinstance(fee_payer, Pubkey) else Pubkey.from_string(fee_payer)
    mint_pk = mint if isinstance(mint, Pubkey) else Pubkey.from_string(mint)
    pay_to_pk = pay_to if isinstance(pay_to, Pubkey) else Pubkey.from_string(pay_to)
    program = token_program if isinstance(token_program, Pubkey) else Pubkey.from_string(
        token_program
    )
    recent = blockhash if isinstance(blockhash, Hash) else Hash.from_string(blockhash)
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= U64_MAX:
        raise ValueError("amount must be an integer between 1 and 2**64-1 base units")
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 255:
        raise ValueError("decimals must be an integer between 0 and 255")
    if program not in TOKEN_PROGRAMS:
        raise ValueError(f"{program} is not the Token or Token-2022 program")
    if fee_payer_pk == owner:
        raise ValueError("the fee payer must not be the paying wallet")
    if memo:
        memo_data = memo.encode("utf-8")
        if len(memo_data) > MAX_MEMO_BYTES:
            raise ValueError(f"memo exceeds {MAX_MEMO_BYTES} bytes")
    else:
        memo_data = binascii.hexlify(os.urandom(16))

    transfer = Instruction(
        program,
        bytes([12]) + amount.to_bytes(8, "little") + bytes([decimals]),
        [
            AccountMeta(_ata(owner, mint_pk, program), is_signer=False, is_writable=True),
            AccountMeta(mint_pk, is_signer=False, is_writable=False),
            AccountMeta(_ata(pay_to_pk, mint_pk, program), is_signer=False, is_writable=True),
            AccountMeta(owner, is_signer=True, is_writable=False),
        ],
    )
    memo_ix = Instruction(MEMO_PROGRAM, memo_data, [])
    message = MessageV0.try_compile(
        fee_payer_pk, [_CU_LIMIT_IX, _CU_PRICE_IX, transfer, memo_ix], [], recent
    )
    signature = sign(b"\x80" + bytes(message))
    return VersionedTransaction.populate(message, [Signature.default(), signature])


def encode_transaction(tx: VersionedTransaction) -> str:
    return base64.b64encode(bytes(tx)).decode("ascii")
