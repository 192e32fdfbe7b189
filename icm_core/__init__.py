"""ICM-LoRA core."""

# Before anything imports torchvision, transformers or peft: keep `import torchvision` working when its
# CUDA-built C++ library cannot load next to the CPU torch (see icm_core/_torchvision_compat.py).
from icm_core._torchvision_compat import ensure_torchvision_importable as _ensure_torchvision_importable


_ensure_torchvision_importable()

__version__ = "0.1.0"
