"""Process settings: `QLP_*` environment variables and files in a secrets directory.

The fleet's shape (tiers, backends) lives in the YAML file named by `QLP_CONFIG`, prices in the one named
by `QLP_PRICING`; this module only holds what differs per deployment and what is secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]

_PLACEHOLDERS = {"changeme", "change-me", "secret", "sk-xxx", "your-key-here"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QLP_", extra="ignore")

    environment: str = Field("development", description="development | production")
    config: Path = Field(Path("config/tiers.yaml"), description="fleet config file (tiers, backends)")
    secrets_dir: Path = Field(Path("secrets"), description="directory of secret files, one value per file")
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = Field(1, ge=1, le=64)
    log_level: str = "info"
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body limit; larger bodies get 413")
    # Secrets named by backends in the fleet config (`api_key_secret: t3_api_key`) are looked up as the
    # environment variable QLP_<NAME> first, then as the file <secrets_dir>/<name>.
    t3_api_key: SecretStr | None = None

    # -- metering (docs/metering.md) ------------------------------------------------------------------
    metering: bool = Field(True, description="API keys, budgets, rate limits and the cost ledger; false: none")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding keys, limits and the ledger")
    redis_timeout: float = Field(1.0, gt=0, description="seconds per Redis round trip before it counts as down")
    pricing: Path = Field(Path("config/pricing.yaml"), description="prices per model and local tier")
    admin_key: SecretStr | None = Field(None, description="bootstrap admin API key (or the file secrets/admin_key)")
    admission_when_redis_down: Literal["closed", "open"] = Field(
        "closed", description="closed: 503 while Redis is unreachable; open: admit known keys up to the cap"
    )
    fail_open_cap: int = Field(1000, ge=0, description="requests one process admits per Redis outage (open)")
    admission_lease_seconds: float = Field(
        0.25,
        ge=0,
        le=10,
        description="how long a busy key's lease of admissions lasts (0: none; a revoked key stops within this)",
    )
    spool_path: Path = Field(Path("var/spool/ledger.jsonl"), description="charges waiting for Redis (fsync'd)")
    spool_replay_interval: float = Field(1.0, gt=0, description="seconds between spool replay attempts")
    ledger_stream_maxlen: int = Field(1_000_000, ge=1000, description="ledger records kept per tenant (approx.)")
    ledger_days: int = Field(400, ge=1, description="days that daily counters and workflow records are kept")
    idempotency_days: int = Field(3, ge=1, description="days a charge id is remembered (spool replays)")
    request_index_days: int = Field(30, ge=1, description="days a request id can be found (feedback)")
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="replicas that must hold a charge before it counts as booked (Redis WAIT; with a replicated "
        "Redis Cluster or Sentinel set 1, so a failover cannot lose an acknowledged charge: one not replicated "
        "in time is spooled and replayed, which is idempotent)",
    )

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.environment != "development":
            for name in ("t3_api_key", "admin_key"):
                value: SecretStr | None = getattr(self, name)
                if value is not None and value.get_secret_value().strip().lower() in _PLACEHOLDERS:
                    raise ValueError(f"QLP_{name.upper()} holds a placeholder; set a real value outside development")
        return self

    def secret(self, name: str) -> str | None:
        """The value of a named secret, or None when neither the variable nor the file is set."""
        # An empty variable counts as unset (compose and k8s often define QLP_X= with no value), so the
        # secrets-file fallback still applies.
        value = os.environ.get(f"QLP_{name.upper()}") or None
        field_value = getattr(self, name, None) if name in type(self).model_fields else None
        if value is None and isinstance(field_value, SecretStr):
            value = field_value.get_secret_value() or None
        if value is None:
            path = self.secrets_dir / name
            if path.is_file():
                value = path.read_text().strip()
        if value is not None and self.environment != "development" and value.lower() in _PLACEHOLDERS:
            raise ValueError(f"secret {name!r} holds a placeholder value")
        return value or None
