"""Where a header may go: ``host[:port][/path]`` patterns, shared by injection and the leak guard.

One implementation on purpose: the headers addon decides where a header is sent with the same
matcher the guard uses to decide where it must not be.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field


def _compile_glob(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE if ignore_case else 0)


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a header may go: a host pattern (fnmatch, case-insensitive, optionally ``:port``)
    and an optional path pattern (fnmatch on the path without its query string).

    ``Scope.parse("api.anthropic.com/v1/*")``; ``Scope.parse("*.openai.com")``.
    """

    host: str
    path: str | None = None
    _host_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _port_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _path_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host, sep, port = self.host.rpartition(":") if self._has_port() else (self.host, "", "")
        object.__setattr__(self, "_host_re", _compile_glob(host or "*", ignore_case=True))
        object.__setattr__(self, "_port_re", _compile_glob(port, ignore_case=False) if sep else None)
        object.__setattr__(
            self,
            "_path_re",
            _compile_glob(self.path, ignore_case=False) if self.path is not None else None,
        )

    def _has_port(self) -> bool:
        _, sep, tail = self.host.rpartition(":")
        return bool(sep) and bool(tail) and "]" not in tail

    @staticmethod
    def parse(text: str) -> Scope:
        """Compiled once per text: scopes are immutable, and the guard reads the scope of every
        injected header back from the flow's metadata on every request."""
        return _parse(text)

    def matches_host(self, host: str, port: int | None = None) -> bool:
        if self._host_re.match(host) is None:
            return False
        return self._port_re is None or port is None or self._port_re.match(str(port)) is not None

    def matches_path(self, path: str) -> bool:
        if self._path_re is None:
            return True
        return self._path_re.match(path.split("?", 1)[0] or "/") is not None

    def matches(self, host: str, path: str, port: int | None = None) -> bool:
        return self.matches_host(host, port) and self.matches_path(path)

    def __str__(self) -> str:
        return self.host + (self.path or "")


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> Scope:
    text = text.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host, sep, rest = text.partition("/")
    return Scope(host.lower() or "*", "/" + rest if sep else None)
