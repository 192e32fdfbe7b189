"""The torchvision workaround: with icm_core imported first, torchvision, transformers and open_clip import
whether or not torchvision's C++ library loads next to the CPU torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icm_core.models.torchvision_compat import ensure_torchvision_importable, torchvision_ops_available


REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_imports_in_a_fresh_process():
    code = (
        "import icm_core, torchvision, open_clip, peft\n"
        "from transformers import DetrConfig, LlamaConfig\n"
        "from facenet_pytorch.models.mtcnn import ONet\n"
        "from icm_core.models.torchvision_compat import torchvision_ops_available\n"
        "print(torchvision.__version__, torchvision_ops_available())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0].startswith("0.28.0")


def test_idempotent_and_consistent():
    first = ensure_torchvision_importable()
    assert ensure_torchvision_importable() == first
    # Either torchvision's own kernels run, or only the schema exists (no kernel): never a half state.
    torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "CPU")
    assert has_kernel == bool(first) == torchvision_ops_available()


def test_when_the_library_loads_nothing_is_redefined():
    # In a fresh process where torchvision's ops were registered first (any machine where the library loads),
    # the step must report native ops and define nothing. Simulate "already registered" with our own schema
    # defined before the check: the step must not try to define it again (which would raise).
    code = (
        "import torch\n"
        "lib = torch.library.Library('torchvision', 'DEF')\n"
        "lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "lib.impl('nms', lambda d, s, t: torch.arange(d.shape[0]), 'CPU')\n"
        "import icm_core.models.torchvision_compat as c\n"
        "print(c.ensure_torchvision_importable(), c.torchvision_ops_available())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]
