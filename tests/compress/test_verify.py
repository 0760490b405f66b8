"""verify() measures fidelity; gates turn it into pass or fail."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leantorch.compress.verify import Fidelity, Gate, GateFailure, verify
from leantorch.errors import LeanError


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def batches(n: int = 4, rows: int = 8) -> list[tuple[torch.Tensor]]:
    return [(torch.randn(rows, 16),) for _ in range(n)]


def test_identical_models_are_perfectly_faithful() -> None:
    model = encoder()
    fidelity = verify(model, copy.deepcopy(model), batches(), task="embedding")
    assert fidelity.samples == 32
    assert fidelity["cosine_mean"] == pytest.approx(1.0)
    assert fidelity["cosine_min"] == pytest.approx(1.0)
    assert fidelity["retrieval_agreement"] == 1.0


def test_a_perturbed_model_loses_fidelity_in_proportion() -> None:
    model = encoder()
    slightly, badly = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        slightly[2].weight.add_(0.01 * torch.randn_like(slightly[2].weight))
        badly[2].weight.copy_(torch.randn_like(badly[2].weight))
    data = batches()
    good, bad = verify(model, slightly, data), verify(model, badly, data)
    assert 0.99 < good["cosine_mean"] < 1.0
    assert bad["cosine_mean"] < 0.5 < good["cosine_mean"]
    assert bad["retrieval_agreement"] < good["retrieval_agreement"]


def test_embeddings_from_hidden_states_are_pooled_over_the_mask() -> None:
    class Hidden(nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids.unsqueeze(-1).float().expand(-1, -1, 4)

    ids = torch.tensor([[1, 2, 99], [3, 4, 5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])

    class Shifted(Hidden):  # differs only at the padded position
        def forward(self, input_ids, attention_mask):
            out = super().forward(input_ids, attention_mask).clone()
            out[0, 2] = -1000.0
            return out

    data = [{"input_ids": ids, "attention_mask": mask}]
    assert verify(Hidden(), Shifted(), data, task="embedding")["cosine_min"] == pytest.approx(1)


def test_classifier_agreement_and_accuracy() -> None:
    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits

    a = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    fidelity = verify(Fixed(a), Fixed(b), [torch.zeros(4)], task="classifier",
                      labels=[0, 1, 0, 0])
    assert fidelity["top1_agreement"] == 0.75
    assert fidelity["original_accuracy"] == 0.75
    assert fidelity["accuracy"] == 0.5


def test_language_model_perplexity() -> None:
    vocab = 5

    class Uniform(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, vocab)

    fidelity = verify(Uniform(), Uniform(), [{"input_ids": torch.randint(0, vocab, (2, 6))}],
                      task="lm")
    assert fidelity["perplexity"] == pytest.approx(vocab)  # uniform over 5 tokens
    assert fidelity["perplexity_ratio"] == pytest.approx(1.0)
    assert fidelity.samples == 2 * 5


def test_gates() -> None:
    fidelity = Fidelity("embedding", 10, {"cosine_mean": 0.95})
    assert Gate("cosine_mean", min=0.9).check(fidelity) is None
    assert "below the minimum 0.99" in Gate("cosine_mean", min=0.99).check(fidelity)
    with pytest.raises(LeanError, match="gate metric 'cosine' is unknown"):
        Gate("cosine", min=0.9)
    with pytest.raises(LeanError, match="needs min and/or max"):
        Gate("cosine_mean")
    error = GateFailure(["x is low"], fidelity, step="quant.int8_dynamic")
    assert str(error) == "verification failed after quant.int8_dynamic: x is low"


def test_bad_arguments() -> None:
    with pytest.raises(LeanError, match="task must be one of"):
        verify(encoder(), encoder(), batches(), task="regression")
    with pytest.raises(LeanError, match="non-empty list"):
        verify(encoder(), encoder(), [])


def test_modes_are_restored() -> None:
    a, b = encoder().train(), encoder().eval()
    verify(a, b, batches())
    assert a.training and not b.training
