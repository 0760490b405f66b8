"""The counting machinery: a dispatch mode that costs every aten op as it executes, a module
tracker that says which module ran it (forward and backward), and trackers for live and saved
activation memory.

These are internals of :func:`leantorch.measure.profile`; use that.
"""

from __future__ import annotations

import functools
import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from leantorch.measure.formulas import (
    NO_WORK,
    Cost,
    OpCall,
    get_formula,
    is_view,
    tensor_bytes,
)
from leantorch.measure.roofline import DeviceSpec

__all__ = ["ROOT", "CostMode", "LiveMemory", "ModuleTally", "ModuleTracker", "OpTally",
           "SavedTensors", "Tally", "in_backward", "is_ancestor", "path_depth", "storage_key"]

ROOT = ""  # path of the profiled model itself


def in_backward() -> bool:
    """True while the autograd engine is running a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of ``t``'s storage, or None for tensors without real memory."""
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return None if ptr == 0 else (ptr, storage.nbytes())


@dataclass
class Tally:
    """Additive cost of one phase (forward or backward) of one module or of the whole model."""

    flops: int = 0
    macs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    weight_bytes_read: int = 0
    ops: int = 0
    compute_seconds: float = 0.0  # sum over ops of flops / peak
    memory_seconds: float = 0.0  # sum over ops of bytes / bandwidth
    roofline_seconds: float = 0.0  # sum over ops of max(compute, memory): a lower bound on time

    def add(self, other: Tally) -> None:
        """Add ``other``'s counts into this tally, field by field."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ModuleTally:
    forward: Tally = field(default_factory=Tally)
    backward: Tally = field(default_factory=Tally)
    calls: int = 0
    saved_bytes: int = 0


@dataclass
class OpTally:
    calls: int = 0
    flops: int = 0
    macs: int = 0
    bytes: int = 0
    backward_calls: int = 0


class ModuleTracker:
    """Knows which modules of ``model`` are running, in forward and in backward.

    Forward: a stack maintained by per-module pre/post hooks (``always_call`` so an exception
    cannot leave a module on it). Backward: a module becomes active when the gradients of its
    outputs are ready and inactive when those of its inputs are (``register_multi_grad_hook``);
    activating a module retires every active module that is neither its ancestor nor its
    descendant, so a module whose inputs need no gradient does not stay active for the rest of
    the pass. Gradient hooks do not fire for the tensors that seed the backward pass, so
    :meth:`start_backward` activates the innermost modules that produced them.
    All hooks are removed by :meth:`remove`.
    """

    def __init__(self, model: nn.Module, backward: bool) -> None:
        self.paths: dict[nn.Module, str] = {}
        for name, module in model.named_modules():
            self.paths.setdefault(module, name)
        self.track_backward = backward
        self.stack: list[str] = []
        self.bw_active: set[str] = set()
        self.calls: dict[str, int] = defaultdict(int)
        self._produced: dict[int, tuple[weakref.ref, str]] = {}  # output tensor -> innermost module
        self._handles: list[Any] = []
        self._grad_handles: list[Any] = []
        for module, path in self.paths.items():
            self._handles.append(module.register_forward_pre_hook(
                functools.partial(self._pre, path), prepend=True))
            self._handles.append(module.register_forward_hook(
                functools.partial(self._post, path), always_call=True))

    def remove(self) -> None:
        """Remove every hook this tracker put on the model (the model is as before)."""
        for handle in self._handles + self._grad_handles:
            handle.remove()
        self._handles.clear()
        self._grad_handles.clear()
        self._produced.clear()

    def __enter__(self) -> ModuleTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @staticmethod
    def _grad_tensors(values: Any) -> list[torch.Tensor]:
        flat, _ = tree_flatten(values)
        return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]

    def _pre(self, path: str, module: nn.Module, args: Any) -> None:
        if not self.stack:
            self.bw_active.clear()
        self.stack.append(path)
        self.calls[path] += 1
        if self.track_backward and torch.is_grad_enabled():
            # leaves are left out: autograd.grad cannot hook them (torch refuses a leaf in
            # _will_engine_execute_node). A module fed only by leaves then stays active until
            # the next module's backward starts, which is where its own backward ends anyway.
            tensors = [t for t in self._grad_tensors(args) if t.grad_fn is not None]
            if tensors:
                self._grad_handles.append(register_multi_grad_hook(
                    tensors, functools.partial(self._bw_exit, path)))

    def _post(self, path: str, module: nn.Module, args: Any, output: Any) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] == path:
                del self.stack[i]
                break
        if self.track_backward and torch.is_grad_enabled() and output is not None:
            tensors = self._grad_tensors(output)
            for t in tensors:  # the first module to return a tensor is the innermost
                self._produced.setdefault(id(t), (weakref.ref(t), path))
            if tensors:
                self._grad_handles.append(register_multi_grad_hook(
                    tensors, functools.partial(self._bw_enter, path)))

    def start_backward(self, roots: Iterable[torch.Tensor]) -> None:
        """Activate the modules that produced ``roots``, the tensors backward starts from."""
        self.bw_active = set()
        for t in roots:
            ref, path = self._produced.get(id(t), (None, None))
            if ref is not None and ref() is t:
                self._bw_enter(path, None)

    def _bw_enter(self, path: str, grads: Any) -> None:
        self.bw_active = {p for p in self.bw_active
                          if is_ancestor(p, path) or is_ancestor(path, p)}
        self.bw_active.add(path)

    def _bw_exit(self, path: str, grads: Any) -> None:
        self.bw_active.discard(path)

    def active(self) -> tuple[set[str], str]:
        """(every active module path including the root, the innermost one)."""
        if in_backward():
            paths = self.bw_active | {ROOT}
            innermost = max(paths, key=path_depth)
        else:
            paths = set(self.stack) | {ROOT}
            innermost = self.stack[-1] if self.stack else ROOT
        return paths, innermost


def is_ancestor(parent: str, child: str) -> bool:
    """Whether module path ``parent`` contains ``child`` (a path is its own ancestor; the
    model's root path ``""`` is everyone's)."""
    return parent == ROOT or child == parent or child.startswith(parent + ".")


def path_depth(path: str) -> int:
    """Depth in the module tree: 0 for the model itself, 1 for ``"encoder"``, 2 for
    ``"encoder.layer"``..."""
    return 0 if path == ROOT else path.count(".") + 1


class LiveMemory:
    """Bytes of tensor storage alive at each moment, counting only storage created during the
    run (weights, buffers and inputs are resident and reported apart).

    Every output tensor of every op is followed by a weak reference; a storage is freed when the
    last tensor using it dies. Tensors the autograd graph keeps alive stay alive here too.
    """

    def __init__(self, resident: set[int]) -> None:
        self.resident = resident
        self._sizes: dict[int, int] = {}
        self._counts: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}  # by id: weakrefs to tensors compare by value
        self.live = 0
        self.peak = 0
        self.peak_at = ROOT
        self.closed = False

    def track(self, tensors: Iterable[torch.Tensor], where: str) -> None:
        """Count the storages of ``tensors`` (an op's outputs, run inside module path
        ``where``) as live until their last tensor dies; update the peak."""
        for t in tensors:
            key = storage_key(t)
            if key is None or key[0] in self.resident:
                continue
            ptr, nbytes = key
            if ptr not in self._counts:
                self._counts[ptr] = 0
                self._sizes[ptr] = nbytes
                self.live += nbytes
                if self.live > self.peak:
                    self.peak, self.peak_at = self.live, where
            self._counts[ptr] += 1
            ref = weakref.ref(t, functools.partial(self._release, ptr))
            self._refs[id(ref)] = ref

    def _release(self, ptr: int, ref: weakref.ref) -> None:
        self._refs.pop(id(ref), None)
        if self.closed or ptr not in self._counts:
            return
        self._counts[ptr] -= 1
        if self._counts[ptr] == 0:
            del self._counts[ptr]
            self.live -= self._sizes.pop(ptr)

    def close(self) -> None:
        """Stop following tensors (later deaths no longer change ``live``)."""
        self.closed = True
        self._refs.clear()


class SavedTensors:
    """Bytes of distinct storages autograd saves for backward, attributed to the innermost
    module that saved them first. Weights are excluded: they exist with or without training."""

    def __init__(self, tracker: ModuleTracker, weights: set[int]) -> None:
        self.tracker = tracker
        self.weights = weights
        self.seen: set[int] = set()
        self.by_module: dict[str, int] = defaultdict(int)
        self.total = 0
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is not None and key[0] not in self.weights and key[0] not in self.seen:
            self.seen.add(key[0])
            self.total += key[1]
            self.by_module[self.tracker.active()[1]] += key[1]
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensors:
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)


class CostMode(TorchDispatchMode):
    """Costs every aten op that executes and books it to the modules running it."""

    def __init__(
        self,
        tracker: ModuleTracker,
        weights: set[int],
        memory: LiveMemory | None = None,
        device: DeviceSpec | None = None,
    ) -> None:
        super().__init__()
        self.tracker = tracker
        self.weights = weights
        self.memory = memory
        self.device = device
        self.modules: dict[str, ModuleTally] = defaultdict(ModuleTally)
        self.ops: dict[str, OpTally] = defaultdict(OpTally)
        self.uncounted: dict[str, dict[str, Any]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        call = OpCall(func, args, kwargs, out)
        paths, innermost = self.tracker.active()
        if self.memory is not None:
            self.memory.track(call.outputs, innermost)
        if is_view(func):
            cost = NO_WORK
        else:
            formula = get_formula(func)
            if formula is None:
                self._uncounted(call.name, innermost, "no formula")
                return
            try:
                result = formula(call)
                cost = result if isinstance(result, Cost) else Cost(int(result))
            except Exception as error:  # a formula that cannot read this call: say so
                self._uncounted(call.name, innermost, f"formula failed: {error}")
                return
        tally = self._tally(call, cost)
        backward = in_backward()
        for path in paths:
            module = self.modules[path]
            (module.backward if backward else module.forward).add(tally)
        op = self.ops[call.name]
        op.calls += 1
        op.backward_calls += int(backward)
        op.flops += tally.flops
        op.macs += tally.macs
        op.bytes += tally.bytes_read + tally.bytes_written

    def _uncounted(self, name: str, where: str, reason: str) -> None:
        entry = self.uncounted.setdefault(name, {"calls": 0, "modules": [], "reason": reason})
        entry["calls"] += 1
        if where not in entry["modules"] and len(entry["modules"]) < 5:
            entry["modules"].append(where)

    def _tally(self, call: OpCall, cost: Cost) -> Tally:
        seen: set[int] = set()
        weight_read = other_read = 0
        for t in call.inputs:
            if id(t) in seen:
                continue
            seen.add(id(t))
            key = storage_key(t)
            if key is not None and key[0] in self.weights:
                weight_read += tensor_bytes(t)
            else:
                other_read += tensor_bytes(t)
        if cost.bytes_read is None:
            read = weight_read + other_read
        else:  # the formula read less than everything: charge weights for what is left over
            read = cost.bytes_read
            weight_read = min(weight_read, max(read - other_read, 0))
        written = (sum(tensor_bytes(t) for t in call.outputs) if cost.bytes_written is None
                   else cost.bytes_written)
        tally = Tally(flops=cost.flops, macs=cost.macs, bytes_read=read, bytes_written=written,
                      weight_bytes_read=weight_read, ops=1)
        if self.device is not None:
            outputs = call.outputs
            dtype = outputs[0].dtype if outputs else torch.float32
            peak = self.device.peak(dtype, matmul=cost.macs > 0)
            tally.compute_seconds = cost.flops / peak
            tally.memory_seconds = (read + written) / self.device.bandwidth
            tally.roofline_seconds = max(tally.compute_seconds, tally.memory_seconds)
        return tally
