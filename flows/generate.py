"""``generate_adapter``: one PEFT adapter from a trained generator, by category name, description or
task-vector file. No real LoRA checkpoint is involved: the generator artifact carries everything.

No call silently replaces another's adapter. The default output folder is keyed by what decides the
adapter: ``<root>/generated/<generator sha256[:12]>/<condition>/seed-<seed>-draws-<n>/adapter``, where the
condition is ``category-<name>``, ``description-<sha256(encoder + text)[:12]>`` or
``<task-vector file stem>-<its sha256[:12]>`` or ``text-<sha256(text files + vector settings)[:12]>``; two
different requests never share a folder, and the same request writes the same bytes again. An explicit ``out``
that already exists is refused unless ``overwrite=True`` (``--overwrite``).

A **new category** (one the generator never saw, nobody fine-tuned) gets its adapter from its text alone
(``text=``, ``icm-lora generate --text-dir FOLDER`` or ``--text FILE``): the task vector the generator was trained
on is computed from that text (paper Eq. 1 on the base model over k samples, ``icm_core/zeroshot/from_text.py``). A
generator trained on fine-tuned-model vectors (the demo's default) is refused with a message saying how to train
one that works (``task_vector.hidden_from=base``); a description-vector generator takes ``description=``."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.runtime import confine_deployment_run, thread_task_runner
from icm_core.generator.config import SampleConfig, TaskVectorConfig
from icm_core.infra.io import read_json, sha256_file, sidecar_path
from icm_core.lora.adapters import adapter_sha256
from icm_core.models.config import ModelConfig
from icm_core.zeroshot.from_text import plan_text_vector, read_text_source, text_condition_label
from tasks.generator import generate_task
from tasks.store import fetch, is_remote, local_root, read_root_json


def latest_generator(root: str | Path) -> Path:
    """The generator of the latest pipeline run under ``root`` (a folder, or an fsspec URL: then this machine's
    staging copy, fetched and verified when the run happened elsewhere)."""
    latest = read_root_json(str(root), "latest.json")
    if latest is None:
        raise FileNotFoundError(
            f"{root}/latest.json: no pipeline run recorded here; run `icm-lora pipeline` first, or give the "
            "generator file (--generator / generator=)"
        )
    path = Path(latest["generator"])
    if is_remote(str(root)):
        # The path in latest.json is the producing machine's; use this machine's staging copy of that output.
        folder = local_root(str(root)) / "generator" / path.parent.name
        if not (folder / path.name).is_file() and not fetch(str(root), folder):
            raise FileNotFoundError(f"{root}: the latest generator ({path.parent.name}) is not published")
        path = folder / path.name
    return path


def generated_markdown(label: str, out_dir: str, root: str, base: str | None) -> str:
    """The UI's note on a generated adapter: where it is (relative to the artifacts root when inside it) and
    how to load it. A path, not a link: the UI cannot open a worker's local files."""
    folder = Path(out_dir).resolve()
    try:
        shown = f"`{folder.relative_to(local_root(root)).as_posix()}` (relative to the artifacts root)"
    except ValueError:
        shown = f"`{out_dir}`"
    return (
        f"# Generated adapter: {label}\n\n"
        f"A standard PEFT folder at {shown} on the machine that ran this flow (the UI cannot open a worker's "
        f"files; a `file://` link would not open in a browser). Its base model: `{base}`.\n\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
        "model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_FOLDER)  # base model + adapter\n```\n"
    )


def file_sha256(path: Path) -> str:
    """A tensor file's sha256 from its sidecar when it has one (read, not recomputed), else by hashing it."""
    side = sidecar_path(path)
    if side.is_file():
        recorded = read_json(side).get("sha256")
        if isinstance(recorded, str):
            return recorded
    return sha256_file(path)


def condition_label(
    category: str | None,
    description: str | None,
    task_vector_file: str | None,
    encoder: str,
    text: str | None = None,
    generator: str | Path | None = None,
    model: ModelConfig | None = None,
    num_samples: int | None = None,
) -> str:
    """The folder name of a generation's condition (see the module docstring)."""
    if text:
        return text_condition_label(text, plan_text_vector(generator, model, num_samples))
    if category:
        return f"category-{category}"
    if description:
        text = encoder + "\n" + description
        return f"description-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    path = Path(task_vector_file)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "task-vector"
    return f"{stem}-{file_sha256(path)[:12]}"


