"""Result tables as data and markdown: the paper's main table (PPL/BPC per category per method), the share of
the fine-tuning gain each method recovers, and storage accounting from actual file sizes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from icm_core.config import METHOD_NAMES, METHOD_TITLES
from icm_core.evaluation.perplexity import gain_recovered
from icm_core.evaluation.stats import mean_blocks, paired_bootstrap, relative_difference, seed_summary, verdict
from icm_core.infra.io import sidecar_path
from icm_core.infra.layout import StageOutput
from icm_core.lora.trajectory import read_trajectory


GENERATED = ("trajectory_mean", "soup_own", "model_soup", "cond_pdiff", "cond_pdiff_shared", "icm_lora")
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
    return ordered_methods(k.removeprefix("ppl_") for k in rows[0] if k.startswith("ppl_") and not k.endswith("_sd"))


def markdown_table(headers: Sequence[str], body: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column ('l' or 'r'), default: first left, rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def fmt(value: float | None, spec: str) -> str:
    """A number for a table cell in format ``spec`` (``".3f"``, ``"+.2%"``, ...); "n/a" when it is missing or not
    finite. Every report formats its cells with this."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def main_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Paper Table 2: methods as rows, PPL and BPC per category as columns, plus the mean."""
    methods = methods_in(rows)
    headers = ["method"] + [f"{r['category']} {m}" for r in rows for m in ("PPL", "BPC")] + ["mean PPL", "mean BPC"]
    body = []
    for m in methods:
        cells = [METHOD_TITLES[m]]
        for r in rows:
            cells += [fmt(r[f"ppl_{m}"], ".3f"), fmt(r[f"bpc_{m}"], ".4f")]
        cells += [
            fmt(sum(r[f"ppl_{m}"] for r in rows) / len(rows), ".3f"),
            fmt(sum(r[f"bpc_{m}"] for r in rows) / len(rows), ".4f"),
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
        cells += [fmt(r.get(f"gain_{m}"), ".1%") for m in methods]
        cells += [fmt(r.get(f"gap_{m}"), "+.2%") for m in methods]
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
        [r["item"], r["files"], f"{r['bytes']:,}", human_bytes(r["bytes"]), fmt(r["vs_checkpoints"], ".1%")]
        for r in rows
    ]
    return markdown_table(["what is stored", "files", "bytes", "size", "vs. checkpoints"], body)


# --- seeds, intervals, diagnostics ------------------------------------------------------------------


