"""``python -m icm_core``: the stage commands without Prefect (``icm_core/cli.py``)."""

from icm_core.cli import main


raise SystemExit(main())
