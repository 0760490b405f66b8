"""Recipes: ordered transforms, calibration data, an optional distillation fine-tune and
verification gates, from YAML or Python.

.. code-block:: yaml

    name: lowrank-50
    description: halve the Linear weights by activation-aware SVD, then distil
    calibration: {samples: 128, batch_size: 32, seq_len: 128, holdout: 0.25}
    steps:
      - transform: lowrank.svd
        args: {param_ratio: 0.5, activation_aware: true, exclude: ["*pooler*"]}
    finetune: {steps: 100, lr: 1.0e-4, loss: mse}
    task: embedding
    gates:
      - {metric: cosine_mean, min: 0.9}

Unknown keys, unknown transforms, unknown transform arguments and out-of-range values are
errors that name the key. :func:`run_recipe` applies the steps to a copy of the model, measures
every stage (params, weight bytes, FLOPs, fidelity against the original on held-out data),
fine-tunes, keeps every stage's model, times all stages at the end in interleaved rounds with
the original (:func:`leantorch.measure.compare_interleaved`: a speedup is a per-round ratio,
reported as its median and quartiles), checks the gates (raising :class:`GateFailure` with the
whole report when one fails) and returns a :class:`RecipeResult`; :meth:`RecipeResult.write`
saves the model and the reports, atomically, only for a result that passed.
"""

from __future__ import annotations

import collections.abc
import copy
import inspect
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantorch.compress.change import Change
from leantorch.compress.finetune import LOSSES, distill
from leantorch.compress.progress import showing
from leantorch.compress.registry import (
    accepts,
    argument_check,
    canonical_name,
    get_transform,
)
from leantorch.compress.verify import TASKS, Fidelity, Gate, GateFailure, verify
from leantorch.errors import LeanError, LeanTypeError, describe
from leantorch.inputs import as_call
from leantorch.io import atomic_directory, atomic_write_text, read_text_file
from leantorch.measure.latency import Spread
from leantorch.validate import positive_int, ratio

__all__ = [
    "Calibration",
    "Finetune",
    "Recipe",
    "RecipeData",
    "RecipeResult",
    "Stage",
    "Step",
    "builtin_recipes",
    "load_recipe",
    "recipe_data",
    "run_recipe",
]


