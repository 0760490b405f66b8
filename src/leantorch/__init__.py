"""leantorch: make PyTorch models cheaper and prove it (measure -> transform -> verify -> report)."""

from leantorch.errors import LeanError, LeanTypeError, UnknownModelError
from leantorch.serialize import load, save

__version__ = "0.1.0"

__all__ = ["LeanError", "LeanTypeError", "UnknownModelError", "__version__", "load", "save"]
