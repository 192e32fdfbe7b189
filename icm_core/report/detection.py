"""The detection results table (the paper's Table 1 layout): mAP50 / mAP75 per task and method, and paired
bootstrap intervals over test images of each method's mAP50 difference to the original LoRA and the base model.

The intervals need AP50 on thousands of resampled image sets, too many for COCOeval, so :func:`image_matches`
does COCOeval's bbox matching once per image (IoU >= 0.5, all areas, 100 detections per image and category,
crowd boxes ignored) and :func:`ap50` recomputes COCO's 101-point interpolated AP from the per-image matches of
any multiset of images; on the full test set it equals COCOeval's mAP50 (tested).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icm_core.config import METHOD_NAMES, METHOD_TITLES
from icm_core.evaluation.stats import bootstrap_interval, verdict
from icm_core.infra.io import csv_text, write_json, write_text
from icm_core.report.plots import plot_detection_bars


def result_rows(scores: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (method, task) with mAP50, mAP75, mAP50:95 and recall, methods in the paper's order."""
    rows = []
    methods = [m for m in METHOD_NAMES if any(m in by for by in scores.values())]
    for method in methods:
        for task in sorted(scores):
            if method not in scores[task]:
                continue
            s = scores[task][method]
            rows.append(
                {
                    "method": method,
                    "task": task,
                    "map50": round(float(s["map50"]), 4),
                    "map75": round(float(s["map75"]), 4),
                    "map": round(float(s["map"]), 4),
                    "recall100": round(float(s["recall100"]), 4),
                    "detections": int(s["detections"]),
                }
            )
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """Methods as rows, tasks as column pairs (mAP50 | mAP75), plus the mean over tasks."""
    tasks = sorted({r["task"] for r in rows})
    by = {(r["method"], r["task"]): r for r in rows}
    header = "| method | " + " | ".join(f"{t} mAP50 | {t} mAP75" for t in tasks) + " | mean mAP50 | mean mAP75 |"
    lines = [header, "|---|" + "---:|" * (2 * len(tasks) + 2)]
    for method in [m for m in METHOD_NAMES if any(k[0] == m for k in by)]:
        cells, m50, m75 = [], [], []
        for task in tasks:
            r = by.get((method, task))
            if r is None:
                cells += ["n/a", "n/a"]
                continue
            cells += [f"{r['map50']:.3f}", f"{r['map75']:.3f}"]
            m50.append(r["map50"])
            m75.append(r["map75"])
        mean = [f"{sum(m50) / len(m50):.3f}", f"{sum(m75) / len(m75):.3f}"] if m50 else ["n/a", "n/a"]
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells + mean) + " |")
    return "\n".join(lines)


def markdown_report(
    rows: list[dict[str, Any]], training: dict[str, dict[str, Any]], generator: dict[str, Any], run: dict[str, Any]
) -> str:
    lines = [
        "# ICM-LoRA on detection tasks",
        "",
        f"Detector: {run.get('detector', '?')}. COCOeval (pycocotools, bbox) on each task's held-out test split; "
        "mAP50 / mAP75 are AP at IoU 0.50 / 0.75, all areas, 100 detections per image.",
        "",
        table_markdown(rows),
        "",
        *_interval_sections(rows),
        "## LoRA fine-tuning per task",
        "",
        "| task | train samples | loss first -> last step | seconds |",
        "|---|---:|---|---:|",
    ]
    for task in sorted(training):
        t = training[task]
        lines.append(
            f"| {task} | {t.get('train_samples')} | {t.get('first_loss', float('nan')):.3f} -> "
            f"{t.get('final_loss', float('nan')):.3f} | {t.get('seconds', 0):.1f} |"
        )
    lines += [
        "",
        f"Generator: {generator.get('num_checkpoints')} checkpoints of {generator.get('flat_length')} LoRA weights, "
        f"{generator.get('bytes', 0) / 1e6:.2f} MB, final reconstruction MSE {generator.get('final_recon', 0):.4f}.",
        "",
        "Run settings:",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in sorted(run.items())]
    return "\n".join(lines) + "\n"


# --- AP50 from per-image matches, and bootstrap intervals over images ---------------------------------


