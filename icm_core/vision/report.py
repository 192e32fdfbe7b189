"""The detection results table (the paper's Table 1 layout): mAP50 / mAP75 per task and method."""

from __future__ import annotations

from typing import Any

from icm_core.config import METHOD_NAMES, METHOD_TITLES


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
