"""KV-cache eviction policies for long prompts, each with a ``budget`` of entries per KV head.

* :class:`StreamingLLM` (Xiao et al. 2023): keep the first ``sinks`` tokens (attention sinks) and
  the ``recent`` last ones; budget = sinks + recent. Applied on every write, so the cache never
  holds more than the budget.
* :class:`SnapKV` (Li et al. 2024): when a prompt (a write of several tokens) overflows the budget,
  the last ``window`` prompt queries (the observation window) vote for earlier keys with their
  attention weights (summed over the window's queries and over the query heads of each KV head's
  group); the votes are smoothed by a 1-D max or average pool of width ``kernel_size`` so that
  neighbours of a hit survive; each KV head keeps its ``budget - window`` best-voted prefix keys
  plus the window. Decoding steps append without evicting (as in the paper), so the cache holds
  ``budget`` entries after the prompt and grows by one per generated token.
* :class:`HeavyHitters` (H2O, Zhang et al. 2023): every cached key accumulates the attention it
  receives from every query (prompt and generated tokens, summed over each group's query heads);
  when the cache overflows, each KV head keeps its ``recent`` last entries plus the
  ``budget - recent`` earlier entries with the largest accumulated attention. Applied on every
  write, so the cache never holds more than the budget.

Selection is per batch element and KV head; kept entries stay in their original order, and since
keys are cached after RoPE they keep their positions. A budget at least the sequence length keeps
everything, so the layer computes exactly what it computes without eviction.

The selection rules are plain functions (``streaming_indices``, ``snapkv_indices``,
``heavy_hitter_indices``) so they can be checked on hand-built scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from leantorch.errors import LeanError, describe
from leantorch.validate import positive_int

__all__ = [
    "EvictionPolicy",
    "HeavyHitters",
    "SnapKV",
    "StreamingLLM",
    "attention_votes",
    "heavy_hitter_indices",
    "snapkv_indices",
    "streaming_indices",
]

Votes = Callable[[int], Tensor]


def attention_votes(q: Tensor, k: Tensor, *, scale: float, chunk: int = 128) -> Tensor:
    """Attention each key receives from the queries, summed over queries and group heads.

    Args:
        q: (batch, q_heads, m, dim): the last ``m`` queries of the sequence whose keys are ``k``
            (bottom-right causal: query ``i`` sees keys ``0 .. k_len - m + i``).
        k: (batch, kv_heads, k_len, dim), with ``q_heads % kv_heads == 0``.
        scale: the softmax scale.

    Returns:
        (batch, kv_heads, k_len): ``sum over queries i and heads h of the group of
        softmax(q_i k^T * scale)``, in float32 or the inputs' float64. Queries are processed
        ``chunk`` at a time so memory stays O(chunk * k_len).
    """
    batch, q_heads, m, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    grouped = q.reshape(batch, kv_heads, group, m, dim)
    votes = q.new_zeros(batch, kv_heads, k_len, dtype=torch.promote_types(q.dtype, torch.float32))
    key_index = torch.arange(k_len, device=q.device)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", grouped[:, :, :, start:stop], k) * scale
        query_position = torch.arange(start, stop, device=q.device) + (k_len - m)
        future = key_index[None, :] > query_position[:, None]
        weights = torch.softmax(scores.masked_fill(future, float("-inf")).to(votes.dtype), -1)
        votes += weights.sum(dim=(2, 3))
    return votes


def streaming_indices(length: int, sinks: int, recent: int, device: torch.device | None = None
                      ) -> Tensor:
    """Indices ``(kept,)`` StreamingLLM keeps of ``length`` entries: the first ``sinks`` and the
    last ``recent`` (all when ``length <= sinks + recent``)."""
    if length <= sinks + recent:
        return torch.arange(length, device=device)
    return torch.cat((torch.arange(sinks, device=device),
                      torch.arange(length - recent, length, device=device)))


def snapkv_indices(votes: Tensor, budget: int, window: int, kernel_size: int = 5,
                   pooling: str = "max") -> Tensor:
    """Indices SnapKV keeps.

    Args:
        votes: (batch, heads, length) attention the observation-window queries paid to each key.
        budget: entries kept per head (the window included).
        window: the last ``window`` entries (the observation window) are always kept.
        kernel_size: width of the 1-D pool over the prefix votes (odd; 1 = no pooling).
        pooling: ``"max"`` or ``"avg"`` (zero padding counted, as a plain ``avg_pool1d``).

    Returns:
        (batch, heads, min(budget, length)) ascending indices.
    """
    batch, heads, length = votes.shape
    if length <= budget:
        return torch.arange(length, device=votes.device).expand(batch, heads, length)
    window = min(window, length)
    prefix = votes[:, :, : length - window].flatten(0, 1).unsqueeze(1)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(prefix, kernel_size, stride=1, padding=kernel_size // 2).reshape(
        batch, heads, length - window)
    chosen = pooled.topk(budget - window, dim=-1).indices
    recent = torch.arange(length - window, length, device=votes.device)
    return torch.cat((chosen.sort(dim=-1).values, recent.expand(batch, heads, window)), dim=-1)


def heavy_hitter_indices(scores: Tensor, budget: int, recent: int) -> Tensor:
    """Indices H2O keeps: the ``recent`` last entries plus the ``budget - recent`` earlier ones
    with the largest accumulated ``scores (batch, heads, length)``; ``(batch, heads,
    min(budget, length))`` ascending."""
    batch, heads, length = scores.shape
    if length <= budget:
        return torch.arange(length, device=scores.device).expand(batch, heads, length)
    heavy = scores[:, :, : length - recent].topk(budget - recent, dim=-1).indices
    last = torch.arange(length - recent, length, device=scores.device)
    return torch.cat((heavy.sort(dim=-1).values, last.expand(batch, heads, recent)), dim=-1)


def _by_position(positions: Tensor, rule: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a selection ``rule`` written for entries in position order to entries stored in
    any order: ``rule(order)`` gets the permutation that sorts each row by position and returns
    indices into the sorted row; the result is a keep mask over the stored order."""
    order = positions.argsort(dim=-1)
    chosen = order.gather(-1, rule(order))
    return torch.zeros_like(positions, dtype=torch.bool).scatter_(-1, chosen, True)


