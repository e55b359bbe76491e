"""scripts/run starts the gateway and prints an environment that gets real clients through."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import FakeProvider
from tests.harness.certs import CertFiles
from tests.harness.procs import REPO, Proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exported(output: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("export "):
            for item in shlex.split(line[len("export "):]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_scripts_run_prints_working_client_environment(tmp_path: Path, test_certs: CertFiles,
                                                       fake_provider: FakeProvider) -> None:
    port = free_port()
    proc = Proc([str(REPO / "scripts" / "run"), "--listen-port", str(port),
                 "--set", f"ssl_verify_upstream_trusted_ca={test_certs.ca_pem}",
                 "--set", f"llmitm_resolve=api.openai.com:443=127.0.0.1:{fake_provider.port}"],
                env={**os.environ, "LLMITM_CONFDIR": str(tmp_path / "certs"),
                     "LLMITM_CONFIG": str(tmp_path / "no-config.yaml")},
                cwd=tmp_path)  # recordings go to tmp_path, never into the repository
    try:
        proc.wait_for(lambda s: "proxy listening at" in s, timeout=90)
        env = exported(proc.output)
        assert env["HTTPS_PROXY"] == f"http://127.0.0.1:{port}"
        bundle = Path(env["SSL_CERT_FILE"])
        assert bundle.read_bytes().count(b"BEGIN CERTIFICATE") > 10  # system CAs + llmitm CA
        for key in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                    "CODEX_CA_CERTIFICATE"):
            assert env[key] == str(bundle)
        client_env = {**os.environ, **env}
        curl = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "https://api.openai.com/v1/chat/completions",
             "-H", "content-type: application/json", "-d", '{"model":"m"}'],
            env=client_env, capture_output=True, check=True)
        assert json.loads(curl.stdout)["object"] == "chat.completion"
        sdk = subprocess.run(
            [sys.executable, "-c",
             "import openai; c = openai.OpenAI(api_key='sk-x', max_retries=0);"
             "print(c.chat.completions.create(model='m', messages=[{'role':'user','content':'hi'}])"
             ".choices[0].message.content)"],
            env=client_env, capture_output=True, check=True, timeout=60)
        assert sdk.stdout.decode().strip() == "w0 w1 w2 w3 w4"
    finally:
        proc.stop()
