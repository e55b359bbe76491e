"""A LiteSVM bank with one SPL mint, a payer and a payee, plus the facilitator signer over it.

LiteSVM runs the real SPL Token / Token-2022 / Associated Token Account / Memo / Compute Budget
programs in-process. solders has no SPL instruction builders, so the few instructions the bank
needs are raw bytes (InitializeMint2, CreateIdempotent, MintTo).

Every access to the LiteSVM object goes through ``Bank.lock``: the bank is shared by the HTTP
server's event loop (RPC, balances) and the facilitator's thread.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from typing import Any

from solders.hash import Hash
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import Transaction, VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from x402.mechanisms.svm import SOLANA_DEVNET_CAIP2, TOKEN_PROGRAM_ADDRESS
from x402.mechanisms.svm.signers import FacilitatorKeypairSigner

TOKEN_PROGRAM = Pubkey.from_string(TOKEN_PROGRAM_ADDRESS)
ATA_PROGRAM = Pubkey.from_string("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL")
MINT_SIZE = 82
LAMPORTS = 1_000_000_000


def ata_address(owner: Pubkey, mint: Pubkey, token_program: Pubkey = TOKEN_PROGRAM) -> Pubkey:
    """The associated token account of ``owner`` for ``mint`` (independent of the code under
    test: the bank derives it itself)."""
    return Pubkey.find_program_address(
        [bytes(owner), bytes(token_program), bytes(mint)], ATA_PROGRAM
    )[0]


class BankError(RuntimeError):
    pass


@dataclass(frozen=True)
class BankInfo:
    mint: str
    decimals: int
    token_program: str
    payer: str
    pay_to: str
    fee_payer: str
    network: str


class Bank:
    """One SPL mint (6 decimals by default), a funded payer, a payee with an empty ATA, and a
    facilitator fee-payer keypair with SOL."""

    def __init__(
        self,
        *,
        payer: Keypair | None = None,
        payee: Keypair | None = None,
        decimals: int = 6,
        token_program: Pubkey = TOKEN_PROGRAM,
        fund_base_units: int = 1_000 * 10**6,
        network: str = SOLANA_DEVNET_CAIP2,
    ) -> None:
        self.lock = threading.RLock()
        self.svm = LiteSVM()
        self.network = network
        self.decimals = decimals
        self.token_program = token_program
        self.payer = payer or Keypair()
        self.payee = payee or Keypair()
        self.fee_payer = Keypair()
        self.authority = Keypair()
        self._mint_kp = Keypair()
        self.mint = self._mint_kp.pubkey()
        for kp in (self.fee_payer, self.authority):
            self.svm.airdrop(kp.pubkey(), 100 * LAMPORTS)
        self._create_mint()
        self.create_ata(self.payer.pubkey())
        self.create_ata(self.payee.pubkey())
        if fund_base_units:
            self.mint_to(self.payer.pubkey(), fund_base_units)

    # --- set-up -------------------------------------------------------------------------------

    def _send_legacy(self, ixs: list[Instruction], signers: list[Keypair]) -> None:
        with self.lock:
            msg = Message.new_with_blockhash(ixs, signers[0].pubkey(), self.svm.latest_blockhash())
            tx = Transaction(signers, msg, self.svm.latest_blockhash())
            result = self.svm.send_transaction(tx)
            if isinstance(result, FailedTransactionMetadata):
                raise BankError(f"bank set-up transaction failed: {result.err()}")
            # A new blockhash per set-up step keeps identical instructions from colliding.
            self.svm.expire_blockhash()

    def _create_mint(self) -> None:
        rent = self.svm.minimum_balance_for_rent_exemption(MINT_SIZE)
        create = create_account(
            CreateAccountParams(
                from_pubkey=self.authority.pubkey(),
                to_pubkey=self.mint,
                lamports=rent,
                space=MINT_SIZE,
                owner=self.token_program,
            )
        )
        # InitializeMint2: [20, decimals, mint_authority(32), freeze_authority option (0 = none)]
        init = Instruction(
            self.token_program,
            bytes([20, self.decimals]) + bytes(self.authority.pubkey()) + bytes([0]),
            [AccountMeta(self.mint, is_signer=False, is_writable=True)],
        )
        self._send_legacy([create, init], [self.authority, self._mint_kp])

    def ata(self, owner: Pubkey) -> Pubkey:
        return ata_address(owner, self.mint, self.token_program)

    def create_ata(self, owner: Pubkey) -> Pubkey:
        ata = self.ata(owner)
        # Associated Token Account program, CreateIdempotent = [1]
        ix = Instruction(
            ATA_PROGRAM,
            bytes([1]),
            [
                AccountMeta(self.authority.pubkey(), is_signer=True, is_writable=True),
                AccountMeta(ata, is_signer=False, is_writable=True),
                AccountMeta(owner, is_signer=False, is_writable=False),
                AccountMeta(self.mint, is_signer=False, is_writable=False),
                AccountMeta(SYSTEM_PROGRAM_ID, is_signer=False, is_writable=False),
                AccountMeta(self.token_program, is_signer=False, is_writable=False),
            ],
        )
        self._send_legacy([ix], [self.authority])
        return ata

    def mint_to(self, owner: Pubkey, amount: int) -> None:
        # MintTo: [7, u64 amount LE]; accounts: mint (w), destination (w), authority (signer)
        ix = Instruction(
            self.token_program,
            bytes([7]) + amount.to_bytes(8, "little"),
            [
                AccountMeta(self.mint, is_signer=False, is_writable=True),
                AccountMeta(self.ata(owner), is_signer=False, is_writable=True),
                AccountMeta(self.authority.pubkey(), is_signer=True, is_writable=False),
            ],
        )
        self._send_legacy([ix], [self.authority])

    # --- reads --------------------------------------------------------------------------------

    def token_balance(self, owner: Pubkey) -> int:
        """Base units held by ``owner``'s ATA (0 when it does not exist)."""
        with self.lock:
            acct = self.svm.get_account(self.ata(owner))
        if acct is None:
            return 0
        return int.from_bytes(bytes(acct.data)[64:72], "little")

    def balances(self) -> dict[str, int]:
        return {
            "payer": self.token_balance(self.payer.pubkey()),
            "pay_to": self.token_balance(self.payee.pubkey()),
        }

    def latest_blockhash(self) -> Hash:
        with self.lock:
            return self.svm.latest_blockhash()

    def expire_blockhash(self) -> None:
        with self.lock:
            self.svm.expire_blockhash()

    def info(self) -> BankInfo:
        return BankInfo(
            mint=str(self.mint),
            decimals=self.decimals,
            token_program=str(self.token_program),
            payer=str(self.payer.pubkey()),
            pay_to=str(self.payee.pubkey()),
            fee_payer=str(self.fee_payer.pubkey()),
            network=self.network,
        )

    # --- a minimal Solana JSON-RPC over the bank ----------------------------------------------

    def rpc(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one JSON-RPC request: getAccountInfo, getLatestBlockhash, getSlot,
        getSignatureStatuses, getBalance. Enough for the official client and llmitm's chain.py."""
        rid = request.get("id")
        method = request.get("method")
        params = request.get("params") or []
        with self.lock:
            slot = self.svm.get_clock().slot
            context = {"slot": slot, "apiVersion": "2.0.0"}
            if method == "getLatestBlockhash":
                value: Any = {
                    "blockhash": str(self.svm.latest_blockhash()),
                    "lastValidBlockHeight": slot + 150,
                }
            elif method == "getAccountInfo":
                acct = self.svm.get_account(Pubkey.from_string(params[0]))
                value = (
                    None
                    if acct is None
                    else {
                        "data": [base64.b64encode(bytes(acct.data)).decode(), "base64"],
                        "executable": acct.executable,
                        "lamports": acct.lamports,
                        "owner": str(acct.owner),
                        "rentEpoch": 0,
                        "space": len(bytes(acct.data)),
                    }
                )
            elif method == "getBalance":
                value = self.svm.get_balance(Pubkey.from_string(params[0])) or 0
            elif method == "getSlot":
                return {"jsonrpc": "2.0", "id": rid, "result": slot}
            elif method == "getSignatureStatuses":
                statuses = []
                for sig in params[0]:
                    tx = self.svm.get_transaction(Signature.from_string(sig))
                    if tx is None:
                        statuses.append(None)
                        continue
                    failed = isinstance(tx, FailedTransactionMetadata)
                    statuses.append(
                        {
                            "slot": slot,
                            "confirmations": None,
                            "err": str(tx.err()) if failed else None,
                            "status": {"Err": str(tx.err())} if failed else {"Ok": None},
                            "confirmationStatus": "finalized",
                        }
                    )
                value = statuses
            else:
                return {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "error": {"code": -32601, "message": f"method not found: {method}"},
                }
        return {"jsonrpc": "2.0", "id": rid, "result": {"context": context, "value": value}}


class LiteSVMFacilitatorSigner(FacilitatorKeypairSigner):
    """The official facilitator signer, with its four RPC calls answered by the bank.

    ``get_addresses`` and ``sign_transaction`` are the SDK's own (fee payer co-signs slot 0);
    ``simulate_transaction``, ``send_transaction`` and ``confirm_transaction`` run on LiteSVM.
    """

    def __init__(self, bank: Bank) -> None:
        super().__init__(bank.fee_payer)
        self._bank = bank
        self.settled: list[str] = []

    def simulate_transaction(self, tx_base64: str, network: str) -> None:
        tx = VersionedTransaction.from_bytes(base64.b64decode(tx_base64))
        with self._bank.lock:
            result = self._bank.svm.simulate_transaction(tx)
        if isinstance(result, FailedTransactionMetadata):
            raise RuntimeError(f"Simulation failed: {result.err()}")

    def send_transaction(self, tx_base64: str, network: str) -> str:
        tx = VersionedTransaction.from_bytes(base64.b64decode(tx_base64))
        with self._bank.lock:
            result = self._bank.svm.send_transaction(tx)
        if isinstance(result, FailedTransactionMetadata):
            raise RuntimeError(f"Send failed: {result.err()}")
        signature = str(tx.signatures[0])
        self.settled.append(signature)
        return signature

    def confirm_transaction(self, signature: str, network: str, timeout_seconds: int = 30) -> None:
        with self._bank.lock:
            tx = self._bank.svm.get_transaction(Signature.from_string(signature))
        if tx is None:
            raise RuntimeError("Transaction not found")
        if isinstance(tx, FailedTransactionMetadata):
            raise RuntimeError(f"Transaction failed: {tx.err()}")


def make_facilitator(bank: Bank) -> tuple[Any, LiteSVMFacilitatorSigner]:
    """The official ``x402Facilitator`` with the SVM exact scheme (v2 and v1) over the bank."""
    from x402 import x402Facilitator
    from x402.mechanisms.svm.exact.register import register_exact_svm_facilitator

    signer = LiteSVMFacilitatorSigner(bank)
    facilitator = x402Facilitator()
    register_exact_svm_facilitator(facilitator, signer, bank.network)
    return facilitator, signer
