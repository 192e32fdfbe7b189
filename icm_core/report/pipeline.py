"""The pipeline's report: result tables and figures of the seen categories, on disk.

Files (under ``report/<key>/``): ``report.md``, ``results.json``, ``results.csv`` (one row per category, every
method), ``storage.csv``, and three PNG figures. Paths in them are relative to the artifacts root (no machine's
absolute paths). :func:`write_report` writes them all; ``tasks/report.py`` runs it as the report stage and
publishes the same results as Prefect UI artifacts (:func:`outputs_markdown` among them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icm_core.config import METHOD_TITLES
from icm_core.generator.config import CVAEConfig
from icm_core.generator.task_vectors import load_task_vector
from icm_core.infra.io import csv_text, read_json, sidecar_path, write_json, write_text
from icm_core.infra.layout import StageOutput
from icm_core.report.plots import plot_main_bars, plot_task_vectors, plot_training_curves
from icm_core.report.tables import (
    add_intervals,
    diagnostics_table,
    fmt,
    gain_table,
    human_bytes,
    interval_table,
    main_table,
    mean_row,
    methods_in,
    ppl_across_draws,
    result_rows,
    seed_rows,
    seed_table,
    storage_inputs,
    storage_rows,
    storage_table,
)


FIGURES = {
    "task_vectors.png": "Task vectors by category (PCA)",
    "training_curves.png": "Generator training curves",
    "main_results.png": "PPL relative to the original model",
}


def eval_summary(evals: list[dict[str, dict[str, StageOutput]]]) -> dict[str, Any]:
    """The evaluation budget actually used (blocks scored / available per category) and seconds per evaluation."""
    blocks, seconds = {}, []
    for by_method in evals:
        for name, refs in by_method.items():
            for ref in refs.values():
                if ref.meta.get("block_nll") is not None:
                    blocks[name] = [len(ref.meta["block_nll"]), ref.meta.get("blocks_available")]
                if ref.meta.get("seconds") is not None:
                    seconds.append(float(ref.meta["seconds"]))
    return {
        "blocks": dict(sorted(blocks.items())),
        "evaluations": len(seconds),
        "seconds_mean": sum(seconds) / len(seconds) if seconds else None,
        "seconds_total": sum(seconds),
    }


def diagnostics_summary(
    diagnostics: list[dict[str, StageOutput]] | None,
    evals: list[dict[str, dict[str, StageOutput]]],
    z_evals: list[dict[str, list[StageOutput]]] | None,
    gen_history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Seed 0's generator diagnostics, the PPL of the ICM-LoRA z draws, and the CVAE's latent usage per seed."""
    if not diagnostics:
        return {}
    first = {label: ref.meta for label, ref in diagnostics[0].items()}
    ppl = {}
    if z_evals:
        for name, refs in z_evals[0].items():
            draws = [evals[0][name]["icm_lora"].meta["ppl"], *(ref.meta["ppl"] for ref in refs)]
            ppl[name] = ppl_across_draws(draws)
    latent = [d["icm_lora"].meta.get("latent") for d in diagnostics if "icm_lora" in d]
    return {
        "generators": first,
        "ppl_across_z": {"icm_lora": ppl},
        "latent_per_seed": latent,
        "training_kld_last_epoch": gen_history[-1].get("kld") if gen_history else None,
    }


