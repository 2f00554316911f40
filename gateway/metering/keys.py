"""API keys: format, hashing, and the key store in Redis.

A key is `qlp-` + 43 characters of `secrets.token_urlsafe(32)` (256 random bits). Redis stores only its
SHA-256: a fast hash is right for high-entropy secrets (there is nothing to brute-force), and a salted slow
hash would make every request pay for nothing. The key id (the digest's first 16 hex digits) names a key
in listings and in `qlp keys revoke`; it is not a secret. The bootstrap admin key from the settings is
compared with `hmac.compare_digest`; Redis keys are found by their digest, so lookup timing reveals only
bits of the digest of the caller's own guess.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis

from gateway.metering.layout import ADMIN_KEY_ID, KEY_INDEX, TENANT_NAME, TENANTS, KeyKeys, tenant_keys

__all__ = [
    "KEY_PREFIX",
    "Credential",
    "KeyInfo",
    "KeyLimits",
    "KeyStore",
    "Principal",
    "Role",
    "bearer",
    "digest",
    "new_key",
]

KEY_PREFIX = "qlp-"
Role = Literal["user", "admin"]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(value: bytes | str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` header value, or None."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, key = text.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    key = key.strip()
    return key if 0 < len(key) <= 256 else None


@dataclass(frozen=True, slots=True)
class Credential:
    """A presented key, hashed; not yet checked against the store."""

    sha256: str

    @property
    def key_id(self) -> str:
        return self.sha256[:16]

    @classmethod
    def of(cls, key: str) -> Credential:
        return cls(digest(key))


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. `key_id` is None for the bootstrap admin key (it has no record and no limits)."""

    tenant: str
    role: Role
    key_id: str | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Per-key limits; 0 means unlimited. Budgets in micro-dollars."""

    budget_day_micros: int = 0
    budget_month_micros: int = 0
    rpm: int = 0
    tpm: int = 0

    def __post_init__(self) -> None:
        if min(self.budget_day_micros, self.budget_month_micros, self.rpm, self.tpm) < 0:
            raise ValueError("limits must be >= 0 (0 = unlimited)")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    tenant: str
    role: Role
    name: str = ""
    created: int = 0
    revoked: bool = False
    limits: KeyLimits = field(default_factory=KeyLimits)

    def as_dict(self) -> dict[str, Any]:
        lim = self.limits
        return {
            "id": self.id,
            "tenant": self.tenant,
            "role": self.role,
            "name": self.name,
            "created": self.created,
            "revoked": self.revoked,
            "limits": {
                "budget_day_micros": lim.budget_day_micros,
                "budget_month_micros": lim.budget_month_micros,
                "requests_per_minute": lim.rpm,
                "tokens_per_minute": lim.tpm,
            },
        }


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _info(key_id: str, h: dict[Any, Any]) -> KeyInfo:
    def num(name: str) -> int:
        return int(h.get(name.encode(), b"0"))

    role = _text(h.get(b"role", b"user"))
    return KeyInfo(
        id=key_id,
        tenant=_text(h[b"tenant"]),
        role="admin" if role == "admin" else "user",
        name=_text(h.get(b"name", b"")),
        created=num("created"),
        revoked=h.get(b"revoked") == b"1",
        limits=KeyLimits(num("budget_day"), num("budget_month"), num("rpm"), num("tpm")),
    )


class KeyStore:
    """Create, list, revoke and look up keys. Used by `qlp keys`, the admin routes and route auth."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def create(
        self, tenant: str, *, name: str = "", role: Role = "user", limits: KeyLimits | None = None
    ) -> tuple[str, KeyInfo]:
        """A new key; the plain key is returned once and never stored."""
        if not TENANT_NAME.match(tenant):
            raise ValueError(f"invalid tenant name {tenant!r}: letters, digits, '.', '_', '-' (max 64)")
        lim = limits or KeyLimits()
        key = new_key()
        cred = Credential.of(key)
        info = KeyInfo(cred.key_id, tenant, role, name[:200], int(time.time()), False, lim)
        async with self.redis.pipeline(transaction=False) as p:
            p.hset(
                KeyKeys(cred.key_id).record,
                mapping={
                    "sha256": cred.sha256,
                    "tenant": tenant,
                    "role": role,
                    "name": info.name,
                    "created": info.created,
                    "revoked": 0,
                    "budget_day": lim.budget_day_micros,
                    "budget_month": lim.budget_month_micros,
                    "rpm": lim.rpm,
                    "tpm": lim.tpm,
                },
            )
            p.sadd(KEY_INDEX, cred.key_id)
            p.sadd(tenant_keys(tenant), cred.key_id)
            p.sadd(TENANTS, tenant)
            await p.execute()
        return key, info

    async def get(self, key_id: str) -> KeyInfo | None:
        h = await self.redis.hgetall(KeyKeys(key_id).record)
        return _info(key_id, h) if h else None

    async def lookup(self, cred: Credential) -> KeyInfo | None:
        """The key's info when the presented key is stored (revoked or not)."""
        h = await self.redis.hgetall(KeyKeys(cred.key_id).record)
        if not h or _text(h.get(b"sha256", b"")) != cred.sha256:
            return None
        return _info(cred.key_id, h)

    async def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        ids = sorted(_text(m) for m in await self.redis.smembers(KEY_INDEX))
        async with self.redis.pipeline(transaction=False) as p:
            for kid in ids:
                p.hgetall(KeyKeys(kid).record)
            records = await p.execute()
        out = [_info(kid, h) for kid, h in zip(ids, records, strict=True) if h]
        out = [k for k in out if tenant is None or k.tenant == tenant]
        return sorted(out, key=lambda k: (k.tenant, k.created, k.id))

    async def revoke(self, key_id: str) -> KeyInfo | None:
        """Marks the key revoked (the record stays for the audit trail). None: no such key."""
        rec = KeyKeys(key_id).record
        if not await self.redis.exists(rec):
            return None
        await self.redis.hset(rec, "revoked", 1)
        return await self.get(key_id)

    async def tenants(self) -> list[str]:
        return sorted(_text(m) for m in await self.redis.smembers(TENANTS))

    async def key_ids(self, tenant: str) -> list[str]:
        """Every key id whose ledger belongs to the tenant (revoked keys included)."""
        ids = {_text(m) for m in await self.redis.smembers(tenant_keys(tenant))}
        if tenant == "admin":
            ids.add(ADMIN_KEY_ID)  # the bootstrap admin key's own requests
        return sorted(ids)
