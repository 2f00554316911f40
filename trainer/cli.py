"""`qlp train`: build datasets, train, evaluate, export and publish AdaLoRA adapters.

    qlp train run --config config/train/developer.yaml --data var/capture/developer.jsonl \\
        --version v1 --servers http://127.0.0.1:8100         # the whole pipeline
    qlp train dataset --config config/train/developer.yaml   # -> <output_dir>/dataset/
    qlp train fit     --config config/train/developer.yaml   # -> <output_dir>/adalora/ (resumes by itself)
    qlp train eval    --config config/train/developer.yaml   # -> <output_dir>/eval.json
    qlp train export  --config config/train/developer.yaml   # -> <output_dir>/lora/
    qlp train publish --config config/train/developer.yaml --version v1 --servers http://127.0.0.1:8100
    torchrun --nproc-per-node 4 -m trainer fit --config ...   # several GPUs

Every subcommand takes the config fields as flags (`qlp train fit --help`); each stage reads what the
previous one wrote under `output_dir`, or the folder given by its own flag. Exit status: 0 done, 2 bad
config/data/checkpoint/export/publish (one line on stderr), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig, add_config_arguments, config_from_args
from .errors import TrainerError, TrainingInterrupted

__all__ = ["build_card", "dataset_stage", "eval_stage", "export_stage", "fit_stage", "main"]

log = logging.getLogger("qlp.trainer")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlp train", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        add_config_arguments(sp)
        return sp

    d = cmd("dataset", "build the dataset folder (validate, deduplicate, split, card)")
    d.add_argument("--out", type=Path, help="dataset folder [default: <output_dir>/dataset]")

    f = cmd("fit", "train the AdaLoRA adapter (resumes from the newest checkpoint unless --fresh)")
    f.add_argument("--dataset", type=Path, help="use this dataset folder instead of building one")
    f.add_argument("--fresh", action="store_true", help="ignore and delete existing checkpoints")

    e = cmd("eval", "held-out loss and pass@1, base model and adapter side by side")
    e.add_argument("--adapter", type=Path, help="adapter folder [default: <output_dir>/adalora]")
    e.add_argument("--dataset", type=Path, help="dataset folder [default: <output_dir>/dataset]")
    e.add_argument("--report", type=Path, help="report file [default: <output_dir>/eval.json]")

    x = cmd("export", "AdaLoRA checkpoint -> plain LoRA for vLLM, with the logits equivalence check")
    x.add_argument("--adalora", type=Path, help="AdaLoRA folder [default: <output_dir>/adalora]")
    x.add_argument("--out", type=Path, help="LoRA folder [default: <output_dir>/lora]")
    x.add_argument("--no-check", action="store_true", help="skip the equivalence check")

    for sp in (
        cmd("publish", "write models/adapters/<name>/<version>/ and load it into the servers"),
        cmd("run", "dataset, fit, eval, export and publish in one go"),
    ):
        sp.add_argument("--lora", type=Path, help="exported LoRA folder [default: <output_dir>/lora]")
        sp.add_argument("--adalora", type=Path, help="AdaLoRA folder [default: <output_dir>/adalora]")
        sp.add_argument(
            "--server-adapters-root",
            help="adapters_root as the model servers see it (a mounted volume) [default: adapters_root, absolute]",
        )
        sp.add_argument("--admin-key-file", type=Path, help="gateway admin key [default: $QLP_ADMIN_KEY]")
        sp.add_argument("--force", action="store_true", help="overwrite an existing version")
        sp.add_argument(
            "--weight",
            type=float,
            help="with --gateway: route only this percent of the agent's "
            "workflows to the adapter, as a canary arm (docs/rollout.md) [default: all of them]",
        )
        if sp.prog.endswith("run"):
            sp.add_argument("--fresh", action="store_true", help="ignore and delete existing checkpoints")
            sp.add_argument("--skip-eval", action="store_true", help="no evaluation (the card says so)")
    return p


# ---- stages (also used by `qlp loop`, trainer/loop.py) ----


def dataset_stage(cfg: TrainConfig, out: Path | None = None) -> Any:
    from .data import build_dataset, load_dataset
    from .train import dist_setup

    out = out or cfg.output_path / "dataset"
    dist = dist_setup()
    if dist.main:
        ds = build_dataset(cfg, out, replace=True)
    if dist.world > 1:  # the others read what rank 0 wrote
        import torch.distributed as tdist

        tdist.barrier()
        if not dist.main:
            ds = load_dataset(out)
    return ds


def fit_stage(cfg: TrainConfig, dataset: Any, fresh: bool) -> Any:
    from .train import dist_setup, train

    result = train(cfg, dataset, resume=not fresh, handle_signals=True, progress=sys.stderr.isatty())
    if dist_setup().main:
        summary = result.summary()
        ranks = list(summary.pop("rank_pattern").values())
        summary["ranks"] = {"modules": len(ranks), "total": sum(ranks), "min": min(ranks), "max": max(ranks)}
        print(json.dumps({"fit": summary}))
    return result


def eval_stage(cfg: TrainConfig, dataset: Any, adapter: Path, report_file: Path) -> dict[str, Any]:
    from .evaluate import evaluate, format_report
    from .files import write_json

    report = evaluate(cfg, dataset, adapter)
    report_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(report_file, report)
    print(format_report(report))
    return report


def export_stage(cfg: TrainConfig, adalora: Path, out: Path, check: bool) -> Any:
    from .export import export_lora

    result = export_lora(cfg.base_model, adalora, out, replace=True, check=check)
    print(
        json.dumps(
            {
                "export": {
                    "path": str(out),
                    "r": result.r,
                    "modules": result.modules,
                    "max_abs_diff": result.max_abs_diff,
                    "adapter_effect": result.adapter_effect,
                }
            }
        )
    )
    return result


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def build_card(cfg: TrainConfig, lora: Path, adalora: Path | None) -> dict[str, Any]:
    """What a published adapter says about itself, gathered from the run folder."""
    from .files import sha256_file

    root = cfg.output_path
    base = Path(cfg.base_model)
    weights = base / "model.safetensors"
    base_config = _read_json(base / "config.json") or {}
    dataset = _read_json(root / "dataset" / "card.json")
    training = _read_json(root / "train_result.json")
    export = _read_json(lora / "export.json")
    adalora_config = _read_json(adalora / "adapter_config.json") if adalora else None
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "agent": cfg.agent,
        "base_model": {
            "path": str(base),
            "name": base_config.get("_model_name_or_path"),
            "architecture": (base_config.get("architectures") or [None])[0],
            "weights_sha256": sha256_file(weights) if weights.is_file() else None,
        },
        "dataset": dataset
        and {
            "hash": dataset["hash"],
            "counts": dataset["counts"],
            "tokens": dataset["tokens"],
            "sources": dataset["sources"],
            "human_eval_seed": dataset["human_eval_seed"],
        },
        "training": training
        and {
            k: training.get(k)
            for k in ("steps", "total_step", "tokens", "seconds", "tokens_per_s", "final_loss", "schedule")
        },
        "adalora": adalora_config
        and {
            k: adalora_config.get(k)
            for k in (
                "init_r",
                "target_r",
                "lora_alpha",
                "lora_dropout",
                "target_modules",
                "tinit",
                "tfinal",
                "deltaT",
                "beta1",
                "beta2",
                "orth_reg_weight",
                "total_step",
            )
        },
        "export": export,
        "rank_pattern": export and export.get("rank_pattern"),
        "evaluation": _read_json(root / "eval.json"),
        "config": cfg.to_dict(),
    }


def _publish(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from .publish import admin_key, load_into_server, publish_folder, route_gateway

    lora = args.lora or cfg.output_path / "lora"
    adalora = args.adalora or cfg.fit_path
    version = cfg.version or time.strftime("v%Y%m%d-%H%M%S", time.gmtime())
    # The AdaLoRA checkpoint travels with the export; a plain LoRA fit is the export, less its padding.
    fit = adalora if cfg.method == "adalora" and adalora.is_dir() else None
    card = build_card(cfg, lora, fit)
    dest = publish_folder(lora, fit, card, Path(cfg.adapters_root), cfg.name, version, force=args.force)
    print(json.dumps({"published": str(dest)}))
    server_root = Path(args.server_adapters_root) if args.server_adapters_root else Path(cfg.adapters_root).resolve()
    # A canary is served beside the version it is compared with, so it needs a name of its own (as `qlp loop`
    # names it); published for all traffic, the adapter keeps its name and replaces the one loaded before.
    served = f"{cfg.name}-{version}" if getattr(args, "weight", None) is not None else cfg.name
    for server in cfg.servers:
        r = load_into_server(server, served, server_root / cfg.name / version)
        print(json.dumps({"server": r.url, "loaded": served, "replaced": r.replaced}))
    if cfg.gateway:
        routed = route_gateway(
            cfg.gateway, admin_key(args.admin_key_file), cfg.tier, cfg.agent, served, weight=args.weight
        )
        print(json.dumps({"gateway": cfg.gateway, "routed": routed, "tier": cfg.tier, "agent": cfg.agent}))
    return 0


def _run(args: argparse.Namespace, cfg: TrainConfig) -> int:
    from .data import load_dataset
    from .train import dist_setup

    root = cfg.output_path
    command = args.command
    if command == "dataset":
        ds = dataset_stage(cfg, args.out)
        print(json.dumps({"dataset": str(ds.path), "hash": ds.hash, "counts": ds.card["counts"]}))
        return 0
    if command == "fit":
        ds = load_dataset(args.dataset) if args.dataset else dataset_stage(cfg)
        fit_stage(cfg, ds, args.fresh)
        return 0
    if command == "eval":
        ds = load_dataset(args.dataset or root / "dataset")
        eval_stage(cfg, ds, args.adapter or cfg.fit_path, args.report or root / "eval.json")
        return 0
    if command == "export":
        export_stage(cfg, args.adalora or cfg.fit_path, args.out or root / "lora", not args.no_check)
        return 0
    if command == "publish":
        return _publish(cfg, args)
    # run: the whole pipeline; after training only the main process goes on.
    ds = dataset_stage(cfg)
    fit_stage(cfg, ds, args.fresh)
    if not dist_setup().main:
        return 0
    if not args.skip_eval:
        eval_stage(cfg, ds, cfg.fit_path, root / "eval.json")
    export_stage(cfg, cfg.fit_path, root / "lora", True)
    args.lora, args.adalora = root / "lora", cfg.fit_path
    return _publish(cfg, args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        return _run(args, cfg)
    except TrainingInterrupted as exc:
        print(f"qlp train: {exc}; run the same command again to resume", file=sys.stderr)
        return exc.exit_code
    except TrainerError as exc:
        print(f"qlp train: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
