"""A real ``mitmdump -s addons/gateway.py`` for end-to-end tests, and the client environment for it."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.procs import REPO, Proc

MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
LISTENING = re.compile(r"proxy listening at \*?\[?([0-9.:]+?)\]?:(\d+)")


def ca_bundle(mitm_ca: Path, out: Path) -> Path:
    """System CAs plus the llmitm CA: one file every client can be pointed at."""
    parts = [Path(p).read_bytes() for p in SYSTEM_CA_FILES if Path(p).exists()]
    parts.append(mitm_ca.read_bytes())
    out.write_bytes(b"\n".join(parts))
    return out


STARTED: list[Gateway] = []  # every gateway this test run started (for whole-run log scans)


@dataclass
class Gateway:
    confdir: Path
    workdir: Path
    upstream_ca: Path | None = None
    resolve: dict[str, int] = field(default_factory=dict)  # "api.openai.com:443" -> local port
    config_text: str | None = None
    extra_args: list[str] = field(default_factory=list)
    script: Path | None = REPO / "addons" / "gateway.py"  # None: bare mitmdump
    env: dict[str, str] | None = None
    wrapper: list[str] = field(default_factory=list)  # runs mitmdump under it (e.g. valgrind)
    proc: Proc | None = None
    port: int = 0

    @property
    def config_path(self) -> Path:
        return self.workdir / "gateway.yaml"

    def start(self, expect_failure: bool = False) -> Gateway:
        args = [*self.wrapper, MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", "0",
                "--set", f"confdir={self.confdir}", "--set", "connection_strategy=lazy"]
        if self.script is not None:
            args += ["-s", str(self.script)]
        if self.upstream_ca is not None:
            args += ["--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"]
        for host, port in self.resolve.items():
            args += ["--set", f"llmitm_resolve={host}=127.0.0.1:{port}"]
        if self.config_text is not None:
            self.config_path.write_text(self.config_text)
            args += ["--set", f"llmitm_config={self.config_path}"]
        args += self.extra_args
        self.proc = Proc(args, env=self.env, cwd=self.workdir)
        STARTED.append(self)
        if expect_failure:
            self.proc.popen.wait(30)
            self.proc.stop()
            return self
        line = self.proc.wait_for(lambda s: LISTENING.search(s) is not None)
        match = LISTENING.search(line)
        assert match
        self.port = int(match.group(2))
        return self

    def stop(self) -> int:
        return self.proc.stop() if self.proc else 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mitm_ca(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def bundle(self) -> Path:
        """Written once per gateway: concurrent clients must never read a half-written file."""
        path = self.workdir / "ca-bundle.pem"
        return path if path.exists() else ca_bundle(self.mitm_ca, path)

    def client_env(self, proxy_url: str | None = None) -> dict[str, str]:
        """The variables each client reads, as scripts/run prints them."""
        bundle = str(self.bundle())
        proxy = proxy_url or self.url
        return {
            "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
            "NO_PROXY": "", "no_proxy": "",
            "SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle, "CURL_CA_BUNDLE": bundle,
            "NODE_EXTRA_CA_CERTS": bundle, "CODEX_CA_CERTIFICATE": bundle,
        }
