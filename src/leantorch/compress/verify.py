"""Is the compressed model still right? Fidelity of a compressed model against the original.

``verify(original, compressed, data)`` runs both models on the same inputs (eval mode, no
gradients) and compares what comes out:

* ``embedding`` (a sentence encoder, or hidden states mean-pooled over the attention mask):
  ``cosine_mean`` / ``cosine_min`` of matching embeddings, and ``retrieval_agreement``: for
  every item, whether its nearest other item is the same under both models.
* ``classifier`` (logits ``(batch, classes)``): ``top1_agreement``, and ``accuracy`` /
  ``original_accuracy`` when labels are given.
* ``lm`` (logits ``(batch, seq, vocab)`` from token ids): ``perplexity`` and
  ``original_perplexity`` of the next token on the inputs themselves, ``perplexity_ratio``,
  and ``next_token_agreement`` (argmax match rate).

A :class:`Gate` such as ``Gate("cosine_mean", min=0.99)`` turns a metric into a pass/fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from leantorch.errors import LeanError, describe
from leantorch.inputs import as_call

__all__ = ["TASKS", "Fidelity", "Gate", "GateFailure", "verify"]

TASKS = ("auto", "embedding", "classifier", "lm")
METRICS = {
    "embedding": ("cosine_mean", "cosine_min", "retrieval_agreement"),
    "classifier": ("top1_agreement", "accuracy", "original_accuracy"),
    "lm": ("perplexity", "original_perplexity", "perplexity_ratio", "next_token_agreement"),
}


@dataclass
class Fidelity:
    """Metrics of a compressed model against its original, on ``samples`` items."""

    task: str
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        if name not in self.metrics:
            raise LeanError(f"metric {name!r} was not measured for task {self.task!r}; "
                            f"measured: {', '.join(self.metrics)}")
        return self.metrics[name]

    def to_dict(self) -> dict[str, Any]:
        """``{"task", "samples", "metrics": {metric name: value}}``."""
        return {"task": self.task, "samples": self.samples, "metrics": dict(self.metrics)}

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())


@dataclass(frozen=True)
class Gate:
    """``metric`` must be at least ``min`` and/or at most ``max``."""

    metric: str
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        known = {m for names in METRICS.values() for m in names}
        if self.metric not in known:
            raise LeanError(f"gate metric {self.metric!r} is unknown; accepted: "
                            f"{', '.join(sorted(known))}")
        if self.min is None and self.max is None:
            raise LeanError(f"gate on {self.metric!r} needs min and/or max")

    def check(self, fidelity: Fidelity) -> str | None:
        """None when the gate passes, else why it failed."""
        value = fidelity[self.metric]
        if self.min is not None and value < self.min:
            return f"{self.metric} = {value:.4f} is below the minimum {self.min}"
        if self.max is not None and value > self.max:
            return f"{self.metric} = {value:.4f} is above the maximum {self.max}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """``{"metric", "min", "max"}``, leaving out whichever bound is None (the
        form a recipe's ``gates`` list takes)."""
        return {k: v for k, v in (("metric", self.metric), ("min", self.min), ("max", self.max))
                if v is not None}


class GateFailure(LeanError):
    """A verification gate failed; ``.fidelity`` and ``.failures`` say how."""

    def __init__(self, failures: list[str], fidelity: Fidelity, step: str = "") -> None:
        self.failures, self.fidelity = failures, fidelity
        where = f" after {step}" if step else ""
        super().__init__(f"verification failed{where}: " + "; ".join(failures))


def primary_output(output: Any, who: str = "verify", hint: str = "") -> torch.Tensor:
    """The tensor a model's output is about: the output itself, ``.logits``,
    ``.last_hidden_state``, or the first floating-point tensor inside it (any nesting of
    tuples, lists and dicts). ``who`` and ``hint`` go into the error when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    if isinstance(output, dict | tuple | list):  # containers pytree does not know
        for value in (output.values() if isinstance(output, dict) else output):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
    raise LeanError(f"{who}: the model output {describe(output)} holds no floating-point "
                    f"tensor{hint}")


def _detect(output: Any) -> str:
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return "lm" if logits.dim() == 3 else "classifier"
    return "embedding"


def _pool(tensor: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() != 3:
        raise LeanError(f"verify(task='embedding'): expected (batch, dim) or (batch, seq, dim) "
                        f"outputs, got shape {tuple(tensor.shape)}")
    mask = kwargs.get("attention_mask")
    if mask is None:
        return tensor.mean(dim=1)
    weights = mask.unsqueeze(-1).to(tensor.dtype)
    return (tensor * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


@torch.no_grad()
def verify(
    original: nn.Module,
    compressed: nn.Module,
    data: Sequence[Any],
    *,
    task: str = "auto",
    labels: Sequence[int] | torch.Tensor | None = None,
) -> Fidelity:
    """Compare ``compressed`` with ``original`` on ``data``: a list of model inputs (each a tuple
    of positional inputs, a dict of keyword inputs, or one tensor). ``task``: "auto" (from the
    outputs: ``.logits`` of rank 3 -> lm, rank 2 -> classifier, anything else -> embedding),
    "embedding", "classifier" or "lm". ``labels``: one class per item, for classifiers."""
    if task not in TASKS:
        raise LeanError(f"verify: task must be one of {', '.join(TASKS)}, got {task!r}")
    if not isinstance(data, Sequence) or isinstance(data, str) or len(data) == 0:
        raise LeanError("verify: data must be a non-empty list of model inputs (tuples of "
                        "positional inputs or dicts of keyword inputs)")
    modes = (original.training, compressed.training)
    original.eval()
    compressed.eval()
    try:
        pairs, batches = [], []
        for batch in data:
            args, kwargs = as_call(batch)
            a, b = original(*args, **kwargs), compressed(*args, **kwargs)
            if task == "auto":
                task = _detect(a)
            pairs.append((primary_output(a).float(), primary_output(b).float()))
            batches.append(kwargs if kwargs else {"input_ids": args[0]} if args else {})
    finally:
        original.train(modes[0])
        compressed.train(modes[1])
    if task == "embedding":
        return _embedding(pairs, batches)
    if task == "classifier":
        return _classifier(pairs, labels)
    return _lm(pairs, batches)


def _embedding(pairs: list[tuple[torch.Tensor, torch.Tensor]],
               batches: list[dict[str, Any]]) -> Fidelity:
    a = torch.cat([_pool(x, kw) for (x, _), kw in zip(pairs, batches, strict=True)])
    b = torch.cat([_pool(y, kw) for (_, y), kw in zip(pairs, batches, strict=True)])
    cosine = F.cosine_similarity(a, b, dim=-1)
    metrics = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}
    if a.shape[0] > 1:
        metrics["retrieval_agreement"] = float((_nearest(a) == _nearest(b)).float().mean())
    return Fidelity("embedding", a.shape[0], metrics)


def _nearest(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(dim=1)


def _classifier(pairs: list[tuple[torch.Tensor, torch.Tensor]],
                labels: Sequence[int] | torch.Tensor | None) -> Fidelity:
    a = torch.cat([x.reshape(x.shape[0], -1) for x, _ in pairs])
    b = torch.cat([y.reshape(y.shape[0], -1) for _, y in pairs])
    metrics = {"top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean())}
    if labels is not None:
        target = torch.as_tensor(labels)
        if target.shape != (a.shape[0],):
            raise LeanError(f"verify: labels must hold one class per item ({a.shape[0]}), got "
                            f"shape {tuple(target.shape)}")
        metrics["accuracy"] = float((b.argmax(1) == target).float().mean())
        metrics["original_accuracy"] = float((a.argmax(1) == target).float().mean())
    return Fidelity("classifier", a.shape[0], metrics)


def _lm(pairs: list[tuple[torch.Tensor, torch.Tensor]],
        batches: list[dict[str, Any]]) -> Fidelity:
    losses = {"a": 0.0, "b": 0.0}
    agree = total = 0
    for (a, b), kwargs in zip(pairs, batches, strict=True):
        ids = kwargs.get("input_ids")
        if ids is None or a.dim() != 3:
            raise LeanError("verify(task='lm'): needs logits (batch, seq, vocab) and the "
                            "input_ids they predict")
        target = ids[:, 1:]
        keep = torch.ones_like(target, dtype=torch.bool)
        if kwargs.get("attention_mask") is not None:
            keep = kwargs["attention_mask"][:, 1:].bool()
        for name, logits in (("a", a), ("b", b)):
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
            losses[name] += float(nll[keep].sum())
        agree += int((a[:, :-1].argmax(-1) == b[:, :-1].argmax(-1))[keep].sum())
        total += int(keep.sum())
    if total == 0:
        raise LeanError("verify(task='lm'): no token to predict (sequences of length 1?)")
    ppl_a = float(torch.tensor(losses["a"] / total).exp())
    ppl_b = float(torch.tensor(losses["b"] / total).exp())
    return Fidelity("lm", total, {"perplexity": ppl_b, "original_perplexity": ppl_a,
                                  "perplexity_ratio": ppl_b / ppl_a,
                                  "next_token_agreement": agree / total})
