"""Instructions per request and per streamed frame inside mitmdump, counted by valgrind's
callgrind: a measure that does not drift with the machine (scripts/bench's timings on a shared
VM swing by more than the differences they compare), for checking a change to the hot path.

Every route runs mitmdump under ``valgrind --tool=callgrind --instr-atstart=no``; after a warm-up
the counting is switched on (``callgrind_control -i on``), N JSON POSTs (or one SSE burst) go
through, and the counters are dumped. Only mitmdump's own process is counted: the recording
writer (a child process) is not. Under valgrind a route is ~50x slower, and TCP may cut a burst
into other chunks than at full speed, so compare these counts with each other, not with
timings. Needs ``valgrind`` (Debian package ``valgrind``); ``python scripts/bench_instructions.py``
prints a markdown table. Everything listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_repair  # noqa: E402
from bench import CHAT_BODY, HEADERS_CONFIG, NODELAY  # noqa: E402

from tests.harness.certs import CertFiles, make_test_certs  # noqa: E402
from tests.harness.gateway import Gateway  # noqa: E402
from tests.harness.procs import Proc  # noqa: E402

GATEWAY = REPO / "addons" / "gateway.py"
STREAM_TRUE = REPO / "scripts" / "bench_stream_true.py"
NO_RECORDING = "record: {dir: null}\n"
# after the warm-up, before counting: the recorder snapshots finished flows in batches, 50 ms
# after the first (recorder.BATCH_DELAY); the warm-up's must not be counted
SETTLE = 2.0


class Counted:
    """One mitmdump under callgrind, counting only between ``start()`` and ``stop()``."""

    def __init__(self, tmp: Path, certs: CertFiles, name: str, script: Path | None,
                 config: str | None, extra: list[str], resolve: dict[str, int]) -> None:
        self.out = tmp / f"callgrind-{name}"
        self.out.mkdir()
        wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={self.out}/cg.%p", sys.executable]
        self.gateway = Gateway(confdir=tmp / "conf", workdir=self.out, upstream_ca=certs.ca_pem,
                               script=script, config_text=config, resolve=resolve,
                               extra_args=["--set", "flow_detail=0", *extra], wrapper=wrapper)
        self.gateway.start()
        assert self.gateway.proc is not None
        self.pid = str(self.gateway.proc.popen.pid)

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, self.pid], capture_output=True, check=False,
                       timeout=60)

    def start(self) -> None:
        self._control("-i", "on")
        self._control("-z")

    def stop(self, tag: str) -> int:
        """Instructions counted since start()."""
        time.sleep(0.5)  # let the last hooks run
        self._control("-d", tag)
        self._control("-i", "off")
        for _ in range(40):  # the dump is written asynchronously, between two basic blocks
            for path in self.out.glob("cg.*"):
                text = path.read_text(errors="replace")
                if f"Client Request: {tag}" in text or f"dump {tag}" in text:
                    for line in text.splitlines():
                        if line.startswith(("summary:", "totals:")):
                            return int(line.split()[1])
            time.sleep(0.25)
        raise RuntimeError(f"no callgrind dump for {tag} in {self.out}")

    def close(self) -> None:
        self.gateway.stop()


def client(gw: Gateway) -> httpx.Client:
    transport = httpx.HTTPTransport(proxy=gw.url, verify=str(gw.bundle()), socket_options=NODELAY)
    return httpx.Client(transport=transport, trust_env=False, timeout=600)


def per_request(route: Counted, url: str, n: int) -> float:
    with client(route.gateway) as c:
        for _ in range(30):
            c.post(url, json=CHAT_BODY, headers={"host": "api.openai.com"})
        time.sleep(SETTLE)
        route.start()
        for _ in range(n):
            assert c.post(url, json=CHAT_BODY, headers={"host": "api.openai.com"}).status_code == 200
        return route.stop(f"requests-{n}") / n


def per_frame(route: Counted, base: str, kind: bench_repair.Kind, stream: Path, tag: str) -> float:
    with client(route.gateway) as c:

        def burst() -> None:
            with c.stream("POST", f"{base}{kind.path}", json=kind.body,
                          headers={"host": kind.host, "x-fake-sse-file": str(stream)}) as r:
                assert r.status_code == 200
                assert sum(len(x) for x in r.iter_raw()) > 0

        burst()
        time.sleep(SETTLE)
        route.start()
        burst()
        return route.stop(tag) / bench_repair.frame_count(stream.read_bytes())


def run(requests: int, frames: int) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="llmitm-bench-instructions-"))
    certs = make_test_certs(tmp / "testca")
    fake = Proc([sys.executable, "-m", "tests.harness.fake_provider", "--no-record",
                 "--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key)])
    try:
        port = json.loads(fake.wait_for(lambda s: s.startswith("{")))["port"]
        named = {"api.openai.com:443": port, "api.anthropic.com:443": port}
        local, openai = f"https://127.0.0.1:{port}", "https://api.openai.com"
        lines = ["| JSON POST, per request | instructions | / mitmdump |", "|---|---|---|"]
        spine: list[tuple[str, Path | None, str | None, list[str], dict[str, int], str]] = [
            ("mitmdump", None, None, [], {}, local),
            ("llmitm (default)", GATEWAY, None, [], named, openai),
            ("llmitm, recording off", GATEWAY, NO_RECORDING, [], named, openai),
            ("llmitm, session headers", GATEWAY, HEADERS_CONFIG, [], named, openai),
        ]
        base_count = 0.0
        for i, (name, script, config, extra, resolve, base) in enumerate(spine):
            route = Counted(tmp, certs, f"spine{i}", script, config, extra, resolve)
            try:
                count = per_request(route, f"{base}/v1/chat/completions", requests)
            finally:
                route.close()
            base_count = base_count or count
            lines.append(f"| {name} | {count / 1e6:.2f}M | {count / base_count:.3f}x |")
        streams = {k.name: tmp / f"burst-{i}.sse" for i, k in enumerate(bench_repair.KINDS)}
        for kind in bench_repair.KINDS:
            streams[kind.name].write_bytes(kind.make(frames))
        routes = [("passthrough", STREAM_TRUE, [], {}),
                  ("repair off", GATEWAY, ["--set", "llmitm_repair=false"], named),
                  ("repair on", GATEWAY, [], named)]
        counts: dict[tuple[str, str], float] = {}
        for i, (name, script, extra, resolve) in enumerate(routes):
            route = Counted(tmp, certs, f"repair{i}", script, None, extra, resolve)
            try:
                for j, kind in enumerate(bench_repair.KINDS):
                    base = local if not resolve else f"https://{kind.host}"
                    counts[(name, kind.name)] = per_frame(route, base, kind, streams[kind.name],
                                                          f"burst-{j}")
            finally:
                route.close()
        lines += ["", f"| SSE burst of ~{frames:,} frames, per frame | passthrough | repair off | "
                  "repair on | passthrough / repair on |", "|---|---|---|---|---|"]
        for kind in bench_repair.KINDS:
            p, off, on = (counts[(r, kind.name)] for r, _, _, _ in routes)
            lines.append(f"| {kind.name} | {p / 1e3:.1f}k | {off / 1e3:.1f}k | {on / 1e3:.1f}k | "
                         f"{p / on:.2f}x |")
        return "\n".join(lines) + "\n"
    finally:
        fake.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--frames", type=int, default=2000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench_instructions: needs valgrind (Debian/Ubuntu: apt-get install valgrind)",
              file=sys.stderr)
        return 2
    print(run(args.requests, args.frames))
    return 0


if __name__ == "__main__":
    sys.exit(main())
