"""Fixtures for the Prefect flow tests: one real Prefect API (a temporary server) for the session, a tiny
model and two tiny user categories, and a per-test artifacts root whose Prefect result storage lives
inside it, so every test starts with an empty cache.

The pipeline runs on the real Prefect engine (task runs, cache policies, result records, artifacts),
only on a model and data small enough that one run takes seconds on two shared CPU cores.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from tests.flows.support import Workspace, forecast_text, recipe_text, tiny_run_config, write_categories


@pytest.fixture(autouse=True)
def prefect_console_on_live_stderr() -> None:
    """Prefect builds its console handler once per process, on the ``sys.stderr`` of that moment. When that was a
    previous test's ``capsys`` stream, closed since, every log line of the next flow run fails to print until the
    run dies of recursion. Point each Prefect console handler at the stream that is live for this test."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream
                handler.console.file = sys.stderr


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server (SQLite + API subprocess) for the whole session; yields its API URL."""
    with prefect_test_harness(server_startup_timeout=180):
        with disable_run_logger():
            yield PREFECT_API_URL.value()


@pytest.fixture
def workspace(prefect_api: str, tmp_path: Path, tiny_base_dir: Path) -> Iterator[Workspace]:
    """A fresh artifacts root with Prefect's result storage inside it (an empty cache for this test)."""
    root = tmp_path / "artifacts"
    results = root / ".prefect" / "results"
    categories_file = write_categories(tmp_path / "data", {"recipes": recipe_text(), "forecast": forecast_text()})
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}):
        yield Workspace(root, results, categories_file, tiny_run_config(tiny_base_dir))