# --------------------------------------------------------------------------- validation
def _keys(where: str, value: Any, allowed: Sequence[str], required: Sequence[str] = ()
          ) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise LeanError(f"{where} must be a mapping with keys {', '.join(allowed)}, got "
                        f"{describe(value)}")
    for key in value:
        if key not in allowed:
            raise LeanError(f"{where}: unknown key {key!r}; accepted: {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise LeanError(f"{where}: missing key {key!r}")
    return dict(value)


def _yaml_problem(error: Exception) -> str:
    """One line for a PyYAML error: where (1-based line and column) and what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return f"not valid YAML: {problem}"
    return f"not valid YAML at line {mark.line + 1} column {mark.column + 1}: {problem}"


def _number(where: str, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise LeanError(f"{where}: {key} must be a number, got {describe(value)}")
    return float(value)


@dataclass(frozen=True)
class Calibration:
    """How many texts (or inputs) calibrate and fine-tune; ``holdout`` of them verify."""

    samples: int = 128
    batch_size: int = 32
    seq_len: int = 128
    holdout: float = 0.25

    @classmethod
    def from_dict(cls, value: Any) -> Calibration:
        """Parse a recipe's ``calibration`` mapping (``samples``, ``batch_size``, ``seq_len``,
        ``holdout``; missing keys take the defaults); LeanError naming a bad key or value."""
        where = "recipe.calibration"
        d = _keys(where, value, ("samples", "batch_size", "seq_len", "holdout"))
        return cls(
            samples=positive_int(where, "samples", d.get("samples", cls.samples)),
            batch_size=positive_int(where, "batch_size", d.get("batch_size", cls.batch_size)),
            seq_len=positive_int(where, "seq_len", d.get("seq_len", cls.seq_len), minimum=2),
            holdout=ratio(where, "holdout", d.get("holdout", cls.holdout), include_low=False),
        )


@dataclass(frozen=True)
class Finetune:
    """A distillation fine-tune against the original model (see ``compress.finetune.distill``).

    ``validation``: fraction of the calibration batches held out and scored every
    ``eval_every`` steps; the best weights are kept and ``patience`` passes without a new best
    stop the run (0: never early). ``l2sp``: strength of the pull toward the starting weights
    (the original's where shapes match). The defaults (0) are a plain distillation."""

    steps: int = 100
    lr: float = 1e-4
    loss: str = "mse"
    weight_decay: float = 0.0
    validation: float = 0.0
    eval_every: int = 10
    patience: int = 0
    l2sp: float = 0.0

    @classmethod
    def from_dict(cls, value: Any) -> Finetune:
        """Parse a ``finetune`` mapping (``steps``, ``lr``, ``loss``, ``weight_decay``,
        ``validation``, ``eval_every``, ``patience``, ``l2sp``; missing keys take the defaults);
        LeanError naming a bad key or value."""
        where = "recipe.finetune"
        d = _keys(where, value, ("steps", "lr", "loss", "weight_decay", "validation",
                                 "eval_every", "patience", "l2sp"))
        loss = d.get("loss", cls.loss)
        if loss not in LOSSES:
            raise LeanError(f"{where}.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        validation = ratio(where, "validation", d.get("validation", 0.0), high=0.5)
        patience = positive_int(where, "patience", d.get("patience", cls.patience), minimum=0)
        if patience and not validation:
            raise LeanError(f"{where}.patience = {patience} needs validation > 0 (the fraction "
                            "of calibration batches to score)")
        return cls(
            steps=positive_int(where, "steps", d.get("steps", cls.steps), minimum=0),
            lr=ratio(where, "lr", d.get("lr", cls.lr), include_low=False, include_high=True),
            loss=loss,
            weight_decay=ratio(where, "weight_decay", d.get("weight_decay", 0.0),
                               include_high=True),
            validation=validation,
            eval_every=positive_int(where, "eval_every", d.get("eval_every", cls.eval_every)),
            patience=patience,
            l2sp=ratio(where, "l2sp", d.get("l2sp", 0.0), high=1e6, include_high=True),
        )


@dataclass(frozen=True)
class Step:
    """One transform by its registered name with its arguments, or a distillation fine-tune
    (``{finetune: {steps: 50}}``), so schedules can interleave the two."""

    transform: str | None
    args: dict[str, Any] = field(default_factory=dict)
    finetune: Finetune | None = None

    def __post_init__(self) -> None:
        # a renamed transform's old name warns once, here, and the step keeps the new name
        if self.transform is not None:
            object.__setattr__(self, "transform", canonical_name(self.transform, stacklevel=4))

    @classmethod
    def from_dict(cls, index: int, value: Any) -> Step:
        """Parse step ``index`` of a recipe: ``{"transform": name, "args": {...}}`` (the transform
        and its arguments checked against the registry) or ``{"finetune": {...}}``."""
        where = f"recipe.steps[{index}]"
        d = _keys(where, value, ("transform", "args", "finetune"))
        if ("transform" in d) == ("finetune" in d):
            raise LeanError(f"{where} needs exactly one of 'transform' or 'finetune'")
        if "finetune" in d:
            if "args" in d:
                raise LeanError(f"{where}: a finetune step takes no 'args'")
            return cls(None, {}, Finetune.from_dict(d["finetune"] or {}))
        args = d.get("args") or {}
        if not isinstance(args, Mapping):
            raise LeanError(f"{where}.args must be a mapping, got {describe(args)}")
        step = cls(str(d["transform"]), dict(args))
        step.check(where)
        return step

    @property
    def label(self) -> str:
        """The transform's name, or ``"fine-tune (N steps)"``."""
        if self.finetune is not None:
            return f"fine-tune ({self.finetune.steps} steps)"
        return str(self.transform)

    def to_dict(self) -> dict[str, Any]:
        """``{"transform": name, "args": {...}}``, or ``{"finetune": the Finetune fields}``: what
        :meth:`from_dict` reads back."""
        if self.finetune is not None:
            return {"finetune": asdict(self.finetune)}
        return {"transform": self.transform, "args": dict(self.args)}

    def check(self, where: str) -> None:
        """Check the step before any work runs: the transform exists, every argument is one it
        takes, each value has the type its annotation declares, and the transform's registered
        argument check (ranges, combinations) passes. Errors name ``where``, the transform, the
        argument, the value and what is accepted."""
        try:
            fn = get_transform(self.transform)
        except LeanError as error:
            raise LeanError(f"{where}: {error}") from error
        label = f"{where} ({self.transform})"
        parameters = inspect.signature(fn).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            accepted = [n for n, p in parameters.items()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY
                        and n not in ("inplace", "calibration", "example_inputs")]
            for key in self.args:
                if key not in accepted:
                    raise LeanError(f"{label}: unknown argument {key!r}; "
                                    f"accepted: {', '.join(accepted)}")
        for key in ("inplace", "calibration", "example_inputs"):
            if key in self.args:
                raise LeanError(f"{label}: argument {key!r} is set by the recipe runner, not "
                                "by a step")
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # an annotation that does not resolve: leave types to the transform
            hints = {}
        for key, value in self.args.items():
            hint = hints.get(key)
            if hint is not None and not _conforms(value, hint):
                raise LeanError(f"{label}: argument {key!r} must be {_hint_text(hint)}, got "
                                f"{describe(value)}")
        check = argument_check(self.transform)
        if check is not None:
            try:
                check(**self.args)
            except LeanError as error:
                raise LeanError(f"{label}: {error}") from error


_UNION_TYPES = (typing.Union, types.UnionType)
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from YAML, or given in Python) fits the annotation ``hint``.
    Annotations this does not understand accept anything (the transform still checks)."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNION_TYPES:
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, collections.abc.Sequence):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_conforms, value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            return False
        return not args or all(_conforms(k, args[0]) and _conforms(v, args[1])
                               for k, v in value.items())
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _hint_text(hint: Any) -> str:
    """An annotation in words, for error messages: ``float | None`` -> "a number or null"."""
    if hint is None or hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNION_TYPES:
        parts = [_hint_text(a) for a in args]
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in simple:
        return simple[hint]
    if origin in (list, tuple, Sequence, collections.abc.Sequence):
        item = args[0] if args else Any
        return f"a list of {_PLURALS.get(item, 'values')}"
    if origin in (dict, Mapping, collections.abc.Mapping):
        key, value = args if args else (Any, Any)
        return (f"a mapping of {_PLURALS.get(key, 'values')} to "
                f"{_PLURALS.get(value, 'values')}")
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return "a Python callable (not expressible in YAML)"
    return getattr(hint, "__name__", str(hint))


