"""A short distillation fine-tune of a compressed model against its original."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantorch.compress.change import _as_call
from leantorch.compress.verify import primary_output
from leantorch.errors import LeanError

__all__ = ["LOSSES", "distill"]

LOSSES = ("mse", "cosine", "kl")


def _loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                    reduction="batchmean")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    loss: str = "mse",
    weight_decay: float = 0.0,
    progress: bool | Callable[[int, float], None] = False,
) -> list[float]:
    """Train ``student``'s trainable parameters for ``steps`` AdamW steps so that its output
    matches ``teacher``'s on ``batches`` (cycled). ``loss``: "mse" or "cosine" on the outputs
    (embeddings), "kl" on logits. Dropout stays off (both run in eval mode) so the target is
    deterministic. Returns the loss of every step; the teacher is not changed."""
    if loss not in LOSSES:
        raise LeanError(f"distill: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise LeanError(f"distill: steps must be an integer >= 0, got {steps!r}")
    if not lr > 0:
        raise LeanError(f"distill: lr must be > 0, got {lr!r}")
    if not batches:
        raise LeanError("distill: needs at least one batch of inputs")
    params = [p for p in student.parameters() if p.requires_grad and p.is_floating_point()]
    if steps == 0 or not params:
        return []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    report = _reporter(progress, steps)
    history = []
    try:
        for step, batch in zip(range(steps), itertools.cycle(batches), strict=False):
            args, kwargs = _as_call(batch)
            with torch.no_grad():
                target = primary_output(teacher(*args, **kwargs)).float()
            output = primary_output(student(*args, **kwargs)).float()
            value = _loss(loss, output, target)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            history.append(value.item())
            report(step + 1, history[-1])
    finally:
        optimizer.zero_grad(set_to_none=True)
        student.train(modes[0])
        teacher.train(modes[1])
    return history


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
