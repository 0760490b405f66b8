"""What a model costs: FLOPs and MACs (never confused), parameters, bytes moved, activation and
peak memory, latency and a roofline view, per module, counted at the aten-op level.

>>> from leantorch.measure import profile
>>> report = profile(model, example_input)   # doctest: +SKIP
>>> print(report)                             # doctest: +SKIP
"""

from leantorch.measure.formulas import Cost, OpCall, attention_pairs, register_formula
from leantorch.measure.latency import Latency, time_callable
from leantorch.measure.profile import count_params, profile
from leantorch.measure.report import (
    CostReport,
    MemoryCost,
    ModuleCost,
    ParamCount,
    PhaseCost,
)
from leantorch.measure.roofline import DATASHEETS, DeviceSpec, calibrate

__all__ = [
    "DATASHEETS",
    "Cost",
    "CostReport",
    "DeviceSpec",
    "Latency",
    "MemoryCost",
    "ModuleCost",
    "OpCall",
    "ParamCount",
    "PhaseCost",
    "attention_pairs",
    "calibrate",
    "count_params",
    "profile",
    "register_formula",
    "time_callable",
]
