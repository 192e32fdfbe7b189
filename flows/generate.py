"""``generate_adapter``: one PEFT adapter from a trained generator, by category name, description or
task-vector file. No real LoRA checkpoint is involved: the generator artifact carries everything."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact

from icm_core.adapters import adapter_sha256
from icm_core.config import SampleConfig, TaskVectorConfig
from icm_core.stages import load_task_vector_with_kind, sample_adapter
from icm_core.task_vectors import TextEncoder, text_task_vector
from tasks.store import fetch, is_remote, local_root, read_root_json


def latest_generator(root: str | Path) -> Path:
    """The generator of the latest pipeline run under ``root`` (a folder, or an fsspec URL: then this machine's
    staging copy, fetched and verified when the run happened elsewhere)."""
    latest = read_root_json(str(root), "latest.json")
    if latest is None:
        raise FileNotFoundError(f"{root}/latest.json: no pipeline run recorded here; pass generator= explicitly")
    path = Path(latest["generator"])
    if is_remote(str(root)) and not path.is_file():
        folder = local_root(str(root)) / "generator" / path.parent.name
        if not (folder / path.name).is_file() and not fetch(str(root), folder):
            raise FileNotFoundError(f"{root}: the latest generator ({path.parent.name}) is not published")
        path = folder / path.name
    return path


@task(name="generate-adapter", task_run_name="generate-{label}", cache_policy=None, persist_result=False)
def generate_task(
    generator: str,
    out: str,
    sample_cfg: SampleConfig,
    label: str,
    category: str | None,
    description: str | None,
    task_vector_file: str | None,
    text_encoder: str,
) -> dict[str, Any]:
    kind = None
    if task_vector_file:
        vector, kind = load_task_vector_with_kind(task_vector_file)
    elif description:
        vector, kind = text_task_vector(description, TextEncoder(text_encoder)), f"description:{text_encoder}"
    else:
        vector = None
    return sample_adapter(
        generator,
        out,
        sample_cfg,
        category=category,
        task_vector=vector,
        task_vector_source=task_vector_file or ("description" if description else None),
        task_vector_kind=kind,
    )


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"generate-{p.get('category') or ('description' if p.get('description') else 'task-vector')}"


@flow(name="generate-adapter", flow_run_name=_run_name, log_prints=True)
def generate_adapter(
    category: str | None = None,
    description: str | None = None,
    task_vector_file: str | None = None,
    out: str | None = None,
    generator: str | None = None,
    sample: SampleConfig = SampleConfig(),  # noqa: B008
    text_encoder: str = TaskVectorConfig().text_encoder,
    root: str = "artifacts",
) -> dict[str, Any]:
    """Generate a PEFT adapter folder.

    Args:
        category: A category the generator was trained on (its stored task vector is used).
        description: A task description, embedded with ``text_encoder`` (for generators trained on
            description task vectors).
        task_vector_file: A ``.safetensors`` file with a ``task_vector`` tensor.
        out: Output adapter folder (default: ``<root>/generated/<label>/adapter``).
        generator: Generator ``.safetensors`` file (default: the latest pipeline run's under ``root``).
        sample: Sampling config (seed of z, number of draws).
        text_encoder: Sentence encoder for ``description``.
        root: Artifacts root.
    """
    given = [x for x in (category, description, task_vector_file) if x]
    if len(given) != 1:
        raise ValueError("give exactly one of category, description, task_vector_file")
    generator_path = str(generator or latest_generator(root))
    label = category or ("description" if description else Path(task_vector_file).stem)
    out_dir = out or str(local_root(root) / "generated" / label / "adapter")
    result = generate_task(
        generator_path, out_dir, sample, label, category, description, task_vector_file, text_encoder
    )
    create_link_artifact(
        # Artifact keys allow only lowercase letters, digits and dashes; a task-vector file's stem may hold more.
        key="generated-" + (re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "adapter"),
        link=Path(out_dir).resolve().as_uri(),
        link_text=f"generated adapter ({label})",
    )
    get_run_logger().info("adapter written to %s in %.1f ms", out_dir, 1000 * result["seconds"])
    return {**result, "adapter_sha256": adapter_sha256(out_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate a PEFT adapter with a trained ICM-LoRA generator.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--category")
    group.add_argument("--description")
    group.add_argument("--task-vector", dest="task_vector_file")
    parser.add_argument("--out")
    parser.add_argument("--generator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="artifacts")
    args = parser.parse_args(argv)
    result = generate_adapter(
        category=args.category,
        description=args.description,
        task_vector_file=args.task_vector_file,
        out=args.out,
        generator=args.generator,
        sample=SampleConfig(seed=args.seed),
        root=args.root,
    )
    print(result["adapter_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
