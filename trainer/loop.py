"""`qlp loop`: the learning loop in one command.

    qlp loop --agent developer --servers http://127.0.0.1:8100 --gateway http://127.0.0.1:8080 \\
        --weight 10 --since 2025-06-01                      # admin key: QLP_ADMIN_KEY or --admin-key-file

  1. export the agent's captured successes from Redis      -> <output_dir>/capture.jsonl
  2. dataset, AdaLoRA fit, plain-LoRA export (the `qlp train` stages; an interrupted loop resumes when
     rerun on the same data)
  3. evaluate the new adapter against the current arm (the heaviest arm of the tier/agent rollout on the
     gateway) on the same held-out split
  4. gate: publish only when the new held-out loss is at most (1 + --max-regression) x the current arm's
     and, with a success_check, its task success is at most --max-success-drop below the current arm's
  5. publish models/adapters/<name>/<vN>/, load it into every --servers model server as <name>-<vN>, and
     add it to the gateway's rollout as a canary arm at --weight percent
  6. print the rollout report for the tier and agent

Every `qlp train` config flag works here (`--max-steps`, `--output-dir`, ...); `--config` defaults to
config/train/<agent>.yaml when it exists. One JSON line per step on stdout. Exit status: 0 published (or,
with --dry-run, would be published); 2 bad input, config or too few examples (one line on stderr); 3 gated,
not published; 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig, add_config_arguments, config_from_args
from .errors import PublishError, TrainerError, TrainingInterrupted

__all__ = ["EXIT_GATED", "CurrentArm", "Gate", "Refused", "current_arm", "gate", "main", "next_version"]

EXIT_OK, EXIT_BAD, EXIT_GATED, EXIT_INTERRUPTED = 0, 2, 3, 130
_VERSION = re.compile(r"^v(\d+)$")


class Refused(TrainerError):
    """Bad input found by the loop itself (exit 2), with the line to print."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlp loop",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p)  # --config and every TrainConfig field, --agent included
    loop = p.add_argument_group("loop")
    loop.add_argument(
        "--weight",
        type=float,
        default=10.0,
        help="canary weight, percent of the agent's workflows (0 < w <= 100) [default: 10]",
    )
    loop.add_argument("--since", help="first UTC day of captured traffic (YYYY-MM-DD) [default: all]")
    loop.add_argument("--until", help="last UTC day of captured traffic, inclusive [default: all]")
    loop.add_argument(
        "--min-examples", type=int, default=10, help="refuse to train on fewer captured successes [default: 10]"
    )
    loop.add_argument(
        "--max-regression",
        type=float,
        default=0.02,
        help="publish only if the new held-out loss is at most this fraction worse than the "
        "current arm's [default: 0.02]",
    )
    loop.add_argument(
        "--max-success-drop",
        type=float,
        default=0.0,
        help="with a success_check: publish only if the new adapter's task success on the held-out "
        "split is at most this much (a fraction, 0.05 = 5 points) below the current arm's "
        "[default: 0]",
    )
    loop.add_argument("--admin-key-file", type=Path, help="gateway admin key [default: $QLP_ADMIN_KEY]")
    loop.add_argument("--redis-url", help="Redis of the capture stream [default: $QLP_REDIS_URL or local]")
    loop.add_argument(
        "--server-adapters-root", help="adapters_root as the model servers see it [default: adapters_root, absolute]"
    )
    loop.add_argument(
        "--dry-run", action="store_true", help="export, train, evaluate and gate; publish, load and route nothing"
    )
    return p


def _say(step: str, value: Any) -> None:
    print(json.dumps({step: value}), flush=True)


# ---- step 1: captured successes ----


