"""Keep ``import torchvision`` (and so ``import transformers``) working when torchvision's C++ ops cannot load.

PyPI's Linux torchvision wheels are CUDA builds. Next to the CPU torch this project pins, their compiled
library ``torchvision/_C.so`` fails to load; torchvision then still imports its Python parts, but its
``_meta_registrations`` module registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms``
without checking that the ops exist, so ``import torchvision`` raises ``operator torchvision::nms does not
exist``. transformers imports torchvision whenever it is installed, so every transformers import fails too.

:func:`ensure_torchvision_importable` runs once, before anything imports torchvision, transformers or
peft (``icm_core/__init__.py`` calls it). If torchvision is not installed or its library loads, it does
nothing. Otherwise it defines the two op schemas (no kernels): the Python parts of torchvision import,
while its C++ ops stay unavailable. :func:`torchvision_ops_available` tells callers which case they are
in (``icm_core.vision.nms`` falls back to a pure-torch NMS).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch


logger = logging.getLogger("icm_lora.torchvision_compat")

_STATE: dict[str, bool | None] = {"native_ops": None}
# Kept alive for the life of the process: dropping the Library object would deregister the schemas.
_LIBRARIES: list[torch.library.Library] = []
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> bool | None:
    """Make ``import torchvision`` safe; return whether its native ops work (None: torchvision absent).

    Idempotent. Must run before the first ``import torchvision`` of the process to have any effect.
    """
    if _STATE["native_ops"] is not None:
        return _STATE["native_ops"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    if _op_exists("nms"):  # loaded already (torchvision imported fine, or a previous definition)
        _STATE["native_ops"] = _has_kernel("nms")
        return _STATE["native_ops"]
    folder = Path(next(iter(spec.submodule_search_locations)))
    library = next(iter(sorted(folder.glob("_C.*so"))), None)
    if library is not None:
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:
            logger.debug("torchvision's C++ library does not load here (%s); defining its op schemas", exc)
    if _op_exists("nms"):
        _STATE["native_ops"] = True
        return True
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        name = schema.split("(", 1)[0]
        if not _op_exists(name):
            lib.define(schema)
    _LIBRARIES.append(lib)
    _STATE["native_ops"] = False
    return False


def _has_kernel(name: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"torchvision::{name}", "CPU"))


def torchvision_ops_available() -> bool:
    """True when torchvision is installed and its compiled ops (nms, roi_align, ...) run on CPU."""
    state = ensure_torchvision_importable()
    return bool(state) and _has_kernel("nms")
