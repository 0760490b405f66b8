"""``profile(model, *inputs)``: what a model costs, per module, honestly counted."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.inputs import ExampleInputs, as_call
from leantorch.measure.counter import (
    ROOT,
    CostMode,
    LiveMemory,
    ModuleTally,
    ModuleTracker,
    SavedTensors,
    Tally,
    path_depth,
    storage_key,
)
from leantorch.measure.hardware import machine_info
from leantorch.measure.latency import time_callable
from leantorch.measure.report import (
    CostReport,
    MemoryCost,
    ModuleCost,
    ParamCount,
    PhaseCost,
)
from leantorch.measure.roofline import DeviceSpec, resolve_device_spec

__all__ = ["count_params", "profile"]


def profile(
    model: nn.Module,
    *inputs: Any,
    input_kwargs: Mapping[str, Any] | None = None,
    example_inputs: ExampleInputs = None,
    backward: bool = False,
    train: bool | None = None,
    activations: bool = True,
    latency: bool = True,
    runs: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    device_spec: str | DeviceSpec | None = "auto",
) -> CostReport:
    """Count what ``model(*inputs, **input_kwargs)`` costs.

    Every aten op that executes is costed (see :mod:`leantorch.measure.formulas`) and booked to
    the modules running it, so a data-dependent model costs what it ran on these inputs.

    Args:
        model: any ``nn.Module``. It is left exactly as it was: same train/eval mode, buffers,
            gradients and RNG state, and no hooks, even when its forward raises.
        inputs: positional inputs. A single ``Mapping`` is passed as keyword inputs
            (what a Hugging Face tokenizer returns).
        input_kwargs: keyword inputs.
        example_inputs: the inputs in any form :func:`leantorch.inputs.as_call` reads (a
            tensor, a tuple or list of positional inputs, a mapping of keyword inputs, or
            ``(args, kwargs)``), as every transform takes them; give either these or
            ``inputs`` / ``input_kwargs``, not both.
        backward: also run backward (gradients of every output w.r.t. every parameter and
            input that requires grad, seeded with ones) and count its FLOPs per module.
            ``.grad`` attributes are not touched.
        train: run in training mode (True) or eval mode (False); None keeps the model's mode.
        activations: measure the bytes autograd saves for backward. Without ``backward`` this
            takes one extra grad-enabled forward with no counting.
        latency: time ``runs`` forwards (forward + backward with ``backward``) after ``warmup``.
        threads: set ``torch.set_num_threads`` for the call (restored after); None keeps it.
        device_spec: roofline device: ``"auto"`` (measured here on a CPU, the datasheet of a
            known GPU), ``"measure"``, a datasheet name such as ``"h100-sxm"``, a
            :class:`DeviceSpec`, or None for no roofline.

    Returns:
        A :class:`CostReport`; ``print(report)`` shows the module tree.

    Example::

        >>> import torch
        >>> from leantorch.measure import profile
        >>> net = torch.nn.Linear(64, 32)
        >>> report = profile(net, torch.randn(8, 64), latency=False, device_spec=None)
        >>> report.macs, report.flops  # 8*64*32 MACs; 2 FLOPs per MAC + 8*32 bias adds
        (16384, 33024)
    """
    if not isinstance(model, nn.Module):
        raise LeanTypeError(
            f"profile: model must be a torch.nn.Module, got {type(model).__name__} "
            f"{describe(model)}"
        )
    args, kwargs = _split_inputs(inputs, input_kwargs, example_inputs)
    for name, value in (("runs", runs), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (name == "runs"):
            raise LeanError(f"profile: {name} must be an integer >= {int(name == 'runs')}, "
                            f"got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise LeanError(f"profile: threads must be a positive integer or None, got {threads!r}")

    device = _model_device(model, args, kwargs)
    if device.type == "meta" and (latency or (isinstance(device_spec, str) and
                                              device_spec.lower() in ("auto", "measure"))):
        # meta tensors run no kernels: a time or a measured peak would be made up
        raise LeanError("profile: a model on the meta device can be counted but not timed; "
                        "pass latency=False and device_spec=None (or a datasheet name)")
    params = _unique(model.parameters())
    buffers = _unique(model.buffers())
    input_tensors = _tensors((args, kwargs))
    weights = {k[0] for k in map(storage_key, params + buffers) if k is not None}
    resident = weights | {k[0] for k in map(storage_key, input_tensors) if k is not None}
    notes: list[str] = []

    def call() -> Any:
        return model(*args, **kwargs)

    with _preserved(model, threads, device, train):
        dtype = params[0].dtype if params else torch.float32
        spec = resolve_device_spec(device_spec, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # -- pass 1: count every op (and the backward, when asked)
        tracker = ModuleTracker(model, backward=backward)
        memory = LiveMemory(resident)
        mode = CostMode(tracker, weights, memory, spec)
        saved = SavedTensors(tracker, weights) if backward else None
        try:
            with torch.set_grad_enabled(backward), saved or contextlib.nullcontext(), mode:
                output = _run(call, args, kwargs)
                if backward:
                    _backward(output, params, input_tensors, tracker)
                del output
        finally:
            tracker.remove()
            memory.close()
        device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        # -- pass 2: bytes saved for backward by a training forward (counted in pass 1 above)
        if saved is None and activations:
            needs_grad = any(p.requires_grad for p in params) or any(
                t.requires_grad for t in input_tensors)
            tracker2 = ModuleTracker(model, backward=False)
            saved = SavedTensors(tracker2, weights)
            try:
                with torch.enable_grad(), saved:
                    _run(call, args, kwargs)
            finally:
                tracker2.remove()
            if not needs_grad:
                notes.append("no parameter or input requires grad: a training step would save "
                             "no activations")
        # -- pass 3: wall-clock latency
        timing = None
        if latency:
            if backward:
                def step() -> None:
                    _backward(call(), params, input_tensors)
                what = "forward + backward"
            else:
                def step() -> None:
                    with torch.no_grad():
                        call()
                what = "forward (no_grad)"
            timing = time_callable(step, runs=runs, warmup=warmup, device=device, what=what)
        training = model.training
        machine = machine_info()  # inside: the thread count the run used

    report = _build_report(
        model, args, kwargs, params, buffers, input_tensors, tracker, mode, memory, saved,
        spec, timing, training, backward, device_peak, notes,
    )
    report.machine = machine
    return report


# --------------------------------------------------------------------------- helpers
def _split_inputs(
    inputs: tuple[Any, ...], input_kwargs: Mapping[str, Any] | None,
    example_inputs: ExampleInputs = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_inputs is not None:
        if inputs or input_kwargs is not None:
            raise LeanError(
                f"profile: example_inputs (a {type(example_inputs).__name__}) was given together "
                f"with {len(inputs)} positional input(s) and input_kwargs="
                f"{'None' if input_kwargs is None else 'a ' + type(input_kwargs).__name__}; "
                "give the inputs one way: either "
                "profile(model, *inputs, input_kwargs=...) or profile(model, example_inputs=...)")
        return as_call(example_inputs, owner="profile: example_inputs")
    if input_kwargs is not None and not isinstance(input_kwargs, Mapping):
        raise LeanTypeError(f"profile: input_kwargs must be a mapping of name -> input, got "
                            f"{type(input_kwargs).__name__}")
    kwargs = dict(input_kwargs or {})
    if len(inputs) == 1 and isinstance(inputs[0], Mapping) and not kwargs:
        return (), dict(inputs[0])
    return tuple(inputs), kwargs


def _tensors(values: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(values)
    return _unique(t for t in flat if isinstance(t, torch.Tensor))


def _unique(tensors: Any) -> list[torch.Tensor]:
    """Distinct tensors: by identity, then by the memory they view (tied weights count once)."""
    seen_ids: set[int] = set()
    seen_views: set[tuple[Any, ...]] = set()
    result = []
    for t in tensors:
        if id(t) in seen_ids:
            continue
        seen_ids.add(id(t))
        try:
            view = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device)
        except RuntimeError:
            view = None
        if view is not None and view[0] != 0:
            if view in seen_views:
                continue
            seen_views.add(view)
        result.append(t)
    return result


def _model_device(model: nn.Module, args: Any, kwargs: Any) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()) + _tensors((args, kwargs)):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _preserved(
    model: nn.Module, threads: int | None, device: torch.device, train: bool | None
) -> Iterator[None]:
    """Run the block, then put back everything it could have changed."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in _unique(model.buffers())]
    old_threads = torch.get_num_threads()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            if threads is not None:
                torch.set_num_threads(threads)
            if train is not None:
                model.train(train)
            yield
    finally:
        torch.set_num_threads(old_threads)
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, value in buffers:
                if buffer.shape == value.shape:
                    buffer.copy_(value)


