"""Sort-based dispatch: group the assignments by expert, run each expert once on its contiguous
rows, and add the gate-weighted outputs back to their tokens.

The expert weights are stacked: ``w_in (experts, dim, hidden)`` (``2 * hidden`` for a gated
expert: the gate half first, then the up half) and ``w_out (experts, hidden, dim)``, so an
expert is ``y = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` (gated:
``act(x @ W_gate) * (x @ W_up)``).

Two ways to run the grouped matmul, with the same results:

* ``"loop"``: one ``mm`` per non-empty expert on its slice of rows, the weights taken with
  ``unbind`` (views): indexing ``w[e]`` inside autograd would make every expert's backward
  allocate and fill a gradient the size of the whole stacked weight;
* ``"grouped_mm"``: ``torch._grouped_mm`` (one call for all experts; float32 / bfloat16 /
  float16, every stride a multiple of 16 bytes); ``"auto"`` takes it when it applies.

No path loops over tokens in Python: the only Python loop is over the experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from leantorch.errors import LeanError, describe

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "DispatchPlan",
    "activation_fn",
    "combine",
    "expert_mlp",
    "grouped_matmul",
    "grouped_mm_supported",
    "plan_dispatch",
]

BACKENDS = ("auto", "loop", "grouped_mm")


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The element-wise activation called ``name`` (relu, gelu, gelu_tanh, silu)."""
    if name not in ACTIVATIONS:
        raise LeanError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


@dataclass
class DispatchPlan:
    """Where each kept assignment goes.

    ``order (kept,)``: indices into the assignment arrays, grouped by expert (ascending) and in
    priority order within an expert; ``counts (experts,)``: kept assignments per expert;
    ``requested (experts,)``: assignments per expert before the capacity limit;
    ``dropped``: assignments over capacity (not run; the residual stream carries the token).
    """

    order: Tensor
    counts: Tensor
    requested: Tensor
    dropped: int

    def counts_list(self) -> list[int]:
        return [int(c) for c in self.counts.tolist()]


def plan_dispatch(
    expert_index: Tensor,
    num_experts: int,
    capacity: int | None = None,
    capped_experts: int | None = None,
) -> DispatchPlan:
    """Group assignments by expert and apply the capacity limit.

    ``expert_index (A,)`` must already be in priority order (see
    :func:`leantorch.ops.moe.routing.priority_order`): the sort is stable, so within an expert
    the first ``capacity`` assignments in that order are kept and the rest dropped.
    ``capped_experts``: only experts ``< capped_experts`` have a capacity (MoE++'s
    zero-computation experts, which cost nothing, are never capped).
    """
    if expert_index.dim() != 1:
        raise LeanError(f"expert_index must be 1-d (assignments,), got shape "
                        f"{tuple(expert_index.shape)}")
    sorted_experts, order = torch.sort(expert_index, stable=True)
    requested = torch.bincount(expert_index, minlength=num_experts)
    if requested.numel() > num_experts:
        raise LeanError(f"expert_index has ids up to {requested.numel() - 1} but num_experts="
                        f"{num_experts}")
    if capacity is None:
        return DispatchPlan(order, requested, requested, 0)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise LeanError(f"capacity must be a non-negative integer or None, got "
                        f"{describe(capacity)}")
    limit = torch.full_like(requested, capacity)
    if capped_experts is not None:
        limit[capped_experts:] = expert_index.numel()
    starts = torch.cumsum(requested, 0) - requested
    position = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
    keep = position < limit[sorted_experts]
    counts = torch.minimum(requested, limit)
    kept_order = order[keep]
    return DispatchPlan(kept_order, counts, requested, int(order.numel() - kept_order.numel()))


