"""Configuration of recording (SPEC §9 ``record``) and of the leak guard (``guard``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RecordConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(
        "recordings", description="one flow file per session and day; null turns recording off"
    )
    redact: list[str] = Field(default_factory=list, description="extra header names to redact")
    max_body: int = Field(1_000_000, ge=0, description="bytes of each body kept in a recording")


class GuardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["mark", "block"] = "mark"