class EvictionPolicy(ABC):
    """Decides which cached entries a layer keeps after each write."""

    budget: int
    #: True when the cache never holds more than ``budget`` entries (evicts on every write).
    bounded: bool = True

    @abstractmethod
    def select(self, positions: Tensor, num_new: int, votes: Votes, scores: Tensor | None
               ) -> tuple[Tensor | None, Tensor | None]:
        """Which entries to keep.

        Args:
            positions: (batch, kv_heads, length) absolute positions of the entries, in storage
                order (not necessarily sorted: decoding moves entries into freed slots); the
                last ``num_new`` are the tokens just written.
            votes: ``votes(m)`` returns the attention ``(batch, kv_heads, length)`` each entry
                received from the last ``m`` new queries (see :func:`attention_votes`); only
                called when needed.
            scores: accumulated scores of the ``length - num_new`` older entries, for policies
                that keep them (H2O), else None.

        Returns:
            ``(keep, scores)``: a bool mask ``(batch, kv_heads, length)`` with the same number
            of True in every row, or None to keep everything; the updated scores of all
            ``length`` entries, or None.
        """


class StreamingLLM(EvictionPolicy):
    """Attention sinks plus a recent window: keep the first ``sinks`` and the last ``recent``
    entries; ``budget = sinks + recent``."""

    def __init__(self, sinks: int = 4, recent: int = 508) -> None:
        self.sinks = positive_int("StreamingLLM", "sinks", sinks, minimum=0)
        self.recent = positive_int("StreamingLLM", "recent", recent)
        self.budget = self.sinks + self.recent

    def __repr__(self) -> str:
        return f"StreamingLLM(sinks={self.sinks}, recent={self.recent})"

    def select(self, positions, num_new, votes, scores):
        length = positions.shape[-1]
        if length <= self.budget:
            return None, None
        index = streaming_indices(length, self.sinks, self.recent, positions.device)
        return _by_position(positions, lambda order: index.expand(*order.shape[:-1], -1)), None


class SnapKV(EvictionPolicy):
    """Compress each prompt to ``budget`` entries per KV head, voted by the attention of its last
    ``window`` queries and pooled over ``kernel_size`` neighbours (``pooling`` "max" or "avg")."""

    bounded = False

    def __init__(self, budget: int, window: int = 32, kernel_size: int = 5,
                 pooling: str = "max") -> None:
        self.budget = positive_int("SnapKV", "budget", budget)
        self.window = positive_int("SnapKV", "window", window)
        if self.window > self.budget:
            raise LeanError(f"SnapKV: window={window} > budget={budget}; the observation window "
                            "is kept, so budget must be >= window")
        self.kernel_size = positive_int("SnapKV", "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise LeanError(f"SnapKV: kernel_size={kernel_size}; expected an odd int (a centred "
                            "pool)")
        if pooling not in ("max", "avg"):
            raise LeanError(f"SnapKV: pooling={describe(pooling)}; expected 'max' or 'avg'")
        self.pooling = pooling

    def __repr__(self) -> str:
        return (f"SnapKV(budget={self.budget}, window={self.window}, "
                f"kernel_size={self.kernel_size}, pooling={self.pooling!r})")

    def select(self, positions, num_new, votes, scores):
        # Only prompts are compressed; single generated tokens are appended.
        if positions.shape[-1] <= self.budget or num_new <= 1:
            return None, None
        observed = votes(min(self.window, num_new))

        def rule(order: Tensor) -> Tensor:  # pooling needs the votes in position order
            return snapkv_indices(observed.gather(-1, order), self.budget, self.window,
                                  self.kernel_size, self.pooling)

        return _by_position(positions, rule), None


class HeavyHitters(EvictionPolicy):
    """H2O: keep the ``recent`` last entries plus the ``budget - recent`` with the largest
    accumulated attention."""

    def __init__(self, budget: int, recent: int | None = None) -> None:
        self.budget = positive_int("HeavyHitters", "budget", budget)
        recent = budget // 2 if recent is None else recent
        self.recent = positive_int("HeavyHitters", "recent", recent, minimum=0)
        if self.recent > self.budget:
            raise LeanError(f"HeavyHitters: recent={recent} > budget={budget}; expected "
                            "0 <= recent <= budget")

    def __repr__(self) -> str:
        return f"HeavyHitters(budget={self.budget}, recent={self.recent})"

    def select(self, positions, num_new, votes, scores):
        length = positions.shape[-1]
        received = votes(num_new)
        if scores is not None:
            received[:, :, : length - num_new] += scores.to(received.dtype)
        if length <= self.budget:
            return None, received

        def rule(order: Tensor) -> Tensor:
            return heavy_hitter_indices(received.gather(-1, order), self.budget, self.recent)

        return _by_position(positions, rule), received
