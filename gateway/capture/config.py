"""The `capture:` section of the fleet config.

capture:
  targets: {T0: [developer], T3: [developer, architect]}   # tier -> agents ("*": any agent)
  maxlen: 100000        # records kept per agent stream (approximate trimming)
  max_bytes: 262144     # a larger exchange is not captured (counted in qlp_capture_total)
  redact: ['(?i)password\\s*[:=]\\s*\\S+']   # extra patterns; the built-in ones always apply
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CaptureConfig"]


class CaptureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="tier -> agents captured there ('*': every agent)"
    )
    maxlen: int = Field(100_000, ge=100, description="records kept per agent stream (approximate)")
    max_bytes: int = Field(262_144, ge=1024, description="exchanges larger than this are not captured")
    redact: tuple[str, ...] = Field((), description="extra regular expressions redacted before writing")

    @field_validator("redact")
    @classmethod
    def _compiles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact pattern {pattern[:80]!r} does not compile: {exc}") from exc
        return v

    def wants(self, tier: str, agent: str | None) -> bool:
        """Is an exchange of `agent` on `tier` captured? Requests without an agent never are."""
        agents = self.targets.get(tier)
        return bool(agents) and agent is not None and (agent in agents or "*" in agents)  # type: ignore[operator]
