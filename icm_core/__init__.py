"""ICM-LoRA core."""

# Before anything imports torchvision, transformers or peft: keep `import torchvision` working when its
# CUDA-built C++ library cannot load next to the CPU torch (see icm_core/models/torchvision_compat.py). The hook
# imports nothing heavy; it acts when torchvision is first imported.
from icm_core.models.torchvision_compat import install_import_hook as _install_import_hook


_install_import_hook()

__version__ = "0.1.0"
"""The one version string of the project (pyproject.toml reads it; ``icm-lora --version`` prints it)."""