def root_relative(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root`` (this machine's folder of the artifacts root), in POSIX form; unchanged if
    outside it."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def markdown_report(
    rows: list[dict[str, Any]],
    storage: list[dict[str, Any]],
    generator: StageOutput,
    notes: dict,
    per_seed_rows: list[list[dict[str, Any]]] | None = None,
    diag: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    root: Path = Path("."),
) -> str:
    """The report as markdown; figure links are file names next to report.md, other paths relative to ``root``."""
    methods = methods_in(rows)
    seeds = len(per_seed_rows or [rows])
    sd = seeds > 1
    per_category = ["| category | " + " | ".join(f"PPL {METHOD_TITLES[m]}" for m in methods) + " | gain |"]
    per_category.append("|---|" + "---:|" * (len(methods) + 1))
    for r in rows:
        gain = fmt(r.get("gain_recovered"), ".1%")
        cells = [
            f"{r[f'ppl_{m}']:.3f}" + (f" ± {r[f'ppl_{m}_sd']:.3f}" if sd and r.get(f"ppl_{m}_sd") is not None else "")
            for m in methods
        ]
        per_category.append(f"| {r['category']} | " + " | ".join(cells) + f" | {gain} |")
    evaluation = evaluation or {}
    budget = ", ".join(f"{name} {used}/{avail}" for name, (used, avail) in evaluation.get("blocks", {}).items())
    lines = [
        "# ICM-LoRA results",
        "",
        "PPL and BPC on each category's held-out test split (lower is better); every method is merged into the "
        "base model and scored by the same code on the same test blocks. *Gain* is the share of the fine-tuning "
        "gain a method recovers: (PPL base - PPL method) / (PPL base - PPL LoRA).",
        "",
        f"Seeds: {seeds}"
        + (" (values are the mean over seeds, ± the standard deviation across seeds)." if sd else ".")
        + f" Test blocks scored per category (scored / available in the test split): {budget}.",
        "",
        *per_category,
        "",
        "## Differences to the original LoRA, with 95% intervals",
        "",
        "PPL_method / PPL_LoRA - 1 (negative: lower PPL than the LoRA), with a paired bootstrap 95% interval over "
        "test blocks" + (" (block NLL averaged over the seeds first)" if sd else "") + ". A method is called "
        "**better** or **worse** only where the interval excludes zero.",
        "",
        interval_table(rows, "lora"),
        "",
        "## Differences to the original model, with 95% intervals",
        "",
        interval_table(rows, "base"),
        "",
        "## Main results (paper Table 2)",
        "",
        main_table(rows),
        "",
        "## Share of the fine-tuning gain recovered, and PPL vs the original LoRA",
        "",
        gain_table(rows),
        "",
    ]
    if sd:
        lines += ["## Spread across seeds (mean PPL over categories)", "", seed_table(per_seed_rows), ""]
    if diag:
        latent = [x for x in diag.get("latent_per_seed", []) if x]
        lines += ["## What the generators do", ""]
        if latent:
            kls = ", ".join(f"{x['kl_total']:.3f}" for x in latent)
            active = ", ".join(f"{x['active_dims']}/{x['latent_dim']}" for x in latent)
            lines += [
                f"ICM-LoRA's CVAE latent: KL(q(z|x,c) || N(0,I)) summed over dimensions, mean over the training "
                f"checkpoints: {kls} nats (per seed); dimensions carrying more than 0.01 nats: {active}; mean "
                f"posterior std {latent[0]['posterior_std_mean']:.3f}. KL term of the last training epoch: "
                f"{fmt(diag.get('training_kld_last_epoch'), '.4f')}. A latent with (almost) no KL carries "
                "(almost) no information: the decoder then maps the task vector to nearly the same weights "
                "whatever z is drawn.",
                "",
            ]
        lines += [
            "Relative L2 distances between flattened LoRA weights (all A and B matrices). *Nearest own checkpoint*: "
            "to the closest of the category's own training checkpoints (which one); *nearest other category*: to "
            "the closest checkpoint of any other category; *own trajectory radius*: the category's own checkpoints' "
            "mean distance to their mean (the scale to read the first two on); *weights across z draws*: mean "
            "(max) pairwise distance between adapters drawn with different z for the same category; *PPL across z "
            "draws*: the same draws scored on the test blocks. Seed 0.",
            "",
            diagnostics_table(
                {label: meta for label, meta in diag["generators"].items()}, diag.get("ppl_across_z", {})
            ),
            "",
        ]
    lines += [
        "## Storage (paper Table 3)",
        "",
        "Keeping the final adapters themselves (one per category) is the honest alternative to any generator for "
        "the categories it was trained on; it is listed next to the generators.",
        "",
        storage_table(storage),
        "",
        "## Methods: what each artifact stores",
        "",
        *[f"- {line}" for line in notes["methods"]],
        "",
    ]
    if evaluation.get("seconds_mean") is not None:
        lines += [
            f"Evaluation: {evaluation['evaluations']} scored adapters, {evaluation['seconds_mean']:.1f} s each on "
            f"average ({evaluation['seconds_total']:.0f} s in all; the base model is loaded once per process and "
            "each adapter merged into it and restored).",
            "",
        ]
    meta = generator.meta
    lines += [
        "## Figures",
        "",
        *[f"![{title}]({name})" for name, title in FIGURES.items()],
        "",
        "Paths below are relative to the artifacts root (`artifacts/` by default).",
        "",
        f"Generator: `{root_relative(generator.file('generator.safetensors'), root)}` "
        f"({human_bytes(meta.get('bytes', 0))}, trained on "
        f"{meta.get('num_checkpoints')} checkpoints of length {meta.get('flat_length')}).",
        "",
        "Generated adapters (standard PEFT folders; README: *Loading a generated adapter in your own code*):",
        "",
        *[f"- {r['category']}: `{root_relative(r['adapter_dir'], root)}`" for r in rows],
    ]
    return "\n".join(lines) + "\n"


def method_notes(
    soups: dict[str, StageOutput], pdiff: StageOutput | None, pdiff_shared: StageOutput | None = None
) -> list[str]:
    notes = [
        "Original model: the base model, no adapter.",
        "Original LoRA: each category's final fine-tuned adapter (the artifact the LoRA stage stores next to its "
        "trajectory; it is also the last of the checkpoints every generator is trained on, so on these seen "
        "categories a generator can score well by reproducing it).",
        "Trajectory mean (own checkpoints): the coordinate-wise mean of the category's own trajectory checkpoints "
        "(A and B averaged separately), i.e. what a lookup table keyed by category would serve; it needs those "
        "checkpoints (or their mean) stored.",
        "Model Soup (own trajectory): per category, the uniform average of the weight deltas B@A of its own "
        "trajectory checkpoints, re-factorised exactly by SVD.",
    ]
    for label, ref in sorted(soups.items()):
        sources = ", ".join(ref.meta.get("sources", []))
        blind = " The same adapter for every category: it gets no category information." if label == "all" else ""
        notes.append(
            f"Model Soup ({'all categories' if label == 'all' else label}): uniform average of weight deltas B@A of "
            f"[{sources}], re-factorised by SVD to rank {ref.meta.get('rank')} (exact).{blind}"
        )
    if pdiff is not None:
        notes.append(
            "COND P-DIFF: autoencoder + conditional latent DDPM trained on the same "
            f"{pdiff.meta.get('num_checkpoints')} checkpoints and task vectors. Its artifact stores, besides the two "
            "networks, every category's per-coordinate mean and std of its checkpoints (public code's "
            "normalisation); the stored mean is the category's mean checkpoint, so a decoder output near zero "
            "de-normalises to the trajectory mean whatever the networks learned."
        )
    if pdiff_shared is not None:
        notes.append(
            "COND P-DIFF (shared norm): the same networks and training with one per-tensor z-score over all "
            "categories (as ICM-LoRA), so no per-category statistics are stored: what is category-specific must "
            "come from the networks and the condition."
        )
    notes.append(
        "ICM-LoRA: one CVAE for all categories; its artifact stores the CVAE, one per-tensor mean/std shared by all "
        "categories, and each training category's task vector; the adapter is one draw z ~ N(0, I) decoded with "
        "the category's task vector."
    )
    return notes


BROWSER_NOTE = (
    "These are files on the machine that ran the flow, relative to its artifacts root{where}. The Prefect UI "
    "cannot open a worker's local files (a browser refuses `file://` links from a web page), so they are "
    "listed as paths, not links."
)


def outputs_markdown(
    rows: list[dict[str, Any]],
    generator: StageOutput,
    pdiff: StageOutput | None,
    root: Path,
    remote_root: str | None = None,
) -> str:
    """Where the outputs are and how to load an adapter, for the UI (``root``: this machine's folder of the
    artifacts root; ``remote_root``: the fsspec URL it stages, if any)."""
    where = f" `{remote_root}`" if remote_root else ""
    lines = [
        "# Where the outputs are",
        "",
        BROWSER_NOTE.format(where=where),
        "",
        "| output | path |",
        "|---|---|",
        *[f"| ICM-LoRA adapter: {r['category']} | `{root_relative(r['adapter_dir'], root)}` |" for r in rows],
        f"| ICM-LoRA generator | `{root_relative(generator.file('generator.safetensors'), root)}` |",
    ]
    if pdiff is not None:
        lines.append(f"| COND P-DIFF baseline | `{root_relative(pdiff.file('pdiff.safetensors'), root)}` |")
    if rows:
        example = root_relative(rows[0]["adapter_dir"], root)
        prefix = "ARTIFACTS_ROOT" if remote_root else Path(root).name
        lines += [
            "",
            "Load an adapter (run from the artifacts root's parent folder, or give the full path):",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{prefix}/{example}")  # base model + adapter',
            "```",
            "",
            "or write a new one with `icm-lora generate --category NAME --out DIR`.",
        ]
    return "\n".join(lines) + "\n"


def write_report(
    out: Path,
    evals: list[dict[str, dict[str, StageOutput]]],
    adapters: dict[str, StageOutput],
    generator: StageOutput,
    root: Path,
    data: dict[str, StageOutput] | None = None,
    loras: dict[str, StageOutput] | None = None,
    task_vectors: dict[str, StageOutput] | None = None,
    pdiff: StageOutput | None = None,
    soups: dict[str, StageOutput] | None = None,
    diagnostics: list[dict[str, StageOutput]] | None = None,
    z_evals: list[dict[str, list[StageOutput]]] | None = None,
    pdiff_shared: StageOutput | None = None,
) -> dict[str, Any]:
    """Write results.json / results.csv / storage.csv / report.md and the figures into ``out``; ``root`` is this
    machine's folder of the artifacts root (paths in the files are relative to it).

    ``evals`` holds one ``{category: {method: evaluation}}`` per seed (seed 0 first); ``diagnostics`` and
    ``z_evals`` one entry per seed too. The tables are means over seeds with intervals and spreads. Returns the
    rows and the storage table (what the report stage's manifest records)."""
    soups = soups or {}
    scores = [
        {name: {m: ref.meta for m, ref in by_method.items()} for name, by_method in seed.items()} for seed in evals
    ]
    per_seed_rows = [result_rows(seed) for seed in scores]
    rows = seed_rows(per_seed_rows)
    add_intervals(rows, scores)
    for row in rows:
        row["adapter_dir"] = adapters[row["category"]].file("adapter").as_posix()
    storage = storage_rows(*storage_inputs(data or {}, loras or {}, generator, pdiff, soups, pdiff_shared))
    notes = {"methods": method_notes(soups, pdiff, pdiff_shared)}
    gen_meta = read_json(sidecar_path(generator.file("generator.safetensors")))["meta"]
    pdiff_history = read_json(sidecar_path(pdiff.file("pdiff.safetensors")))["meta"]["history"] if pdiff else None
    diag = diagnostics_summary(diagnostics, evals, z_evals, gen_meta.get("history", []))
    evaluation = eval_summary(evals)
    if task_vectors:
        vectors = {n: load_task_vector(ref.file("task_vector.safetensors")) for n, ref in task_vectors.items()}
        plot_task_vectors(vectors, out / "task_vectors.png")
    kld_weight = gen_meta.get("cvae_config", {}).get("kld_weight", CVAEConfig().kld_weight)
    plot_training_curves(gen_meta["history"], pdiff_history, out / "training_curves.png", kld_weight)
    plot_main_bars(rows, out / "main_results.png")
    # The files name outputs relative to the artifacts root: no absolute paths of this machine in them.
    file_rows = [{**row, "adapter_dir": root_relative(row["adapter_dir"], root)} for row in rows]
    write_json(
        out / "results.json",
        {
            "rows": file_rows,
            "mean": mean_row(rows),
            "seeds": len(evals),
            "per_seed": per_seed_rows,
            "storage": storage,
            "generator": generator.meta,
            "diagnostics": diag,
            "evaluation": evaluation,
            "notes": notes,
            "paths_relative_to": "the artifacts root",
        },
    )
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows]
    file_flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in file_rows]
    write_text(out / "results.csv", csv_text([*file_flat, mean_row(flat)]))
    write_text(out / "storage.csv", csv_text(storage))
    write_text(
        out / "report.md", markdown_report(rows, storage, generator, notes, per_seed_rows, diag, evaluation, root)
    )
    return {"rows": flat, "storage": storage, "seeds": len(evals)}
