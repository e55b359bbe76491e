"""Report secret leaks in a recording, offline (run through ``scripts/leakscan``).

    scripts/leakscan FILE [--config gateway.yaml] [--json]

Recordings are redacted, so this works on what is left: ``[redacted:xxxxxxxx]`` markers whose
digest is a configured secret's, found outside that secret's scope, session or header (or in a
URL or body); markers of headers the gateway injected into one session's flows, found in another
session's flow (owners learned from the recording itself, without a config); injected headers
outside their recorded scope; the findings the live guard left on the flow (``llmitm.leaks``);
and, for unredacted recordings, the configured secret values themselves.

One line per finding: time, session, method, URL (redacted), kind, where, explanation. Exit
status: 1 when anything was found, 0 when nothing was, 2 when the file (or config) is unreadable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from mitmproxy import flow as mflow
from mitmproxy import http, io
from mitmproxy.exceptions import FlowReadException

from llmitm import flowmeta
from llmitm.leaks import (
    ConfigSecrets,
    Finding,
    Injected,
    LeakChecker,
    OutgoingRequest,
    learn_secrets,
    load_config_secrets,
)
from llmitm.redact import SecretSet


@dataclass
class Recorded:
    """One outgoing request (or WebSocket message) of a recorded flow."""

    flow: http.HTTPFlow
    request: OutgoingRequest
    guard_findings: list[Finding]


def session_of(flow: mflow.Flow) -> str:
    session = flow.metadata.get(flowmeta.SESSION)
    if isinstance(session, str) and session:
        return session
    auth = flow.metadata.get("proxyauth")
    if isinstance(auth, (list, tuple)) and auth and isinstance(auth[0], str) and auth[0]:
        return auth[0]
    return "default"


def requests_of(flow: http.HTTPFlow) -> Iterator[Recorded]:
    req = flow.request
    injected_meta = flow.metadata.get(flowmeta.INJECTED)
    injected = (
        [
            inj
            for inj in (Injected.from_meta(e) for e in injected_meta if isinstance(e, dict))
            if inj is not None
        ]
        if isinstance(injected_meta, list)
        else []
    )
    leaks_meta = flow.metadata.get(flowmeta.LEAKS)
    guard = (
        [f for f in (Finding.from_meta(e) for e in leaks_meta if isinstance(e, dict)) if f is not None]
        if isinstance(leaks_meta, list)
        else []
    )
    session = session_of(flow)
    body = req.get_content(strict=False) or b""
    yield Recorded(
        flow,
        OutgoingRequest(
            session=session,
            host=req.host,
            path=req.path,
            headers=[(k, v) for k, v in req.headers.items(multi=True)],
            body=body,
            url=req.url,
            port=req.port,
            injected=injected,
        ),
        guard,
    )
    if flow.websocket is not None:
        for message in flow.websocket.messages:
            if message.from_client and message.content:
                yield Recorded(
                    flow,
                    OutgoingRequest(
                        session=session,
                        host=req.host,
                        path=req.path,
                        body=message.content,
                        url=req.url,
                        port=req.port,
                        body_label="websocket",
                    ),
                    [],
                )


def read(path: str) -> list[Recorded]:
    out: list[Recorded] = []
    with open(path, "rb") as fh:
        for f in io.FlowReader(fh).stream():
            if isinstance(f, http.HTTPFlow):
                out.extend(requests_of(f))
    return out


def scan(recorded: list[Recorded], config: ConfigSecrets | None) -> list[tuple[Recorded, Finding]]:
    learned = learn_secrets(r.request for r in recorded)
    checker = LeakChecker(config.known if config else (), learned=learned)
    results: list[tuple[Recorded, Finding]] = []
    for rec in recorded:
        findings = [*rec.guard_findings, *checker.check_recorded(rec.request)]
        if config is not None and config.known:
            findings += checker.check(rec.request)
        seen: set[tuple[str, str, str]] = set()
        for f in findings:
            key = (f.kind, f.where.lower(), f.secret)
            if key not in seen:
                seen.add(key)
                results.append((rec, f))
    return results


def line(rec: Recorded, finding: Finding, redactor: SecretSet) -> str:
    flow = rec.flow
    when = datetime.fromtimestamp(flow.timestamp_created, UTC).isoformat(timespec="seconds")
    url = redactor.redact_text(flow.request.url)
    return (
        f"{when} {rec.request.session} {flow.request.method} {url} "
        f"{finding.kind} {finding.where}: {redactor.redact_text(finding.explanation)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leakscan", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a mitmproxy flow file (e.g. a llmitm recording)")
    parser.add_argument("--config", help="gateway YAML naming the secrets and their scopes")
    parser.add_argument("--json", action="store_true", help="one JSON object per finding")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    config: ConfigSecrets | None = None
    if args.config:
        try:
            config = load_config_secrets(args.config, os.environ)
        except ValueError as e:
            print(f"leakscan: {e}", file=sys.stderr)
            return 2
    try:
        recorded = read(args.file)
    except (OSError, FlowReadException) as e:
        print(f"leakscan: cannot read {args.file}: {e}", file=sys.stderr)
        return 2

    redactor = config.secret_set() if config else SecretSet()
    results = scan(recorded, config)
    for rec, finding in results:
        if args.json:
            entry = {
                "time": rec.flow.timestamp_created,
                "session": rec.request.session,
                "method": rec.flow.request.method,
                "url": redactor.redact_text(rec.flow.request.url),
                **finding.to_meta(),
            }
            entry["explanation"] = redactor.redact_text(finding.explanation)
            print(json.dumps(entry))
        else:
            print(line(rec, finding, redactor))
    flows = len({id(r.flow) for r in recorded})
    print(f"leakscan: {len(results)} finding(s) in {flows} flow(s) of {args.file}", file=sys.stderr)
    return 1 if results else 0


if __name__ == "__main__":
    sys.exit(main())