def grouped_mm_supported(rows: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these operands here: float32/bfloat16/float16 on
    a CPU (or a CUDA GPU of compute capability 8.0+), 16-byte-aligned strides and pointers."""
    if not hasattr(torch, "_grouped_mm") or rows.dtype != weight.dtype:
        return False
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if rows.device.type == "cuda":
        if torch.cuda.get_device_capability(rows.device) < (8, 0):
            return False
    elif rows.device.type != "cpu":
        return False
    size = rows.element_size()
    for t in (rows, weight):
        if t.data_ptr() % 16:
            return False
        if any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _contiguous_grad(output: Tensor) -> Tensor:
    # torch._grouped_mm's backward rejects a broadcast (stride-0) incoming gradient
    if output.requires_grad:
        output.register_hook(lambda grad: grad.contiguous())
    return output


def grouped_matmul(
    rows: Tensor,
    weight: Tensor,
    counts: Tensor,
    bias: Tensor | None = None,
    backend: str = "auto",
    counts_list: Sequence[int] | None = None,
) -> Tensor:
    """``rows[group e] @ weight[e] (+ bias[e])`` for every group, the groups contiguous.

    Args:
        rows: ``(S, K)``, grouped by expert, ``S == counts.sum()``.
        weight: ``(E, K, N)``.
        counts: ``(E,)`` rows per group.
        bias: ``(E, N)`` or None.
        backend: ``"auto"``, ``"loop"`` or ``"grouped_mm"``.
        counts_list: ``counts`` as Python ints, when the caller has them already.

    Returns:
        ``(S, N)``.
    """
    if backend not in BACKENDS:
        raise LeanError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if weight.dim() != 3 or rows.dim() != 2 or rows.shape[1] != weight.shape[1]:
        raise LeanError(f"grouped_matmul: rows (S, K) and weight (E, K, N) expected, got "
                        f"{tuple(rows.shape)} and {tuple(weight.shape)}")
    use_grouped = backend == "grouped_mm" or (
        backend == "auto" and grouped_mm_supported(rows, weight))
    if use_grouped:
        if not grouped_mm_supported(rows, weight):
            raise LeanError(f"backend='grouped_mm' does not apply to {rows.dtype} rows "
                            f"{tuple(rows.shape)} on {rows.device} (needs float32/bfloat16/"
                            "float16 and 16-byte-aligned strides); use backend='auto'")
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        out = _contiguous_grad(torch._grouped_mm(rows, weight, offs=offsets))
        if bias is not None:
            out = out + bias.repeat_interleave(counts, dim=0, output_size=rows.shape[0])
        return out
    sizes = list(counts_list) if counts_list is not None else [int(c) for c in counts.tolist()]
    parts = []
    weights = weight.unbind(0)
    biases = bias.unbind(0) if bias is not None else None
    for e, chunk in enumerate(rows.split(sizes)):
        if sizes[e] == 0:
            continue  # an expert that received nothing runs nothing
        if biases is None:
            parts.append(chunk @ weights[e])
        else:
            parts.append(torch.addmm(biases[e], chunk, weights[e]))
    if not parts:
        return rows.new_zeros(0, weight.shape[2])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def expert_mlp(
    rows: Tensor,
    counts: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    *,
    activation: str = "silu",
    gated: bool = True,
    backend: str = "auto",
    counts_list: Sequence[int] | None = None,
) -> Tensor:
    """Run stacked FFN experts on rows grouped by expert.

    ``rows (S, dim)``, ``counts (E,)``, ``w_in (E, dim, hidden or 2*hidden)``,
    ``w_out (E, hidden, dim)``, ``b_in (E, hidden or 2*hidden)``, ``b_out (E, dim)``
    -> ``(S, dim)``.
    """
    act = activation_fn(activation)
    if counts_list is None and backend != "grouped_mm":
        counts_list = [int(c) for c in counts.tolist()]
    hidden = grouped_matmul(rows, w_in, counts, b_in, backend, counts_list)
    if gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = act(gate) * up
    else:
        hidden = act(hidden)
    return grouped_matmul(hidden, w_out, counts, b_out, backend, counts_list)


def combine(
    expert_out: Tensor,
    gates: Tensor,
    token_index: Tensor,
    num_tokens: int,
    out: Tensor | None = None,
) -> Tensor:
    """``out[token] += gate * expert_out`` for every row: ``expert_out (S, dim)``,
    ``gates (S,)``, ``token_index (S,)`` -> ``(num_tokens, dim)`` (added to ``out`` when
    given, out of place)."""
    weighted = expert_out * gates.to(expert_out.dtype).unsqueeze(-1)
    if out is None:
        out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add(0, token_index, weighted)
