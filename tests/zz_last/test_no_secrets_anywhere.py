"""After the whole run: no secret of any gateway's configuration or environment appears in any
file a gateway wrote (recordings above all) or in any gateway's log.

Runs last (see conftest.py here): it collects every gateway this pytest run started from
``tests.harness.gateway.STARTED``. The secrets are those the gateway itself would redact
(``load_config_secrets`` on its config file, with its environment) plus every environment value
whose name says secret (KEY, TOKEN, SECRET, PASSWORD) that the test set for that gateway. Files
are scanned as bytes and, for flow files, as decoded bodies (through Content-Encoding).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
from mitmproxy.exceptions import FlowReadException

from llmitm.leaks import load_config_secrets
from llmitm.redact import secret_needles
from tests.e2e.recording_support import flow_texts, read_flows
from tests.harness.gateway import STARTED, Gateway

SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)
MIN_LEN = 8
NOT_WRITTEN_BY_THE_GATEWAY = {"gateway.yaml", "ca-bundle.pem"}


def secrets_of(gw: Gateway) -> set[str]:
    values: set[str] = set()
    env = gw.env or {}
    if gw.config_text is not None and gw.config_path.exists():
        with contextlib.suppress(ValueError):  # a gateway started to show a config is refused
            values |= load_config_secrets(gw.config_path, env).values
    for name, value in env.items():
        if SECRET_ENV_NAME.search(name) and os.environ.get(name) != value:
            values.add(value)
    needles: set[str] = set()
    for value in values:
        needles |= {needle for needle, _ in secret_needles(value) if len(needle) >= MIN_LEN}
    return needles


def find(data: bytes, needles: set[str]) -> list[str]:
    return sorted({n[:4] + "..." for n in needles if n.encode("utf-8", "surrogateescape") in data})


def test_no_secret_in_any_recording_or_log() -> None:
    if not STARTED:
        pytest.skip("no gateway was started in this run")
    problems: list[str] = []
    scanned_files = 0
    for gw in STARTED:
        needles = secrets_of(gw)
        if not needles:
            continue
        if gw.proc is not None and (hits := find(gw.proc.output.encode("utf-8", "replace"), needles)):
            problems.append(f"log of the gateway in {gw.workdir}: {hits}")
        for path in sorted(p for p in Path(gw.workdir).rglob("*") if p.is_file()):
            if path.name in NOT_WRITTEN_BY_THE_GATEWAY:
                continue
            scanned_files += 1
            if hits := find(path.read_bytes(), needles):
                problems.append(f"{path}: {hits}")
            if path.suffix == ".mitm":
                try:
                    flows = read_flows(path)
                except FlowReadException as e:
                    problems.append(f"{path}: unreadable ({e})")
                    continue
                for flow in flows:
                    for text in flow_texts(flow):
                        if hits := find(text, needles):
                            problems.append(f"{path} flow {flow.id} (decoded): {hits}")
    assert not problems, "secrets found:\n" + "\n".join(problems)
    print(f"scanned the logs of {len(STARTED)} gateway(s) and {scanned_files} file(s)")


def test_the_scan_finds_a_planted_secret(tmp_path: Path) -> None:
    """The scan above is not vacuous: a secret from the config, percent-encoded in a file."""
    (tmp_path / "gateway.yaml").write_text("control:\n  admin_token: ${PLANTED}\n")
    gw = Gateway(confdir=tmp_path, workdir=tmp_path, config_text="",
                 env={"PLANTED": "planted/admin-token-123"})
    (tmp_path / "trace.log").write_text("token=planted%2Fadmin-token-123\n")
    needles = secrets_of(gw)
    assert find((tmp_path / "trace.log").read_bytes(), needles) == ["plan..."]
