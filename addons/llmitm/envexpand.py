"""``${VAR}`` / ``${VAR:-default}`` expansion for every string in the config (SPEC §2).

``$${`` is a literal ``${``. An unset variable without a default is an error naming the variable
and the key path: it must never silently become an empty header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# "$${" escapes; otherwise ${NAME} or ${NAME:-default} (the default may be empty, no "}" inside).
_TOKEN = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ExpansionError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


def expand_string(value: str, env: Mapping[str, str], path: str = "") -> str:
    if "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ExpansionError(
            path, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"
        )

    return _TOKEN.sub(substitute, value)


def _check_malformed(value: str, path: str) -> None:
    # "${" that is neither an escape nor a well-formed reference is a typo worth reporting.
    stripped = _TOKEN.sub("", value)
    if "${" in stripped:
        raise ExpansionError(path, "malformed ${...} reference (write $${ for a literal ${)")


def expand_tree(node: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Return a copy of a parsed YAML tree with every string value expanded."""
    if isinstance(node, str):
        _check_malformed(node, path)
        return expand_string(node, env, path)
    if isinstance(node, dict):
        return {
            key: expand_tree(value, env, f"{path}.{key}" if path else str(key))
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [expand_tree(item, env, f"{path}[{i}]") for i, item in enumerate(node)]
    return node
