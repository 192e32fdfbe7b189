"""The Prefect UI as a person sees it: a pipeline run on a real server, its pages rendered by headless Chromium.

Chromium is Debian's ``chromium`` package (``make test`` installs it when missing), started with a fresh
profile and everything that would reach the network switched off, and driven over the DevTools protocol
(``tests/ops/browser.py``): open the page, wait until the UI has rendered it, click a tab, read the visible
text, take screenshots (saved in the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

from icm_core.report.pipeline import FIGURES
from tests.flows.support import CATEGORIES, forecast_text, recipe_text, tiny_run_config, write_categories
from tests.ops.browser import Browser, find_chromium


pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def browser(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium package (apt-get install)")
    with Browser(tmp_path / "chromium-profile", binary) as chromium:
        yield chromium


def test_flow_run_and_results_in_a_browser(live_server, tiny_base_dir, tmp_path, browser):
    from flows.pipeline import icm_pipeline

    categories = write_categories(tmp_path / "data", {"recipes": recipe_text(), "forecast": forecast_text()})
    root = tmp_path / "artifacts"
    results = root / ".prefect" / "results"
    settings = {PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}
    with live_server.connected(settings):
        state = icm_pipeline(
            config=tiny_run_config(tiny_base_dir), categories_file=str(categories), root=str(root), return_state=True
        )
        assert state.is_completed(), state.message
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
            [table], [report], [outputs] = (
                client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                    )
                )
                for key in ("icm-eval-summary", "icm-report", "icm-outputs")
            )
    rows = state.result()["rows"]
    cells = json.loads(table.data) if isinstance(table.data, str) else table.data

    # The flow run page: the run, its state, and (Task Runs tab) a task run per category and stage.
    browser.open(f"{live_server.url}/runs/flow-run/{flow_run_id}")
    browser.wait_for(lambda text: flow_run.name in text and "Completed" in text)
    browser.screenshot(tmp_path / "flow-run.png")
    browser.click("#task-runs")
    expected = [f"{stage}-{c}" for c in CATEGORIES for stage in ("lora", "task-vector", "sample")]
    expected += [f"eval-{c}-{m}" for c in CATEGORIES for m in ("base", "lora", "icm_lora")]
    expected += ["train-generator", "report"]
    text = browser.wait_for(lambda text: all(name in text for name in expected))
    assert "Completed" in text
    browser.screenshot(tmp_path / "task-runs.png")

    # The results artifact: one row per category with its metrics, as the UI's table renders them.
    browser.open(f"{live_server.url}/artifacts/artifact/{table.id}")
    text = browser.wait_for(lambda text: all(row["category"] in text for row in cells))
    browser.screenshot(tmp_path / "results.png")
    assert "icm-eval-summary" in text
    # Table cells come out tab-separated, the category (a block element) on its own line: compare cell tokens
    # near each category's cell.
    tokens = [token for token in re.split(r"[\t\n]+", text) if token.strip()]
    header = next(line.split("\t") for line in text.splitlines() if "ppl_base" in line.split("\t"))
    checked = ("ppl_base", "ppl_lora", "ppl_icm_lora", "bpc_icm_lora", "gain_recovered")
    assert set(checked) <= set(header), header
    for row in cells:
        i = tokens.index(row["category"], tokens.index(header[-1]))
        near = tokens[max(0, i - len(header)) : i + len(header)]
        for column in checked:
            assert str(row[column]) in near, f"{row['category']} {column}={row[column]} not shown near it: {near}"
    assert sorted(r["category"] for r in cells) == sorted(r["category"] for r in rows)

    # The markdown report: its figures render as images (decoded, non-zero size), and no absolute path of the
    # machine that ran the flow appears; the outputs artifact explains why it lists paths, not file:// links.
    browser.open(f"{live_server.url}/artifacts/artifact/{report.id}")
    browser.wait_for(lambda text: "ICM-LoRA results" in text and "Figures" in text)
    images = browser.wait_for_value(RENDERED_IMAGES, lambda found: len(found) >= 3 and all(w > 0 for _, w, _ in found))
    assert sorted(alt for alt, _, _ in images) == sorted(FIGURES.values()), images
    text = browser.text()
    assert str(root.resolve()) not in text and "Paths below are relative to the artifacts root" in text
    browser.screenshot(keep(tmp_path / "report-artifact-top.png"))
    browser.evaluate("document.querySelector('img[alt]').scrollIntoView()")
    browser.screenshot(keep(tmp_path / "report-artifact.png"))
    browser.open(f"{live_server.url}/artifacts/artifact/{outputs.id}")
    text = browser.wait_for(lambda text: "Where the outputs are" in text)
    assert "cannot open" in text and str(root.resolve()) not in text
    assert browser.evaluate("document.querySelectorAll('a[href^=\"file:\"]').length") == 0
    browser.screenshot(keep(tmp_path / "outputs-artifact.png"))


# Every decoded image in the page: (alt text, natural width, natural height).
RENDERED_IMAGES = (
    "[...document.querySelectorAll('img')].filter(i => i.complete && i.src.startsWith('data:image/png'))"
    ".map(i => [i.alt, i.naturalWidth, i.naturalHeight])"
)


def keep(path):
    """Screenshots go to the test's folder; ICM_LORA_SCREENSHOTS=<folder> keeps a copy there."""
    folder = os.environ.get("ICM_LORA_SCREENSHOTS")
    return Path(folder) / path.name if folder else path
