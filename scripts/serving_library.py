"""Assemble a serving library (``icm_core.zeroshot.serving``) from one fold of a leave-out run's artifacts root:
the fold's training categories' own LoRAs and task vectors, its multi-task LoRA, its mean LoRA and its generator.
The library then serves the fold's held-out categories as new ones (``icm-lora adapt``).

    .venv/bin/python scripts/serving_library.py --root artifacts --fold 0 --out artifacts/serving-library-fold-0

The folders are found by name under the root (``lora/<category>/``, ``task_vectors/<category>/``,
``lora/multitask-fold-<i>/``, ``zeroshot_library/fold-<i>/``, ``generator/``): a root holding one leave-out run,
each of those folders with one output. The generator is the one trained on exactly the fold's training categories.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from icm_core.infra.io import read_json, sidecar_path
from icm_core.lora.trajectory import read_trajectory
from icm_core.zeroshot.serving import write_library


def one(folder: Path, pattern: str) -> Path:
    """The one output under ``folder`` matching ``pattern`` (a root with two runs' outputs is refused)."""
    found = sorted(p for p in folder.glob(pattern) if (p.parent / "manifest.json").is_file() or p.is_dir())
    if len(found) != 1:
        raise SystemExit(f"{folder}/{pattern}: expected one output, found {len(found)}")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="artifacts root of one leave-out run")
    parser.add_argument("--fold", type=int, required=True, help="the fold whose training categories are the library")
    parser.add_argument("--out", type=Path, required=True, help="the serving library folder to write")
    args = parser.parse_args()
    label = f"fold-{args.fold}"
    multitask = one(args.root / "lora" / f"multitask-{label}", "*/manifest.json").parent
    mean = one(args.root / "zeroshot_library" / label, "*/adapter")
    generators = {}
    pooled = read_json(one(args.root / "zeroshot_pooled" / label, "*/manifest.json"))
    train = sorted(pooled.get("meta", {}).get("sources", []))
    if not train:
        raise SystemExit(f"{args.root}/zeroshot_pooled/{label}: no training categories recorded")
    for path in sorted(args.root.glob("generator/*/generator.safetensors")):
        if sorted(read_json(sidecar_path(path)).get("meta", {}).get("categories", [])) == train:
            generators["icm_lora"] = path
    categories = {c: read_trajectory(one(args.root / "lora" / c, "*/manifest.json").parent).adapter_dir for c in train}
    vectors = {c: one(args.root / "task_vectors" / c, "*/task_vector.safetensors") for c in train}
    out = write_library(
        args.out,
        {"multitask_lora": read_trajectory(multitask).adapter_dir, "mean_lora": mean},
        categories,
        vectors,
        generators,
        "multitask_lora",
    )
    print(f"{out}: {len(categories)} categories ({', '.join(train)}), generators {sorted(generators)}")


if __name__ == "__main__":
    main()
