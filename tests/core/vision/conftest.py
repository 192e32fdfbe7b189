"""Fixtures of the vision tests: a tiny built-in face task on disk, and the real MTCNN."""

from __future__ import annotations

from pathlib import Path

import pytest

from icm_core.vision.config import DetectionDataConfig


TINY_FACES = DetectionDataConfig(tasks=("blur", "noise"), train_images=4, test_images=3)


@pytest.fixture(scope="session")
def face_task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'blur' face task with 4 train and 3 test images (real LFW faces on real photos)."""
    from icm_core.vision.stages import prepare_detection_task

    out = tmp_path_factory.mktemp("faces") / "blur"
    prepare_detection_task("blur", TINY_FACES, out)
    return out


@pytest.fixture(scope="session")
def mtcnn():
    from icm_core.vision.mtcnn import load_mtcnn

    return load_mtcnn()