@dataclass(frozen=True)
class Recipe:
    """An ordered list of transforms with calibration, fine-tune and gates."""

    name: str
    steps: tuple[Step, ...]
    description: str = ""
    calibration: Calibration = Calibration()
    finetune: Finetune | None = None
    gates: tuple[Gate, ...] = ()
    task: str = "auto"

    @classmethod
    def from_dict(cls, value: Any) -> Recipe:
        """Parse and check a whole recipe mapping (``name`` and ``steps`` required; ``description``,
        ``calibration``, ``finetune``, ``gates``, ``task`` optional); LeanError naming the bad
        key or value."""
        d = _keys("recipe", value, ("name", "description", "calibration", "steps", "finetune",
                                    "gates", "task"), required=("name", "steps"))
        steps = d["steps"]
        if not isinstance(steps, list) or not steps:
            raise LeanError(f"recipe.steps must be a non-empty list of steps, got "
                            f"{describe(steps)}")
        gates = d.get("gates") or []
        if not isinstance(gates, list):
            raise LeanError(f"recipe.gates must be a list, got {describe(gates)}")
        parsed_gates = []
        for i, gate in enumerate(gates):
            g = _keys(f"recipe.gates[{i}]", gate, ("metric", "min", "max"), ("metric",))
            if not isinstance(g["metric"], str):
                raise LeanError(f"recipe.gates[{i}]: metric must be a metric name, got "
                                f"{describe(g['metric'])}")
            where = f"recipe.gates[{i}] ({g['metric']})"
            try:
                parsed_gates.append(Gate(g["metric"], _number(where, "min", g.get("min")),
                                         _number(where, "max", g.get("max"))))
            except LeanError as error:
                if str(error).startswith(where):
                    raise
                raise LeanError(f"recipe.gates[{i}]: {error}") from error
        task = d.get("task", "auto")
        if task not in TASKS:
            raise LeanError(f"recipe.task must be one of {', '.join(TASKS)}, got {task!r}")
        return cls(
            name=str(d["name"]),
            description=str(d.get("description", "")),
            steps=tuple(Step.from_dict(i, s) for i, s in enumerate(steps)),
            calibration=Calibration.from_dict(d.get("calibration") or {}),
            finetune=None if d.get("finetune") is None else Finetune.from_dict(d["finetune"]),
            gates=tuple(parsed_gates),
            task=task,
        )

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike[str]) -> Recipe:
        """Parse YAML text, or the file at a path."""
        try:
            import yaml
        except ImportError as error:
            raise LeanError("YAML recipes need PyYAML: pip install 'leantorch[cli]'") from error
        text = str(text_or_path)
        path = Path(text)
        source = "recipe text"
        if "\n" not in text and path.suffix in (".yaml", ".yml"):
            if not path.exists():
                raise LeanError(f"recipe file {text!r} does not exist")
            if not path.is_file():
                raise LeanError(f"recipe file {text!r} is not a regular file")
            source = f"recipe file {text!r}"
            text = read_text_file(path, source, "a text/YAML file")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise LeanError(f"{source}: {_yaml_problem(error)}") from error
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "description", "calibration", "steps", "finetune", "gates", "task"}`` with
        every part as a plain dict or list: what :meth:`from_dict` reads back."""
        return {
            "name": self.name,
            "description": self.description,
            "calibration": asdict(self.calibration),
            "steps": [s.to_dict() for s in self.steps],
            "finetune": None if self.finetune is None else asdict(self.finetune),
            "gates": [g.to_dict() for g in self.gates],
            "task": self.task,
        }


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in ``leantorch/recipes``."""
    folder = resources.files("leantorch.recipes")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | os.PathLike[str] | Recipe | Mapping[str, Any]) -> Recipe:
    """A shipped recipe by name (``"int8"``), a YAML file, a dict, or a Recipe."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return Recipe.from_dict(name_or_path)
    text = str(name_or_path)
    if text in builtin_recipes():
        return Recipe.from_yaml(resources.files("leantorch.recipes").joinpath(
            f"{text}.yaml").read_text())
    path = Path(text)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists() and path.parent == Path(".") and path.stem in builtin_recipes():
            return load_recipe(path.stem)  # "prune-50.yaml" names the shipped file
        return Recipe.from_yaml(text)
    raise LeanError(f"unknown recipe {text!r}; shipped: {', '.join(builtin_recipes())}, or a "
                    "path to a .yaml file")


# --------------------------------------------------------------------------- running
@dataclass
class Stage:
    """The model after one stage of a recipe, measured.

    ``latency_ms`` is the median of the stage's times in the interleaved run (``latency`` has
    the quartiles, in ms); ``speedup`` summarises the per-round ratios original / stage.
    ``model`` is the stage's own model (the original's for the first stage): the one verified,
    timed and, for the last stage, saved.
    """

    label: str
    params: int
    param_bytes: int
    flops: int | None
    macs: int | None
    latency_ms: float | None
    fidelity: Fidelity | None = None
    latency: Spread | None = None
    speedup: Spread | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    # on the second text set (``run_recipe(evaluation_ood=...)``), of a different kind
    fidelity_ood: Fidelity | None = None

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict would deep-copy the model
        """JSON-ready dict of the stage: ``label``, ``params``, ``param_bytes``, ``flops``,
        ``macs``, ``latency_ms``, ``latency`` (quartiles in ms), ``speedup``, ``fidelity`` and
        ``fidelity_ood`` (None where not measured); the model is left out."""
        return {
            "label": self.label, "params": self.params, "param_bytes": self.param_bytes,
            "flops": self.flops, "macs": self.macs, "latency_ms": self.latency_ms,
            "latency": None if self.latency is None else
            {f"{k}_ms": v for k, v in self.latency.to_dict().items()},
            "speedup": None if self.speedup is None else self.speedup.to_dict(),
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "fidelity_ood": None if self.fidelity_ood is None else self.fidelity_ood.to_dict(),
        }

    def speedup_text(self) -> str:
        """``"1.36x [1.31-1.40]"``: median [q1-q3] of the per-round ratios; ``"-"`` when not
        timed."""
        return "-" if self.speedup is None else self.speedup.bracket()


@dataclass
class RecipeResult:
    """What a recipe did: one :class:`Stage` per step (the first is the original)."""

    recipe: Recipe
    model: nn.Module
    stages: list[Stage]
    changes: list[Change]
    finetune_loss: list[float]
    failures: list[str]
    threads: int
    source: str = ""
    timing: dict[str, Any] | None = None  # how the stages were timed; None: not timed
    machine: dict[str, Any] | None = None  # measure.hardware.machine_info() of the timing
    # what each fine-tune did (``DistillHistory.summary()``: losses, validation, best step)
    finetunes: list[dict[str, Any]] = field(default_factory=list)
    # where the second text set came from, for the report
    ood_source: str = ""

    @property
    def passed(self) -> bool:
        """True when no gate failed."""
        return not self.failures

    @property
    def fidelity(self) -> Fidelity | None:
        """The last stage's fidelity (None when it was not verified)."""
        return self.stages[-1].fidelity

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report: ``source``, ``recipe`` (:meth:`Recipe.to_dict`), ``passed``,
        ``failures``, ``threads``, ``machine``, ``timing``, ``stages``, ``changes``,
        ``finetune_loss`` (first, last, steps; or None), ``finetunes`` and ``ood_source``."""
        return {
            "source": self.source,
            "recipe": self.recipe.to_dict(),
            "passed": self.passed,
            "failures": list(self.failures),
            "threads": self.threads,
            "machine": self.machine,
            "timing": self.timing,
            "stages": [s.to_dict() for s in self.stages],
            "changes": [c.to_dict() for c in self.changes],
            "finetune_loss": {"first": self.finetune_loss[0], "last": self.finetune_loss[-1],
                              "steps": len(self.finetune_loss)} if self.finetune_loss else None,
            "finetunes": [dict(f) for f in self.finetunes],
            "ood_source": self.ood_source,
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the before/after table, one row per stage."""
        last = self.stages[-1]
        metrics = list(last.fidelity.metrics) if last.fidelity else []
        ood = list(last.fidelity_ood.metrics) if last.fidelity_ood else []
        header = ["stage", "params", "weights", "GFLOPs", "latency ms", "speedup [q1-q3]",
                  *metrics, *(f"{m}_ood" for m in ood)]
        rows = []
        for i, s in enumerate(self.stages):
            # the original is the baseline: its ratio is 1 in every round, no spread to show
            speed = "1.00x" if i == 0 and s.speedup is not None else s.speedup_text()
            row = [s.label, f"{s.params / 1e6:.2f} M", f"{s.param_bytes / 2**20:.1f} MiB",
                   "-" if s.flops is None else f"{s.flops / 1e9:.2f}",
                   "-" if s.latency_ms is None else f"{s.latency_ms:.1f}", speed]
            row += [f"{s.fidelity.metrics[m]:.4f}" if s.fidelity and m in s.fidelity.metrics
                    else "-" for m in metrics]
            row += [f"{s.fidelity_ood.metrics[m]:.4f}" if s.fidelity_ood
                    and m in s.fidelity_ood.metrics else "-" for m in ood]
            rows.append(row)
        return header, rows

    def markdown(self) -> str:
        """The before/after table as Markdown."""
        header, rows = self.table()
        lines = [f"# {self.source or 'model'}: recipe `{self.recipe.name}`", "",
                 self.recipe.description.strip(), "",
                 "| " + " | ".join(header) + " |",
                 "|---|" + "--:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", self.timing_note() + " Fidelity: against the original on held-out data"
                  + (f", and (`_ood` columns) on {self.stages[-1].fidelity_ood.samples} texts of "
                     f"a second, different set never used for tuning"
                     + (f" ({self.ood_source})" if self.ood_source else "")
                     if self.stages[-1].fidelity_ood else "") + ".",
                  "Gates (on the held-out data): "
                  + (", ".join(str(g.to_dict()) for g in self.recipe.gates) or "none")
                  + (" (all passed)" if self.passed else
                     " (FAILED: " + "; ".join(self.failures) + ")")]
        return "\n".join(lines) + "\n"

    def timing_note(self) -> str:
        """How the latency and speedup columns were measured, and on what: one paragraph."""
        if self.timing is None:
            return f"Latency: not timed ({self.threads} thread(s))."
        from leantorch.measure.hardware import machine_summary

        t = self.timing
        where = machine_summary(self.machine) if self.machine else f"{t['threads']} thread(s)"
        return (f"Latency: median ms over {t['rounds']} interleaved rounds on one evaluation "
                f"batch, every stage timed once per round in a rotated order after "
                f"{t['warmup']} warm-up calls; speedup: median [quartiles] of the per-round "
                f"ratio original / stage. Timed on {where}.")

    def write(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False
              ) -> dict[str, Path]:
        """Save ``model.safetensors``, ``report.json`` and ``report.md`` into ``out_dir``.

        The three files are written into a temporary sibling folder that is then renamed to
        ``out_dir``, so the folder is complete or absent, never partial. An existing non-empty
        ``out_dir`` is refused unless ``overwrite``. Refuses a result whose gates failed:
        nothing is written."""
        if not self.passed:
            raise LeanError("refusing to write a model whose verification gates failed: "
                            + "; ".join(self.failures))
        from leantorch.serialize import save

        out = Path(out_dir)
        names = {"model": "model.safetensors", "report_json": "report.json",
                 "report_md": "report.md"}
        with atomic_directory(out, overwrite=overwrite) as tmp:
            save(self.model, tmp / names["model"],
                 metadata={"recipe": self.recipe.name, "source": self.source})
            atomic_write_text(tmp / names["report_json"],
                              json.dumps(self.to_dict(), indent=2) + "\n")
            atomic_write_text(tmp / names["report_md"], self.markdown())
        return {key: out / name for key, name in names.items()}


