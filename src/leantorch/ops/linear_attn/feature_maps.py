"""Feature maps phi for linear attention: softmax(q.k) is replaced by phi(q).phi(k).

Every map acts on the last dimension: ``x: (..., head_dim) -> (..., feat_dim)``.

- ``"elu"``: elu(x) + 1 (Katharopoulos et al., 2020); positive, ``feat_dim = head_dim``.
- ``"relu"``: relu(x); non-negative, ``feat_dim = head_dim``.
- ``"taylor"``: the 2nd-order Taylor expansion of exp used by Based (2024). With x scaled by
  ``head_dim ** -0.25``, ``phi(x) = [1, x, vec(x x^T) / sqrt(2)]``, so that
  ``phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)``, i.e. ``1 + s + s^2 / 2`` for the scaled
  dot product ``s = q.k / sqrt(d)``; ``feat_dim = 1 + head_dim + head_dim**2``. The
  denominator ``1 + s + s^2/2 >= 1/2`` is always positive.
- ``"identity"``: phi(x) = x (plain, unnormalised linear attention; what GLA uses with gate 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = [
    "FEATURE_MAPS",
    "FeatureMap",
    "elu_feature_map",
    "feature_dim",
    "feature_map",
    "identity_feature_map",
    "relu_feature_map",
    "taylor_feature_map",
]

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1: ``x: (..., d) -> (..., d)``, every feature > 0."""
    # In place on elu's fresh output (its backward uses the input, not the output): one pass.
    return F.elu(x).add_(1)


def relu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """relu(x): ``x: (..., d) -> (..., d)``."""
    return F.relu(x)


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """Based's 2nd-order Taylor map: ``x: (..., d) -> (..., 1 + d + d*d)``.

    ``phi(q).phi(k) = 1 + s + s^2 / 2`` with ``s = q.k / sqrt(d)``.
    """
    head_dim = x.shape[-1]
    # d^(-1/4) on both sides gives the 1/sqrt(d) of the scaled dot product.
    x = x * head_dim**-0.25
    # vec(x x^T) . vec(y y^T) = (x.y)^2, and the two 1/sqrt(2) factors give the 1/2 of x^2/2.
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * math.sqrt(0.5)
    return torch.cat([x.new_ones(*x.shape[:-1], 1), x, second], dim=-1)


def identity_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = x."""
    return x


FEATURE_MAPS: dict[str, FeatureMap] = {
    "elu": elu_feature_map,
    "relu": relu_feature_map,
    "taylor": taylor_feature_map,
    "identity": identity_feature_map,
}


def feature_map(name_or_callable: str | FeatureMap) -> FeatureMap:
    """The feature map called ``name_or_callable`` (a key of :data:`FEATURE_MAPS`), or the
    callable itself (it must map ``(..., head_dim)`` to ``(..., feat_dim)``)."""
    if isinstance(name_or_callable, str):
        try:
            return FEATURE_MAPS[name_or_callable]
        except KeyError:
            raise LeanError(
                f"feature_map={name_or_callable!r} is not a known feature map; accepted: "
                f"{', '.join(repr(name) for name in FEATURE_MAPS)} or a callable"
            ) from None
    if callable(name_or_callable):
        return name_or_callable
    raise LeanTypeError(
        f"feature_map={describe(name_or_callable)} must be a name "
        f"({', '.join(repr(name) for name in FEATURE_MAPS)}) or a callable"
    )


def feature_dim(name_or_callable: str | FeatureMap, head_dim: int) -> int:
    """Output size of the feature map for inputs of size ``head_dim`` (the state's row count)."""
    if name_or_callable in ("elu", "relu", "identity"):
        return head_dim
    if name_or_callable == "taylor":
        return 1 + head_dim + head_dim * head_dim
    return int(feature_map(name_or_callable)(torch.zeros(1, head_dim)).shape[-1])
