"""A short distillation fine-tune of a compressed model against its original."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantorch import validate
from leantorch.compress.verify import primary_output
from leantorch.errors import LeanError
from leantorch.inputs import as_call

__all__ = ["LOSSES", "DistillHistory", "distill"]

LOSSES = ("mse", "cosine", "kl")


def _loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                    reduction="batchmean")


class DistillHistory(list):
    """The training loss of every step (a ``list[float]``), plus what the validation saw.

    Attributes:
        validation: ``(step, loss)`` of every validation pass; step 0 is the model as it came.
        best_step: the step whose weights the student holds at the end (the last step when
            there was no validation).
        stopped_early: True when ``patience`` ran out before ``steps``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.validation: list[tuple[int, float]] = []
        self.best_step = 0
        self.stopped_early = False

    def summary(self) -> dict[str, Any]:
        """The numbers a report shows: first and last training loss, steps run, validation."""
        out: dict[str, Any] = {"steps": len(self),
                               "first": self[0] if self else None,
                               "last": self[-1] if self else None}
        if self.validation:
            best = dict(self.validation)[self.best_step]
            out.update(validation_first=self.validation[0][1], validation_best=best,
                       best_step=self.best_step, stopped_early=self.stopped_early)
        return out


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    loss: str = "mse",
    weight_decay: float = 0.0,
    validation: float = 0.0,
    eval_every: int = 10,
    patience: int = 0,
    l2sp: float = 0.0,
    progress: bool | Callable[[int, float], None] = False,
) -> DistillHistory:
    """Train ``student``'s trainable parameters for ``steps`` AdamW steps so that its output
    matches ``teacher``'s on ``batches`` (cycled). ``loss``: "mse" or "cosine" on the outputs
    (embeddings, e.g. ``(batch, dim)``), "kl" on logits ``(..., classes)``. Dropout stays off
    (both run in eval mode) so the target is deterministic. The teacher is not changed.

    Args:
        validation: fraction of ``batches`` (the last ones, at least one, rounded) kept out of
            training and scored every ``eval_every`` steps with the same loss; at the end the
            student gets back the weights of the best validation score, which may be its
            weights before the first step. 0: train on every batch, keep the last weights.
        patience: stop after this many validation passes without a new best (0: never stop
            early). Needs ``validation``.
        l2sp: pull toward the starting point (L2-SP): after each step every trained weight
            ``w`` moves to ``w0 + (w - w0) / (1 + 2 * lr * l2sp)``, the exact proximal step of
            the penalty ``l2sp * ||w - w0||^2``. ``w0`` is the teacher's parameter of the same
            name where its shape matches (a quantized or unpruned tensor), else the student's
            own value before fine-tuning (pruned or factorised layers). Decoupled from the
            gradient, like AdamW's weight decay, because Adam normalises gradients: a penalty
            added to the loss would pull with about the same strength whatever ``l2sp`` is.
            ``l2sp`` very large keeps every weight at ``w0``; 0 is plain distillation.

    Returns:
        A :class:`DistillHistory`: the training loss of every step run, with the validation
        scores and the step whose weights were kept.
    """
    if loss not in LOSSES:
        raise LeanError(f"distill: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    validate.positive_int("distill", "steps", steps, minimum=0)
    if not lr > 0:
        raise LeanError(f"distill: lr must be > 0, got {lr!r}")
    if not batches:
        raise LeanError("distill: needs at least one batch of inputs")
    validate.ratio("distill", "validation", validation)
    validate.positive_int("distill", "eval_every", eval_every)
    validate.positive_int("distill", "patience", patience, minimum=0)
    if isinstance(l2sp, bool) or not isinstance(l2sp, int | float) or not l2sp >= 0:
        raise LeanError(f"distill: l2sp must be a number >= 0, got {l2sp!r}")
    if patience and not validation:
        raise LeanError(f"distill: patience={patience} needs validation > 0 (a fraction of "
                        "the batches to score)")
    train, held = _split_batches(batches, validation)
    history = DistillHistory()
    named = [(n, p) for n, p in student.named_parameters()
             if p.requires_grad and p.is_floating_point()]
    params = [p for _, p in named]
    if steps == 0 or not params:
        return history
    anchors = _anchors(named, teacher) if l2sp else []
    shrink = 1.0 / (1.0 + 2.0 * lr * l2sp)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    report = _reporter(progress, steps)
    best: dict[str, torch.Tensor] | None = None
    best_loss, since_best = float("inf"), 0
    try:
        if held:
            targets = _targets(teacher, held)
            best_loss = _score(student, held, targets, loss)
            history.validation.append((0, best_loss))
            best = _snapshot(params)
        for step, batch in zip(range(steps), itertools.cycle(train), strict=False):
            args, kwargs = as_call(batch)
            with torch.no_grad():
                target = primary_output(teacher(*args, **kwargs)).float()
            output = primary_output(student(*args, **kwargs)).float()
            value = _loss(loss, output, target)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if anchors:
                with torch.no_grad():
                    for p, w0 in anchors:
                        p.sub_(w0).mul_(shrink).add_(w0)
            history.append(value.item())
            report(step + 1, history[-1])
            if held and ((step + 1) % eval_every == 0 or step + 1 == steps):
                score = _score(student, held, targets, loss)
                history.validation.append((step + 1, score))
                if score < best_loss:
                    best_loss, since_best, history.best_step = score, 0, step + 1
                    best = _snapshot(params)
                else:
                    since_best += 1
                    if patience and since_best >= patience and step + 1 < steps:
                        history.stopped_early = True
                        if progress is True:  # end the bar's line, which stopped short
                            print(f" stopped early, kept step {history.best_step}",
                                  file=sys.stderr, flush=True)
                        break
        if best is None:
            history.best_step = len(history)
        else:
            with torch.no_grad():
                for p, kept in zip(params, best, strict=True):
                    p.copy_(kept)
    finally:
        optimizer.zero_grad(set_to_none=True)
        student.train(modes[0])
        teacher.train(modes[1])
    return history


def _split_batches(batches: Sequence[Any], validation: float
                   ) -> tuple[list[Any], list[Any]]:
    """``(train, held)``: the last ``round(validation * len)`` batches (at least one when
    ``validation`` > 0) are held out; at least one batch stays for training."""
    batches = list(batches)
    if not validation:
        return batches, []
    n_held = max(1, round(validation * len(batches)))
    if n_held >= len(batches):
        raise LeanError(f"distill: validation={validation} of {len(batches)} batch(es) leaves "
                        "none to train on; give more batches or validation=0")
    return batches[:-n_held], batches[-n_held:]


def _targets(teacher: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [primary_output(teacher(*a, **k)).float()
                for a, k in (as_call(b) for b in batches)]


def _score(student: nn.Module, batches: list[Any], targets: list[torch.Tensor],
           loss: str) -> float:
    """The distillation loss on held-out batches, averaged over batches."""
    with torch.no_grad():
        values = [_loss(loss, primary_output(student(*a, **k)).float(), t).item()
                  for (a, k), t in zip((as_call(b) for b in batches), targets, strict=True)]
    return sum(values) / len(values)


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _anchors(named: list[tuple[str, nn.Parameter]], teacher: nn.Module
             ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, w0)`` for L2-SP: the teacher's tensor of the same name and shape, else a
    copy of the student's own starting value."""
    original = dict(teacher.named_parameters())
    out = []
    for name, p in named:
        ref = original.get(name)
        if ref is not None and ref.shape == p.shape and ref.is_floating_point():
            out.append((p, ref.detach().to(p.dtype).clone()))
        else:
            out.append((p, p.detach().clone()))
    return out


def _reporter(progress: bool | Callable[[int, float], None], steps: int
              ) -> Callable[[int, float], None]:
    if callable(progress):
        return progress
    if not progress:
        return lambda step, value: None

    def report(step: int, value: float) -> None:
        bar = "#" * (20 * step // steps)
        print(f"\r  fine-tune [{bar:<20}] {step}/{steps} loss {value:.5f}", end="",
              file=sys.stderr, flush=True)
        if step == steps:
            print(file=sys.stderr)

    return report
