"""The paid test bed: ``python -m tests.x402bank.server [--port N] [--certfile F --keyfile K]
[--payer-keypair PATH] [--price BASE_UNITS]`` from the repo root.

Prints one JSON line when ready::

    {"ready": true, "port": ..., "mint": ..., "pay_to": ..., "fee_payer": ..., "network": ...,
     "decimals": 6, "price": ..., "payer": ..., "rpc_url": ..., "facilitator_url": ...,
     "scheme": "http"|"https"}

Endpoints (all OpenAI-compatible ``POST .../v1/chat/completions``):

- ``/v1/chat/completions``: the official SDK (``x402ResourceServer`` + ``PaymentMiddlewareASGI``),
  x402 v2, JSON response, price ``--price``.
- ``/cheap/v1/chat/completions``: the same SDK, two accepts, the dearer (2x) advertised first.
- ``/x402v1/v1/chat/completions``: hand-built x402 v1 (402 body, ``X-PAYMENT``,
  ``X-PAYMENT-RESPONSE``), verified and settled through the same facilitator.
- ``/stream/v1/chat/completions``: own v2 endpoint that verifies and settles first, then streams
  SSE ``chat.completion.chunk`` frames ``--interval`` seconds apart, with ``PAYMENT-RESPONSE``.
- ``GET /v1/models``: free.
- ``GET /_bank/balances``: ``{"payer", "pay_to", "settlements", "by_endpoint" (paid),
  "requests" (every request by path, 402s included), "streams" ([{first, last}] send times of
  each paid stream's frames), ...}``; the streaming endpoint takes ``X-Bank-Interval: <s>``,
  the SDK endpoints ``X-Bank-Delay: <s>`` (a pause between verification and settlement);
  ``POST /_bank/expire_blockhash``; ``POST /rpc``: the bank's Solana JSON-RPC.

The facilitator (and a plain-HTTP copy of ``/rpc``) runs in its own thread and loop on another
port: ``rpc_url``/``facilitator_url`` in the ready line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from solders.keypair import Keypair
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .bank import Bank
from .facilitator import FacilitatorThread, bind_socket

MAX_TIMEOUT_SECONDS = 60


def load_or_create_keypair(path: Path) -> Keypair:
    if path.exists():
        return Keypair.from_bytes(bytes(json.loads(path.read_text())))
    kp = Keypair()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(list(bytes(kp)), fh)
    return kp


def _b64json(doc: Any) -> str:
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-x402bank-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


async def _model_of(request: Request) -> str:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return "x402bank"
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else "x402bank"


def build_app(bank: Bank, fac: FacilitatorThread, price: int, interval: float) -> Starlette:
    from x402 import x402ResourceServer
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient
    from x402.http.middleware.fastapi import PaymentMiddlewareASGI
    from x402.http.types import PaymentOption, RouteConfig
    from x402.mechanisms.svm.exact.server import ExactSvmScheme
    from x402.schemas import (
        PaymentPayload,
        PaymentPayloadV1,
        PaymentRequirements,
        PaymentRequirementsV1,
    )

    info = bank.info()
    fac_client = HTTPFacilitatorClient(FacilitatorConfig(url=fac.url, timeout=30))
    server = x402ResourceServer(fac_client)
    server.register(info.network, ExactSvmScheme())
    counts: Counter[str] = Counter()  # paid successes per path
    requests: Counter[str] = Counter()  # every request per path, 402s included
    streams: list[dict[str, float | None]] = []  # per paid stream: when its frames were sent

    def option(amount: int) -> PaymentOption:
        return PaymentOption(
            scheme="exact",
            pay_to=info.pay_to,
            price={"amount": str(amount), "asset": info.mint, "extra": {}},
            network=info.network,
            max_timeout_seconds=MAX_TIMEOUT_SECONDS,
        )

    routes = {
        "POST /v1/chat/completions": RouteConfig(
            accepts=option(price), description="x402bank chat", mime_type="application/json"
        ),
        "POST /cheap/v1/chat/completions": RouteConfig(
            accepts=[option(2 * price), option(price)],
            description="x402bank chat, two prices",
            mime_type="application/json",
        ),
    }

    async def sdk_chat(request: Request) -> JSONResponse:
        # X-Bank-Delay: seconds between the SDK's verify and its settlement (a slow answer)
        try:
            delay = min(10.0, max(0.0, float(request.headers.get("x-bank-delay", 0))))
        except ValueError:
            delay = 0.0
        if delay:
            await asyncio.sleep(delay)
        counts[request.url.path] += 1
        return JSONResponse(completion(await _model_of(request), "paid answer"))

    # --- v1, by hand ----------------------------------------------------------------------

    def v1_requirement(request: Request) -> dict[str, Any]:
        return {
            "scheme": "exact",
            "network": "solana-devnet",
            "maxAmountRequired": str(price),
            "resource": str(request.url),
            "description": "x402bank chat (v1)",
            "mimeType": "application/json",
            "payTo": info.pay_to,
            "maxTimeoutSeconds": MAX_TIMEOUT_SECONDS,
            "asset": info.mint,
            "extra": {"feePayer": info.fee_payer},
        }

    async def v1_chat(request: Request) -> Response:
        req = v1_requirement(request)
        header = request.headers.get("x-payment")

        def unpaid(error: str) -> JSONResponse:
            return JSONResponse({"x402Version": 1, "error": error, "accepts": [req]}, 402)

        if not header:
            return unpaid("X-PAYMENT header is required")
        try:
            payload = PaymentPayloadV1.model_validate_json(base64.b64decode(header))
        except (ValueError, binascii.Error):
            return unpaid("X-PAYMENT header is malformed")
        requirements = PaymentRequirementsV1.model_validate(req)
        if payload.scheme != req["scheme"] or payload.network != req["network"]:
            return unpaid("payment does not match the requirements")
        verified = await fac_client.verify(payload, requirements)
        if not verified.is_valid:
            return unpaid(f"invalid payment: {verified.invalid_reason}")
        settled = await fac_client.settle(payload, requirements)
        receipt = _b64json(settled.model_dump(by_alias=True, exclude_none=True))
        if not settled.success:
            return JSONResponse(
                {"x402Version": 1, "error": settled.error_reason, "accepts": [req]},
                402,
                headers={"X-PAYMENT-RESPONSE": receipt},
            )
        counts[request.url.path] += 1
        return JSONResponse(
            completion(await _model_of(request), "paid answer (v1)"),
            headers={"X-PAYMENT-RESPONSE": receipt},
        )

    # --- streaming v2, by hand ------------------------------------------------------------

    def stream_requirement() -> dict[str, Any]:
        with bank.lock:
            blockhash = str(bank.svm.latest_blockhash())
        return {
            "scheme": "exact",
            "network": info.network,
            "asset": info.mint,
            "amount": str(price),
            "payTo": info.pay_to,
            "maxTimeoutSeconds": MAX_TIMEOUT_SECONDS,
            "extra": {"feePayer": info.fee_payer, "recentBlockhash": blockhash},
        }

    async def stream_chat(request: Request) -> Response:
        req = stream_requirement()
        header = request.headers.get("payment-signature")

        def unpaid(error: str, extra_headers: dict[str, str] | None = None) -> JSONResponse:
            doc = {
                "x402Version": 2,
                "error": error,
                "resource": {
                    "url": str(request.url),
                    "description": "x402bank streamed chat",
                    "mimeType": "text/event-stream",
                },
                "accepts": [req],
            }
            headers = {"PAYMENT-REQUIRED": _b64json(doc), **(extra_headers or {})}
            return JSONResponse({}, 402, headers=headers)

        if not header:
            return unpaid("Payment required")
        try:
            payload = PaymentPayload.model_validate_json(base64.b64decode(header))
        except (ValueError, binascii.Error):
            return unpaid("PAYMENT-SIGNATURE header is malformed")
        acc = payload.accepted
        if (
            acc.scheme != req["scheme"]
            or acc.network != req["network"]
            or acc.amount != req["amount"]
            or acc.asset != req["asset"]
            or acc.pay_to != req["payTo"]
            or (acc.extra or {}).get("feePayer") != info.fee_payer
        ):
            return unpaid("payment does not match the requirements")
        requirements = PaymentRequirements.model_validate(
            {**req, "extra": {"feePayer": info.fee_payer}}
        )
        verified = await fac_client.verify(payload, requirements)
        if not verified.is_valid:
            return unpaid(f"invalid payment: {verified.invalid_reason}")
        settled = await fac_client.settle(payload, requirements)
        receipt = _b64json(settled.model_dump(by_alias=True, exclude_none=True))
        if not settled.success:
            return unpaid(f"settlement failed: {settled.error_reason}", {"PAYMENT-RESPONSE": receipt})
        counts[request.url.path] += 1
        model = await _model_of(request)
        pieces = ["Paid", " streamed", " answer", "."]

        try:
            spacing = min(5.0, max(0.0, float(request.headers.get("x-bank-interval", interval))))
        except ValueError:
            spacing = interval
        sent: dict[str, float | None] = {"first": None, "last": None}
        streams.append(sent)

        def stamp(frame: bytes) -> bytes:
            sent["first"] = sent["first"] or time.time()
            sent["last"] = time.time()
            return frame

        async def frames() -> AsyncIterator[bytes]:
            base = {
                "id": f"chatcmpl-x402bank-{time.monotonic_ns()}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            yield stamp(f"data: {json.dumps({**base, 'choices': [first]})}\n\n".encode())
            for piece in pieces:
                await asyncio.sleep(spacing)
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                yield stamp(f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode())
            await asyncio.sleep(spacing)
            last = {"index": 0, "delta": {}, "finish_reason": "stop"}
            usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            yield stamp(f"data: {json.dumps({**base, 'choices': [last], 'usage': usage})}\n\n".encode())
            yield stamp(b"data: [DONE]\n\n")

        return StreamingResponse(
            frames(),
            media_type="text/event-stream",
            headers={"PAYMENT-RESPONSE": receipt, "Cache-Control": "no-cache"},
        )

    # --- free and admin -------------------------------------------------------------------

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "x402bank", "object": "model"}]})

    async def balances(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                **bank.balances(),
                "settlements": len(fac.signer.settled),
                "by_endpoint": dict(counts),
                "requests": dict(requests),
                "streams": list(streams),
                "mint": info.mint,
                "decimals": info.decimals,
            }
        )

    async def expire_blockhash(request: Request) -> JSONResponse:
        bank.expire_blockhash()
        return JSONResponse({"blockhash": str(bank.latest_blockhash())})

    async def rpc(request: Request) -> JSONResponse:
        return JSONResponse(bank.rpc(json.loads(await request.body())))

    class CountRequests:
        """Outermost middleware: every request that reaches the seller, by path."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and not scope["path"].startswith(("/_bank", "/rpc")):
                requests[scope["path"]] += 1
            await self.app(scope, receive, send)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", sdk_chat, methods=["POST"]),
            Route("/cheap/v1/chat/completions", sdk_chat, methods=["POST"]),
            Route("/x402v1/v1/chat/completions", v1_chat, methods=["POST"]),
            Route("/stream/v1/chat/completions", stream_chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/_bank/balances", balances, methods=["GET"]),
            Route("/_bank/expire_blockhash", expire_blockhash, methods=["POST"]),
            Route("/rpc", rpc, methods=["POST"]),
        ],
        middleware=[
            Middleware(CountRequests),
            Middleware(PaymentMiddlewareASGI, routes=routes, server=server),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    parser.add_argument("--payer-keypair", type=Path, help="created (mode 0600) if missing")
    parser.add_argument("--price", type=int, default=10_000, help="base units (6 decimals)")
    parser.add_argument("--fund", type=int, default=1_000 * 10**6, help="payer's base units")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between SSE frames")
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    # the test bed only ever talks to itself; never through a proxy from the environment
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(name, None)

    payer = load_or_create_keypair(args.payer_keypair) if args.payer_keypair else Keypair()
    bank = Bank(payer=payer, fund_base_units=args.fund)
    fac = FacilitatorThread(bank)
    fac.start()
    app = build_app(bank, fac, args.price, args.interval)
    sock = bind_socket(port=args.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        access_log=False,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    info = bank.info()

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        for _ in range(1000):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            server.should_exit = True
            await task
            raise SystemExit("x402bank: server did not start")
        ready = {
            "ready": True,
            "port": port,
            "scheme": "https" if args.certfile else "http",
            "mint": info.mint,
            "decimals": info.decimals,
            "pay_to": info.pay_to,
            "fee_payer": info.fee_payer,
            "payer": info.payer,
            "network": info.network,
            "price": args.price,
            "rpc_url": f"{fac.url}/rpc",
            "facilitator_url": fac.url,
        }
        print(json.dumps(ready), flush=True)
        await task

    try:
        asyncio.run(run())
    finally:
        fac.stop()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