def export_successes(agent: str, out: Path, *, redis_url: str | None, since: str | None, until: str | None) -> int:
    """`qlp capture export --outcome success` into `out`; the number of records written."""
    from gateway.capture.cli import main as capture_main

    argv = [
        *(["--redis-url", redis_url] if redis_url else []),
        "export",
        "--agent",
        agent,
        "-o",
        str(out),
        "--outcome",
        "success",
        *(["--since", since] if since else []),
        *(["--until", until] if until else []),
    ]
    summary = io.StringIO()
    if capture_main(argv, out=summary) != 0:  # it printed why on stderr
        raise Refused("exporting the captured successes failed (see above)")
    with out.open(encoding="utf-8") as fh:
        written = sum(1 for line in fh if line.strip())
    _say("capture", {"path": str(out), "successes": written, "summary": summary.getvalue().strip()})
    return written


# ---- step 3: the current arm ----


@dataclass(frozen=True)
class CurrentArm:
    name: str  # the arm's name ("baseline" when there is no rollout)
    adapter: str | None  # the adapter it serves; None: the tier's usual model
    folder: Path | None  # that adapter's published folder, evaluated on the held-out split
    note: str  # why these figures stand for the current arm


def _adapter_folder(adapter: str, root: Path, name: str) -> Path | None:
    """models/adapters/<name>/<version>/ of an adapter served as `<name>-<version>`; this config's name
    first, then any split at a dash."""
    splits = [(name, adapter[len(name) + 1 :])] if adapter.startswith(name + "-") else []
    splits += [(adapter[:i], adapter[i + 1 :]) for i, c in enumerate(adapter) if c == "-"]
    for n, v in splits:
        if n and v and (root / n / v / "adapter_config.json").is_file():
            return root / n / v
    return None


def current_arm(rollouts: list[dict[str, Any]], tier: str, agent: str, adapters_root: Path, name: str) -> CurrentArm:
    """The arm that serves most of the agent's workflows on `tier` (the rollout for the agent, else the
    tier's "*" rollout). An adapter arm must resolve to a published folder; an arm without an adapter (or
    no rollout) is the base model; an arm on another tier (e.g. T3) cannot be evaluated offline, so the base
    model stands in for it and the note says so."""
    by_key = {(r.get("tier"), r.get("agent")): r for r in rollouts}
    rollout = by_key.get((tier, agent)) or by_key.get((tier, "*"))
    arms = [a for a in (rollout or {}).get("arms") or [] if float(a.get("weight") or 0) > 0]
    if not arms:
        return CurrentArm("baseline", None, None, f"no rollout for {tier}/{agent}: the base model serves it")
    arm = max(arms, key=lambda a: float(a["weight"]))  # max keeps the first of equal weights
    if arm.get("tier") not in (None, tier):
        return CurrentArm(
            arm["name"],
            arm.get("adapter"),
            None,
            f"arm {arm['name']!r} is served by {arm['tier']}, which is not evaluated offline: "
            "compared with the base model instead",
        )
    if not arm.get("adapter"):
        return CurrentArm(arm["name"], None, None, f"arm {arm['name']!r} is the tier's usual model (base model)")
    folder = _adapter_folder(arm["adapter"], adapters_root, name)
    if folder is None:
        raise Refused(
            f"the current arm {arm['name']!r} serves adapter {arm['adapter']!r}, but no published "
            f"folder {adapters_root}/<name>/<version>/ matches it; pass the --adapters-root it was "
            "published under"
        )
    return CurrentArm(arm["name"], arm["adapter"], folder, f"arm {arm['name']!r}: adapter {folder}")


# ---- step 4: the gate ----


