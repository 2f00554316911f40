"""`qlp capture`: captured exchanges out of Redis (QLP_REDIS_URL), as the trainer's JSONL.

    qlp capture export --agent developer -o var/capture/developer.jsonl --outcome success
    qlp capture export -o var/capture/all.jsonl --since 2025-06-01 --until 2025-06-30 --tenant acme
    qlp capture stats

Dates are UTC days, inclusive; without them every record kept is exported. The redaction applied again
on export uses the fleet config's `capture.redact` patterns (QLP_CONFIG, default config/tiers.yaml) and
the secrets the settings know (backend API keys, admin key). Exit status 0, or 2 with one line on stderr.
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

from gateway.capture.export import OUTCOMES, export, stream_stats
from gateway.capture.redact import Redactor
from gateway.config import load_config
from gateway.metering.meter import connect
from gateway.settings import Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlp capture", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--redis-url", help="default: QLP_REDIS_URL or redis://127.0.0.1:6379/0")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="captured records as the trainer's JSON lines, outcomes joined")
    e.add_argument("--agent", help="one agent's stream (default: every agent)")
    e.add_argument("-o", "--output", required=True, help="JSONL file (written atomically)")
    e.add_argument("--outcome", choices=OUTCOMES, default="any", help="unknown: no feedback yet")
    e.add_argument("--since", help="first UTC day (YYYY-MM-DD)")
    e.add_argument("--until", help="last UTC day, inclusive")
    e.add_argument("--tenant", help="one tenant's records (default: every tenant)")
    e.add_argument("--redis-url", dest="redis_url_sub", help=argparse.SUPPRESS)
    s = sub.add_parser("stats", help="records kept per agent stream")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--redis-url", dest="redis_url_sub", help=argparse.SUPPRESS)
    return p


def _day_ms(value: str | None, end: bool) -> int | None:
    if not value:
        return None
    day = dt.date.fromisoformat(value)
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    if end:
        start += dt.timedelta(days=1)
    return int(start.timestamp() * 1000) - (1 if end else 0)


def _redactor(settings: Settings) -> Redactor:
    config = load_config(settings.config)
    names = {be.api_key_secret for t in config.tiers.values() for be in t.backends if be.api_key_secret}
    names.add("admin_key")
    secrets = tuple(v for v in (settings.secret(n) for n in sorted(names)) if v)
    return Redactor(config.capture.redact, secrets)


def _ms_time(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if ms is not None else "-"


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings()
    url = args.redis_url_sub or args.redis_url
    if url:
        settings = settings.model_copy(update={"redis_url": url})
    if args.cmd == "export":
        since, until = _day_ms(args.since, False), _day_ms(args.until, True)
        if since is not None and until is not None and until < since:
            raise ValueError("'until' is before 'since'")
        redactor = _redactor(settings)
    redis = connect(settings)
    try:
        if args.cmd == "stats":
            rows = await stream_stats(redis)
            if args.json:
                print(json.dumps(rows, indent=2), file=out)
                return 0
            width = max([5, *(len(r["agent"]) for r in rows)])
            print(f"{'AGENT'.ljust(width)}  {'RECORDS':>8}  {'FIRST (UTC)':19}  LAST (UTC)", file=out)
            for r in rows:
                print(
                    f"{r['agent'].ljust(width)}  {r['records']:>8}  {_ms_time(r['first_ms']):19}  "
                    f"{_ms_time(r['last_ms'])}",
                    file=out,
                )
            return 0
        stats = await export(
            redis,
            Path(args.output),
            redactor,
            agent=args.agent,
            since_ms=since,
            until_ms=until,
            tenant=args.tenant,
            outcome=args.outcome,
        )
        c = stats.as_dict()
        print(
            f"{args.output}: {c['written']} records written (success {c['success']}, failure {c['failure']}, "
            f"unknown {c['unknown']}) of {c['read']} read from {c['streams']} stream(s); skipped: "
            f"other tenant {c['other_tenant']}, other outcome {c['other_outcome']}, invalid {c['invalid']}",
            file=out,
        )
        return 0
    finally:
        await redis.aclose()


def main(argv: list[str], out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, out or sys.stdout))
    except (ValueError, SystemExit) as exc:  # bad dates, bad config (load_config exits with a message)
        print(f"qlp capture: {exc}", file=sys.stderr)
        return 2
    except (OSError, RedisError) as exc:
        print(f"qlp capture: cannot reach Redis or write the file: {exc}", file=sys.stderr)
        return 2
