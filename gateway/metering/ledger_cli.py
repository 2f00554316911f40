"""`qlp ledger`: the cost ledger as tables, and record export (straight from Redis: QLP_REDIS_URL).

    qlp ledger summary --by tier --since 2025-06-01 --until 2025-06-30 [--tenant acme]
    qlp ledger summary --by day
    qlp ledger workflow wf-42 [--tenant acme]
    qlp ledger export --format csv --since 2025-06-01 -o june.csv
    qlp ledger export --format jsonl --tenant acme

Dates are UTC days, inclusive; the default is today. Without --tenant: every tenant. Amounts in USD.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import sys
from typing import Any, TextIO

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.metering import reader
from gateway.metering.keys import KeyStore
from gateway.metering.meter import connect
from gateway.settings import Settings

__all__ = ["main"]

CSV_FIELDS = [
    "id",
    "request_id",
    "time",
    "tenant",
    "key_id",
    "workflow",
    "agent",
    "arm",
    "tier",
    "requested_tier",
    "backend",
    "model",
    "endpoint",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_micros",
    "reference_cost_micros",
    "reference_model",
    "latency_ms",
    "status",
    "estimated",
    "attempts",
    "fallback",
]
COLUMNS = [
    ("group", "GROUP"),
    ("requests", "REQUESTS"),
    ("prompt_tokens", "PROMPT TOK"),
    ("completion_tokens", "COMPL TOK"),
    ("cost_usd", "COST USD"),
    ("reference_cost_usd", "REFERENCE USD"),
    ("savings_usd", "SAVED USD"),
    ("estimated_requests", "ESTIMATED"),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlp ledger", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--redis-url", help="default: QLP_REDIS_URL or redis://127.0.0.1:6379/0")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="totals grouped by tier, model, agent, workflow, day or tenant")
    s.add_argument("--by", choices=reader.GROUPS, default="tier")
    w = sub.add_parser("workflow", help="one workflow: its cost and every request in it")
    w.add_argument("workflow_id")
    e = sub.add_parser("export", help="ledger records as CSV or JSON lines")
    e.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    e.add_argument("-o", "--output", help="file (default: stdout)")
    for q in (s, w, e):
        q.add_argument("--tenant", action="append", help="repeatable; default: every tenant")
        q.add_argument("--json", action="store_true", help=argparse.SUPPRESS if q is e else "print JSON")
    for q in (s, e):
        q.add_argument("--since", help="first UTC day (YYYY-MM-DD), default today")
        q.add_argument("--until", help="last UTC day, inclusive, default today")
    return p


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]] = COLUMNS) -> str:
    cells = [[h for _, h in columns]] + [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]

    def line(c: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths, strict=True)))

    return "\n".join(line(c) for c in cells)


def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    row = {k: rec.get(k) for k in CSV_FIELDS}
    row["fallback"] = ">".join(rec.get("fallback") or [])
    return row


async def _tenants(redis: Redis, given: list[str] | None) -> list[str]:
    return given if given else sorted({*await KeyStore(redis).tenants(), "admin"})


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings()
    if args.redis_url:
        settings = settings.model_copy(update={"redis_url": args.redis_url})
    redis = connect(settings)
    try:
        tenants = await _tenants(redis, args.tenant)
        if args.cmd == "workflow":
            for t in tenants:
                wf = await reader.workflow(redis, t, args.workflow_id)
                if wf is not None:
                    break
            else:
                print(f"qlp ledger: no workflow {args.workflow_id!r}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(wf, indent=2), file=out)
                return 0
            print(f"workflow {wf['id']} (tenant {wf['tenant']})", file=out)
            print(table([wf]), file=out)
            cols = [
                ("time", "TIME"),
                ("request_id", "REQUEST"),
                ("agent", "AGENT"),
                ("tier", "TIER"),
                ("model", "MODEL"),
                ("prompt_tokens", "PROMPT"),
                ("completion_tokens", "COMPL"),
                ("cost_micros", "COST uUSD"),
                ("status", "STATUS"),
                ("estimated", "EST"),
            ]
            print("", file=out)
            print(table(wf["records"], cols), file=out)
            return 0
        today = dt.datetime.now(dt.UTC).date()
        since, until = reader.parse_day(args.since, today), reader.parse_day(args.until, today)
        if args.cmd == "summary":
            s = await reader.summary(redis, tenants, args.by, since, until)
            if args.json:
                print(json.dumps(s, indent=2), file=out)
            else:
                print(f"{since} .. {until} (UTC), by {args.by}, tenants: {', '.join(tenants)}", file=out)
                print(table([*s["data"], s["total"]]), file=out)
            return 0
        dest = open(args.output, "w", newline="") if args.output else out  # noqa: ASYNC230 (a CLI: nothing else runs)
        try:
            writer = csv.DictWriter(dest, CSV_FIELDS) if args.format == "csv" else None
            if writer is not None:
                writer.writeheader()
            async for rec in reader.export(redis, tenants, since, until):
                if writer is not None:
                    writer.writerow(_csv_row(rec))
                else:
                    dest.write(json.dumps(rec) + "\n")
        finally:
            if dest is not out:
                dest.close()
        return 0
    finally:
        await redis.aclose()


def main(argv: list[str], out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, out or sys.stdout))
    except ValueError as exc:
        print(f"qlp ledger: {exc}", file=sys.stderr)
        return 2
    except (OSError, RedisError) as exc:
        print(f"qlp ledger: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
