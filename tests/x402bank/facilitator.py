"""The official x402 facilitator over the LiteSVM bank, served over HTTP for
``HTTPFacilitatorClient``: ``GET /supported``, ``POST /verify``, ``POST /settle``; plus
``POST /rpc`` (the bank's minimal Solana JSON-RPC).

It runs in its own thread with its own event loop: the SDK middleware's ``initialize()`` does a
blocking GET to ``/supported`` from inside the paid server's loop, which would deadlock if the
facilitator shared that loop.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from x402.schemas import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
)

from .bank import Bank, make_facilitator


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else Nagle + delayed
    # ACK add ~40 ms to responses written in pieces)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _parse(body: dict[str, Any]) -> tuple[Any, Any]:
    version = body.get("x402Version")
    payload, requirements = body["paymentPayload"], body["paymentRequirements"]
    if version == 1:
        return PaymentPayloadV1.model_validate(payload), PaymentRequirementsV1.model_validate(
            requirements
        )
    return PaymentPayload.model_validate(payload), PaymentRequirements.model_validate(requirements)


def facilitator_app(bank: Bank) -> tuple[Starlette, Any]:
    facilitator, signer = make_facilitator(bank)

    async def supported(request: Request) -> JSONResponse:
        return JSONResponse(facilitator.get_supported().model_dump(by_alias=True, exclude_none=True))

    async def verify(request: Request) -> JSONResponse:
        try:
            payload, requirements = _parse(await request.json())
        except (ValueError, KeyError, TypeError) as err:
            return JSONResponse({"error": f"bad request: {err}"}, status_code=400)
        result = await facilitator.verify(payload, requirements)
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    async def settle(request: Request) -> JSONResponse:
        try:
            payload, requirements = _parse(await request.json())
        except (ValueError, KeyError, TypeError) as err:
            return JSONResponse({"error": f"bad request: {err}"}, status_code=400)
        result = await facilitator.settle(payload, requirements)
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    async def rpc(request: Request) -> JSONResponse:
        return JSONResponse(bank.rpc(json.loads(await request.body())))

    app = Starlette(
        routes=[
            Route("/supported", supported, methods=["GET"]),
            Route("/verify", verify, methods=["POST"]),
            Route("/settle", settle, methods=["POST"]),
            Route("/rpc", rpc, methods=["POST"]),
        ]
    )
    return app, signer


class FacilitatorThread:
    """Serve ``facilitator_app`` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, bank: Bank) -> None:
        self.app, self.signer = facilitator_app(bank)
        self.sock = bind_socket()
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="x402bank-facilitator", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        waited = 0.0
        while not self.server.started:
            if waited >= timeout or not self.thread.is_alive():
                raise RuntimeError("facilitator did not start")
            threading.Event().wait(0.01)
            waited += 0.01

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
