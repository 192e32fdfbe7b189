"""Helpers of the flow tests: tiny categories and run config, a per-test workspace, task-run states."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from icm_core.baselines.config import PDiffConfig
from icm_core.config import DEFAULT_METHODS, RunConfig
from icm_core.data.config import DataConfig
from icm_core.evaluation.config import DiagnosticsConfig, EvalConfig
from icm_core.generator.config import CVAEConfig, TaskVectorConfig
from icm_core.models.config import ModelConfig
from tests import helpers


CATEGORIES = ("recipes", "forecast")

_RECIPE_DISHES = [
    "lentil soup",
    "apple crumble",
    "tomato risotto",
    "leek pie",
    "carrot cake",
    "bean stew",
    "onion tart",
    "pea salad",
]
_RECIPE_STEPS = [
    "Warm a little olive oil in a heavy pan and soften the onion over a low heat for ten minutes.",
    "Stir in the garlic and cook until it smells sweet, then add the stock and bring it to a simmer.",
    "Season with salt and pepper, taste, and add a squeeze of lemon if it needs brightness.",
    "Butter a shallow dish, spoon in the mixture and bake until golden at the edges.",
    "Leave it to rest for five minutes before serving with crusty bread and a green salad.",
    "Whisk the flour, sugar and butter together until the mixture looks like coarse crumbs.",
]
_SEA_AREAS = [
    "Viking",
    "Forties",
    "Cromarty",
    "Dogger",
    "Fisher",
    "Humber",
    "Thames",
    "Dover",
    "Wight",
    "Portland",
    "Plymouth",
    "Biscay",
]
_WINDS = [
    "southwest 5 to 7",
    "westerly 4 or 5, occasionally 6",
    "northeast 3 or 4",
    "cyclonic 6 to gale 8",
    "variable 3, becoming southerly 5",
]
_SEAS = ["moderate or rough", "slight or moderate", "rough or very rough", "moderate"]
_WEATHER = ["rain then showers", "fair", "fog patches, then drizzle", "squally showers", "thundery rain"]
_VISIBILITY = ["good, occasionally poor", "moderate or good", "very poor at first", "good"]


def recipe_text() -> str:
    """About 3,000 characters of plain cooking prose, one short recipe per paragraph."""
    docs = []
    for i, dish in enumerate(_RECIPE_DISHES):
        steps = " ".join(_RECIPE_STEPS[(i + j) % len(_RECIPE_STEPS)] for j in range(4))
        docs.append(f"How to make {dish} for {2 + i % 4} people. {steps}")
    return "\n\n".join(docs) + "\n"


def forecast_text() -> str:
    """About 3,000 characters of a shipping forecast: terse, capitalised, numeric."""
    docs = []
    for i, area in enumerate(_SEA_AREAS):
        docs.append(
            f"{area}. Wind {_WINDS[i % len(_WINDS)]}. Sea state {_SEAS[i % len(_SEAS)]}. "
            f"Weather {_WEATHER[i % len(_WEATHER)]}. Visibility {_VISIBILITY[i % len(_VISIBILITY)]}. "
            f"Pressure {990 + 3 * i} millibars, {'rising slowly' if i % 2 else 'falling more slowly'}. "
            f"Outlook for the next 24 hours: wind {_WINDS[(i + 2) % len(_WINDS)]}, "
            f"sea state {_SEAS[(i + 1) % len(_SEAS)]}."
        )
    return "\n\n".join(docs) + "\n"


def write_categories(folder: Path, texts: dict[str, str]) -> Path:
    """Write one ``<name>.txt`` per category and a ``categories.yaml`` that points at them (relative paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        entries.append({"name": name, "description": f"{name} text for the flow tests", "source": f"{name}.txt"})
    path = folder / "categories.yaml"
    path.write_text(yaml.safe_dump({"categories": entries}, sort_keys=False), encoding="utf-8")
    return path


def tiny_run_config(model_dir: Path, **lora_overrides: Any) -> RunConfig:
    """A RunConfig small enough that a whole pipeline run takes seconds on CPU."""
    return RunConfig(
        model=ModelConfig(name_or_path=str(model_dir), device="cpu", dtype="float32", num_threads=1),
        data=DataConfig(seq_len=32, min_chars=500),
        lora=helpers.lora_config(**{"steps": 4, "trajectory_size": 2, "checkpoint_every": 2, **lora_overrides}),
        task_vector=TaskVectorConfig(num_samples=2, sample_tokens=16),
        cvae=CVAEConfig(channels=(4, 8, 8, 4), latent_dim=8, epochs=3, batch_size=2),
        eval=EvalConfig(max_tokens=128),
        pdiff=TINY_PDIFF,
        diagnostics=DiagnosticsConfig(z_draws=2, score_z_draws=True),
    )


EVALUATED = (*DEFAULT_METHODS, "icm_lora@z1")
"""What a tiny run evaluates: every default method, and ICM-LoRA's second z draw (generator diagnostics)."""


TINY_PDIFF = PDiffConfig(
    fold_rate=3,
    ae_kernel_size=3,
    ae_enc_channels=(2, 2),
    ae_dec_channels=(2, 4),
    ae_epochs=2,
    unet_channels=(8, 16),
    cond_tokens=2,
    timesteps=20,
    ddpm_steps=4,
    batch_size=4,
    log_every=2,
)


def pipeline_args(root: Path, config: RunConfig, categories_file: Path, folder: Path) -> list[str]:
    """``icm-lora pipeline`` arguments: ``root``, ``config`` (written to ``folder/run.yaml``) and a category file."""
    config_file = folder / "run.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    return ["--root", str(root), "--config", str(config_file), "--categories", str(categories_file)]


@dataclass
class Workspace:
    """A test's artifacts root, its Prefect result folder, its category file and its run config."""

    root: Path
    results: Path
    categories_file: Path
    config: RunConfig

    def pipeline_args(self, folder: Path, config: RunConfig | None = None) -> list[str]:
        """``icm-lora pipeline`` arguments for this workspace (its config unless ``config`` is given)."""
        return pipeline_args(self.root, config or self.config, self.categories_file, folder)

    def run(
        self,
        config: RunConfig | None = None,
        categories_file: Path | None = None,
        root: Path | None = None,
        **kwargs: Any,
    ):
        """Run the pipeline in this process (default: this workspace's config, categories and root); return
        its final flow-run state."""
        from flows.pipeline import icm_pipeline

        return icm_pipeline(
            config=config or self.config,
            categories_file=str(categories_file or self.categories_file),
            root=str(root or self.root),
            return_state=True,
            **kwargs,
        )


def settled_task_runs(flow_run_ids, timeout_s: float = 60.0, quiet_s: float = 1.5) -> list:
    """The task runs of the given flow runs, read back through the Prefect API once the server has recorded them.

    Task-run states reach the server as events that its recorder writes asynchronously, so a read right after
    a flow returns can see a run's first record (a default name like ``report-ccb``, state Pending) rather than
    its last, or miss a run whose events are not recorded yet (seen in CI: a fully cached rerun read back
    without its last task, ``report``). The client's events are flushed, then the read is repeated until
    nothing has changed for ``quiet_s`` seconds and every task run is in a final state; runs that legitimately
    stay unfinished (NotReady behind a failed upstream) are returned once ``timeout_s`` has passed or nothing
    has changed for ``4 * quiet_s``."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids)))
    deadline = time.monotonic() + timeout_s
    last_snapshot, unchanged_since = None, time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_filter)
            snapshot = sorted((str(run.id), run.name, run.state_name or "") for run in runs)
            now = time.monotonic()
            if snapshot != last_snapshot:
                last_snapshot, unchanged_since = snapshot, now
            quiet_for = now - unchanged_since
            all_final = all(run.state is not None and run.state.is_final() for run in runs)
            if (all_final and quiet_for >= quiet_s) or quiet_for >= 4 * quiet_s or now > deadline:
                return runs
            time.sleep(0.2)


def task_runs_of(state) -> list:
    """The task runs of the flow run that ended in ``state``, read back through the Prefect API."""
    return settled_task_runs([state.state_details.flow_run_id])


def states_by_name(state) -> dict[str, str]:
    """``{task run name: state name}`` of a flow run (e.g. ``{"lora-recipes": "Cached", ...}``)."""
    runs = task_runs_of(state)
    names = [run.name for run in runs]
    assert len(names) == len(set(names)), f"duplicate task run names: {sorted(names)}"
    return {run.name: run.state.name for run in runs}


BATCHED_TASK_RUNS = frozenset({"sample-pdiff", "sample-pdiff-z1"})
"""Task runs that write one output folder per category (COND P-DIFF samples all categories in one batch)."""


def expected_output_folders(categories=CATEGORIES) -> int:
    """How many stage output folders a run writes: one per task run, and one per category for each batched one."""
    runs = expected_task_runs(categories)
    assert BATCHED_TASK_RUNS <= runs
    return len(runs) - len(BATCHED_TASK_RUNS) + len(BATCHED_TASK_RUNS) * len(categories)


def expected_task_runs(categories=CATEGORIES) -> set[str]:
    names = {"train-generator", "train-cond-pdiff", "soup-all", "report"}
    names |= {"diagnostics-icm_lora", "diagnostics-cond_pdiff"}
    names |= BATCHED_TASK_RUNS
    for c in categories:
        names |= {f"data-{c}", f"lora-{c}", f"task-vector-{c}", f"sample-{c}"}
        names |= {f"trajectory-mean-{c}", f"soup-{c}-own", f"sample-{c}-z1"}
        names |= {f"eval-{c}-{m}" for m in EVALUATED}
    return names
