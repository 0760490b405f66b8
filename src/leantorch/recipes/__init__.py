"""Recipes shipped with leantorch (YAML files); see ``leantorch.compress.recipe``."""
