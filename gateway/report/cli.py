"""`qlp report`: the rollout report from Redis (QLP_REDIS_URL), as a table, JSON, or an HTML page.

    qlp report                                   # today, every tenant, as a table
    qlp report --since 2025-06-01 --until 2025-06-30 --tenant acme
    qlp report --tier T0 --agent developer --html report.html
    qlp report --json

Dates are UTC days, inclusive; the default is today. The figures are defined in docs/report.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import TextIO

from redis.exceptions import RedisError

from gateway.config import FleetConfig, load_config
from gateway.metering.keys import KeyStore
from gateway.metering.meter import connect
from gateway.metering.reader import parse_day
from gateway.report import reader, render
from gateway.settings import Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlp report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--redis-url", help="default: QLP_REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--since", help="first UTC day (YYYY-MM-DD), default today")
    p.add_argument("--until", help="last UTC day, inclusive, default today")
    p.add_argument("--tenant", action="append", help="repeatable; default: every tenant")
    p.add_argument("--tier", help="only requests for this (requested) tier")
    p.add_argument("--agent", help='only this agent ("(none)": requests without one)')
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--html", metavar="FILE", help="also write the report with charts to this HTML file")
    return p


def _fleet(settings: Settings) -> FleetConfig | None:
    """The fleet config (QLP_CONFIG), to tell local tiers from external ones; absent: T3 is external."""
    try:
        return load_config(settings.config)
    except (SystemExit, ValueError, OSError):
        return None


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings()
    if args.redis_url:
        settings = settings.model_copy(update={"redis_url": args.redis_url})
    today = dt.datetime.now(dt.UTC).date()
    since, until = parse_day(args.since, today), parse_day(args.until, today)
    redis = connect(settings)
    try:
        tenants = args.tenant or sorted({*await KeyStore(redis).tenants(), "admin"})
        rep = await reader.load(
            redis,
            reader.Selection(tenants, since, until, args.tier, args.agent),
            reader.external_tiers(_fleet(settings)),
        )
    finally:
        await redis.aclose()
    print(json.dumps(rep, indent=2) if args.json else render.table(rep), file=out)
    if args.html:
        Path(args.html).write_text(render.html_page(rep), encoding="utf-8")  # noqa: ASYNC240 (a CLI: nothing else runs)
        if not args.json:
            print(f"\nwrote {args.html}", file=out)
    return 0


def main(argv: list[str], out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, out or sys.stdout))
    except ValueError as exc:
        print(f"qlp report: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"qlp report: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"qlp report: {exc}", file=sys.stderr)
        return 1
