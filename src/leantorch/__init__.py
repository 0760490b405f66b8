"""leantorch: make PyTorch models cheaper and prove it (measure -> transform -> verify -> report).

The sub-packages load on first use, so ``import leantorch`` costs little and still gives
``leantorch.measure.profile``, ``leantorch.compress.quant.int8_dynamic``,
``leantorch.nn.Attention``, ``leantorch.ops.attention``, ``leantorch.models.load_model``...
"""

from leantorch._lazy import lazy_submodules as _lazy_submodules
from leantorch.errors import LeanError, LeanTypeError, UnknownModelError
from leantorch.serialize import load, save

__version__ = "0.1.0"

__all__ = ["LeanError", "LeanTypeError", "UnknownModelError", "__version__", "load", "save"]

# imported on first attribute access (PEP 562); see leantorch/_lazy.py
_SUBMODULES = ("compress", "data", "distributed", "errors", "inputs", "io", "measure", "models",
              "nn", "ops", "serialize", "validate")
__getattr__, __dir__ = _lazy_submodules(__name__, _SUBMODULES, globals())
