"""Panoptic-DeepLab."""

from importlib import import_module
from typing import Any

# Public names, imported on first use (PEP 562) so that `import panoptic_deeplab` (and the CLI's
# --help) does not pay for torch.
_LAZY_EXPORTS = {
    "Predictor": "panoptic_deeplab.inference.predictor",
    "PanopticResult": "panoptic_deeplab.inference.results",
    "PanopticDeepLab": "panoptic_deeplab.modeling.panoptic_deeplab",
    "build_model": "panoptic_deeplab.modeling.panoptic_deeplab",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'panoptic_deeplab' has no attribute {name!r}")
