"""The paying wallet: a Solana CLI keypair file (JSON array of 64 integers) or a base58 secret.

The secret never leaves this object in readable form: ``repr``/``str`` show only the public
key, pickling is refused, and no error message quotes the configured value unless it is
unmistakably a file path (a base58 secret never contains ``/``, ``.`` or ``~``).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import NoReturn

from pydantic import SecretStr
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

log = logging.getLogger(__name__)

_BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


class WalletError(ValueError):
    """The wallet could not be loaded; the message never contains the secret."""


class Wallet:
    __slots__ = ("_keypair", "_pubkey", "source")

    def __init__(self, keypair: Keypair, source: str = "secret") -> None:
        self._keypair = keypair
        self._pubkey = keypair.pubkey()
        self.source = source  # "file:<path>" or "secret": where it came from, never the secret

    @property
    def pubkey(self) -> Pubkey:
        return self._pubkey

    @property
    def address(self) -> str:
        return str(self._pubkey)

    def sign_message(self, message: bytes) -> Signature:
        return self._keypair.sign_message(message)

    def __repr__(self) -> str:
        return f"Wallet(pubkey={self._pubkey})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Wallet holds a secret key and cannot be pickled or copied")


def _looks_like_path(value: str) -> bool:
    return any(c in value for c in "/.~\\") or not set(value) <= _BASE58


def _from_file(path: Path) -> tuple[Keypair, list[str]]:
    warnings: list[str] = []
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise WalletError(f"wallet file {path}: {err.strerror or 'cannot be read'}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warning = (
            f"wallet file {path} is accessible by group/others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
        warnings.append(warning)
        log.warning(warning)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise WalletError(f"wallet file {path}: {err.strerror or 'cannot be read'}") from None
    except ValueError:
        raise WalletError(
            f"wallet file {path} is not a Solana CLI keypair (JSON array of 64 integers)"
        ) from None
    if (
        not isinstance(data, list)
        or len(data) != 64
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in data)
    ):
        raise WalletError(
            f"wallet file {path} is not a Solana CLI keypair (JSON array of 64 integers)"
        )
    try:
        keypair = Keypair.from_bytes(bytes(data))
    except Exception:
        raise WalletError(
            f"wallet file {path} does not hold a valid keypair (public key mismatch)"
        ) from None
    return keypair, warnings


def load_wallet(spec: SecretStr | str) -> tuple[Wallet, list[str]]:
    """Load the wallet named by the config's ``x402.wallet``.

    Returns the wallet and warnings (e.g. a key file readable by group/others; they are also
    logged). Raises ``WalletError`` with a message that never contains the secret.
    """
    value = spec.get_secret_value() if isinstance(spec, SecretStr) else spec
    value = value.strip()
    if not value:
        raise WalletError("x402.wallet is empty")
    expanded = Path(os.path.expanduser(value))
    if _looks_like_path(value):
        keypair, warnings = _from_file(expanded)
        return Wallet(keypair, source=f"file:{expanded}"), warnings
    if 80 <= len(value) <= 90:
        try:
            keypair = Keypair.from_base58_string(value)
        except Exception:
            raise WalletError("x402.wallet is not a valid base58 keypair secret") from None
        return Wallet(keypair), []
    if expanded.is_file():
        keypair, warnings = _from_file(expanded)
        return Wallet(keypair, source=f"file:{expanded}"), warnings
    raise WalletError(
        "x402.wallet is neither a keypair file path nor a base58 keypair secret (64 bytes)"
    )


def write_keypair_file(path: Path, keypair: Keypair) -> None:
    """Write ``keypair`` in the Solana CLI format, mode 0600 (used by the test bed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(list(bytes(keypair)), fh)
