"""The project's own loggers reach the flow run's logs (``logging.extra_loggers = "icm_lora"`` in prefect.toml,
``PREFECT_LOGGING_EXTRA_LOGGERS`` in the work pools and the CLI): a warning such as "invalid artifact, will
recompute" shows in the Prefect UI, not only on the worker's terminal."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import get_current_settings


def test_extra_loggers_setting():
    assert "icm_lora" in get_current_settings().logging.extra_loggers


def test_project_warnings_appear_in_the_run_logs(workspace):
    first = workspace.run()
    assert first.is_completed(), first.message
    [generator] = workspace.root.glob("generator/*/generator.safetensors")
    generator.write_bytes(generator.read_bytes()[:100])  # a torn file: the next run must notice and rebuild

    second = workspace.run()
    assert second.is_completed(), second.message
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[second.state_details.flow_run_id]))
        )
    ours = [log for log in logs if log.name.startswith("icm_lora")]
    assert any("will recompute" in log.message or "dropped cache record" in log.message for log in ours), [
        (log.name, log.message[:120]) for log in logs
    ]
