"""The rollouts in force in this process: the config's defaults, overridden at run time by the admin API.

Runtime changes live in Redis, so that every gateway process (and every replica) applies the same ones:

    qlp:rollouts          HASH  "<tier>/<agent>" -> rollout JSON (gateway/rollout/model.py), and the field
                                "version", incremented with every change

One key, so that a change and its version move together in one slot (a Redis Cluster refuses a
transaction across slots).

Each process reads the version once per `REFRESH_SECONDS` and reloads the hash when it moved; the process
that served the admin call applies the change at once. Deleting a runtime rollout restores the config's.
On the request path a rollout costs one or two dict lookups (`assign`), none when no rollout has arms.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis

from gateway.config import FleetConfig
from gateway.rollout.arms import pick, point
from gateway.rollout.model import Rollout, RolloutError, check_rollout, rollout_key
from gateway.routing import Target, target_in

__all__ = ["REFRESH_SECONDS", "ROLLOUTS", "VERSION", "Rollouts"]

log = logging.getLogger("qlp.rollout")

ROLLOUTS = "qlp:rollouts"
VERSION = "version"  # a field of ROLLOUTS (no rollout key has no "/")
REFRESH_SECONDS = 1.0


class Rollouts:
    def __init__(self, config: FleetConfig, redis: Redis | None) -> None:
        self.config = config
        self.redis = redis
        self._runtime: dict[str, Rollout] = {}
        self._version: bytes | None = None
        self._table: dict[tuple[str, str], Rollout] = {}
        self.active = False  # some rollout has arms
        self.shadowing = False  # some rollout has a shadow
        self._rebuild()

    # -- the request path ------------------------------------------------------------------------------
    def lookup(self, tier: str, agent: str | None) -> Rollout | None:
        """The rollout of `tier` for `agent`, else the tier's catch-all (agent "*")."""
        if agent is not None:
            r = self._table.get((tier, agent))
            if r is not None:
                return r
        return self._table.get((tier, "*"))

    def assign(self, target: Target, model: str | None, agent: str | None, sticky: str) -> tuple[Target, str | None]:
        """The request's target after its rollout, and the arm's name (None: no rollout applies)."""
        r = self.lookup(target.tier.name, agent)
        if r is None or not r.arms:
            return target, None
        arm = pick(r.arms, point(target.tier.name, agent or "*", sticky))
        if arm is None:
            return target, None
        tier = self.config.tiers[arm.tier] if arm.tier is not None else target.tier
        if arm.adapter is not None:
            return Target(tier, arm.adapter, arm.adapter), arm.name
        if arm.tier is not None:
            return target_in(tier, model, agent), arm.name
        return target, arm.name

    # -- reading and changing ----------------------------------------------------------------------------
    def effective(self) -> list[dict[str, Any]]:
        out = []
        for (tier, agent), r in sorted(self._table.items()):
            key = rollout_key(tier, agent)
            out.append(
                {
                    "tier": tier,
                    "agent": agent,
                    **r.model_dump(mode="json"),
                    "source": "runtime" if key in self._runtime else "config",
                }
            )
        return out

    def get(self, tier: str, agent: str) -> Rollout | None:
        return self._table.get((tier, agent))

    async def put(self, tier: str, agent: str, rollout: Rollout) -> None:
        check_rollout(self.config.tiers, tier, agent, rollout)
        redis = self._store()
        key = rollout_key(tier, agent)
        async with redis.pipeline(transaction=True) as p:
            p.hset(ROLLOUTS, key, orjson.dumps(rollout.model_dump(mode="json")))
            p.hincrby(ROLLOUTS, VERSION, 1)
            _, version = await p.execute()
        self._runtime[key] = rollout
        self._version = str(version).encode()
        self._rebuild()
        log.warning("rollout %s set: %s", key, rollout.model_dump_json())

    async def delete(self, tier: str, agent: str) -> bool:
        redis = self._store()
        key = rollout_key(tier, agent)
        async with redis.pipeline(transaction=True) as p:
            p.hdel(ROLLOUTS, key)
            p.hincrby(ROLLOUTS, VERSION, 1)
            removed, version = await p.execute()
        self._runtime.pop(key, None)
        self._version = str(version).encode()
        self._rebuild()
        return bool(removed)

    async def refresh(self) -> bool:
        """Reload the runtime rollouts when another process changed them. True when something changed."""
        if self.redis is None:
            return False
        version: bytes | None = await self.redis.hget(ROLLOUTS, VERSION)  # type: ignore[assignment]
        if version == self._version:
            return False
        raw: dict[bytes, bytes] = await self.redis.hgetall(ROLLOUTS)  # type: ignore[assignment]
        runtime: dict[str, Rollout] = {}
        for k, v in raw.items():
            key = k.decode()
            if key == VERSION:
                continue
            tier, _, agent = key.partition("/")
            try:
                r = Rollout.model_validate_json(v)
                check_rollout(self.config.tiers, tier, agent, r)
            except (ValidationError, RolloutError) as exc:
                # Written by a gateway with another fleet config (a tier that is not here): not ours to apply.
                log.error("ignoring rollout %s from Redis: %s", key[:80], str(exc)[:200])
                continue
            runtime[key] = r
        self._runtime = runtime
        self._version = version
        self._rebuild()
        return True

    async def refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # Redis away: keep the rollouts we have, try again
                log.debug("rollout refresh failed: %s", type(exc).__name__)
            await asyncio.sleep(REFRESH_SECONDS)

    def _store(self) -> Redis:
        if self.redis is None:
            raise RolloutError("runtime rollouts need Redis (metering on)")
        return self.redis

    def _rebuild(self) -> None:
        table: dict[tuple[str, str], Rollout] = {}
        for key, r in {**self.config.rollouts, **self._runtime}.items():
            tier, _, agent = key.partition("/")
            table[(tier, agent)] = r
        self._table = table
        self.active = any(r.arms for r in table.values())
        self.shadowing = any(r.shadow is not None and r.shadow.share > 0 for r in table.values())
