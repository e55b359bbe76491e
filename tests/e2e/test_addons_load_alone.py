"""Each addon module loads on its own with ``mitmdump -s`` (and serves a request), from any cwd."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import FakeProvider
from tests.harness.certs import CertFiles
from tests.harness.gateway import Gateway
from tests.harness.procs import REPO

ADDON_MODULES = sorted(p for p in (REPO / "addons").glob("*.py")
                       if p.name not in ("glue.py", "gateway.py"))


def test_every_addon_module_is_listed() -> None:
    names = {p.stem for p in ADDON_MODULES}
    assert {"configuration", "resolve", "identify", "control", "session_headers", "streams",
            "repair"} <= names


@pytest.mark.parametrize("module", ADDON_MODULES, ids=lambda p: p.stem)
def test_addon_module_loads_alone(module: Path, mitm_confdir: Path, test_certs: CertFiles,
                                  fake_provider: FakeProvider, tmp_path: Path) -> None:
    gw = Gateway(confdir=mitm_confdir, workdir=tmp_path, upstream_ca=test_certs.ca_pem,
                 script=module, env=dict(os.environ),
                 extra_args=["--set", f"llmitm_resolve=api.openai.com:443=127.0.0.1:{fake_provider.port}"]
                 if module.stem == "resolve" else [])
    gw.start()
    try:
        # Without llmitm_resolve, the request names the fake's address; Host says the provider.
        url = ("https://api.openai.com/v1/models" if module.stem == "resolve"
               else f"https://127.0.0.1:{fake_provider.port}/v1/models")
        with httpx.Client(proxy=gw.url, verify=str(gw.bundle()), trust_env=False, timeout=20) as c:
            r = c.get(url, headers={"host": "api.openai.com"})
        assert r.status_code == 200, gw.proc.output if gw.proc else ""
    finally:
        gw.stop()
    assert gw.proc is not None and "Traceback" not in gw.proc.output, gw.proc.output
