"""Addons: where upstream connections go (``llmitm_resolve``) and what the client sees when the
upstream cannot be reached.

``Resolve`` rewrites the TCP address in ``server_connect`` while Host and SNI stay the original,
then puts the original address back in ``server_connected``: otherwise mitmproxy never matches
the connection for reuse, opens one per request and hangs after five (research/mitmproxy.md).

``UpstreamProbe`` sits late in the stack: when no connection to a request's upstream is open, it
tries a TCP connect first, because once mitmproxy's own connect fails it answers with a fixed
HTML page that no hook can replace; the probe lets the gateway answer a 502 JSON error in the
provider's shape naming the host instead. While a connection to that upstream is open (the
usual keep-alive case) nothing is probed, so the cost is one extra connect per new upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks

from glue import answer_error
from llmitm.resolve import Address, parse_resolve_entries

logger = logging.getLogger(__name__)


def _connects_directly() -> bool:
    """In upstream-proxy or SOCKS mode a direct probe says nothing about reachability."""
    modes = getattr(ctx.options, "mode", None) or ["regular"]
    return all(str(m).split(":", 1)[0].split("@", 1)[0] in ("regular", "transparent", "local",
                                                            "wireguard", "reverse")
               for m in modes)


def _resolve_table() -> dict[Address, Address]:
    entries = getattr(ctx.options, "llmitm_resolve", None) or []
    return parse_resolve_entries(entries)


class Resolve:
    name = "llmitm-resolve"

    def __init__(self) -> None:
        self.table: dict[Address, Address] = {}
        self._original: dict[str, Address] = {}

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "llmitm_resolve", Sequence[str], [],
            "Connect to ADDR:PORT for HOST:PORT while Host and SNI stay HOST "
            "(HOST:PORT=ADDR:PORT, repeatable, like curl --resolve).",
        )

    def configure(self, updated: set[str]) -> None:
        if "llmitm_resolve" in updated:
            try:
                self.table = _resolve_table()
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address is None or not self.table:
            return
        target = self.table.get((str(address[0]).lower(), address[1]))
        if target is not None:
            self._original[data.server.id] = (address[0], address[1])
            data.server.address = target

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore(data.server)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore(data.server)

    def _restore(self, server: connection.Server) -> None:
        original = self._original.pop(server.id, None)
        if original is not None:
            # The open connection refuses attribute changes; this is the documented way round it.
            object.__setattr__(server, "address", original)


class UpstreamProbe:
    name = "llmitm-upstream-probe"

    PROBE_TIMEOUT = 5.0

    def __init__(self) -> None:
        # Open upstream connections per (host, port): with lazy connections a flow's own
        # server_conn is not open yet at `request` time, so that cannot tell us.
        self.open: dict[Address, int] = {}
        self.direct = True  # _connects_directly(), kept per configure: options are deep-copied on read

    def configure(self, updated: set[str]) -> None:
        if "mode" in updated:
            self.direct = _connects_directly()

    @staticmethod
    def _key(server: connection.Server) -> Address | None:
        address = server.address
        return (str(address[0]).lower(), address[1]) if address else None

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        key = self._key(data.server)
        if key is not None:
            self.open[key] = self.open.get(key, 0) + 1

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        key = self._key(data.server)
        if key is not None and key in self.open:
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not flow.live or not self.direct:
            return
        host, port = flow.request.host, flow.request.port
        if self.open.get((host.lower(), port)):
            return
        target = _resolve_table().get((host.lower(), port), (host, port))
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(target[0], target[1]), self.PROBE_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            reason = type(e).__name__ if isinstance(e, TimeoutError) else (e.strerror or str(e))
            logger.warning("llmitm: upstream %s:%s unreachable: %s", host, port, reason)
            answer_error(
                flow, 502,
                f"llmitm could not reach the upstream {host}:{port} ({reason}). "
                "Check the host, your network, or llmitm_resolve.",
                "upstream_unreachable",
            )
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


addons = [Resolve(), UpstreamProbe()]
