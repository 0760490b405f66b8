"""distill(): held-out validation with early stopping that restores the best weights, and L2-SP
toward the starting point."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leantorch.compress.finetune import distill
from leantorch.errors import LeanError


def teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 8))


def student_of(model: nn.Module) -> nn.Module:
    """A perturbed copy (same shapes): enough error that distillation moves the weights."""
    student = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in student.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return student


def batches(n: int, seed: int = 2) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g),) for _ in range(n)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def val_loss(student: nn.Module, original: nn.Module, held: list) -> float:
    with torch.no_grad():
        values = [torch.nn.functional.mse_loss(student(*b), original(*b)).item() for b in held]
    return sum(values) / len(values)


def test_validation_keeps_the_best_weights_and_they_equal_a_run_stopped_there() -> None:
    torch.set_num_threads(1)
    original = teacher()
    data = batches(5)
    # lr high enough that the validation loss goes up again: the best is inside the run
    tuned = student_of(original)
    history = distill(tuned, original, data, steps=60, lr=0.05, validation=0.2, eval_every=4)
    scores = dict(history.validation)
    assert list(scores)[:3] == [0, 4, 8] and list(scores)[-1] == 60 and len(history) == 60
    best = min(scores, key=scores.__getitem__)
    assert history.best_step == best and 0 < best < 60  # a real choice, not an end point
    # the weights kept are the ones step `best` produced: train a fresh copy that far
    again = student_of(original)
    plain = distill(again, original, data[:4], steps=best, lr=0.05)
    assert plain == history[:best]
    assert all(torch.equal(v, weights(again)[k]) for k, v in weights(tuned).items())
    assert val_loss(tuned, original, data[4:]) == pytest.approx(scores[best], rel=1e-6)
    assert history.summary()["validation_best"] == scores[best]


def test_patience_stops_early_and_restores_the_best(capsys) -> None:
    torch.set_num_threads(1)
    original = teacher()
    data = batches(5)
    tuned = student_of(original)
    history = distill(tuned, original, data, steps=400, lr=0.05, validation=0.2, eval_every=4,
                      patience=3, progress=True)
    assert history.stopped_early and len(history) < 400
    assert capsys.readouterr().err.endswith(
        f"{len(history)}/400 loss {history[-1]:.5f} stopped early, kept step {history.best_step}\n")
    steps = [s for s, _ in history.validation]
    # it stopped at the third pass after the best one, no later
    assert steps[-1] == history.best_step + 3 * 4 and len(history) == steps[-1]
    again = student_of(original)
    distill(again, original, data[:4], steps=history.best_step, lr=0.05)
    assert all(torch.equal(v, weights(again)[k]) for k, v in weights(tuned).items())


def test_a_student_that_only_gets_worse_comes_back_unchanged() -> None:
    torch.set_num_threads(1)
    original = teacher()
    tuned = copy.deepcopy(original)  # already perfect: any step can only raise the loss
    start = weights(tuned)
    history = distill(tuned, original, batches(4), steps=8, lr=0.05, validation=0.25,
                      eval_every=2)
    assert history.best_step == 0 and history.validation[0] == (0, 0.0)
    assert all(torch.equal(v, start[k]) for k, v in weights(tuned).items())


def test_l2sp_zero_is_plain_distillation_and_huge_keeps_the_start() -> None:
    torch.set_num_threads(1)
    original = teacher()
    data = batches(3)
    plain, zero, huge = student_of(original), student_of(original), student_of(original)
    start = weights(huge)
    first = distill(plain, original, data, steps=20, lr=0.01)
    assert distill(zero, original, data, steps=20, lr=0.01, l2sp=0.0) == first
    assert all(torch.equal(v, weights(plain)[k]) for k, v in weights(zero).items())
    distill(huge, original, data, steps=20, lr=0.01, l2sp=1e12)
    # same shapes as the teacher: the anchor is the teacher's weights, not the student's start
    for (name, p), ref in zip(huge.named_parameters(), original.parameters(), strict=True):
        assert torch.allclose(p, ref, atol=1e-6), name
        assert not torch.allclose(start[name], ref, atol=1e-2)


def test_l2sp_anchors_a_reshaped_layer_to_its_own_start() -> None:
    torch.set_num_threads(1)
    original = teacher()
    narrow = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))  # a pruned width
    with torch.no_grad():
        narrow[0].weight.copy_(original[0].weight[:16])
        narrow[0].bias.copy_(original[0].bias[:16])
        narrow[2].weight.copy_(original[2].weight[:, :16])
        narrow[2].bias.copy_(original[2].bias + 0.5)
    start = weights(narrow)
    distill(narrow, original, batches(3), steps=20, lr=0.01, l2sp=1e12)
    for name in ("0.weight", "0.bias", "2.weight"):  # shapes differ: back to where they began
        assert torch.allclose(narrow.state_dict()[name], start[name], atol=1e-6), name
    # 2.bias has the teacher's shape: it is pulled to the teacher's value
    assert torch.allclose(narrow[2].bias, original[2].bias, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"validation": 1.0}, "distill: validation=1.0; expected a number in [0, 1)"),
    ({"validation": -0.1}, "distill: validation=-0.1; expected a number in [0, 1)"),
    ({"eval_every": 0}, "distill: eval_every=0; expected an int >= 1"),
    ({"patience": -1}, "distill: patience=-1; expected an int >= 0"),
    ({"l2sp": -1.0}, "l2sp must be a number >= 0, got -1.0"),
    ({"patience": 2}, "patience=2 needs validation > 0"),
    ({"validation": 0.9}, "validation=0.9 of 2 batch(es) leaves none to train on"),
])
def test_bad_arguments_name_themselves(kwargs: dict, message: str) -> None:
    original = teacher()
    with pytest.raises(LeanError) as info:
        distill(student_of(original), original, batches(2), steps=2, **kwargs)
    assert message in str(info.value)
