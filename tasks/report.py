"""The report stage: results table files on disk and the same results as Prefect UI artifacts."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from icm_core.evaluate import gain_recovered
from icm_core.io import write_json, write_text
from tasks.artifacts import ArtifactCachePolicy, ArtifactRef
from tasks.stages import TASK_DEFAULTS, run_stage


METHODS = ("base", "lora", "icm_lora")
METHOD_TITLES = {"base": "Original model", "lora": "Original LoRA", "icm_lora": "ICM-LoRA"}


def result_rows(evals: dict[str, dict[str, ArtifactRef]], adapters: dict[str, ArtifactRef]) -> list[dict[str, Any]]:
    """One row per category: PPL and BPC per method, gain recovered, and the generated adapter's folder."""
    rows = []
    for name in sorted(evals):
        scores = {method: ref.meta for method, ref in evals[name].items()}
        row: dict[str, Any] = {"category": name}
        for method in METHODS:
            row[f"ppl_{method}"] = round(scores[method]["ppl"], 4)
        for method in METHODS:
            row[f"bpc_{method}"] = round(scores[method]["bpc"], 5)
        gain = gain_recovered(scores["base"]["ppl"], scores["lora"]["ppl"], scores["icm_lora"]["ppl"])
        row["gain_recovered"] = None if gain is None else round(gain, 4)
        row["adapter_dir"] = adapters[name].file("adapter").as_posix()
        rows.append(row)
    return rows


def markdown_report(rows: list[dict[str, Any]], generator: ArtifactRef) -> str:
    lines = [
        "# ICM-LoRA results",
        "",
        "PPL and BPC on each category's held-out test split (lower is better). *Gain* is the share of the "
        "fine-tuning gain the generated adapter recovers: (PPL base - PPL ICM) / (PPL base - PPL LoRA).",
        "",
        "| category | PPL base | PPL LoRA | PPL ICM-LoRA | BPC base | BPC LoRA | BPC ICM-LoRA | gain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gain = "n/a" if r["gain_recovered"] is None else f"{r['gain_recovered']:.1%}"
        lines.append(
            f"| {r['category']} | {r['ppl_base']:.3f} | {r['ppl_lora']:.3f} | {r['ppl_icm_lora']:.3f} | "
            f"{r['bpc_base']:.4f} | {r['bpc_lora']:.4f} | {r['bpc_icm_lora']:.4f} | {gain} |"
        )
    meta = generator.meta
    lines += [
        "",
        f"Generator: `{generator.file('generator.safetensors')}` ({meta.get('bytes', 0) / 1e6:.2f} MB, trained on "
        f"{meta.get('num_checkpoints')} checkpoints of length {meta.get('flat_length')}).",
        "",
        "Generated adapters (standard PEFT folders):",
        "",
    ]
    lines += [f"- {r['category']}: `{r['adapter_dir']}`" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@task(
    name="report",
    task_run_name="report",
    cache_policy=ArtifactCachePolicy("report", category_arg=None),
    **TASK_DEFAULTS,
)
def report_task(
    evals: dict[str, dict[str, ArtifactRef]], adapters: dict[str, ArtifactRef], generator: ArtifactRef, root: str
) -> ArtifactRef:
    """Write results.json / results.csv / report.md for all categories."""
    inputs = {"evals": evals, "adapters": adapters, "generator": generator, "root": root}

    def build(out: Path) -> dict[str, Any]:
        rows = result_rows(evals, adapters)
        write_json(out / "results.json", {"rows": rows, "generator": generator.meta})
        write_text(out / "results.csv", csv_text(rows))
        write_text(out / "report.md", markdown_report(rows, generator))
        return {"rows": rows}

    return run_stage("report", None, inputs, build)


def publish_report(report: ArtifactRef, generator: ArtifactRef) -> None:
    """Show the results in the Prefect UI: a table, the markdown report, and links to the adapters."""
    rows = report.meta["rows"]
    create_table_artifact(
        key="icm-eval-summary",
        table=[{k: v for k, v in row.items() if k != "adapter_dir"} for row in rows],
        description="ICM-LoRA: PPL / BPC per category for the original model, the original LoRA and the "
        "generated adapter.",
    )
    create_markdown_artifact(
        key="icm-report", markdown=Path(report.file("report.md")).read_text(), description="ICM-LoRA report"
    )
    for row in rows:
        create_link_artifact(
            key=f"adapter-{row['category'].replace('_', '-')}",
            link=Path(row["adapter_dir"]).resolve().as_uri(),
            link_text=f"generated adapter for {row['category']}",
        )
    create_link_artifact(
        key="icm-generator",
        link=Path(generator.file("generator.safetensors")).resolve().as_uri(),
        link_text="ICM-LoRA generator (safetensors)",
    )
