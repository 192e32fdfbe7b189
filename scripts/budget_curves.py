"""Validation curves behind the demo's training budgets (the CVAE's epochs, the LoRA fine-tune's steps).

Reads a finished pipeline run under ``--root`` (its data splits, LoRA trajectories and task vectors) and:

1. CVAE: trains the generator with the run config's CVAE settings up to ``--epochs``, validating every
   ``--every`` epochs without stopping, and prints per check the generated adapters' validation NLL and the
   share of the base-to-LoRA validation NLL gap they recover (mean and worst category). Then it replays the
   configured early stopping (``cvae.val_criterion`` / ``val_every`` / ``patience`` / ``min_delta``) on that
   curve: the epoch it stops at, and what it keeps.
2. LoRA (``--lora name,...``): fine-tunes each named category with the configured schedule, keeping a
   checkpoint every ``--lora-every`` steps, and prints the validation NLL of each checkpoint.

    .venv/bin/python scripts/budget_curves.py --root artifacts [--epochs 120] [--every 5] [--lora news]
        [--json curves.json] [--set section.field=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from icm_core.config import load_run_config
from icm_core.generator.dataset import generator_training_data
from icm_core.generator.train import EarlyStopping, train_generator
from icm_core.generator.validation import validation_scorer
from icm_core.lora.stages import finetune_lora
from icm_core.lora.trajectory import final_lora_state, load_trajectory_checkpoints, read_trajectory


def newest(folder: Path) -> Path:
    """The most recently written keyed output under ``<root>/<stage>/<category>``."""
    keyed = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] if folder.is_dir() else []
    if not keyed:
        raise FileNotFoundError(f"{folder}: no output here; run the pipeline on this root first")
    return max(keyed, key=lambda p: p.stat().st_mtime)


def gap_share(base: dict[str, float], lora: dict[str, float], got: dict[str, float]) -> dict[str, float]:
    return {n: (base[n] - got[n]) / (base[n] - lora[n]) for n in got if abs(base[n] - lora[n]) > 1e-12}


def cvae_curve(cfg, root: Path, names: list[str], epochs: int, every: int) -> dict[str, Any]:
    lora_dirs = {n: newest(root / "lora" / n) for n in names}
    vectors = {n: newest(root / "task_vectors" / n) / "task_vector.safetensors" for n in names}
    splits = {n: newest(root / "data" / n) / "splits" for n in names}
    dataset, adapter_config = generator_training_data(lora_dirs, vectors)
    scorer = validation_scorer(
        splits, cfg.model, cfg.data, cfg.cvae.val_tokens, adapter_config, criterion=cfg.cvae.val_criterion
    )
    if scorer is None:
        raise SystemExit("no category has a validation block")
    scorer.with_reference({n: final_lora_state(lora_dirs[n]) for n in names})
    base = {n: scorer.reference[n][0] for n in names}
    lora = {n: scorer.reference[n][1] for n in names}
    print(
        f"validation NLL/token  base {sum(base.values()) / len(base):.4f}  LoRA {sum(lora.values()) / len(lora):.4f}"
    )
    checks: list[dict[str, Any]] = []

    def score(states) -> float:
        values = scorer.per_category(states)
        shares = gap_share(base, lora, values)
        mean_nll = sum(values.values()) / len(values)
        criterion = scorer.criterion_of(values)  # what the training loop's stop rule sees
        checks.append({"nll": mean_nll, "criterion": criterion, "per_category": values, "gap_share": shares})
        return criterion

    def on_epoch(epoch: int, row: dict) -> None:
        if "val" in row:
            check = checks[-1]
            check.update(epoch=epoch + 1, recon=row["recon"], kld=row["kld"])
            shares = check["gap_share"].values()
            print(
                f"epoch {epoch + 1:>4}  recon {row['recon']:.5f}  kld {row['kld']:.3f}  val NLL {check['nll']:.4f}  "
                f"gap recovered mean {sum(shares) / len(shares):.1%} worst {min(shares):.1%}",
                flush=True,
            )

    probe = cfg.cvae.model_copy(update={"epochs": epochs, "val_every": every, "patience": 10**6})
    _, _, seconds = train_generator(dataset, probe, adapter_config, on_epoch=on_epoch, score_adapters=score)

    # Replay the configured early stopping (the training loop's own rule) on the recorded curve.
    rule = cfg.cvae
    stopper, stop = EarlyStopping(rule.val_every, rule.patience, rule.min_delta), None
    for check in checks:
        if not stopper.due(check["epoch"], epochs):
            continue
        stopper.observe(check["epoch"], check["criterion"])
        if stopper.stopped:
            stop = check["epoch"]
            break
    best_check = next(check for check in checks if check["epoch"] == stopper.best_epoch)
    kept = best_check["gap_share"].values()
    print(
        f"\nconfigured rule ({rule.val_criterion}, val_every {rule.val_every}, patience {rule.patience}, "
        f"min_delta {rule.min_delta}): "
        f"stops after epoch {stop or epochs}, keeps epoch {best_check['epoch']} "
        f"(gap recovered mean {sum(kept) / len(kept):.1%}, worst {min(kept):.1%}); "
        f"{epochs} epochs took {seconds:.0f} s with validation"
    )
    return {"base": base, "lora": lora, "checks": checks, "stop_epoch": stop, "kept_epoch": best_check["epoch"]}


def lora_curve(cfg, root: Path, name: str, every: int, work: Path) -> list[dict[str, Any]]:
    splits = newest(root / "data" / name) / "splits"
    lora_cfg = cfg.lora.model_copy(update={"checkpoint_every": every, "trajectory_size": cfg.lora.steps // every})
    out = work / name
    finetune_lora(splits, cfg.model, cfg.data, lora_cfg, out)
    trajectory = read_trajectory(out)
    scorer = validation_scorer({name: splits}, cfg.model, cfg.data, cfg.cvae.val_tokens, trajectory.adapter_config)
    base = scorer.per_category({name: None})[name]
    rows = [{"step": 0, "nll": base}]
    for step, state in zip(trajectory.steps, load_trajectory_checkpoints(out), strict=True):
        rows.append({"step": step, "nll": scorer.per_category({name: state})[name]})
    print(f"\nLoRA {name}: validation NLL/token by step")
    for row in rows:
        print(f"  step {row['step']:>4}  {row['nll']:.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="artifacts")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--no-cvae", action="store_true")
    parser.add_argument("--lora", default="", help="comma-separated categories whose fine-tune curve to measure")
    parser.add_argument("--lora-every", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = load_run_config(args.config, args.set)
    root = Path(args.root)
    names = sorted(p.name for p in (root / "lora").iterdir() if p.is_dir())
    result: dict[str, Any] = {"categories": names}
    if not args.no_cvae:
        result["cvae"] = cvae_curve(cfg, root, names, args.epochs, args.every)
    if args.lora:
        with tempfile.TemporaryDirectory(prefix="icm-lora-curve-") as tmp:
            result["lora"] = {n: lora_curve(cfg, root, n, args.lora_every, Path(tmp)) for n in args.lora.split(",")}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