@dataclass(frozen=True)
class Gate:
    current_loss: float
    new_loss: float
    max_regression: float
    # Task success on the held-out split (config `success_check`), when the task family has a check.
    current_success: float | None = None
    new_success: float | None = None
    max_success_drop: float = 0.0

    @property
    def regression(self) -> float:
        """How much worse the new loss is, as a fraction of the current one (negative: better)."""
        return (self.new_loss - self.current_loss) / self.current_loss if self.current_loss else 0.0

    @property
    def loss_passed(self) -> bool:
        return self.new_loss <= self.current_loss * (1.0 + self.max_regression)

    @property
    def success_passed(self) -> bool:
        if self.new_success is None or self.current_success is None:
            return True
        return self.new_success >= self.current_success - self.max_success_drop

    @property
    def passed(self) -> bool:
        return self.loss_passed and self.success_passed

    def why_not(self) -> str:
        if not self.success_passed:
            return (
                f"task success {self.new_success:.3f} is below the current arm's {self.current_success:.3f} "
                f"by more than --max-success-drop {self.max_success_drop:g}"
            )
        return (
            f"held-out loss {self.new_loss:.4f} is {self.regression:.1%} worse than the current arm's "
            f"{self.current_loss:.4f} (--max-regression {self.max_regression:g})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "current_loss": self.current_loss,
            "new_loss": self.new_loss,
            "regression": round(self.regression, 5),
            "max_regression": self.max_regression,
            "current_success": self.current_success,
            "new_success": self.new_success,
            "max_success_drop": self.max_success_drop,
            "passed": self.passed,
        }


def gate(
    current_loss: float,
    new_loss: float,
    max_regression: float,
    current_success: float | None = None,
    new_success: float | None = None,
    max_success_drop: float = 0.0,
) -> Gate:
    return Gate(current_loss, new_loss, max_regression, current_success, new_success, max_success_drop)