def _run(call: Callable[[], Any], args: Any, kwargs: Any) -> Any:
    try:
        return call()
    except Exception as error:
        shapes = ", ".join(_describe_input(t) for t in tree_flatten((args, kwargs))[0]) or "none"
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise LeanError(
            f"profile: the model's forward failed on the example inputs ({shapes}): "
            f"{type(error).__name__}: {message}"
        ) from error


def _describe_input(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return describe(value, 20)


def _backward(
    output: Any,
    params: list[torch.Tensor],
    inputs: list[torch.Tensor],
    tracker: ModuleTracker | None = None,
) -> None:
    outputs = [t for t in _tensors(output) if t.requires_grad and t.is_floating_point()]
    targets = [t for t in params + inputs if t.requires_grad]
    if not outputs or not targets:
        raise LeanError(
            "profile(backward=True): nothing to differentiate: no output requires grad (are "
            "all parameters frozen and no input requires grad?)"
        )
    seeds = [torch.ones_like(t) for t in outputs]
    if tracker is not None:
        tracker.start_backward(outputs)
    torch.autograd.grad(outputs, targets, seeds, allow_unused=True)


def count_params(module: nn.Module) -> ParamCount:
    """Parameters and buffers of ``module``, each distinct tensor once."""
    params = _unique(module.parameters())
    buffers = _unique(module.buffers())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return ParamCount(
        total=total,
        trainable=trainable,
        frozen=total - trainable,
        bytes=sum(p.numel() * p.element_size() for p in params),
        buffers=sum(b.numel() for b in buffers),
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
    )


def _phase(tally: Tally) -> PhaseCost:
    return PhaseCost(**{name: getattr(tally, name) for name in Tally.__dataclass_fields__})


def _build_report(
    model: nn.Module,
    args: Any,
    kwargs: Any,
    params: list[torch.Tensor],
    buffers: list[torch.Tensor],
    input_tensors: list[torch.Tensor],
    tracker: ModuleTracker,
    mode: CostMode,
    memory: LiveMemory,
    saved: SavedTensors | None,
    spec: DeviceSpec | None,
    timing: Any,
    training: bool,
    backward: bool,
    device_peak: int | None,
    notes: list[str],
) -> CostReport:
    saved_by_module = saved.by_module if saved is not None else None
    entries: list[ModuleCost] = []

    def visit(module: nn.Module, path: str) -> ModuleCost:
        tally = mode.modules.get(path, ModuleTally())
        children = []
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if tracker.paths.get(child) == child_path:  # a shared module sits under its first name
                children.append((child, child_path))
        entry = ModuleCost(
            path=path,
            type=type(module).__name__,
            depth=path_depth(path),
            calls=tracker.calls.get(path, 0),
            params=count_params(module),
            forward=_phase(tally.forward),
            backward=_phase(tally.backward) if backward else None,
            saved_bytes=None if saved_by_module is None else sum(
                b for p, b in saved_by_module.items()
                if p == path or path == ROOT or p.startswith(path + ".")),
            children=[p for _, p in children],
        )
        entries.append(entry)
        child_entries = [visit(child, child_path) for child, child_path in children]
        if entry.calls == 0 and path != ROOT:  # a container (ModuleList...): sum its children
            for child in child_entries:
                entry.forward.add(child.forward)
                if entry.backward is not None and child.backward is not None:
                    entry.backward.add(child.backward)
        return entry

    visit(model, ROOT)
    root = mode.modules.get(ROOT, ModuleTally())
    param_count = count_params(model)
    input_bytes = sum(t.untyped_storage().nbytes() for t in input_tensors
                      if storage_key(t) is not None)
    resident = param_count.bytes + param_count.buffer_bytes + input_bytes
    memory_cost = MemoryCost(
        param_bytes=param_count.bytes,
        buffer_bytes=param_count.buffer_bytes,
        input_bytes=input_bytes,
        saved_activation_bytes=saved.total if saved is not None else None,
        peak_activation_bytes=memory.peak,
        peak_bytes=resident + memory.peak,
        peak_module=memory.peak_at,
        device_peak_bytes=device_peak,
    )
    inputs_summary = []
    for index, value in enumerate(args):
        inputs_summary.extend(_input_entries(f"arg{index}", value))
    for name, value in kwargs.items():
        inputs_summary.extend(_input_entries(name, value))
    ops = {
        name: {"calls": op.calls, "backward_calls": op.backward_calls, "flops": op.flops,
               "macs": op.macs, "bytes": op.bytes}
        for name, op in sorted(mode.ops.items(), key=lambda item: -item[1].flops)
    }
    return CostReport(
        model=type(model).__name__,
        inputs=inputs_summary,
        training=training,
        params=param_count,
        forward=_phase(root.forward),
        backward=_phase(root.backward) if backward else None,
        memory=memory_cost,
        latency=timing,
        device=spec,
        modules=entries,
        ops=ops,
        uncounted=mode.uncounted,
        notes=notes,
    )


def _input_entries(name: str, value: Any) -> list[dict[str, Any]]:
    flat, _ = tree_flatten(value)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    return [
        {"name": name if len(tensors) == 1 else f"{name}[{i}]", "shape": list(t.shape),
         "dtype": str(t.dtype).removeprefix("torch.")}
        for i, t in enumerate(tensors)
    ]
