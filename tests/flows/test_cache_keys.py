"""Cache keys that cannot go stale (issue 14): the model's content and the numeric libraries' versions are in
every key that depends on them, stale records are expired through Prefect's own API, outputs are checked by
stat unless a full verification is asked for, and no output is silently replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from icm_core.generator.config import TaskVectorConfig
from tests import helpers
from tests.flows.support import CATEGORIES, expected_task_runs, states_by_name


REPO = Path(__file__).resolve().parents[2]


def test_replaced_model_weights_recompute_every_stage_that_reads_the_model(workspace, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(Path(workspace.config.model.name_or_path), model_dir)
    config = workspace.config.model_copy(
        update={"model": workspace.config.model.model_copy(update={"name_or_path": str(model_dir)})}
    )
    first = workspace.run(config=config)
    assert first.is_completed(), first.message

    # Same folder, same file names and sizes: only the weights differ (another seed).
    helpers.save_tiny_base(tmp_path / "other", seed=1)
    weights = next(p.name for p in model_dir.iterdir() if p.suffix == ".safetensors")
    assert (tmp_path / "other" / weights).stat().st_size == (model_dir / weights).stat().st_size
    shutil.copyfile(tmp_path / "other" / weights, model_dir / weights)

    second = workspace.run(config=config)
    assert second.is_completed(), second.message
    states = states_by_name(second)
    assert set(states) == expected_task_runs()
    readers = {f"{stage}-{c}" for c in CATEGORIES for stage in ("lora", "task-vector")}
    readers |= {f"eval-{c}-{m}" for c in CATEGORIES for m in ("base", "lora", "model_soup", "cond_pdiff", "icm_lora")}
    assert {n: states[n] for n in readers} == dict.fromkeys(readers, "Completed")
    assert {n: states[n] for n in (f"data-{c}" for c in CATEGORIES)} == dict.fromkeys(
        (f"data-{c}" for c in CATEGORIES), "Cached"
    )
    assert second.result()["rows"] != first.result()["rows"]  # a stale hit would have repeated the old numbers

    third = workspace.run(config=config)
    assert set(states_by_name(third).values()) == {"Cached"}


def test_two_description_generations_keep_both_adapters(workspace, tmp_path):
    from flows.generate import generate_adapter

    config = workspace.config.model_copy(
        update={"task_vector": TaskVectorConfig(source="description"), "methods": ("base", "lora", "icm_lora")}
    )
    assert workspace.run(config=config).is_completed()
    first = generate_adapter(description="slow-cooked winter stews", root=str(workspace.root))
    second = generate_adapter(description="gale warnings for the north sea", root=str(workspace.root))
    a, b = Path(first["adapter_dir"]), Path(second["adapter_dir"])
    assert a != b and a.is_dir() and b.is_dir()
    assert first["adapter_sha256"] != second["adapter_sha256"]
    from icm_core.lora.adapters import adapter_sha256

    assert adapter_sha256(a) == first["adapter_sha256"]  # the first was not overwritten by the second

    # An explicit folder that exists is refused without overwrite=True, and left as it was.
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_adapter(description="anything else", out=str(a), root=str(workspace.root))
    assert adapter_sha256(a) == first["adapter_sha256"]
    replaced = generate_adapter(description="anything else", out=str(a), root=str(workspace.root), overwrite=True)
    assert adapter_sha256(a) == replaced["adapter_sha256"] != first["adapter_sha256"]


def test_drop_cache_record_expires_it_through_the_result_store(prefect_api, tmp_path):
    """The policy's drop goes through ResultStore (any storage block): the record reads as absent afterwards."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    from tasks.artifacts import drop_cache_record

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)), serializer=JSONSerializer())
    store.write(obj={"ref": 1}, key="k" * 64)
    assert store.exists("k" * 64)

    class Ctx:
        result_store = store

    assert drop_cache_record(Ctx(), "k" * 64)
    assert not store.exists("k" * 64)
    assert not drop_cache_record(Ctx(), "k" * 64)  # nothing left to drop
    assert json.loads((tmp_path / ("k" * 64)).read_text())["metadata"]["expiration"]  # expired, not deleted
