"""The detection flow on the real Prefect engine: real MTCNN, two tiny face tasks, all five methods; a second
run is all cache hits."""

from __future__ import annotations

from pathlib import Path

from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from icm_core.generator.config import CVAEConfig
from icm_core.infra.io import read_json
from icm_core.vision.config import DetectionDataConfig, DetectionLoraConfig, DetectionRunConfig
from tests.flows.support import TINY_PDIFF, states_by_name


def tiny_detection_config() -> DetectionRunConfig:
    return DetectionRunConfig(
        data=DetectionDataConfig(tasks=("blur", "noise"), train_images=3, test_images=2),
        lora=DetectionLoraConfig(
            steps=4,
            trajectory_size=2,
            warmup_steps=1,
            batch_size=32,
            positives_per_face=2,
            parts_per_face=1,
            negatives_per_image=3,
        ),
        cvae=CVAEConfig(channels=(4, 8), latent_dim=8, epochs=2, batch_size=2),
        pdiff=TINY_PDIFF,
    )


def test_detection_flow_runs_and_resumes(prefect_api: str, tmp_path: Path):
    from flows.cli import main
    from flows.detection import detection_pipeline

    root = tmp_path / "artifacts"
    cfg = tiny_detection_config()
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / ".prefect" / "results"}):
        first = detection_pipeline(config=cfg, root=str(root), publish=False, return_state=True)
        assert first.is_completed(), first.message
        summary = first.result()
        rows = summary["rows"]
        assert {(r["method"], r["task"]) for r in rows} == {
            (m, t) for m in ("base", "lora", "model_soup", "cond_pdiff", "icm_lora") for t in ("blur", "noise")
        }
        for row in rows:
            assert 0.0 <= row["map50"] <= 1.0 and 0.0 <= row["map75"] <= row["map50"] + 1e-9
            # Paired bootstrap interval over test images of the mAP50 difference to the LoRA and to the base.
            for ref in ("lora", "base"):
                if row["method"] != ref:
                    low, high = row[f"ci95_map50_vs_{ref}"]
                    assert low <= row[f"map50_diff_vs_{ref}"] + 1e-9 and row[f"map50_diff_vs_{ref}"] <= high + 1e-9
        report = Path(summary["report"]).read_text()
        assert "| Original model |" in report and "| ICM-LoRA |" in report and "blur mAP50" in report
        assert read_json(root / "latest.json")["report"] == summary["report"]
        # The detection figure (mAP50 / mAP75 bars per task and method) sits next to the report, linked from it.
        assert "](detection_results.png)" in report
        assert (Path(summary["report_dir"]) / "detection_results.png").read_bytes()[:4] == b"\x89PNG"

        second = detection_pipeline(config=cfg, root=str(root), publish=False, return_state=True)
        states = settled_states(second)
        assert states and all(state == "Cached" for state in states.values()), states
        assert second.result()["rows"] == rows

        # The CLI copies the report into a results folder (what results/ holds).
        out = tmp_path / "results"
        assert main(["detect", "--root", str(root), "--results-dir", str(out), *overrides(cfg)]) == 0
        assert (out / "detection-report.md").read_text() == report
        assert (out / "detection-results.csv").read_text().startswith("method,task,map50,map75")
        figure = (Path(summary["report_dir"]) / "detection_results.png").read_bytes()
        assert (out / "detection_results.png").read_bytes() == figure  # the name report.md links to


def settled_states(state, timeout: float = 60.0) -> dict[str, str]:
    """Task-run states read back through the API once the server has recorded them all (it records state
    events asynchronously, so right after a fast run some may still read Pending / Running)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        states = states_by_name(state)
        if all(s not in ("Pending", "Running", "Scheduled") for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


def overrides(cfg: DetectionRunConfig) -> list[str]:
    """``--set`` arguments that rebuild ``cfg`` from the defaults."""
    import json

    args = []
    for section, value in cfg.model_dump(mode="json").items():
        for key, item in value.items():
            args += ["--set", f"{section}.{key}={json.dumps(item)}"]
    return args


def test_detection_flow_on_an_fsspec_root(prefect_api: str, tmp_path: Path, monkeypatch):
    """The detection flow takes the same fsspec roots as the pipeline: outputs and records are published to a
    memory:// root; a second machine (empty staging cache) gets all cache hits and the same numbers."""
    import uuid

    import fsspec

    from flows.detection import detection_pipeline
    from tasks.store import CACHE_ENV

    url = f"memory://det-{uuid.uuid4().hex[:8]}/artifacts"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine-a"))
    cfg = tiny_detection_config()
    first = detection_pipeline(config=cfg, root=url, publish=False, return_state=True)
    assert first.is_completed(), first.message
    fs, base = fsspec.core.url_to_fs(url)
    published = fs.find(base)
    assert any(p.endswith("/latest.json") for p in published)
    assert sum(p.endswith("/manifest.json") for p in published) >= 2 * 5 + 2  # per task: data, lora, vector, ...
    assert any("/.prefect/results/" in p for p in published)  # Prefect's records live in the root too
    assert not (tmp_path / "artifacts").exists()

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine-b"))
    second = detection_pipeline(config=cfg, root=url, publish=False, return_state=True)
    assert second.is_completed(), second.message
    assert set(states_by_name(second).values()) == {"Cached"}
    assert second.result()["rows"] == first.result()["rows"]
