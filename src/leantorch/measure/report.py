"""The result of :func:`leantorch.measure.profile`: totals, a per-module tree, per-op totals,
what could not be counted, and the stable JSON form (``schema_version`` 1, documented in
``docs/measure.md``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantorch.measure.latency import Latency
from leantorch.measure.roofline import DeviceSpec

__all__ = [
    "SCHEMA_VERSION",
    "CostReport",
    "MemoryCost",
    "ModuleCost",
    "ParamCount",
    "PhaseCost",
    "fmt_bytes",
    "fmt_count",
]

SCHEMA_VERSION = 1


@dataclass
class PhaseCost:
    """Cost of one phase (forward or backward) of a module or the whole model.

    ``flops`` counts every floating-point operation (a MAC is 2 of them); ``macs`` are the
    multiply-accumulates of matmul-class ops only. ``roofline_seconds`` is the sum over ops of
    ``max(flops / peak, bytes / bandwidth)`` on the report's device: a lower bound on time.
    """

    flops: int = 0
    macs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    weight_bytes_read: int = 0
    ops: int = 0
    compute_seconds: float = 0.0
    memory_seconds: float = 0.0
    roofline_seconds: float = 0.0

    @property
    def matmul_flops(self) -> int:
        """FLOPs of matmul-class ops: 2 per MAC."""
        return 2 * self.macs

    @property
    def other_flops(self) -> int:
        """FLOPs outside matmul-class ops: bias adds, softmax, norms, activations, reductions."""
        return self.flops - 2 * self.macs

    @property
    def bytes(self) -> int:
        """Bytes read plus bytes written."""
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float | None:
        """Arithmetic intensity: FLOPs per byte read or written (None when nothing moved)."""
        return self.flops / self.bytes if self.bytes else None

    @property
    def bound(self) -> str | None:
        """``"compute"`` or ``"memory"``: which roofline term dominates (None without a device)."""
        if self.compute_seconds == 0 and self.memory_seconds == 0:
            return None
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

    def add(self, other: PhaseCost) -> None:
        """Add ``other``'s counts into this one, field by field."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields and the derived values (matmul/other FLOPs,
        intensity, bound)."""
        return {
            "flops": self.flops,
            "macs": self.macs,
            "matmul_flops": self.matmul_flops,
            "other_flops": self.other_flops,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "weight_bytes_read": self.weight_bytes_read,
            "ops": self.ops,
            "intensity": self.intensity,
            "compute_seconds": self.compute_seconds,
            "memory_seconds": self.memory_seconds,
            "roofline_seconds": self.roofline_seconds,
            "bound": self.bound,
        }


@dataclass
class ParamCount:
    """Parameters counted once per distinct tensor (tied weights count once)."""

    total: int = 0
    trainable: int = 0
    frozen: int = 0
    bytes: int = 0
    buffers: int = 0
    buffer_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class MemoryCost:
    """Memory of the profiled run, in bytes.

    ``saved_activation_bytes``: distinct storages autograd keeps for backward (weights
    excluded; None when not measured). ``peak_activation_bytes``: the most memory held at once by tensors created during
    the run; ``peak_bytes`` adds the resident parameters, buffers and inputs.
    """

    param_bytes: int = 0
    buffer_bytes: int = 0
    input_bytes: int = 0
    saved_activation_bytes: int | None = None  # None: not measured (activations=False)
    peak_activation_bytes: int = 0
    peak_bytes: int = 0
    peak_module: str = ""
    device_peak_bytes: int | None = None  # the CUDA caching allocator's peak, when on CUDA

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class ModuleCost:
    """One module of the tree. Costs are inclusive: a module's FLOPs contain its children's."""

    path: str
    type: str
    depth: int
    calls: int
    params: ParamCount
    forward: PhaseCost
    backward: PhaseCost | None
    saved_bytes: int | None  # None: not measured
    children: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The path, or ``"(model)"`` for the model itself, for display."""
        return self.path or "(model)"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (parameters flattened to counts and bytes)."""
        return {
            "path": self.path,
            "type": self.type,
            "depth": self.depth,
            "calls": self.calls,
            "params": self.params.total,
            "trainable_params": self.params.trainable,
            "param_bytes": self.params.bytes,
            "forward": self.forward.to_dict(),
            "backward": None if self.backward is None else self.backward.to_dict(),
            "saved_activation_bytes": self.saved_bytes,
            "children": list(self.children),
        }


@dataclass
class CostReport:
    """What a model costs on the example inputs. ``str(report)`` is a readable table."""

    model: str
    inputs: list[dict[str, Any]]
    training: bool
    params: ParamCount
    forward: PhaseCost
    backward: PhaseCost | None
    memory: MemoryCost
    latency: Latency | None
    device: DeviceSpec | None
    modules: list[ModuleCost]
    ops: dict[str, dict[str, int]]
    uncounted: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] | None = None  # measure.hardware.machine_info() where it ran

    # ---- shortcuts
    @property
    def flops(self) -> int:
        """Forward FLOPs (a MAC counts as 2)."""
        return self.forward.flops

    @property
    def macs(self) -> int:
        """Forward multiply-accumulates of matmul-class ops (not FLOPs)."""
        return self.forward.macs

    @property
    def backward_flops(self) -> int | None:
        """Backward FLOPs, or None when the backward pass was not profiled."""
        return None if self.backward is None else self.backward.flops

    def module(self, path: str) -> ModuleCost:
        """The entry of the module at ``path`` (``""`` is the model itself)."""
        for entry in self.modules:
            if entry.path == path:
                return entry
        known = ", ".join(repr(m.path) for m in self.modules[:8])
        raise KeyError(f"no module at path {path!r}; paths look like: {known}, ...")

    # ---- machine form
    def to_dict(self) -> dict[str, Any]:
        """The whole report as a JSON-ready dict (``schema``/``schema_version`` first), the
        form ``profile --json`` prints."""
        return {
            "schema": "leantorch.cost_report",
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "inputs": self.inputs,
            "training": self.training,
            "params": self.params.to_dict(),
            "forward": self.forward.to_dict(),
            "backward": None if self.backward is None else self.backward.to_dict(),
            "memory": self.memory.to_dict(),
            "latency": None if self.latency is None else self.latency.to_dict(),
            "device": None if self.device is None else self.device.to_dict(),
            "modules": [m.to_dict() for m in self.modules],
            "ops": self.ops,
            "uncounted": self.uncounted,
            "notes": list(self.notes),
            "machine": self.machine,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        """The report as JSON; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            from leantorch.io import atomic_write_text

            atomic_write_text(Path(path), text + "\n")
        return text

    def table(self, depth: int = 2) -> str:
        """A plain-text table of the module tree down to ``depth`` plus the totals."""
        from leantorch.measure.render import render_text

        return render_text(self, depth=depth)

    def __str__(self) -> str:
        return self.table()


def fmt_count(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M'."""
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip() if float(n).is_integer() else f"{n:.2f} {unit}".rstrip()


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.50 KiB'."""
    if n is None:
        return "-"
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"