def _comparison(current: CurrentArm, cur: dict[str, Any], new: dict[str, Any], new_name: str) -> str:
    """current arm vs new adapter, on the same held-out split (what `qlp train eval` prints, per arm)."""
    cur_label = f"current ({current.adapter or current.name})"
    new_label = f"new ({new_name})"
    rows = [("metric", cur_label, new_label)]
    loss = new["held_out_loss"]
    rows.append((f"held-out loss ({loss['tokens']} tokens)", f"{cur['loss']:.4f}", f"{loss['adapter']:.4f}"))
    p = new.get("pass_at_1")
    if p and cur.get("pass_at_1") is not None:
        rows.append((f"pass@1 ({p['tasks']} HumanEval tasks)", f"{cur['pass_at_1']:.3f}", f"{p['adapter']:.3f}"))
    s = new.get("task_success")
    if s and cur.get("task_success") is not None:
        rows.append((f"{s['check']} success ({s['tasks']} tasks)", f"{cur['task_success']:.3f}", f"{s['adapter']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


# ---- step 5: publish ----


def next_version(root: Path) -> str:
    """The next free vN under models/adapters/<name>/ (v1 for the first)."""
    taken = [int(m.group(1)) for d in (root.iterdir() if root.is_dir() else ()) if (m := _VERSION.match(d.name))]
    return f"v{max(taken, default=0) + 1}"


# ---- step 6: the report ----


def print_report(cfg: TrainConfig, key: str | None, redis_url: str | None) -> None:
    """The rollout report for tier/agent: from the gateway (admin key) when there is one, else from Redis
    (`qlp report`). A report that cannot be had is a warning: the loop's work is already done."""
    _say("report", {"tier": cfg.tier, "agent": cfg.agent, "from": cfg.gateway or "redis"})
    try:
        if cfg.gateway:
            from .publish import admin_get

            query = urllib.parse.urlencode({"tier": cfg.tier, "agent": cfg.agent, "format": "json"})
            rep = admin_get(cfg.gateway, key, f"/v1/report?{query}")
            try:
                from gateway.report.render import table
            except ImportError:  # an older gateway package: the figures, compactly
                print(json.dumps(rep, indent=1))
            else:
                print(table(rep))
        else:
            from gateway.report.cli import main as report_main

            if (
                report_main(
                    [*(["--redis-url", redis_url] if redis_url else []), "--tier", cfg.tier, "--agent", cfg.agent]
                )
                != 0
            ):
                print("qlp loop: warning: no report (see above)", file=sys.stderr)
    except (PublishError, ImportError, OSError) as exc:
        print(f"qlp loop: warning: no report: {exc}", file=sys.stderr)
    sys.stdout.flush()


# ---- the loop ----


def _check(args: argparse.Namespace, cfg: TrainConfig, key: str | None) -> None:
    """Everything that can be refused before an hour of training."""
    if not 0 < args.weight <= 100:
        raise Refused(f"--weight must be in (0, 100] percent (got {args.weight:g})")
    if args.max_regression < 0:
        raise Refused(f"--max-regression must be >= 0 (got {args.max_regression:g})")
    if not 0 <= args.max_success_drop <= 1:
        raise Refused(f"--max-success-drop must be in [0, 1] (got {args.max_success_drop:g})")
    if args.min_examples < 1:
        raise Refused(f"--min-examples must be at least 1 (got {args.min_examples})")
    if cfg.gateway and not key:
        raise Refused(
            "--gateway needs the admin key (QLP_ADMIN_KEY or --admin-key-file): the loop reads the "
            "rollout and adds the canary arm with it"
        )
    if cfg.gateway and not cfg.servers and not args.dry_run:
        raise Refused(
            "--gateway without --servers would route a canary to an adapter that no model server "
            "has loaded; give the tier's model servers with --servers"
        )
    if cfg.version is not None and (Path(cfg.adapters_root) / cfg.name / cfg.version).exists():
        raise Refused(
            f"{Path(cfg.adapters_root) / cfg.name / cfg.version} already exists; versions are "
            "immutable (leave --version out to take the next free vN)"
        )


def _resumable(cfg: TrainConfig, dataset: Any) -> bool:
    """Resume only a run of this very configuration and dataset (an interrupted loop rerun); new captured
    data starts a fresh run, where `qlp train fit` would refuse the old checkpoint."""
    from .checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(cfg.output_path)
    return ckpt is not None and ckpt.resume_hash == cfg.resume_hash() and ckpt.dataset_hash == dataset.hash


def _loop(args: argparse.Namespace, cfg: TrainConfig) -> int:
    from .cli import build_card, dataset_stage, export_stage, fit_stage
    from .evaluate import evaluate
    from .files import write_json
    from .publish import admin_get, admin_key, load_into_server, publish_folder, route_gateway

    started = time.monotonic()
    key = admin_key(args.admin_key_file) if cfg.gateway else None
    _check(args, cfg, key)
    if cfg.gateway:  # the key and the admin API work: found out now, not after the training
        admin_get(cfg.gateway, key, "/v1/admin/rollouts")
    root, adapters_root = cfg.output_path, Path(cfg.adapters_root)
    root.mkdir(parents=True, exist_ok=True)

    # 1. captured successes
    capture = root / "capture.jsonl"
    n = export_successes(cfg.agent, capture, redis_url=args.redis_url, since=args.since, until=args.until)
    if n < args.min_examples:
        raise Refused(
            f"only {n} captured successes of agent {cfg.agent!r}"
            + (f" since {args.since}" if args.since else "")
            + f"; --min-examples is {args.min_examples}: not training"
        )
    cfg = dataclasses.replace(cfg, data=[str(capture), *(d for d in cfg.data if d != str(capture))])

    # 2. dataset, fit, export
    ds = dataset_stage(cfg)
    _say("dataset", {"path": str(ds.path), "hash": ds.hash, "counts": ds.card["counts"]})
    fit_stage(cfg, ds, fresh=not _resumable(cfg, ds))
    lora = root / "lora"
    export_stage(cfg, cfg.fit_path, lora, True)

    # 3. evaluate against the current arm (as it is now, after the training), on the same held-out split
    rollouts = admin_get(cfg.gateway, key, "/v1/admin/rollouts")["data"] if cfg.gateway else []
    current = current_arm(rollouts, cfg.tier, cfg.agent, adapters_root, cfg.name)
    if not cfg.gateway:
        current = dataclasses.replace(current, note="no --gateway: the base model stands for the current arm")
    new = evaluate(cfg, ds, lora)
    if current.folder is not None:
        old = evaluate(cfg, ds, current.folder)
        cur = {
            "loss": old["held_out_loss"]["adapter"],
            "pass_at_1": old["pass_at_1"] and old["pass_at_1"]["adapter"],
            "task_success": old["task_success"] and old["task_success"]["adapter"],
        }
    else:
        cur = {
            "loss": new["held_out_loss"]["base"],
            "pass_at_1": new["pass_at_1"] and new["pass_at_1"]["base"],
            "task_success": new["task_success"] and new["task_success"]["base"],
        }
    version = cfg.version or next_version(adapters_root / cfg.name)
    served_as = f"{cfg.name}-{version}"

    # 4. gate
    g = gate(
        cur["loss"],
        new["held_out_loss"]["adapter"],
        args.max_regression,
        cur["task_success"],
        new["task_success"] and new["task_success"]["adapter"],
        args.max_success_drop,
    )
    evaluation = {
        **new,
        "current_arm": {
            "name": current.name,
            "adapter": current.adapter,
            "folder": current.folder and str(current.folder),
            "note": current.note,
            **cur,
        },
        "gate": g.as_dict(),
    }
    write_json(root / "eval.json", evaluation)  # build_card puts it on the card
    print(_comparison(current, cur, new, served_as))
    _say("gate", {**g.as_dict(), "current_arm": current.name, "note": current.note})
    if not g.passed:
        print(f"qlp loop: not published: {g.why_not()}", file=sys.stderr)
        return EXIT_GATED

    # 5. publish, load side by side with the current version, add the canary arm
    if args.dry_run:
        _say(
            "dry_run",
            {
                "would_publish": str(adapters_root / cfg.name / version),
                "adapter": served_as,
                "servers": cfg.servers,
                "gateway": cfg.gateway,
                "weight": args.weight,
            },
        )
    else:
        fit = cfg.fit_path if cfg.method == "adalora" else None
        card = build_card(cfg, lora, fit)
        card["loop"] = {
            "served_as": served_as,
            "weight": args.weight,
            "since": args.since,
            "until": args.until,
            "captured_successes": n,
            "current_arm": evaluation["current_arm"],
            "gate": g.as_dict(),
        }
        dest = publish_folder(lora, fit, card, adapters_root, cfg.name, version)
        _say("published", str(dest))
        server_root = Path(args.server_adapters_root) if args.server_adapters_root else adapters_root.resolve()
        for server in cfg.servers:
            r = load_into_server(server, served_as, server_root / cfg.name / version)
            _say("server", {"url": r.url, "loaded": served_as, "replaced": r.replaced})
        if cfg.gateway:
            if not route_gateway(cfg.gateway, key, cfg.tier, cfg.agent, served_as, weight=args.weight):
                raise PublishError(
                    f"{served_as} is published and loaded, but {cfg.gateway} has no admin routes: "
                    f"add it to the {cfg.tier}/{cfg.agent} rollout in the fleet config"
                )
            now = current_rollout(admin_get(cfg.gateway, key, "/v1/admin/rollouts")["data"], cfg.tier, cfg.agent)
            _say(
                "canary",
                {"tier": cfg.tier, "agent": cfg.agent, "adapter": served_as, "weight": args.weight, "arms": now},
            )

    # 6. report
    print_report(cfg, key, args.redis_url)
    _say("loop", {"seconds": round(time.monotonic() - started, 1), "published": not args.dry_run, "adapter": served_as})
    return EXIT_OK


def current_rollout(rollouts: list[dict[str, Any]], tier: str, agent: str) -> list[dict[str, Any]]:
    """The arms of the tier/agent rollout as (name, weight, adapter)."""
    for r in rollouts:
        if r.get("tier") == tier and r.get("agent") == agent:
            return [{k: a.get(k) for k in ("name", "weight", "adapter")} for a in r.get("arms") or []]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "agent", None):
        parser.error("--agent is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.config is None and Path(f"config/train/{args.agent}.yaml").is_file():
        args.config = Path(f"config/train/{args.agent}.yaml")
    try:
        cfg = config_from_args(args)
        return _loop(args, cfg)
    except TrainingInterrupted as exc:
        print(f"qlp loop: {exc}; run the same command again to resume", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qlp loop: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainerError as exc:
        print(f"qlp loop: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
