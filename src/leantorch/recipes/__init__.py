"""Recipes shipped with leantorch (YAML files); see ``leantorch.compress.recipe``."""

__all__: list[str] = []  # data only: the YAML files beside this one
