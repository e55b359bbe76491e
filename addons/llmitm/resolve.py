"""``llmitm_resolve`` entries: ``HOST:PORT=ADDR:PORT``, like curl's ``--resolve``."""

from __future__ import annotations

from collections.abc import Iterable

Address = tuple[str, int]


def _split_host_port(text: str, entry: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"llmitm_resolve entry {entry!r}: expected HOST:PORT=ADDR:PORT")
    return host.strip("[]").lower(), int(port)


def parse_resolve_entries(entries: Iterable[str]) -> dict[Address, Address]:
    table: dict[Address, Address] = {}
    for entry in entries:
        left, sep, right = entry.partition("=")
        if not sep:
            raise ValueError(f"llmitm_resolve entry {entry!r}: expected HOST:PORT=ADDR:PORT")
        table[_split_host_port(left, entry)] = _split_host_port(right, entry)
    return table
