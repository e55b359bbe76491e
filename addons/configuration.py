"""Addon: load ``llmitm_config``, validate it, and re-read it when the file changes.

At start an invalid file raises OptionsError, which mitmdump reports and exits non-zero. On a
later edit an invalid file keeps the previous configuration in force and logs why. Each request
reads ``current_config()`` once, so a reload applies to the next request and never to a stream
already in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from glue import CONFIG_ADDON_NAME
from llmitm.config import ConfigError, GatewayConfig, load_config_file

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Configuration:
    name = CONFIG_ADDON_NAME

    def __init__(self) -> None:
        self.config = GatewayConfig()
        self._path = ""
        self._signature: tuple[int, int, int] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "llmitm_config", str, "",
            "Path of the llmitm YAML configuration (re-read automatically when it changes).",
        )

    def configure(self, updated: set[str]) -> None:
        if "llmitm_config" not in updated:
            return
        path = ctx.options.llmitm_config
        if not path:
            self._path, self.config = "", GatewayConfig()
            return
        try:
            config = load_config_file(path)
        except ConfigError as e:
            raise exceptions.OptionsError(f"llmitm_config: {e}") from None
        self._path, self.config = path, config
        self._signature = _file_signature(path)
        logger.info("llmitm: configuration loaded from %s", path)

    def running(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self._path:
                self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        signature = _file_signature(self._path)
        if signature is None or signature == self._signature:
            return False
        self._signature = signature
        try:
            self.config = load_config_file(self._path)
        except ConfigError as e:
            logger.warning("llmitm: config edit rejected, previous configuration stays: %s", e)
            return False
        logger.info("llmitm: configuration reloaded from %s", self._path)
        return True


addons = [Configuration()]
