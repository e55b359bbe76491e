"""The gateway's configuration: one YAML file, one pydantic model tree (SPEC §2).

Each feature owns its section's model beside its code; this root only composes them. Unknown
keys are errors and every error names the key path, so a typo never silently disables a feature.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from llmitm.envexpand import ExpansionError, expand_tree
from llmitm.providers import ProviderConfig
from llmitm.recording import GuardConfig, RecordConfig
from llmitm.sessions import ControlConfig, SessionConfig, validate_sessions
from llmitm.x402.config import X402Config


class ConfigError(ValueError):
    """An invalid configuration; the message names the key path and the reason."""


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concurrency: dict[str, PositiveInt] = Field(
        default_factory=dict, description="host pattern -> max requests in flight"
    )
    queue_timeout: float = Field(30.0, gt=0, description="seconds a queued request may wait")


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    sessions: dict[str, SessionConfig] = Field(default_factory=dict)
    control: ControlConfig = Field(default_factory=ControlConfig)
    x402: X402Config | None = None
    record: RecordConfig = Field(default_factory=RecordConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("sessions")
    @classmethod
    def _session_ids(cls, value: dict[str, SessionConfig]) -> dict[str, SessionConfig]:
        return validate_sessions(value)


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        reason = item["msg"]
        if item["type"] == "extra_forbidden":
            reason = "unknown key"
        lines.append(f"{path}: {reason}")
    return "; ".join(lines)


def parse_config(text: str, env: Mapping[str, str] | None = None, source: str = "config") -> GatewayConfig:
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        # Only the problem and its position: PyYAML's own message quotes the line, which may hold
        # a secret.
        problem = getattr(e, "problem", None) or "syntax error"
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML: {problem}{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        expanded = expand_tree(raw, os.environ if env is None else env)
    except ExpansionError as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        return GatewayConfig.model_validate(expanded)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_validation_error(e)}") from None


def load_config_file(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(text, env, str(path))