def seed_rows(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Rows averaged over seeds: every numeric key is the mean over seeds, and with several seeds each
    ``ppl_``/``bpc_``/``gain_``/``gap_`` key gets a ``<key>_sd`` companion (sample standard deviation)."""
    if not per_seed:
        raise ValueError("no seeds")
    by_category = [{r["category"]: r for r in rows} for rows in per_seed]
    out = []
    for name in sorted(by_category[0]):
        rows = [seed[name] for seed in by_category if name in seed]
        row: dict[str, Any] = {"category": name}
        for key in rows[0]:
            if key == "category":
                continue
            values = [r.get(key) for r in rows]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                summary = seed_summary(values)
                row[key] = round(summary["mean"], 5)
                if len(per_seed) > 1 and key.split("_")[0] in ("ppl", "bpc", "gain", "gap"):
                    row[f"{key}_sd"] = None if summary["sd"] is None else round(summary["sd"], 5)
            else:
                row[key] = values[0]
        out.append(row)
    return out


def blocks_of(meta: Mapping[str, Any]) -> tuple[list[float], list[int]] | None:
    """Per-block NLL sums and token counts of one evaluation (None for evaluations without them)."""
    nll, tokens = meta.get("block_nll"), meta.get("block_tokens")
    return (list(nll), list(tokens)) if nll and tokens else None


def comparison(
    per_seed: Sequence[Mapping[str, Mapping[str, Any]]], method: str, reference: str
) -> dict[str, Any] | None:
    """Relative PPL difference of ``method`` to ``reference`` on one category, seed-averaged per block, with its
    paired bootstrap 95% interval and verdict; ``per_seed[i][method]`` is an evaluation's metadata. None when a
    seed lacks either method or its blocks, or the two were scored on different blocks."""
    a_seeds, b_seeds, tokens = [], [], None
    for scores in per_seed:
        if method not in scores or reference not in scores:
            return None
        a, b = blocks_of(scores[method]), blocks_of(scores[reference])
        if a is None or b is None or a[1] != b[1] or (tokens is not None and a[1] != tokens):
            return None
        a_seeds.append(a[0])
        b_seeds.append(b[0])
        tokens = a[1]
    a_mean, b_mean = mean_blocks(a_seeds), mean_blocks(b_seeds)
    interval = paired_bootstrap(a_mean, b_mean, tokens)
    return {
        "diff": relative_difference(a_mean, b_mean, tokens),
        "ci95": [round(interval[0], 6), round(interval[1], 6)],
        "verdict": verdict(interval),
        "blocks": len(tokens),
    }


def add_intervals(
    rows: list[dict[str, Any]], scores_per_seed: Sequence[Mapping[str, Mapping[str, Mapping[str, Any]]]]
) -> None:
    """Add ``ci95_vs_lora`` / ``ci95_vs_base`` (method -> [low, high] of PPL_method / PPL_ref - 1),
    ``diff_vs_lora`` / ``diff_vs_base`` and ``verdict_vs_lora`` / ``verdict_vs_base`` to every row, in place."""
    for row in rows:
        per_seed = [scores[row["category"]] for scores in scores_per_seed if row["category"] in scores]
        methods = ordered_methods(per_seed[0])
        for reference in ("lora", "base"):
            cis, diffs, verdicts = {}, {}, {}
            for m in methods:
                if m == reference:
                    continue
                result = comparison(per_seed, m, reference)
                if result is None:
                    continue
                cis[m], diffs[m], verdicts[m] = result["ci95"], round(result["diff"], 6), result["verdict"]
            row[f"ci95_vs_{reference}"] = cis
            row[f"diff_vs_{reference}"] = diffs
            row[f"verdict_vs_{reference}"] = verdicts


def interval_table(rows: Sequence[Mapping[str, Any]], reference: str) -> str:
    """Per category and method: relative PPL difference to ``reference``, its 95% interval and the verdict."""
    methods = [
        m for m in methods_in(rows) if m != reference and any(m in r.get(f"ci95_vs_{reference}", {}) for r in rows)
    ]
    headers = ["category"] + [METHOD_TITLES[m] for m in methods]
    body = []
    for r in rows:
        cells = [r["category"]]
        for m in methods:
            ci = r.get(f"ci95_vs_{reference}", {}).get(m)
            if ci is None:
                cells.append("n/a")
                continue
            diff = r[f"diff_vs_{reference}"][m]
            word = r[f"verdict_vs_{reference}"][m]
            mark = {"better": " **better**", "worse": " **worse**"}.get(word, " (no clear difference)")
            cells.append(f"{fmt(diff, '+.2%')} [{fmt(ci[0], '+.2%')}, {fmt(ci[1], '+.2%')}]{mark}")
        body.append(cells)
    return markdown_table(headers, body)


def seed_table(per_seed_rows: Sequence[Sequence[Mapping[str, Any]]]) -> str:
    """Mean PPL over categories per method and seed, and mean +- sd over seeds."""
    methods = methods_in(per_seed_rows[0])
    headers = ["method"] + [f"seed {i}" for i in range(len(per_seed_rows))] + ["mean", "sd"]
    body = []
    for m in methods:
        means = [sum(r[f"ppl_{m}"] for r in rows) / len(rows) for rows in per_seed_rows]
        summary = seed_summary(means)
        body.append(
            [METHOD_TITLES[m], *(f"{v:.3f}" for v in means), f"{summary['mean']:.3f}", fmt(summary["sd"], ".3f")]
        )
    return markdown_table(headers, body)


def spread_cell(row: Mapping[str, Any] | None) -> str:
    if not row:
        return "n/a"
    return f"{row['pairwise_mean']:.2%} (max {row['pairwise_max']:.2%}, {row['draws']} draws)"


def diagnostics_table(
    diagnostics: Mapping[str, Mapping[str, Any]], ppl_spread: Mapping[str, Mapping[str, Any]]
) -> str:
    """Per generator and category: nearest training checkpoint (own / other category), own trajectory's radius,
    distance to the final adapter, spread of the weights across z draws, and of PPL (where scored)."""
    headers = [
        "generator",
        "category",
        "nearest own checkpoint",
        "nearest other category",
        "own trajectory radius",
        "to final adapter",
        "weights across z draws",
        "PPL across z draws",
    ]
    body = []
    for label in [m for m in METHOD_NAMES if m in diagnostics]:
        for name, d in sorted(diagnostics[label]["categories"].items()):
            near = d["nearest"]
            ppl = ppl_spread.get(label, {}).get(name)
            body.append(
                [
                    METHOD_TITLES[label],
                    name,
                    f"{near['own']:.2%} (#{near['own_index']})",
                    f"{near['other']:.2%} ({near['other_category']})" if near["other"] is not None else "n/a",
                    f"{d['trajectory']['to_mean']:.2%}",
                    fmt(d.get("to_final"), ".2%"),
                    spread_cell(d.get("z_spread")),
                    "n/a"
                    if not ppl
                    else f"{ppl['min']:.3f}-{ppl['max']:.3f} (range {ppl['range_rel']:.3%}, {ppl['n']} draws)",
                ]
            )
    return markdown_table(headers, body, "ll" + "r" * 6)


def ppl_across_draws(ppls: Sequence[float]) -> dict[str, Any] | None:
    """Spread of one category's PPL across z draws: min, max, mean, sd and range relative to the mean."""
    if len(ppls) < 2:
        return None
    summary = seed_summary(ppls)
    return {
        "n": len(ppls),
        "min": summary["min"],
        "max": summary["max"],
        "mean": summary["mean"],
        "sd": summary["sd"],
        "range_rel": (summary["max"] - summary["min"]) / summary["mean"],
    }


def storage_inputs(
    data: dict[str, StageOutput],
    loras: dict[str, StageOutput],
    generator: StageOutput,
    pdiff: StageOutput | None,
    soups: dict[str, StageOutput],
    pdiff_shared: StageOutput | None = None,
) -> tuple[list[Path], list[Path], list[Path], dict[str, list[Path]]]:
    """The files behind each storage row: train text, checkpoints, final adapters, and each generator's files."""
    train_text = [data[name].file("splits") / "train.jsonl" for name in sorted(data)]
    checkpoints, finals = [], []
    for name in sorted(loras):
        trajectory = read_trajectory(loras[name].folder)
        checkpoints += [trajectory.folder / f for f in trajectory.files]
        finals.append(trajectory.adapter_dir / "adapter_model.safetensors")
    gen_file = generator.file("generator.safetensors")
    generators = {
        "ICM-LoRA generator (CVAE + shared per-tensor stats + task vectors)": [gen_file, sidecar_path(gen_file)]
    }
    if pdiff is not None:
        pdiff_file = pdiff.file("pdiff.safetensors")
        generators["COND P-DIFF (AE + DDPM + per-task mean/std of every weight)"] = [
            pdiff_file,
            sidecar_path(pdiff_file),
        ]
    if pdiff_shared is not None:
        shared_file = pdiff_shared.file("pdiff.safetensors")
        generators["COND P-DIFF, shared norm (AE + DDPM + per-tensor stats)"] = [
            shared_file,
            sidecar_path(shared_file),
        ]
    if soups:
        generators[f"Model Soup adapter(s) ({len(soups)})"] = [
            ref.file("adapter") / "adapter_model.safetensors" for ref in soups.values()
        ]
    return train_text, checkpoints, finals, generators
