"""A test CA and a server certificate for the provider hosts, made with mitmproxy's own CertStore.

The fake provider serves this certificate for api.openai.com / api.anthropic.com (and 127.0.0.1
for the tests' direct control calls); mitmdump trusts the test CA through
``ssl_verify_upstream_trusted_ca``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.certs import CertStore

PROVIDER_HOSTS = (
    "api.openai.com",
    "api.anthropic.com",
    "compat.example.test",
    "telemetry.example.test",
    "paid.example.test",
    "localhost",
)


@dataclass(frozen=True)
class CertFiles:
    ca_pem: Path  # CA certificate only
    server_cert: Path  # server certificate (+ chain)
    server_key: Path


def make_test_certs(directory: Path) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    store = CertStore.from_store(directory, "llmitm-test", 2048)
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in PROVIDER_HOSTS]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    entry = store.get_cert("api.openai.com", sans)
    ca_pem = directory / "test-ca.pem"
    ca_pem.write_bytes(store.default_ca.to_pem())
    server_cert = directory / "server-cert.pem"
    server_cert.write_bytes(entry.cert.to_pem())
    server_key = directory / "server-key.pem"
    server_key.write_bytes(
        entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return CertFiles(ca_pem, server_cert, server_key)
