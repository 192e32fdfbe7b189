"""Prefect deployment pull steps (``prefect.yaml`` ``pull:``), run by each flow run before the flow loads.

``use_checkout`` makes a worker on any machine run the deployment from its own checkout of this repository:
the folder named by ``$ICM_LORA_HOME`` when the worker's environment sets it, else the checkout that the
running Python environment has installed (the venv's editable install of icm-lora). Without it, Prefect
records the deploying machine's folder, which a worker elsewhere does not have.
"""

from __future__ import annotations

import os
from pathlib import Path


HOME_ENV = "ICM_LORA_HOME"


def checkout_folder() -> Path:
    """This machine's checkout: ``$ICM_LORA_HOME``, else the folder the installed ``flows`` package lives in."""
    configured = os.environ.get(HOME_ENV, "").strip()
    return Path(configured).expanduser().resolve() if configured else Path(__file__).resolve().parents[1]


def use_checkout() -> dict[str, str]:
    """Pull step: change into this machine's checkout (see :func:`checkout_folder`).

    Raises:
        FileNotFoundError: The folder is not a checkout of icm-lora (no prefect.yaml and flows/ in it).
    """
    folder = checkout_folder()
    if not (folder / "prefect.yaml").is_file() or not (folder / "flows").is_dir():
        raise FileNotFoundError(
            f"{folder}: not a checkout of icm-lora (no prefect.yaml / flows/); set {HOME_ENV} in the worker's "
            "environment to this machine's checkout"
        )
    os.chdir(folder)
    return {"directory": str(folder)}