def default_out(root: str, generator: Path, condition: str, sample: SampleConfig) -> Path:
    """``<root>/generated/<generator sha256[:12]>/<condition>/seed-<seed>-draws-<n>/adapter``."""
    folder = f"seed-{sample.seed}-draws-{sample.num_draws}"
    return local_root(root) / "generated" / file_sha256(generator)[:12] / condition / folder / "adapter"


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    if p.get("text"):
        return "generate-text-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", Path(p["text"]).stem).strip("-") or "text")
    return f"generate-{p.get('category') or ('description' if p.get('description') else 'task-vector')}"


@flow(name="generate-adapter", task_runner=thread_task_runner(), flow_run_name=_run_name, log_prints=True)
def generate_adapter(
    category: str | None = None,
    description: str | None = None,
    task_vector_file: str | None = None,
    out: str | None = None,
    generator: str | None = None,
    sample: SampleConfig = SampleConfig(),  # noqa: B008
    text_encoder: str = TaskVectorConfig().text_encoder,
    root: str = "artifacts",
    overwrite: bool = False,
    base_model: str | None = None,
    text: str | None = None,
    model: ModelConfig = ModelConfig(),  # noqa: B008 - pydantic default, shown as a form in the UI
    num_samples: int | None = None,
) -> dict[str, Any]:
    """Generate a PEFT adapter folder.

    Args:
        category: A category the generator was trained on (its stored task vector is used).
        description: A task description, embedded with ``text_encoder`` (for generators trained on
            description task vectors).
        task_vector_file: A ``.safetensors`` file with a ``task_vector`` tensor.
        text: A new category's text (a ``.txt`` / ``.jsonl`` file or a folder of ``.txt`` files): its task vector
            is computed from it the way the generator's were (Eq. 1 on the base model; needs a generator trained
            with ``task_vector.hidden_from=base``).
        out: Output adapter folder (default: a folder keyed by generator, condition and sampling, see the module
            docstring). An existing ``out`` is refused unless ``overwrite``.
        generator: Generator ``.safetensors`` file (default: the latest pipeline run's under ``root``).
        sample: Sampling config (seed of z, number of draws).
        text_encoder: Sentence encoder for ``description``.
        root: Artifacts root.
        overwrite: Replace an existing ``out`` folder.
        base_model: What the adapter's ``base_model_name_or_path`` names (a hub id or a model folder); default:
            what the generator's training data recorded (see ``ModelConfig.adapter_base``).
        model: Base-model loading settings for ``text`` (device, dtype); the model itself is the one the
            generator's task vectors came from (recorded in its sidecar).
        num_samples: k, the samples of ``text`` averaged in Eq. 1 (default: the generator's training value).
    """
    given = [x for x in (category, description, task_vector_file, text) if x]
    if len(given) != 1:
        raise ValueError("give exactly one of category, description, task_vector_file, text")
    # A deployment run writes and reads files only inside its root; a new category's text is registry data.
    confine_deployment_run(
        root, {"text": text}, {"out": out, "generator": generator, "task_vector_file": task_vector_file}, model
    )
    generator_path = str(generator or latest_generator(root))
    if text:
        # Checked before any output folder is named or written: the generator's vector kind, then the text.
        plan = plan_text_vector(generator_path, model, num_samples)
        if not plan.uses_text:
            raise ValueError(
                f"{generator_path}: trained on description vectors ({plan.kind!r}); give the new category's one-line "
                "description (description= / --description), not its text"
            )
        read_text_source(text)
    label = category or ("description" if description else Path(task_vector_file or text).stem)
    if out:
        if Path(out).exists() and not overwrite:
            raise FileExistsError(f"out: {out} already exists; pass overwrite=True (--overwrite) to replace it")
        out_dir = out
    else:
        condition = condition_label(
            category, description, task_vector_file, text_encoder, text, generator_path, model, num_samples
        )
        out_dir = str(default_out(root, Path(generator_path), condition, sample))
    result = generate_task(
        generator_path, out_dir, sample, label, category, description, task_vector_file, text_encoder, base_model,
        text, model, num_samples,
    )  # fmt: skip
    base = json.loads((Path(out_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    create_markdown_artifact(
        # Artifact keys allow only lowercase letters, digits and dashes; a task-vector file's stem may hold more.
        key="generated-" + (re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "adapter"),
        markdown=generated_markdown(label, out_dir, root, base),
        description=f"generated adapter ({label})",
    )
    get_run_logger().info("adapter written to %s in %.1f ms", out_dir, 1000 * result["seconds"])
    return {**result, "adapter_sha256": adapter_sha256(out_dir)}
