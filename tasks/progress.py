"""Progress bars in the Prefect UI for long stages (Prefect progress artifacts).

A :class:`Progress` belongs to the run it is created in (a task run's inside a task, the flow run's inside
a flow). Updates are throttled (a step of at least ``min_step`` of the whole, and the last one always), so
a thousand-step loop costs a few dozen API calls. Outside a Prefect run, or when the API refuses, it does
nothing: progress must never fail a stage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any


logger = logging.getLogger("icm_lora.progress")


class Progress:
    """One progress artifact: ``Progress("fine-tune lora-news", total=60)``, then ``update(done)``."""

    def __init__(self, description: str, total: int, min_step: float = 0.05):
        self.description = description
        self.total = max(1, int(total))
        self.min_step = min_step
        self.shown = -1.0
        self.artifact_id = None
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import FlowRunContext, TaskRunContext

            if FlowRunContext.get() is None and TaskRunContext.get() is None:
                return
            self.artifact_id = create_progress_artifact(0.0, description=self._text(0))
            self.shown = 0.0
        except Exception as exc:  # no API, or an API that refuses: run without a progress bar
            logger.debug("no progress artifact for %s (%s)", description, exc)

    def _text(self, done: int) -> str:
        return f"{self.description}: {done}/{self.total}"

    def update(self, done: int) -> None:
        if self.artifact_id is None:
            return
        percent = 100.0 * min(done, self.total) / self.total
        if percent < 100.0 and percent - self.shown < 100.0 * self.min_step:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, percent, description=self._text(min(done, self.total)))
            self.shown = percent
        except Exception as exc:
            logger.debug("progress update failed for %s (%s)", self.description, exc)


def track(futures: Sequence[Any], description: str) -> Iterable[Any]:
    """Yield fanned-out task futures as they finish, advancing a progress artifact of the flow run."""
    from prefect.futures import as_completed

    progress = Progress(description, len(futures), min_step=0.0)
    for done, future in enumerate(as_completed(list(futures)), start=1):
        future.wait()  # as_completed sees the run finish; wait() also records its final state on the future
        progress.update(done)
        yield future
