"""The detection flow end to end with detector.kind=florence2 on a tiny random Florence-2 and a tiny COCO file
(two per-label tasks, all five methods) on the real Prefect engine."""

from __future__ import annotations

from pathlib import Path

from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from icm_core.vision.config import DetectionLoraConfig, DetectorConfig
from tests.core.vision.test_florence import tiny_florence
from tests.core.vision.test_hf_detector import shapes_data_config
from tests.flows.test_detection_flow import tiny_detection_config


def test_detection_flow_with_florence2(prefect_api: str, tmp_path: Path):
    from flows.detection import detection_pipeline

    cfg = tiny_detection_config().model_copy(
        update={
            "data": shapes_data_config(tmp_path / "coco"),
            "detector": DetectorConfig(
                kind="florence2",
                name_or_path=str(tiny_florence(tmp_path / "florence")),
                input_size=32,
                score_threshold=0.0,
                max_new_tokens=16,
            ),
            "lora": DetectionLoraConfig(
                target_modules=("q_proj", "v_proj"), steps=4, trajectory_size=2, warmup_steps=0, batch_size=2
            ),
        }
    )
    root = tmp_path / "artifacts"
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / ".prefect" / "results"}):
        state = detection_pipeline(config=cfg, root=str(root), publish=False, return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()["rows"]
    assert {(r["method"], r["task"]) for r in rows} == {
        (m, t) for m in ("base", "lora", "model_soup", "cond_pdiff", "icm_lora") for t in ("square", "disc")
    }
    for row in rows:
        assert 0.0 <= row["map50"] <= 1.0 and 0.0 <= row["map75"] <= row["map50"] + 1e-9
