"""Keep ``import torchvision`` (and so ``import transformers``) working when torchvision's C++ ops cannot load.

PyPI's Linux torchvision wheels are CUDA builds. Next to the CPU torch this project pins, their compiled
library ``torchvision/_C.so`` fails to load; torchvision then still imports its Python parts, but its
``_meta_registrations`` module registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms``
without checking that the ops exist, so ``import torchvision`` raises ``operator torchvision::nms does not
exist``. transformers imports torchvision whenever it is installed, so every transformers import fails too.

:func:`ensure_torchvision_importable` must run before torchvision's first import. If torchvision is not
installed or its library loads, it does nothing. Otherwise it defines the two op schemas (no kernels): the
Python parts of torchvision import, while its C++ ops stay unavailable. :func:`torchvision_ops_available`
tells callers which case they are in (``icm_core.vision.nms`` falls back to a pure-torch NMS).

Two ways it runs, both through :func:`install_import_hook` (an import hook that calls the step right
before torchvision's module executes, so nothing here imports torch until torchvision is really imported):

* ``import icm_core`` installs the hook;
* ``make install`` writes ``icm_lora_torchvision.pth`` into the virtual environment's site-packages
  (``install_pth()``), so the hook is in place at interpreter
  start-up and a user's own script (``from peft import PeftModel``) works without importing the project.
  The ``.pth`` loads this file by path: the ``icm_core`` package itself is not imported.

This module imports only the standard library at import time (the CLI's ``--help`` stays torch-free).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any


logger = logging.getLogger("icm_lora.torchvision_compat")

_STATE: dict[str, bool | None] = {"native_ops": None}
# Kept alive for the life of the process: dropping the Library object would deregister the schemas.
_LIBRARIES: list[Any] = []
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
PTH_NAME = "icm_lora_torchvision.pth"


def _op_exists(name: str) -> bool:
    import torch

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
    import torch

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
    import torch

    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"torchvision::{name}", "CPU"))


def torchvision_ops_available() -> bool:
    """True when torchvision is installed and its compiled ops (nms, roi_align, ...) run on CPU."""
    state = ensure_torchvision_importable()
    return bool(state) and _has_kernel("nms")


class _ShimLoader(importlib.abc.Loader):
    """Wraps torchvision's own loader: runs :func:`ensure_torchvision_importable` right before the package
    executes, then steps aside (the hook is removed after the first import)."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _remove_hook()
        try:
            ensure_torchvision_importable()
        except Exception as exc:  # never make an import fail that would have worked without us
            logger.debug("torchvision shim skipped (%s)", exc)
        self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, get_source, ...
        return getattr(self._loader, name)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Finds torchvision like the path finder does, with its loader wrapped in :class:`_ShimLoader`.

    ``importlib.util.find_spec("torchvision")`` (transformers' availability check) goes through here too;
    it only builds a spec, so nothing runs (and torch is not imported) until torchvision really is imported.
    """

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "torchvision" or "torchvision" in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or isinstance(spec.loader, _ShimLoader):
            return spec
        spec.loader = _ShimLoader(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_TorchvisionFinder"]


def install_import_hook() -> None:
    """Arrange for :func:`ensure_torchvision_importable` to run right before torchvision is first imported.

    Cheap (no torch import). Idempotent, also across copies of this module (the ``.pth`` loads its own copy):
    a hook already in place, or a torchvision already imported, leaves nothing to do.
    """
    if "torchvision" in sys.modules or any(type(f).__name__ == "_TorchvisionFinder" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())


def pth_line(source: str | Path | None = None) -> str:
    """The one ``.pth`` line that installs the hook at interpreter start-up, loading this file by path.

    It does nothing when the file is gone (a moved checkout): ``import icm_core`` still installs the hook.
    """
    source = str(Path(source or __file__).resolve())
    return (
        "import importlib.util as _u, os as _o; _f = " + repr(source) + "; "
        "_s = _o.path.isfile(_f) and _u.spec_from_file_location('_icm_lora_torchvision_hook', _f); "
        "_m = _s and _u.module_from_spec(_s); _s and _s.loader.exec_module(_m); _m and _m.install_import_hook()\n"
    )


def install_pth(site_packages: str | Path | None = None) -> Path:
    """Write :data:`PTH_NAME` into ``site_packages`` (default: this interpreter's purelib folder)."""
    import sysconfig

    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / PTH_NAME
    path.write_text(pth_line())
    return path
