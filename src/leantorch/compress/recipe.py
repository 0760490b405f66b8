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
every stage (params, weight bytes, FLOPs, latency, fidelity against the original on held-out
data), fine-tunes, checks the gates (raising :class:`GateFailure` with the whole report when one
fails) and returns a :class:`RecipeResult`; :meth:`RecipeResult.write` saves the model and the
reports, atomically, only for a result that passed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantorch.compress.change import Change, _as_call
from leantorch.compress.finetune import LOSSES, distill
from leantorch.compress.progress import showing
from leantorch.compress.registry import accepts, get_transform
from leantorch.compress.verify import TASKS, Fidelity, Gate, GateFailure, verify
from leantorch.errors import LeanError, describe
from leantorch.io import atomic_write_text

__all__ = [
    "Calibration",
    "Finetune",
    "Recipe",
    "RecipeResult",
    "Stage",
    "Step",
    "builtin_recipes",
    "load_recipe",
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


def _int(where: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LeanError(f"{where}.{key} must be an integer >= {low}, got {value!r}")
    return value


def _float(where: str, key: str, value: Any, low: float, high: float,
           open_low: bool = True, open_high: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = (value > low if open_low else value >= low) and \
             (value < high if open_high else value <= high)
    if not ok:
        bracket = ("(" if open_low else "[") + f"{low}, {high}" + (")" if open_high else "]")
        raise LeanError(f"{where}.{key} must be a number in {bracket}, got {value!r}")
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
        where = "recipe.calibration"
        d = _keys(where, value, ("samples", "batch_size", "seq_len", "holdout"))
        return cls(
            samples=_int(where, "samples", d.get("samples", cls.samples), 1),
            batch_size=_int(where, "batch_size", d.get("batch_size", cls.batch_size), 1),
            seq_len=_int(where, "seq_len", d.get("seq_len", cls.seq_len), 2),
            holdout=_float(where, "holdout", d.get("holdout", cls.holdout), 0, 1, True, True),
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
        where = "recipe.finetune"
        d = _keys(where, value, ("steps", "lr", "loss", "weight_decay", "validation",
                                 "eval_every", "patience", "l2sp"))
        loss = d.get("loss", cls.loss)
        if loss not in LOSSES:
            raise LeanError(f"{where}.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        validation = _float(where, "validation", d.get("validation", 0.0), 0, 0.5,
                            open_low=False, open_high=True)
        patience = _int(where, "patience", d.get("patience", cls.patience), 0)
        if patience and not validation:
            raise LeanError(f"{where}.patience = {patience} needs validation > 0 (the fraction "
                            "of calibration batches to score)")
        return cls(
            steps=_int(where, "steps", d.get("steps", cls.steps), 0),
            lr=_float(where, "lr", d.get("lr", cls.lr), 0, 1),
            loss=loss,
            weight_decay=_float(where, "weight_decay", d.get("weight_decay", 0.0), 0, 1,
                                open_low=False),
            validation=validation,
            eval_every=_int(where, "eval_every", d.get("eval_every", cls.eval_every), 1),
            patience=patience,
            l2sp=_float(where, "l2sp", d.get("l2sp", 0.0), 0, 1e6, open_low=False),
        )


@dataclass(frozen=True)
class Step:
    """One transform by its registered name with its arguments, or a distillation fine-tune
    (``{finetune: {steps: 50}}``), so schedules can interleave the two."""

    transform: str | None
    args: dict[str, Any] = field(default_factory=dict)
    finetune: Finetune | None = None

    @classmethod
    def from_dict(cls, index: int, value: Any) -> Step:
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
        if self.finetune is not None:
            return f"fine-tune ({self.finetune.steps} steps)"
        return str(self.transform)

    def to_dict(self) -> dict[str, Any]:
        if self.finetune is not None:
            return {"finetune": asdict(self.finetune)}
        return {"transform": self.transform, "args": dict(self.args)}

    def check(self, where: str) -> None:
        try:
            fn = get_transform(self.transform)
        except LeanError as error:
            raise LeanError(f"{where}: {error}") from error
        import inspect

        parameters = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        accepted = [n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                    and n not in ("inplace", "calibration", "example_inputs")]
        for key in self.args:
            if key not in accepted:
                raise LeanError(f"{where} ({self.transform}): unknown argument {key!r}; "
                                f"accepted: {', '.join(accepted)}")


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
            parsed_gates.append(Gate(g["metric"], g.get("min"), g.get("max")))
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
        if "\n" not in text and path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise LeanError(f"recipe file {text!r} does not exist")
            text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise LeanError(f"recipe is not valid YAML: {error}") from error
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
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
    """The model after one stage of a recipe, measured."""

    label: str
    params: int
    param_bytes: int
    flops: int | None
    macs: int | None
    latency_ms: float | None
    fidelity: Fidelity | None = None
    # on the second text set (``run_recipe(evaluation_ood=...)``), of a different kind
    fidelity_ood: Fidelity | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("fidelity", "fidelity_ood")}
        d["fidelity"] = None if self.fidelity is None else self.fidelity.to_dict()
        d["fidelity_ood"] = None if self.fidelity_ood is None else self.fidelity_ood.to_dict()
        return d


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
    # what each fine-tune did (``DistillHistory.summary()``: losses, validation, best step)
    finetunes: list[dict[str, Any]] = field(default_factory=list)
    # where the second text set came from, for the report
    ood_source: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def fidelity(self) -> Fidelity | None:
        return self.stages[-1].fidelity

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "recipe": self.recipe.to_dict(),
            "passed": self.passed,
            "failures": list(self.failures),
            "threads": self.threads,
            "stages": [s.to_dict() for s in self.stages],
            "changes": [c.to_dict() for c in self.changes],
            "finetune_loss": {"first": self.finetune_loss[0], "last": self.finetune_loss[-1],
                              "steps": len(self.finetune_loss)} if self.finetune_loss else None,
            "finetunes": [dict(f) for f in self.finetunes],
            "ood_source": self.ood_source,
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the before/after table, one row per stage."""
        first = self.stages[0]
        last = self.stages[-1]
        metrics = list(last.fidelity.metrics) if last.fidelity else []
        ood = list(last.fidelity_ood.metrics) if last.fidelity_ood else []
        header = ["stage", "params", "weights", "GFLOPs", "latency ms", "speedup", *metrics,
                  *(f"{m}_ood" for m in ood)]
        rows = []
        for s in self.stages:
            speed = (f"{first.latency_ms / s.latency_ms:.2f}x"
                     if s.latency_ms and first.latency_ms else "-")
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
        lines += ["", f"Latency: median of timed forwards on one evaluation batch, "
                  f"{self.threads} thread(s); fidelity against the original on held-out data"
                  + (f", and (`_ood` columns) on {self.stages[-1].fidelity_ood.samples} texts of "
                     f"a second, different set never used for tuning"
                     + (f" ({self.ood_source})" if self.ood_source else "")
                     if self.stages[-1].fidelity_ood else "") + ".",
                  "Gates (on the held-out data): " + (", ".join(str(g.to_dict()) for g in self.recipe.gates) or "none")
                  + (" (all passed)" if self.passed else
                     " (FAILED: " + "; ".join(self.failures) + ")")]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Save ``model.safetensors``, ``report.json`` and ``report.md`` into ``out_dir``
        (atomically). Refuses a result whose gates failed: nothing is written."""
        if not self.passed:
            raise LeanError("refusing to write a model whose verification gates failed: "
                            + "; ".join(self.failures))
        from leantorch.serialize import save

        out = Path(out_dir)
        paths = {"model": save(self.model, out / "model.safetensors",
                               metadata={"recipe": self.recipe.name, "source": self.source})}
        paths["report_json"] = atomic_write_text(out / "report.json",
                                                 json.dumps(self.to_dict(), indent=2) + "\n")
        paths["report_md"] = atomic_write_text(out / "report.md", self.markdown())
        return paths


def _measure(label: str, model: nn.Module, example_inputs: Any, latency_runs: int,
             fidelity: Fidelity | None = None) -> Stage:
    from leantorch.compress.change import summarize
    from leantorch.measure import time_callable

    summary = summarize(model, example_inputs)
    latency = None
    if latency_runs:
        args, kwargs = _as_call(example_inputs)
        training = model.training
        model.eval()

        def forward() -> None:
            with torch.no_grad():
                model(*args, **kwargs)

        latency = time_callable(forward, runs=latency_runs, warmup=2).median_ms
        model.train(training)
    return Stage(label, summary.params, summary.param_bytes, summary.flops, summary.macs,
                 latency, fidelity)


def run_recipe(
    recipe: Recipe | str | Mapping[str, Any],
    model: nn.Module,
    *,
    calibration: Sequence[Any],
    evaluation: Sequence[Any],
    example_inputs: Any,
    latency_runs: int = 10,
    progress: bool = False,
    source: str = "",
    evaluation_ood: Sequence[Any] | None = None,
    ood_source: str = "",
) -> RecipeResult:
    """Apply ``recipe`` to a copy of ``model``.

    Args:
        calibration: model inputs (batches) for transforms that look at activations and for
            the fine-tune.
        evaluation: held-out model inputs on which every stage is verified against ``model``.
        example_inputs: one batch for FLOPs and latency.
        latency_runs: timed forwards per stage (0: no timing).
        evaluation_ood: optional model inputs from a second text set of a different kind
            (e.g. :func:`leantorch.data.reference_sentences`), kept out of calibration and
            fine-tune; every stage is also verified on it (``Stage.fidelity_ood``) so a report
            shows how far the held-out numbers carry. Gates check ``evaluation`` only.
        ood_source: a few words saying where ``evaluation_ood`` came from, for the report.

    Raises:
        GateFailure: a gate failed; ``error.result`` holds the full :class:`RecipeResult`.
    """
    recipe = load_recipe(recipe)
    if not calibration or not evaluation:
        raise LeanError("run_recipe: calibration and evaluation must be non-empty lists of "
                        "model inputs")
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
    stages = [_measure("original", model, example_inputs, latency_runs)]
    changes: list[Change] = []
    current = model
    history: list[float] = []
    finetunes: list[dict[str, Any]] = []
    transformed = False
    steps = list(recipe.steps)
    if recipe.finetune is not None and recipe.finetune.steps > 0:
        steps.append(Step(None, {}, recipe.finetune))
    for index, step in enumerate(steps):
        if progress:
            print(f"  step {index + 1}/{len(steps)}: {step.label}", flush=True)
        if step.finetune is not None:
            if not transformed:  # never train the caller's model
                current = copy.deepcopy(current)
                transformed = True
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
            # the first transform copies the caller's model; later steps edit that copy
            current, change = fn(current, inplace=transformed, **kwargs)
            transformed = True
            changes.append(change)
        fidelity = verify(model, current, evaluation, task=recipe.task)
        label = f"+ {step.label}" if step.finetune is not None else step.label
        stages.append(_measure(label, current, example_inputs, latency_runs, fidelity))
        if evaluation_ood:
            stages[-1].fidelity_ood = verify(model, current, evaluation_ood, task=recipe.task)
    failures = [f for f in (g.check(stages[-1].fidelity) for g in recipe.gates) if f]
    result = RecipeResult(recipe, current, stages, changes, history, failures,
                          torch.get_num_threads(), source, finetunes,
                          ood_source if evaluation_ood else "")
    if failures:
        error = GateFailure(failures, stages[-1].fidelity, step=f"recipe {recipe.name!r}")
        error.result = result
        raise error
    return result
