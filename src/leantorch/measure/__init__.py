"""What a model costs: FLOPs and MACs (never confused), parameters, bytes moved, activation and
peak memory, latency and a roofline view, per module, counted at the aten-op level.

>>> from leantorch.measure import profile
>>> report = profile(model, example_input)   # doctest: +SKIP
>>> print(report)                             # doctest: +SKIP
"""

from leantorch.measure.formulas import Cost, OpCall, attention_pairs, register_formula
from leantorch.measure.hardware import kernel_paths, machine_info, machine_summary, matrix_peaks
from leantorch.measure.latency import (
    CandidateTiming,
    Comparison,
    Latency,
    Spread,
    compare_interleaved,
    time_callable,
)
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
    "CandidateTiming",
    "Comparison",
    "Cost",
    "CostReport",
    "DeviceSpec",
    "Latency",
    "MemoryCost",
    "ModuleCost",
    "OpCall",
    "ParamCount",
    "PhaseCost",
    "Spread",
    "attention_pairs",
    "calibrate",
    "compare_interleaved",
    "count_params",
    "kernel_paths",
    "machine_info",
    "machine_summary",
    "matrix_peaks",
    "profile",
    "register_formula",
    "time_callable",
]
