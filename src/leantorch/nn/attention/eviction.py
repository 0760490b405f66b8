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


def _positive_int(owner: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LeanError(f"{owner}: {name}={describe(value)}; expected an int >= {minimum}")
    return value


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


class EvictionPolicy(ABC):
    """Decides which cached entries a layer keeps after each write."""

    budget: int
    #: True when the cache never holds more than ``budget`` entries (evicts on every write).
    bounded: bool = True
    #: True when the policy keeps accumulated per-entry scores in the cache.
    tracks_scores: bool = False

    @abstractmethod
    def select(self, length: int, num_new: int, votes: Votes, scores: Tensor | None
               ) -> tuple[Tensor | None, Tensor | None]:
        """Which of ``length`` entries (the last ``num_new`` just written) to keep.

        ``votes(m)`` returns the attention ``(batch, kv_heads, length)`` received from the last
        ``m`` new queries (see :func:`attention_votes`); it is only called when needed.
        ``scores`` are the accumulated scores of the ``length - num_new`` older entries when the
        policy tracks scores. Returns ``(indices, scores)``: indices ``(kept,)`` or ``(batch,
        kv_heads, kept)`` ascending, or None to keep everything; the kept entries' scores or None.
        """


class StreamingLLM(EvictionPolicy):
    """Attention sinks plus a recent window: keep the first ``sinks`` and the last ``recent``
    entries; ``budget = sinks + recent``."""

    def __init__(self, sinks: int = 4, recent: int = 508) -> None:
        self.sinks = _positive_int("StreamingLLM", "sinks", sinks, minimum=0)
        self.recent = _positive_int("StreamingLLM", "recent", recent)
        self.budget = self.sinks + self.recent

    def __repr__(self) -> str:
        return f"StreamingLLM(sinks={self.sinks}, recent={self.recent})"

    def select(self, length, num_new, votes, scores):
        if length <= self.budget:
            return None, None
        return streaming_indices(length, self.sinks, self.recent), None


class SnapKV(EvictionPolicy):
    """Compress each prompt to ``budget`` entries per KV head, voted by the attention of its last
    ``window`` queries and pooled over ``kernel_size`` neighbours (``pooling`` "max" or "avg")."""

    bounded = False

    def __init__(self, budget: int, window: int = 32, kernel_size: int = 5,
                 pooling: str = "max") -> None:
        self.budget = _positive_int("SnapKV", "budget", budget)
        self.window = _positive_int("SnapKV", "window", window)
        if self.window > self.budget:
            raise LeanError(f"SnapKV: window={window} > budget={budget}; the observation window "
                            "is kept, so budget must be >= window")
        self.kernel_size = _positive_int("SnapKV", "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise LeanError(f"SnapKV: kernel_size={kernel_size}; expected an odd int (a centred "
                            "pool)")
        if pooling not in ("max", "avg"):
            raise LeanError(f"SnapKV: pooling={describe(pooling)}; expected 'max' or 'avg'")
        self.pooling = pooling

    def __repr__(self) -> str:
        return (f"SnapKV(budget={self.budget}, window={self.window}, "
                f"kernel_size={self.kernel_size}, pooling={self.pooling!r})")

    def select(self, length, num_new, votes, scores):
        # Only prompts are compressed; single generated tokens are appended.
        if length <= self.budget or num_new <= 1:
            return None, None
        observed = votes(min(self.window, num_new))
        return snapkv_indices(observed, self.budget, self.window, self.kernel_size,
                              self.pooling), None


class HeavyHitters(EvictionPolicy):
    """H2O: keep the ``recent`` last entries plus the ``budget - recent`` with the largest
    accumulated attention."""

    tracks_scores = True

    def __init__(self, budget: int, recent: int | None = None) -> None:
        self.budget = _positive_int("HeavyHitters", "budget", budget)
        recent = budget // 2 if recent is None else recent
        self.recent = _positive_int("HeavyHitters", "recent", recent, minimum=0)
        if self.recent > self.budget:
            raise LeanError(f"HeavyHitters: recent={recent} > budget={budget}; expected "
                            "0 <= recent <= budget")

    def __repr__(self) -> str:
        return f"HeavyHitters(budget={self.budget}, recent={self.recent})"

    def select(self, length, num_new, votes, scores):
        received = votes(num_new)
        if scores is not None:
            received = received.clone()
            received[:, :, : length - num_new] += scores.to(received.dtype)
        if length <= self.budget:
            return None, received
        keep = heavy_hitter_indices(received, self.budget, self.recent)
        return keep, received.gather(-1, keep)