def _iou(det: Sequence[float], gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of one xywh box with xywh boxes (for crowd boxes: intersection over the detection's area, as COCO)."""
    x1, y1 = np.maximum(det[0], gts[:, 0]), np.maximum(det[1], gts[:, 1])
    x2 = np.minimum(det[0] + det[2], gts[:, 0] + gts[:, 2])
    y2 = np.minimum(det[1] + det[3], gts[:, 1] + gts[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = np.where(crowd, det[2] * det[3], det[2] * det[3] + gts[:, 2] * gts[:, 3] - inter)
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def image_matches(
    gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], category_ids: Sequence[int], max_dets: int = 100
) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray, int]]]:
    """Per image and category: (scores, true-positive flags) of its counted detections and its number of
    non-crowd ground-truth boxes, matched at IoU 0.5 the way COCOeval does."""
    image_ids = sorted(img["id"] for img in gt["images"])
    gts: dict[tuple[int, int], list] = {}
    for ann in gt["annotations"]:
        gts.setdefault((ann["image_id"], ann["category_id"]), []).append(ann)
    dts: dict[tuple[int, int], list] = {}
    for det in detections:
        dts.setdefault((det["image_id"], det["category_id"]), []).append(det)
    out: dict[int, dict[int, tuple[np.ndarray, np.ndarray, int]]] = {}
    for image in image_ids:
        out[image] = {}
        for cat in category_ids:
            g = sorted(gts.get((image, cat), []), key=lambda a: bool(a.get("iscrowd", 0)))  # crowd last
            d = sorted(dts.get((image, cat), []), key=lambda r: -r["score"])[:max_dets]
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in g], dtype=bool)
            boxes = np.array([a["bbox"] for a in g], dtype=np.float64).reshape(-1, 4)
            taken = np.zeros(len(g), dtype=bool)
            scores, tps = [], []
            for det in d:
                best, best_iou = -1, 0.5 - 1e-10
                if len(g):
                    ious = _iou(det["bbox"], boxes, crowd)
                    for j in range(len(g)):
                        if taken[j] and not crowd[j]:
                            continue
                        if best > -1 and not crowd[best] and crowd[j]:
                            break  # a real match beats a crowd match
                        if ious[j] < best_iou:
                            continue
                        best, best_iou = j, ious[j]
                if best > -1 and crowd[best]:
                    continue  # matched a crowd box: neither true nor false positive
                if best > -1:
                    taken[best] = True
                scores.append(det["score"])
                tps.append(best > -1)
            out[image][cat] = (np.array(scores, dtype=np.float64), np.array(tps, dtype=bool), int((~crowd).sum()))
    return out


