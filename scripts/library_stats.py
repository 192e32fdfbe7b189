"""Smoke run of the category library: prepare every category's splits and count its tokens.

    python scripts/library_stats.py [--max-chars 120000] [--out results/zeroshot]   (or: make library)

For every library category it reads the text, writes the deterministic train / val / test splits
under ``artifacts/library/data/<category>`` (reused when already there) and counts the SmolLM2
tokens of each split. It prints a table and writes ``library.md`` and ``library.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from icm_core.data.categories import library_categories
from icm_core.data.config import DataConfig
from icm_core.data.corpora.base import FAMILIES
from icm_core.data.documents import source_fingerprint
from icm_core.data.splits import read_splits
from icm_core.data.stages import prepare_data
from icm_core.infra.io import write_json, write_text
from icm_core.models.base_model import load_tokenizer
from icm_core.models.config import ModelConfig


def count_tokens(texts: list[str], tokenizer) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-chars", type=int, default=120_000, help="characters read per category")
    parser.add_argument("--root", default="artifacts/library/data", help="where the splits are written")
    parser.add_argument("--out", default="results/zeroshot", help="where library.md / library.json go")
    args = parser.parse_args(argv)
    cfg = DataConfig(max_chars=args.max_chars)
    tokenizer = load_tokenizer(ModelConfig())
    rows = []
    for category in library_categories():
        started = time.perf_counter()
        folder = Path(args.root) / category.name / source_fingerprint(category)[:12]
        if not (folder / "splits.json").is_file():
            prepare_data(category, cfg, folder)
        splits = read_splits(folder)
        row = {"category": category.name, "family": category.family, "description": category.description}
        for name, docs in splits.as_dict().items():
            row[f"{name}_documents"] = len(docs)
            row[f"{name}_chars"] = sum(map(len, docs))
            row[f"{name}_tokens"] = count_tokens(docs, tokenizer)
        row["chars_per_token"] = round(
            sum(row[f"{s}_chars"] for s in ("train", "val", "test"))
            / max(1, sum(row[f"{s}_tokens"] for s in ("train", "val", "test"))),
            2,
        )
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        print(
            f"{row['category']:<20} {row['family']:<10} train {row['train_tokens']:>7} val {row['val_tokens']:>6} "
            f"test {row['test_tokens']:>6} tokens  ({row['chars_per_token']} chars/token, {row['seconds']} s)",
            flush=True,
        )
    out = Path(args.out)
    payload = {
        "max_chars": args.max_chars,
        "categories": len(rows),
        "families": sorted({r["family"] for r in rows}),
        "rows": rows,
    }
    write_json(out / "library.json", payload)
    lines = [
        "# Category library",
        "",
        f"{len(rows)} categories in {len(payload['families'])} families, each read up to {args.max_chars:,} "
        "characters, split 75/10/15 by characters (seed 0); tokens counted with the SmolLM2 tokenizer. "
        "Written by `make library` (scripts/library_stats.py).",
        "",
        "| category | family | description | train tokens | val tokens | test tokens | chars/token |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['category']} | {r['family']} | {r['description']} | {r['train_tokens']:,} | "
            f"{r['val_tokens']:,} | {r['test_tokens']:,} | {r['chars_per_token']} |"
        )
    lines += ["", "Families:", ""] + [f"- **{k}**: {v}" for k, v in FAMILIES.items()]
    write_text(out / "library.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'library.md'} and {out / 'library.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
