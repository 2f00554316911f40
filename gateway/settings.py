"""Process settings: `QLP_*` environment variables and files in a secrets directory.

The fleet's shape (tiers, backends, prices) lives in the YAML file named by `QLP_CONFIG`; this module only
holds what differs per deployment and what is secret.
"""

from __future__ import annotations

from pathlib import Path

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

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.environment != "development" and self.t3_api_key is not None:
            if self.t3_api_key.get_secret_value().strip().lower() in _PLACEHOLDERS:
                raise ValueError("QLP_T3_API_KEY holds a placeholder; set a real key outside development")
        return self

    def secret(self, name: str) -> str | None:
        """The value of a named secret, or None when neither the variable nor the file is set."""
        import os

        value = os.environ.get(f"QLP_{name.upper()}")
        if value is None and name == "t3_api_key" and self.t3_api_key is not None:
            value = self.t3_api_key.get_secret_value()
        if value is None:
            path = self.secrets_dir / name
            if path.is_file():
                value = path.read_text().strip()
        if value is not None and self.environment != "development" and value.lower() in _PLACEHOLDERS:
            raise ValueError(f"secret {name!r} holds a placeholder value")
        return value or None