def _measure(label: str, model: nn.Module, example_inputs: Any,
             fidelity: Fidelity | None = None) -> Stage:
    from leantorch.compress.change import summarize

    summary = summarize(model, example_inputs)
    return Stage(label, summary.params, summary.param_bytes, summary.flops, summary.macs,
                 None, fidelity, model=model)


_WARMUP = 2


def _time_stages(stages: list[Stage], example_inputs: Any, rounds: int) -> dict[str, Any]:
    """Time every stage's model on ``example_inputs`` in ``rounds`` interleaved rounds with the
    original (the first stage) and fill in each stage's latency and speedup. Stages are timed
    together at the end, not one after another as they are made: a ratio of two times taken
    minutes apart carries whatever changed on the machine in between."""
    from leantorch.measure.latency import compare_interleaved

    args, kwargs = as_call(example_inputs)

    def forward(model: nn.Module) -> Any:
        def call() -> None:
            with torch.no_grad():
                model(*args, **kwargs)
        return call

    models = [s.model for s in stages]
    modes = [m.training for m in models]
    first = next(iter(models[0].parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        for m in models:
            m.eval()
        comparison = compare_interleaved({str(i): forward(m) for i, m in enumerate(models)},
                                         baseline="0", rounds=rounds, warmup=_WARMUP,
                                         device=device)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    for i, stage in enumerate(stages):
        entry = comparison[str(i)]
        stage.latency_ms, stage.latency, stage.speedup = entry.median_ms, entry.latency, \
            entry.speedup
    return {"rounds": comparison.rounds, "warmup": comparison.warmup,
            "order": comparison.order, "threads": comparison.threads,
            "device": comparison.device, "baseline": stages[0].label}


@dataclass
class RecipeData:
    """The batches a recipe runs on, made from texts by its ``calibration`` settings (see
    :func:`recipe_data`): pass them to :func:`run_recipe` with ``**data.arguments()``."""

    calibration: list[Any]
    evaluation: list[Any]
    evaluation_ood: list[Any] | None = None
    ood_source: str = ""

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of :func:`run_recipe` these data fill."""
        return {"calibration": self.calibration, "evaluation": self.evaluation,
                "example_inputs": self.evaluation[0], "evaluation_ood": self.evaluation_ood,
                "ood_source": self.ood_source}


def recipe_data(recipe: Recipe | str | Mapping[str, Any], loaded: Any,
                texts: Sequence[str] | None = None, *,
                shapes: Sequence[str] | None = None) -> RecipeData:
    """Calibration and evaluation batches for ``loaded`` (a
    :class:`leantorch.models.LoadedModel`, which knows how to turn texts into model inputs)
    by ``recipe.calibration``: ``holdout`` of the texts verify, the first ``samples`` of the
    rest calibrate and fine-tune, in batches of ``batch_size`` texts cut at ``seq_len``
    tokens. The same function serves ``leantorch compress`` and :func:`run_recipe`, so a recipe
    gives the same result from Python and from the command line.

    ``texts``: at least 4 texts; None: the bundled sets (:func:`leantorch.data.corpora`: the
    held-out sentences verify, the rest and the paraphrase corpus calibrate). A text model with
    a tokenizer is also verified on a second kind of text
    (:func:`leantorch.data.reference_sentences`), never calibrated on. ``shapes``: input
    shapes for a model that takes neither text nor images (see ``LoadedModel.batches``).
    """
    from leantorch.data import corpora, reference_sentences, split

    recipe = load_recipe(recipe)
    if not callable(getattr(loaded, "batches", None)) or not isinstance(
            getattr(loaded, "model", None), nn.Module):
        raise LeanTypeError(f"recipe_data: loaded={describe(loaded)}; expected a "
                            "leantorch.models.LoadedModel (from load_model), which makes inputs "
                            "from texts")
    cal = recipe.calibration
    if texts is not None:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or \
                len(texts) < 4:
            raise LeanError(f"recipe_data: texts={describe(texts)}; expected a list of at "
                            "least 4 strings (calibration and held-out evaluation)")
        calibration_texts, evaluation_texts = split(list(texts), holdout=cal.holdout)
    else:  # bundled sentences held out; calibration adds the paraphrase corpus
        sets = corpora(holdout=cal.holdout)
        calibration_texts, evaluation_texts = sets.calibration, sets.held_out
    calibration = loaded.batches(calibration_texts[:cal.samples], cal.batch_size, cal.seq_len,
                                 shapes=shapes)
    evaluation = loaded.batches(evaluation_texts[:max(cal.batch_size, cal.samples)],
                                cal.batch_size, cal.seq_len, seed=1, shapes=shapes)
    # a second, different kind of text, never tuned on: only meaningful with a real tokenizer
    tuned_on = set(calibration_texts)
    ood_texts = [t for t in reference_sentences() if t not in tuned_on]
    ood = (loaded.batches(ood_texts, cal.batch_size, cal.seq_len)
           if loaded.kind == "text" and loaded.tokenizer is not None and ood_texts else None)
    return RecipeData(calibration, evaluation, ood,
                      "sentences of the Python language reference" if ood else "")


def run_recipe(
    recipe: Recipe | str | Mapping[str, Any],
    model: Any,
    *,
    calibration: Sequence[Any] | None = None,
    evaluation: Sequence[Any] | None = None,
    example_inputs: Any = None,
    texts: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    latency_runs: int = 10,
    progress: bool = False,
    source: str = "",
    evaluation_ood: Sequence[Any] | None = None,
    ood_source: str = "",
) -> RecipeResult:
    """Apply ``recipe`` to a copy of ``model``.

    ``model`` is an ``nn.Module`` with the data given as batches (``calibration``,
    ``evaluation``, ``example_inputs``), or a :class:`leantorch.models.LoadedModel`
    (``load_model(name)``), whose data :func:`recipe_data` makes from ``texts`` (default: the
    bundled sets) by the recipe's ``calibration`` settings, exactly as ``leantorch compress``
    does.

    Args:
        calibration: model inputs (batches) for transforms that look at activations and for
            the fine-tune.
        evaluation: held-out model inputs on which every stage is verified against ``model``.
        example_inputs: one batch for FLOPs and latency (any form
            :func:`leantorch.inputs.as_call` reads; default: the first evaluation batch).
        texts, shapes: for a ``LoadedModel``: see :func:`recipe_data`.
        latency_runs: interleaved timing rounds; each round times every stage's model once,
            original included (0: no timing).
        evaluation_ood: optional model inputs from a second text set of a different kind
            (e.g. :func:`leantorch.data.reference_sentences`), kept out of calibration and
            fine-tune; every stage is also verified on it (``Stage.fidelity_ood``) so a report
            shows how far the held-out numbers carry. Gates check ``evaluation`` only.
        ood_source: a few words saying where ``evaluation_ood`` came from, for the report.

    Raises:
        GateFailure: a gate failed; ``error.result`` holds the full :class:`RecipeResult`.
    """
    recipe = load_recipe(recipe)
    if not isinstance(model, nn.Module):
        given = [n for n, v in (("calibration", calibration), ("evaluation", evaluation),
                                ("example_inputs", example_inputs),
                                ("evaluation_ood", evaluation_ood)) if v is not None]
        if given:
            raise LeanError(f"run_recipe: model is a {type(model).__name__} whose data the "
                            f"recipe's calibration settings make; got {', '.join(given)} as "
                            "well: pass model.model with your own batches, or leave them out")
        data = recipe_data(recipe, model, texts, shapes=shapes)
        source = source or getattr(model, "name", "")
        model = model.model
        calibration, evaluation = data.calibration, data.evaluation
        evaluation_ood, ood_source = data.evaluation_ood, ood_source or data.ood_source
    elif texts is not None or shapes is not None:
        raise LeanError("run_recipe: texts= and shapes= need a leantorch.models.LoadedModel "
                        "(load_model(name)) to turn them into inputs; model is a "
                        f"{type(model).__name__}")
    if not calibration or not evaluation:
        raise LeanError("run_recipe: calibration and evaluation must be non-empty lists of "
                        "model inputs")
    if example_inputs is None:
        example_inputs = evaluation[0]
    # a Recipe built in Python skipped from_dict's checks: run them before any step does work
    for index, step in enumerate(recipe.steps):
        if step.finetune is None:
            step.check(f"recipe.steps[{index}]")
    for index, gate in enumerate(recipe.gates):
        for key in ("min", "max"):
            _number(f"recipe.gates[{index}] ({gate.metric})", key, getattr(gate, key))
    # checked now, not after the transforms and fine-tunes have run (0: no timing)
    positive_int("run_recipe", "latency_runs", latency_runs, minimum=0)
    if evaluation_ood is not None and not evaluation_ood:
        raise LeanError("run_recipe: evaluation_ood must be None or a non-empty list of model "
                        "inputs, got an empty one")
    with showing(progress):
        return _run(recipe, model, calibration, evaluation, example_inputs, latency_runs,
                    progress, source, evaluation_ood, ood_source)


def _run(recipe: Recipe, model: nn.Module, calibration: Sequence[Any],
         evaluation: Sequence[Any], example_inputs: Any, latency_runs: int, progress: bool,
         source: str, evaluation_ood: Sequence[Any] | None = None, ood_source: str = ""
         ) -> RecipeResult:
    from leantorch.measure.hardware import machine_info

    stages = [_measure("original", model, example_inputs)]
    changes: list[Change] = []
    current = model
    history: list[float] = []
    finetunes: list[dict[str, Any]] = []
    steps = list(recipe.steps)
    if recipe.finetune is not None and recipe.finetune.steps > 0:
        steps.append(Step(None, {}, recipe.finetune))
    for index, step in enumerate(steps):
        if progress:
            print(f"  step {index + 1}/{len(steps)}: {step.label}", flush=True)
        # every step makes a new model and leaves the previous stage's alone (the caller's
        # model is the first of them), so each stage keeps the model it was verified with
        if step.finetune is not None:
            current = copy.deepcopy(current)
            ft = step.finetune
            # validation needs a batch to score and one to train on; with a single calibration
            # batch the fine-tune runs without it, and the report says so
            validate = bool(ft.validation) and len(calibration) >= 2
            run = distill(current, model, calibration, steps=ft.steps, lr=ft.lr, loss=ft.loss,
                          weight_decay=ft.weight_decay,
                          validation=ft.validation if validate else 0.0,
                          eval_every=ft.eval_every, patience=ft.patience if validate else 0,
                          l2sp=ft.l2sp, progress=progress)
            history += run
            summary = run.summary()
            if ft.validation and not validate:
                summary["validation_skipped"] = (f"needs at least 2 calibration batches, got "
                                                 f"{len(calibration)}")
            finetunes.append(summary)
        else:
            fn = get_transform(step.transform)
            kwargs = dict(step.args)
            if accepts(fn, "calibration"):
                kwargs["calibration"] = list(calibration)
            if accepts(fn, "example_inputs"):
                kwargs["example_inputs"] = example_inputs
            current, change = fn(current, inplace=False, **kwargs)
            changes.append(change)
        fidelity = verify(model, current, evaluation, task=recipe.task)
        label = f"+ {step.label}" if step.finetune is not None else step.label
        stages.append(_measure(label, current, example_inputs, fidelity))
        if evaluation_ood:
            stages[-1].fidelity_ood = verify(model, current, evaluation_ood, task=recipe.task)
    timing = _time_stages(stages, example_inputs, latency_runs) if latency_runs else None
    failures = [f for f in (g.check(stages[-1].fidelity) for g in recipe.gates) if f]
    result = RecipeResult(recipe, current, stages, changes, history, failures,
                          torch.get_num_threads(), source, timing=timing,
                          machine=machine_info(), finetunes=finetunes,
                          ood_source=ood_source if evaluation_ood else "")
    if failures:
        error = GateFailure(failures, stages[-1].fidelity, step=f"recipe {recipe.name!r}")
        error.result = result
        raise error
    return result
