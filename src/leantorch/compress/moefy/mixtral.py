"""A transformers Mixtral model -> the same model with leantorch :class:`~leantorch.nn.moe.MoE`
layers, weights copied exactly (the per-block conversion is
:func:`leantorch.nn.moe.from_mixtral`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from leantorch.compress.change import Change, apply_transform, replace_module, select_modules
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError
from leantorch.nn.moe.interop import _is_mixtral_block, from_mixtral

__all__ = ["convert_mixtral"]


@register_transform("moefy.convert_mixtral")
def convert_mixtral(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    calibration: Sequence[Any] | None = None,
    inplace: bool = False,
    **moe_args: Any,
) -> tuple[nn.Module, Change]:
    """Replace every ``MixtralSparseMoeBlock`` of a transformers model with an equivalent
    :class:`~leantorch.nn.moe.MoE`; ``moe_args`` go to :func:`~leantorch.nn.moe.from_mixtral`.
    ``calibration`` is accepted (recipes pass it to every transform) and not used: the
    conversion copies weights. Returns ``(new_model, Change)``; the caller's model is
    untouched unless ``inplace``.

    Args:
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            MoE blocks matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.

    Example::

        >>> converted, change = convert_mixtral(mixtral_model)  # doctest: +SKIP
        >>> change.replaced                                     # doctest: +SKIP
        ['model.layers.0.mlp', 'model.layers.1.mlp']
    """
    del calibration

    def edit(target: nn.Module, change: Change) -> None:
        for path, block in select_modules(target, nn.Module, include, exclude):
            if _is_mixtral_block(block):
                replace_module(target, path, from_mixtral(block, **moe_args))
                change.replaced.append(path)
        if not change.replaced:
            raise LeanError("moefy.convert_mixtral: no MixtralSparseMoeBlock matched include="
                            f"{include!r} exclude={exclude!r}")

    return apply_transform("moefy.convert_mixtral", model, edit, example_inputs=example_inputs,
                           inplace=inplace, params={"include": include, "exclude": exclude,
                                                    **moe_args})
