"""Result tables as data and markdown: the paper's main table (PPL/BPC per category per method), the share of
the fine-tuning gain each method recovers, and storage accounting from actual file sizes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from icm_core.config import METHOD_NAMES, METHOD_TITLES
from icm_core.evaluate import gain_recovered


GENERATED = ("model_soup", "cond_pdiff", "icm_lora")
"""Methods measured against the original LoRA (gain recovered, PPL gap)."""


def ordered_methods(methods: Iterable[str]) -> list[str]:
    """Methods in report order (original model, LoRA, soup, P-DIFF, ICM-LoRA)."""
    present = set(methods)
    unknown = present - set(METHOD_NAMES)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {list(METHOD_NAMES)}")
    return [m for m in METHOD_NAMES if m in present]


def result_rows(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict[str, Any]]:
    """One row per category from ``scores[category][method] = {"ppl", "bpc"}``.

    Row keys: ``category``, ``ppl_<method>``, ``bpc_<method>``, and for every generated method
    ``gain_<method>`` (share of the LoRA's PPL gain over the base model) and ``gap_<method>`` (relative PPL
    difference to the original LoRA: +0.01 = 1% worse). ``gain_recovered`` repeats ``gain_icm_lora``.
    """
    rows = []
    for name in sorted(scores):
        per = scores[name]
        methods = ordered_methods(per)
        row: dict[str, Any] = {"category": name}
        for m in methods:
            row[f"ppl_{m}"] = round(float(per[m]["ppl"]), 4)
        for m in methods:
            row[f"bpc_{m}"] = round(float(per[m]["bpc"]), 5)
        for m in methods:
            if m in GENERATED and "base" in per and "lora" in per:
                gain = gain_recovered(per["base"]["ppl"], per["lora"]["ppl"], per[m]["ppl"])
                row[f"gain_{m}"] = None if gain is None else round(gain, 4)
                row[f"gap_{m}"] = round(per[m]["ppl"] / per["lora"]["ppl"] - 1, 5)
        if "gain_icm_lora" in row:
            row["gain_recovered"] = row["gain_icm_lora"]
        rows.append(row)
    return rows


def mean_row(rows: Sequence[Mapping[str, Any]], label: str = "mean") -> dict[str, Any]:
    """Column means of the numeric columns (a column with any missing value is left out)."""
    out: dict[str, Any] = {"category": label}
    for key in rows[0]:
        values = [r.get(key) for r in rows]
        if key != "category" and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = round(sum(values) / len(values), 5)
    return out


def methods_in(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return ordered_methods(k.removeprefix("ppl_") for k in rows[0] if k.startswith("ppl_"))


def markdown_table(headers: Sequence[str], body: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column ('l' or 'r'), default: first left, rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Paper Table 2: methods as rows, PPL and BPC per category as columns, plus the mean."""
    methods = methods_in(rows)
    headers = ["method"] + [f"{r['category']} {m}" for r in rows for m in ("PPL", "BPC")] + ["mean PPL", "mean BPC"]
    body = []
    for m in methods:
        cells = [METHOD_TITLES[m]]
        for r in rows:
            cells += [_fmt(r[f"ppl_{m}"], ".3f"), _fmt(r[f"bpc_{m}"], ".4f")]
        cells += [
            _fmt(sum(r[f"ppl_{m}"] for r in rows) / len(rows), ".3f"),
            _fmt(sum(r[f"bpc_{m}"] for r in rows) / len(rows), ".4f"),
        ]
        body.append(cells)
    return markdown_table(headers, body)


def gain_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per category and method: share of the fine-tuning gain recovered, and PPL gap to the original LoRA."""
    methods = [m for m in methods_in(rows) if m in GENERATED]
    headers = (
        ["category"] + [f"{METHOD_TITLES[m]} gain" for m in methods] + [f"{METHOD_TITLES[m]} vs LoRA" for m in methods]
    )
    body = []
    for r in [*rows, mean_row(rows)]:
        cells = [r["category"]]
        cells += [_fmt(r.get(f"gain_{m}"), ".1%") for m in methods]
        cells += [_fmt(r.get(f"gap_{m}"), "+.2%") for m in methods]
        body.append(cells)
    return markdown_table(headers, body)


# --- storage ----------------------------------------------------------------------------------------


def files_bytes(paths: Iterable[str | Path]) -> tuple[int, int]:
    """(number of files, total bytes) of existing files; a missing file is an error (no silent zero)."""
    count = total = 0
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (storage accounting)")
        count += 1
        total += path.stat().st_size
    return count, total


def storage_rows(
    train_text: Iterable[str | Path],
    checkpoints: Iterable[str | Path],
    final_adapters: Iterable[str | Path],
    generators: Mapping[str, Iterable[str | Path]],
) -> list[dict[str, Any]]:
    """Paper Table 3 as rows ``{item, files, bytes, vs_checkpoints}`` from the files themselves.

    ``generators`` maps a method title to the files that method must keep to produce every category's
    adapter (e.g. the ICM-LoRA generator file, the COND P-DIFF file, the soup adapter).
    """
    entries = [
        ("training text (train splits)", files_bytes(train_text)),
        ("all LoRA trajectory checkpoints", files_bytes(checkpoints)),
        ("original LoRA adapters (one per category)", files_bytes(final_adapters)),
    ]
    entries += [(title, files_bytes(paths)) for title, paths in generators.items()]
    store = entries[1][1][1]
    return [
        {"item": item, "files": count, "bytes": size, "vs_checkpoints": round(size / store, 5) if store else None}
        for item, (count, size) in entries
    ]


def human_bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def storage_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = [
        [r["item"], r["files"], f"{r['bytes']:,}", human_bytes(r["bytes"]), _fmt(r["vs_checkpoints"], ".1%")]
        for r in rows
    ]
    return markdown_table(["what is stored", "files", "bytes", "size", "vs. checkpoints"], body)
