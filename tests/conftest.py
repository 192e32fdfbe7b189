"""Shared fixtures: a tiny model folder (built once per session) and loaders for fresh copies of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


# One intra-op thread. The tiny models do microsecond-sized ops; on the shared 2-core workers, two OpenMP
# threads that spin at every barrier while another process holds the other core made LoRA training about
# 100x slower (25 s instead of 0.2 s for 30 steps). Subprocesses started by the tests inherit this.
# ICM_TEST_THREADS overrides the count (e.g. to compare timings).
TEST_THREADS = int(os.environ.get("ICM_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
# Nothing may be downloaded: a model id that is not a local folder must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from icm_core.models.config import ModelConfig  # noqa: E402
from tests import helpers  # noqa: E402


torch.set_num_threads(TEST_THREADS)

# A real `prefect server start` (session fixture ``live_server``) for deployment, trigger and UI tests.
pytest_plugins = ("tests.live_server",)


@pytest.fixture(autouse=True)
def _test_threads():
    """Restore the session's thread count around every test: a test module that raises it for its own
    tests (tests/core/test_cvae.py uses 2) must not slow down the module-scoped fixtures that follow."""
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)


def pytest_configure(config: pytest.Config) -> None:
    # Known third-party noise: peft renames base_model_name_or_path of models built from a config (we record
    # our own id), and peft calls a transformers property that transformers has deprecated.
    config.addinivalue_line("filterwarnings", "ignore:The PEFT config's `base_model_name_or_path`:UserWarning")
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="session")
def char_tokenizer():
    """The character-level tokenizer (built in memory)."""
    return helpers.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama model + character tokenizer folder, shared by the whole session (read only)."""
    return helpers.save_tiny_base(tmp_path_factory.mktemp("tiny-base") / "model")


@pytest.fixture(scope="session")
def tiny_model_cfg(tiny_base_dir: Path) -> ModelConfig:
    return helpers.model_config(tiny_base_dir)


@pytest.fixture
def fresh_base(tiny_model_cfg: ModelConfig) -> Callable[[], torch.nn.Module]:
    """Factory of freshly loaded base models (peft wraps models in place, so each use needs its own)."""
    from icm_core.models.base_model import load_base_model

    return lambda: load_base_model(tiny_model_cfg)
