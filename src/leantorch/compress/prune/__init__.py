"""Pruning: unstructured, N:M and block masks, sparse execution, lottery tickets, structured
pruning. Each transform returns ``(new_model, Change)``."""