def ap50(matches: Mapping[int, Mapping[int, tuple]], images: Sequence[int], category_ids: Sequence[int]) -> float:
    """COCO's 101-point interpolated AP at IoU 0.5, averaged over categories with ground truth, of the images
    listed (repeats count again: a bootstrap resample)."""
    aps = []
    for cat in category_ids:
        parts = [matches[i][cat] for i in images]
        n_gt = sum(p[2] for p in parts)
        if n_gt == 0:
            continue
        scores = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
        if scores.size == 0:  # ground truth but no detection: AP 0
            aps.append(0.0)
            continue
        tps = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=bool)
        order = np.argsort(-scores, kind="mergesort")
        tp = np.cumsum(tps[order])
        fp = np.cumsum(~tps[order])
        recall = tp / n_gt
        precision = tp / np.maximum(tp + fp, np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
        thresholds = np.linspace(0.0, 1.0, 101)
        idx = np.searchsorted(recall, thresholds, side="left")
        q = np.where(idx < precision.size, precision[np.minimum(idx, max(precision.size - 1, 0))], 0.0)
        aps.append(float(q.mean()) if precision.size else 0.0)
    return float(np.mean(aps)) if aps else 0.0


def detection_intervals(
    gt: Mapping[str, Any],
    detections: Mapping[str, Sequence[Mapping[str, Any]]],
    category_ids: Sequence[int],
    references: Sequence[str] = ("lora", "base"),
) -> dict[str, dict[str, Any]]:
    """For each reference method and every other method: mAP50 difference (method - reference) on the test
    images, its paired bootstrap 95% interval over images, and the verdict (higher mAP is better)."""
    images = sorted(img["id"] for img in gt["images"])
    matches = {m: image_matches(gt, dets, category_ids) for m, dets in detections.items()}
    out: dict[str, dict[str, Any]] = {}
    for ref in references:
        if ref not in matches:
            continue
        out[ref] = {}
        for method in [m for m in METHOD_NAMES if m in matches and m != ref]:

            def diff(idx: np.ndarray, method: str = method, ref: str = ref) -> float:
                chosen = [images[i] for i in idx]
                return ap50(matches[method], chosen, category_ids) - ap50(matches[ref], chosen, category_ids)

            interval = bootstrap_interval(len(images), diff, samples=1000)
            out[ref][method] = {
                "diff": diff(np.arange(len(images))),
                "ci95": [round(interval[0], 6), round(interval[1], 6)],
                "verdict": verdict(interval, lower_is_better=False),
            }
    return out


def add_detection_intervals(
    rows: list[dict[str, Any]], eval_folders: Mapping[str, Mapping[str, Path]], task_dirs: Mapping[str, Path]
) -> None:
    """Add ``ci95_map50_vs_lora`` / ``ci95_map50_vs_base`` ([low, high] of the mAP50 difference) and the verdicts
    to every (method, task) row, from each evaluation's ``detections.json`` and the task's ``test.json``."""
    for task, folders in eval_folders.items():
        task_dir = Path(task_dirs[task])
        gt = json.loads((task_dir / "test.json").read_text(encoding="utf-8"))
        info = (
            json.loads((task_dir / "task.json").read_text(encoding="utf-8"))
            if (task_dir / "task.json").is_file()
            else {}
        )
        category_ids = info.get("category_ids") or sorted({c["id"] for c in gt.get("categories", [])})
        detections = {
            m: json.loads((Path(folder) / "detections.json").read_text(encoding="utf-8"))
            for m, folder in folders.items()
            if (Path(folder) / "detections.json").is_file()
        }
        intervals = detection_intervals(gt, detections, category_ids)
        for row in rows:
            if row["task"] != task:
                continue
            for ref, by_method in intervals.items():
                got = by_method.get(row["method"])
                if got is not None:
                    row[f"ci95_map50_vs_{ref}"] = got["ci95"]
                    row[f"map50_diff_vs_{ref}"] = round(got["diff"], 6)
                    row[f"verdict_vs_{ref}"] = got["verdict"]


def _interval_sections(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for reference, title in (("lora", "the original LoRA"), ("base", "the original detector")):
        if any(f"ci95_map50_vs_{reference}" in r for r in rows):
            out += [
                f"### mAP50 difference to {title}, with 95% intervals",
                "",
                "Method minus reference, paired bootstrap over test images (1000 resamples; AP50 recomputed from "
                "COCOeval-style per-image matches). **better** / **worse** only where the interval excludes zero.",
                "",
                interval_markdown(rows, reference),
                "",
            ]
    return out


def interval_markdown(rows: list[dict[str, Any]], reference: str) -> str:
    """mAP50 difference to ``reference`` with its 95% interval, per method and task."""
    tasks = sorted({r["task"] for r in rows})
    by = {(r["method"], r["task"]): r for r in rows}
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for method in [m for m in METHOD_NAMES if m != reference and any(k[0] == m for k in by)]:
        cells = []
        for task in tasks:
            r = by.get((method, task), {})
            ci = r.get(f"ci95_map50_vs_{reference}")
            if ci is None:
                cells.append("n/a")
                continue
            word = r[f"verdict_vs_{reference}"]
            mark = {"better": " **better**", "worse": " **worse**"}.get(word, " (no clear difference)")
            cells.append(f"{r[f'map50_diff_vs_{reference}']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]{mark}")
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FIGURE = "detection_results.png"


def write_detection_report(
    out: Path,
    scores: dict[str, dict[str, dict[str, Any]]],
    training: dict[str, dict[str, Any]],
    generator_meta: dict[str, Any],
    run_info: dict[str, Any],
    evaluations: dict[str, dict[str, Path]] | None = None,
    task_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Write report.md / results.csv / results.json and the figure into ``out``: mAP50 and mAP75 per task and
    method (paper Table 1), with bootstrap intervals over test images when each evaluation's folder
    (``evaluations``, holding its ``detections.json``) and each task's folder (``task_dirs``) are given."""
    rows = result_rows(scores)
    if evaluations is not None and task_dirs is not None:
        add_detection_intervals(rows, evaluations, task_dirs)
    write_json(
        out / "results.json", {"rows": rows, "training": training, "generator": generator_meta, "run": run_info}
    )
    write_text(out / "results.csv", csv_text(rows))
    plot_detection_bars(rows, out / FIGURE)
    figure = f"\n## Figure\n\n![mAP50 and mAP75 per task and method]({FIGURE})\n"
    write_text(out / "report.md", markdown_report(rows, training, generator_meta, run_info) + figure)
    return {"rows": rows}
