"""Models: the embedded sentence encoder, built-in architectures by name, and loaders."""

from leantorch.models.registry import BUILTINS, LoadedModel, load_model, parse_shape
from leantorch.models.sentence import SentenceEncoder, load_minilm, minilm_tokenizer

__all__ = [
    "BUILTINS",
    "LoadedModel",
    "SentenceEncoder",
    "load_minilm",
    "load_model",
    "minilm_tokenizer",
    "parse_shape",
]
