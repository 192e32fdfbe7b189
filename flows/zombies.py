"""Mark killed flow runs Crashed: flow-run heartbeats plus a zombie-detection automation on the server.

A flow run whose process dies by SIGKILL, an OOM kill, a power cut or a preempted VM never reports a final
state, so the server shows it "Running" for ever. Prefect 3 fixes this with two pieces (Prefect's guide
"How to detect and respond to zombie flows"):

1. every flow run's engine emits a ``prefect.flow-run.heartbeat`` event every
   ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (minimum 30; the project sets 60 in ``prefect.toml`` and
   in ``prefect.yaml``'s work-pool environments);
2. an automation on the server with a *proactive* trigger: after a heartbeat of a flow run, if neither
   another heartbeat nor a final state of that run (Completed, Failed, Cancelled, Crashed) arrives within
   ``within`` seconds, it sets the run to Crashed.

This module creates (or updates) that automation, named :data:`AUTOMATION_NAME`::

    python -m flows.zombies                   # against $PREFECT_API_URL, within = 3 x heartbeat frequency
    python -m flows.zombies --within 300
    make zombie-detection

Run it once per server (it is idempotent). A restarted pipeline is a new flow run (the killed one stays
Crashed in the history); its cached stages and the long stages' resumable state make it continue where
the killed one stopped.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import Any


AUTOMATION_NAME = "icm-crash-zombie-flow-runs"
HEARTBEAT_FREQUENCY_S = 60
"""The project's heartbeat interval (``prefect.toml``: ``flows.heartbeat_frequency``)."""
MISSED_HEARTBEATS = 3
"""How many heartbeat intervals of silence mark a run Crashed (the default ``within``)."""


def zombie_automation(within_s: float, name: str = AUTOMATION_NAME) -> Any:
    """The automation: a run that was heard from and then stays silent for ``within_s`` seconds is Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=name,
        description=(
            "Flow runs that stop sending heartbeats (process killed, machine lost) are marked Crashed "
            "(icm-lora, flows/zombies.py)."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within_s:.0f} s: the flow run's process is gone (marked by {name}).",
            )
        ],
    )


def ensure_zombie_automation(within_s: float | None = None, name: str = AUTOMATION_NAME) -> Any:
    """Create the automation on the current API, or replace an existing one of the same name; return it."""
    from prefect.automations import Automation

    within_s = within_s or MISSED_HEARTBEATS * HEARTBEAT_FREQUENCY_S
    try:
        existing = Automation.read(name=name)
    except ValueError:  # Prefect raises ValueError when no automation has that name
        existing = None
    if existing is not None:
        existing.delete()
    return zombie_automation(within_s, name).create()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create the automation that marks silent (killed) flow runs Crashed.")
    parser.add_argument(
        "--within",
        type=float,
        default=MISSED_HEARTBEATS * HEARTBEAT_FREQUENCY_S,
        help="seconds without a heartbeat before a run is Crashed (default "
        f"{MISSED_HEARTBEATS * HEARTBEAT_FREQUENCY_S}: {MISSED_HEARTBEATS} heartbeats of {HEARTBEAT_FREQUENCY_S} s)",
    )
    args = parser.parse_args(argv)
    if args.within < 10:
        print("error: --within must be at least 10 seconds", file=sys.stderr)
        return 2
    automation = ensure_zombie_automation(args.within)
    print(f"automation {automation.name!r} ({automation.id}): flow runs silent for {args.within:.0f} s -> Crashed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
