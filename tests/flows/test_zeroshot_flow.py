"""The leave-out protocol flow end to end on a tiny model and four tiny categories (2 folds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from icm_core.generator.config import TaskVectorConfig
from icm_core.infra.io import load_tensors, read_json
from icm_core.zeroshot.config import ZeroShotConfig, ZeroShotRunConfig
from icm_core.zeroshot.protocol import METHODS, make_folds
from tests.flows.support import forecast_text, recipe_text, tiny_run_config, write_categories


def _letters_text() -> str:
    return "\n\n".join(f"Dear {n}, thank you for the parcel of {n.lower()} seeds; they came up in May." * 3
                       for n in ["Ann", "Bob", "Cal", "Dot", "Eve", "Fay", "Gus", "Hal"]) + "\n"  # fmt: skip


def _scores_text() -> str:
    return "\n\n".join(f"Round {i}: home {i % 5} away {(i * 3) % 4}, attendance {1000 + 37 * i}, referee R{i % 7}." * 3
                       for i in range(20)) + "\n"  # fmt: skip


def test_zeroshot_flow_on_a_tiny_model(workspace, tmp_path: Path) -> None:
    from flows.zeroshot import zeroshot_protocol

    texts = {
        "recipes": recipe_text(),
        "forecast": forecast_text(),
        "letters": _letters_text(),
        "scores": _scores_text(),
    }
    categories_file = write_categories(tmp_path / "zs", texts)
    base = tiny_run_config(workspace.config.model.name_or_path)
    cfg = ZeroShotRunConfig(
        model=base.model,
        data=base.data,
        lora=base.lora,
        task_vector=TaskVectorConfig(hidden_from="base", num_samples=2, sample_tokens=16),
        cvae=base.cvae,
        eval=base.eval,
        zeroshot=ZeroShotConfig(
            folds=2, multitask_steps=4, bootstrap_samples=20, knn_k=2, functional_steps=2, scaling_sizes=(1, 5)
        ),
    )
    results = tmp_path / "results"
    out = zeroshot_protocol(
        config=cfg, categories_file=str(categories_file), root=str(workspace.root), results_dir=str(results)
    )
    summary = json.loads((results / "summary.json").read_text())
    assert summary["categories"] == 4 and summary["folds"] == 2
    assert set(summary["macro_gain"]) == {*METHODS, "icm_lora@1"}  # size 5 >= a fold's 2 training categories
    scaling = summary["scaling"]
    assert [(p["method"], p["training_categories"]) for p in scaling] == [("icm_lora@1", 1), ("icm_lora", 2)]
    assert scaling[-1]["macro_gain"] == summary["macro_gain"]["icm_lora"]
    assert summary["scored_categories"] >= 1
    assert summary["macro_gain"]["base"] == 0.0 and abs(summary["macro_gain"]["oracle"] - 1.0) < 1e-9
    assert {
        "icm_lora_vs_mean_lora",
        "icm_lora_vs_multitask_lora",
        "icm_lora_vs_nn1",
        "icm_lora_vs_knn_softmax",
    } <= set(summary["win_rate"])
    assert all(summary[k] == v for k, v in out["summary"].items())
    for name in ("report.md", "per_category.csv", "results.json", "gain_per_category.png",
                 "multitask_training_curve.png", "task_vector_map.png", "scaling_curve.png"):  # fmt: skip
        assert (results / name).is_file(), name
    folds = make_folds(list(texts), 2, 0)
    assert summary["fold_assignment"] == folds
    assert summary["complete"] and summary["folds_evaluated"] == 2
    assert not (results / "interim").exists()  # the interim report after fold 0 is superseded and removed

    # The cross-category matrix: every category's LoRA on every category's test text.
    assert (results / "cross_category_matrix.png").is_file()
    cross = (results / "cross_category.csv").read_text().splitlines()
    assert cross[0] == "target,source,gap_recovered" and len(cross) == 1 + 4 * 4
    diagonal = [line.split(",")[2] for line in cross[1:] if line.split(",")[0] == line.split(",")[1]]
    assert all(float(v) == 1.0 for v in diagonal if v), diagonal
    assert summary["cross_category"]["categories"] == 4
    assert "cross-category matrix" in (results / "report.md").read_text()

    # What the task vectors say about the adapters, with the transfer analysis from the matrix.
    geometry = json.loads((results / "condition_geometry.json").read_text())
    assert geometry["categories"] == sorted(texts)
    assert geometry["vector_vs_adapter"]["pairs"] == 6 and geometry["vector_vs_transfer"]["pairs"] <= 12
    assert geometry["retrieval"]["by_task_vector"]["targets"] == summary["cross_category"]["scored_targets"]
    assert summary["condition_geometry"]["categories"] == 4 and "matrices" not in summary["condition_geometry"]
    assert (results / "condition_geometry.png").is_file()
    assert "What the task vectors say about the adapters" in (results / "report.md").read_text()

    # Leakage: every fold's generator, pooled multi-task text and k-NN weights name training categories only.
    root = workspace.root
    held_out_of = {c: set(f) for f in folds for c in f}
    generated = [read_json(m)["meta"] for m in root.glob("zeroshot_adapters/*/*/manifest.json")]
    # icm_lora, icm_functional, shuffled, mean-condition and the 1-category generator's, per held-out category
    assert len(generated) == 4 * 5
    for manifest in root.glob("zeroshot_adapters/*/*/manifest.json"):
        cat = manifest.parent.parent.name
        meta = read_json(manifest)["meta"]
        assert not set(meta["generator_categories"]) & held_out_of[cat], (cat, meta)
        if meta["method"] == "icm_shuffled":
            assert meta["vector_categories"] != [cat] and set(meta["vector_categories"]) <= held_out_of[cat]
        if meta["method"] == "icm_mean_condition":
            assert not set(meta["vector_categories"]) & held_out_of[cat]
    # The selector: one per held-out category, its candidates from the training fold only (own LoRAs named
    # lora:<category>), its picks and category-level intervals in the summary.
    selections = {m.parent.parent.name: json.loads((m.parent / "adapter" / "selection.json").read_text())
                  for m in root.glob("zeroshot_selector/*/*/manifest.json")}  # fmt: skip
    assert sorted(selections) == sorted(texts)
    for cat, selection in selections.items():
        own = {row["name"][5:] for row in selection["scores"] if row["name"].startswith("lora:")}
        assert own and not own & held_out_of[cat], (cat, own)
        assert {"multitask_lora", "mean_lora", "knn_softmax", "icm_lora:z0", "mix", "finetune"} <= {
            row["name"] for row in selection["scores"]
        }
    assert sum(summary["selector"]["picks"].values()) == summary["scored_categories"]
    assert (
        "multitask_lora_minus_selector" in summary["ci95_category"] and "selector_vs_icm_lora" in summary["win_rate"]
    )
    pooled = [read_json(m)["meta"]["sources"] for m in root.glob("zeroshot_pooled/*/*/manifest.json")]
    assert sorted(map(sorted, pooled)) == sorted(sorted(set(texts) - set(f)) for f in folds)
    for manifest in root.glob("zeroshot_library/*/*/manifest.json"):
        meta = read_json(manifest)["meta"]
        label = manifest.parent.parent.name
        held = set(folds[int(label.split("-")[1])]) if label.startswith("fold-") else held_out_of[label]
        assert not set(meta["weights"]) & held, (label, meta)
    generators = [load_tensors(p)[1] for p in root.glob("generator/*/generator.safetensors")]
    # Per fold: the reconstruction-trained CVAE, its functional fine-tune and the scaling curve's 1-category one.
    assert len(generators) == 6
    assert {g["task_vector_kind"] for g in generators} == {f"hidden_state:base:{cfg.model.name_or_path}"}
    full = [g for g in generators if len(g["categories"]) == 2]
    assert sorted(sorted(g["categories"]) for g in full) == sorted(
        sorted(set(texts) - set(f)) for f in folds for _ in range(2)
    )
    assert sum(len(g["categories"]) == 1 for g in generators) == 2
    # The 1-category generator saw one of its fold's training categories, never a held-out one.
    for manifest in root.glob("zeroshot_adapters/*/*/manifest.json"):
        meta = read_json(manifest)["meta"]
        if meta["method"] == "icm_lora@1":
            assert len(meta["generator_categories"]) == 1
            assert not set(meta["generator_categories"]) & held_out_of[manifest.parent.parent.name]
    assert sum("functional" in g for g in generators) == 2
    assert "icm_functional_vs_icm_lora" in summary["win_rate"]

    # A second run reuses every stage output (no new folder) and reproduces the summary.
    before = sorted(p for p in root.rglob("manifest.json"))
    again = zeroshot_protocol(
        config=cfg, categories_file=str(categories_file), root=str(workspace.root), results_dir=str(results)
    )
    assert sorted(p for p in root.rglob("manifest.json")) == before
    assert again["summary"] == out["summary"]

    # The results are also Prefect UI artifacts.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        keys = [
            "icm-zeroshot-macro",
            "icm-zeroshot-per-category",
            "icm-zeroshot-win-rates",
            "icm-zeroshot-cross-category",
            "icm-zeroshot-scaling",
            "icm-zeroshot-condition-geometry",
        ]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {a.key for a in found} == set(keys)
    # Fold 0's interim report was published before the final one (an earlier version of the same key).
    macro = [a.description or "" for a in found if a.key == "icm-zeroshot-macro"]
    assert any("interim: 1 of 2 folds" in d for d in macro) and any("interim" not in d for d in macro), macro

    # The same analysis straight from the artifacts root (for runs made before the report had it).
    script = Path(__file__).resolve().parents[2] / "scripts" / "condition_geometry.py"
    out_dir = tmp_path / "geometry"
    done = subprocess.run(
        [sys.executable, str(script), "--root", str(root), "--results", str(results), "--out", str(out_dir),
         "--permutations", "999"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from_root = json.loads((out_dir / "condition_geometry.json").read_text())
    assert from_root["vector_vs_adapter"] == geometry["vector_vs_adapter"]
    assert from_root["retrieval"] == geometry["retrieval"]
    assert "What the task vectors say about the adapters" in done.stdout

    # A LoRA whose files no longer match their manifest is not read, as the flows' cache would not read it.
    victim_category = geometry["categories"][0]
    lora_dir = next(root.glob(f"lora/{victim_category}/*/manifest.json")).parent
    victim = next(lora_dir.rglob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-8] + b"corrupt!")
    done = subprocess.run(
        [sys.executable, str(script), "--root", str(root), "--out", str(tmp_path / "geometry-3")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    left = json.loads((tmp_path / "geometry-3" / "condition_geometry.json").read_text())["categories"]
    assert left == sorted(set(texts) - {victim_category})
