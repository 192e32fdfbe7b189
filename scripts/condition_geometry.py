"""What the task vectors say about the adapters, for the categories of a finished (or half-finished) run.

    .venv/bin/python scripts/condition_geometry.py --root artifacts [--results results/zeroshot] [--out DIR]

The leave-out flow writes this analysis into its own report (``icm_core.zeroshot.geometry``). This script runs the
same analysis straight from an artifacts root: the final LoRA of every category under ``<root>/lora/`` and its task
vector under ``<root>/task_vectors/``, so it can run before the benchmark's generators exist, or over a run made
by an older commit. With ``--results`` holding a leave-out run's ``results.json`` that has the cross-category
matrix, it adds the transfer analysis. Writes ``condition_geometry.json``, ``condition_geometry.md`` and
``condition_geometry.png`` to ``--out`` (default: ``--results``) and prints the markdown. A category with more
than one finished LoRA or task vector (runs with different settings under one root) is an error naming the
folders; ``--lora-key`` / ``--vector-key`` pick one by its folder name.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from icm_core.zeroshot.config import ZeroShotConfig  # noqa: E402 - after the path insert


DEFAULTS = ZeroShotConfig()


def commit() -> str:
    """This checkout's commit (short hash, '+dirty' with uncommitted changes), or 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "icm_core", "scripts"], cwd=REPO,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return f"`{head.stdout.strip()}`" + ("+dirty" if dirty.stdout.strip() else "")


def finished(stage_dir: Path, key: str | None) -> dict[str, Path]:
    """``{category: folder}`` of the finished outputs under ``<root>/<stage>/``: those whose manifest lists files
    that are all present and unchanged (``tasks.manifest.valid_output``, as the flows' cache reads them)."""
    from tasks.manifest import valid_output

    found: dict[str, Path] = {}
    if not stage_dir.is_dir():
        return found
    for category in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
        folders = [f for f in sorted(category.iterdir()) if f.is_dir() and valid_output(f) is not None]
        if key is not None:
            folders = [f for f in folders if f.name.startswith(key)]
        if len(folders) > 1:
            raise SystemExit(
                f"{category}: {len(folders)} finished outputs {[f.name for f in folders]}; pick one with "
                f"--{'lora' if stage_dir.name == 'lora' else 'vector'}-key"
            )
        if folders:
            found[category.name] = folders[0]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="artifacts", help="artifacts root of the run")
    parser.add_argument("--results", default=None, help="a leave-out results folder (its results.json)")
    parser.add_argument("--out", default=None, help="where to write (default: --results)")
    parser.add_argument("--lora-key", default=None, help="prefix of the LoRA folder name to use per category")
    parser.add_argument("--vector-key", default=None, help="prefix of the task-vector folder name to use")
    parser.add_argument("--permutations", type=int, default=999, help="Mantel permutations")
    parser.add_argument("--knn-k", type=int, default=DEFAULTS.knn_k, help="softmax k-NN neighbours (zeroshot.knn_k)")
    parser.add_argument("--knn-temperature", type=float, default=DEFAULTS.knn_temperature, help="its temperature")
    args = parser.parse_args()
    out = args.out or args.results
    if out is None:
        parser.error("give --out or --results")

    from icm_core.data.categories import category_family, library_categories
    from icm_core.generator.task_vectors import load_task_vector
    from icm_core.infra.io import read_json, write_text
    from icm_core.lora.adapters import read_adapter
    from icm_core.lora.trajectory import read_trajectory
    from icm_core.report.geometry import geometry_lines, write_geometry
    from icm_core.zeroshot.geometry import condition_geometry, lora_factors

    root = Path(args.root)
    loras = finished(root / "lora", args.lora_key)
    vectors = finished(root / "task_vectors", args.vector_key)
    share = None
    if args.results and (Path(args.results) / "results.json").is_file():
        matrix = read_json(Path(args.results) / "results.json").get("cross_category")
        share = matrix and matrix["share"]
    names = sorted(set(loras) & set(vectors) & (set(share) if share else set(loras)))
    if len(names) < 3:
        raise SystemExit(f"{root}: {len(names)} categories with both a finished LoRA and task vector; need 3")
    families = {c.name: category_family(c) for c in library_categories()}
    geometry = condition_geometry(
        {n: load_task_vector(vectors[n] / "task_vector.safetensors") for n in names},
        {n: lora_factors(*read_adapter(read_trajectory(loras[n]).adapter_dir)) for n in names},
        share,
        families,
        args.permutations,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    write_geometry(out, geometry, families)
    sources = [
        f"- artifacts root: `{root}`",
        f"- cross-category matrix: {'yes, from ' + str(Path(args.results) / 'results.json') if share else 'no'}",
        f"- analysed by `scripts/condition_geometry.py` at commit {commit()}",
    ]
    text = "\n".join(["# " + geometry_lines(geometry)[0].removeprefix("## "), *geometry_lines(geometry)[1:], "",
                      *sources]) + "\n"  # fmt: skip
    write_text(Path(out) / "condition_geometry.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
