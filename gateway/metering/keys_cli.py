"""`qlp keys`: create, list and revoke API keys (straight in Redis: QLP_REDIS_URL).

    qlp keys create --tenant acme --name ci --budget-day 5 --budget-month 100 --rpm 60 --tpm 200000
    qlp keys create --tenant ops --admin
    qlp keys list [--tenant acme] [--json]
    qlp keys revoke 3f1c0a9d2b7e4c55

The key is printed once, at creation; Redis holds only its SHA-256. Limits of 0 mean unlimited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from redis.exceptions import RedisError

from gateway.metering.keys import KeyInfo, KeyLimits, KeyStore
from gateway.metering.meter import connect
from gateway.metering.pricing import micros_of_usd, usd
from gateway.settings import Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlp keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--redis-url", help="default: QLP_REDIS_URL or redis://127.0.0.1:6379/0")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a key (printed once)")
    c.add_argument("--tenant", required=True)
    c.add_argument("--name", default="")
    c.add_argument("--admin", action="store_true", help="may read every tenant's ledger and manage keys")
    c.add_argument("--budget-day", default="0", metavar="USD", help="daily budget in USD (0: none)")
    c.add_argument("--budget-month", default="0", metavar="USD", help="monthly budget in USD (0: none)")
    c.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
    c.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: unlimited)")
    c.add_argument("--json", action="store_true")
    ls = sub.add_parser("list", help="list keys (never the keys themselves)")
    ls.add_argument("--tenant")
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    return p


def _limit(v: int) -> str:
    return str(v) if v else "-"


def _table(keys: list[KeyInfo]) -> str:
    head = ("ID", "TENANT", "NAME", "ROLE", "CREATED", "REVOKED", "USD/DAY", "USD/MONTH", "RPM", "TPM")
    rows = [head] + [
        (
            k.id,
            k.tenant,
            k.name,
            k.role,
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created)),
            "yes" if k.revoked else "no",
            usd(k.limits.budget_day_micros) if k.limits.budget_day_micros else "-",
            usd(k.limits.budget_month_micros) if k.limits.budget_month_micros else "-",
            _limit(k.limits.rpm),
            _limit(k.limits.tpm),
        )
        for k in keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def _run(args: argparse.Namespace) -> int:
    settings = Settings()
    if args.redis_url:
        settings = settings.model_copy(update={"redis_url": args.redis_url})
    redis = connect(settings)
    store = KeyStore(redis)
    try:
        if args.cmd == "create":
            limits = KeyLimits(micros_of_usd(args.budget_day), micros_of_usd(args.budget_month), args.rpm, args.tpm)
            key, info = await store.create(
                args.tenant, name=args.name, role="admin" if args.admin else "user", limits=limits
            )
            if args.json:
                print(json.dumps({"key": key, **info.as_dict()}))
            else:
                print(key)
                print(
                    f"id {info.id}, tenant {info.tenant}, role {info.role} (the key is shown only now)", file=sys.stderr
                )
        elif args.cmd == "list":
            keys = await store.list_keys(args.tenant)
            print(json.dumps([k.as_dict() for k in keys], indent=2) if args.json else _table(keys))
        else:
            revoked = await store.revoke(args.key_id)
            if revoked is None:
                print(f"qlp keys: no key {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"revoked {revoked.id} (tenant {revoked.tenant})")
        return 0
    finally:
        await redis.aclose()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except ValueError as exc:
        print(f"qlp keys: {exc}", file=sys.stderr)
        return 2
    except (OSError, RedisError) as exc:
        print(f"qlp keys: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
