"""Sort-based dispatch: group the assignments by expert, run each expert once on its contiguous
rows, and add the gate-weighted outputs back to their tokens.

The expert weights are stacked: ``w_in (experts, dim, hidden)`` (``2 * hidden`` for a gated
expert: the gate half first, then the up half) and ``w_out (experts, hidden, dim)``, so an
expert is ``y = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` (gated:
``act(x @ W_gate) * (x @ W_up)``).

Two ways to run the grouped matmul, with the same results:

* ``"loop"``: one expert after the other on its slice of rows, in an autograd Function that
  writes outputs and weight gradients in place (indexing ``w[e]`` inside autograd would make
  every expert's backward allocate and fill a gradient the size of the whole stacked weight;
  ``unbind`` views avoid that but still copy all the gradients once more when stacking them);
* ``"grouped_mm"``: ``torch._grouped_mm`` (one call for all experts; float32 / bfloat16 /
  float16, every stride a multiple of 16 bytes).

``"auto"`` takes the loop on a CPU, where it measured faster (``benchmarks/moe.py``), and the
grouped matmul on a GPU where it applies.

No path loops over tokens in Python: the only Python loop is over the experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from leantorch.errors import LeanError
from leantorch.validate import positive_int

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "DispatchPlan",
    "TopkLayout",
    "activation_fn",
    "combine",
    "combine_topk",
    "dispatch_topk",
    "expert_mlp",
    "grouped_matmul",
    "grouped_mm_supported",
    "plan_dispatch",
    "topk_layout",
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
    ``dropped``: assignments over capacity (not run; the residual stream carries the token);
    ``dropped_order (dropped,)``: their indices, grouped by expert.
    """

    order: Tensor
    counts: Tensor
    requested: Tensor
    dropped: int
    dropped_order: Tensor | None = None

    def counts_list(self) -> list[int]:
        """``counts`` as Python ints, one per expert (one device
        sync)."""
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
    positive_int("plan_dispatch", "capacity", capacity, minimum=0)  # None: dropless
    limit = torch.full_like(requested, capacity)
    if capped_experts is not None:
        limit[capped_experts:] = expert_index.numel()
    starts = torch.cumsum(requested, 0) - requested
    position = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
    keep = position < limit[sorted_experts]
    counts = torch.minimum(requested, limit)
    kept_order = order[keep]
    return DispatchPlan(kept_order, counts, requested, int(order.numel() - kept_order.numel()),
                        order[~keep])


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


class _LoopExpertMLP(torch.autograd.Function):
    """Each expert run whole on its rows (up projection, activation, down projection), one
    after the other, forward and backward.

    Why a Function: per expert, the ``hidden``-wide intermediates stay small (they fit in cache
    for a few hundred rows, where one buffer for all experts would not); the outputs and the
    weight gradients are written in place (``out=``) instead of being concatenated and stacked
    (autograd through ``unbind`` would copy every expert's weight gradient once more: the
    whole cost of a small batch). Only the pre-activations are saved; the activation is
    recomputed per expert in backward.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                b_out: Tensor | None, sizes: list[int], activation: str,
                gated: bool) -> Tensor:
        save = any(ctx.needs_input_grad[:5])
        pre = rows.new_empty(rows.shape[0], w_in.shape[2]) if save else None
        out = _run_experts(rows, w_in, w_out, b_in, b_out, sizes, activation, gated, pre)
        ctx.sizes, ctx.activation, ctx.gated = list(sizes), activation, gated
        ctx.save_for_backward(rows, w_in, w_out, pre)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, w_in, w_out, pre = ctx.saved_tensors
        need_rows, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:5]
        need_hidden = need_rows or need_w_in or need_b_in
        hidden_of = _hidden_fn(ctx.activation, ctx.gated)
        grad_rows = torch.empty_like(rows) if need_rows else None
        # every expert that ran overwrites its slice (out=); only the idle ones need zeros, so
        # the weight gradients are not written twice (at a small batch that second pass over
        # every expert's weights was most of the backward)
        grad_w_in = torch.empty_like(w_in) if need_w_in else None
        grad_w_out = torch.empty_like(w_out) if need_w_out else None
        grad_b_in = w_in.new_empty(w_in.shape[0], w_in.shape[2]) if need_b_in else None
        grad_b_out = w_out.new_empty(w_out.shape[0], w_out.shape[2]) if need_b_out else None
        sizes = list(ctx.sizes) + [0] * (w_in.shape[0] - len(ctx.sizes))
        start = 0
        for e, n in enumerate(sizes):
            if n == 0:
                for g in (grad_w_in, grad_w_out, grad_b_in, grad_b_out):
                    if g is not None:
                        g[e].zero_()
                continue
            stop = start + n
            g = grad[start:stop]
            with torch.enable_grad():
                h = pre[start:stop].detach().requires_grad_(need_hidden)
                a = hidden_of(h)
            if need_w_out:
                torch.mm(a.detach().t(), g, out=grad_w_out[e])
            if need_b_out:
                torch.sum(g, dim=0, out=grad_b_out[e])
            if need_hidden:
                (grad_h,) = torch.autograd.grad(a, h, g @ w_out[e].t())
                if need_w_in:
                    torch.mm(rows[start:stop].t(), grad_h, out=grad_w_in[e])
                if need_b_in:
                    torch.sum(grad_h, dim=0, out=grad_b_in[e])
                if need_rows:
                    torch.mm(grad_h, w_in[e].t(), out=grad_rows[start:stop])
            start = stop
        if need_rows and start < rows.shape[0]:  # rows past the last group: no expert
            grad_rows[start:].zero_()
        return grad_rows, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None, None


# activations with an in-place form, for the inference loop (no autograd to save for)
_INPLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu_,
    "silu": lambda x: F.silu(x, inplace=True),
}


def _run_experts(rows: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                 b_out: Tensor | None, sizes: list[int], activation: str, gated: bool,
                 pre: Tensor | None = None) -> Tensor:
    """Each expert whole on its rows, one after the other: ``(S, dim) -> (S, dim)``.

    With ``pre`` (``(S, hidden or 2*hidden)``, for a backward) every expert's pre-activations
    are written into its rows of ``pre`` and kept. Without it (inference) one buffer sized for
    the busiest expert serves every expert and the activation (and the gate product) runs in
    place where the activation has an in-place form: no per-expert allocation.
    """
    out = rows.new_empty(rows.shape[0], w_out.shape[2])
    largest = max(sizes, default=0)
    buffer = rows.new_empty(largest, w_in.shape[2]) if pre is None and largest else None
    inplace = _INPLACE.get(activation) if pre is None else None
    hidden_of = _hidden_fn(activation, gated)
    start = 0
    for e, n in enumerate(sizes):
        if n == 0:
            continue  # an expert that received nothing runs nothing
        stop = start + n
        h = buffer[:n] if pre is None else pre[start:stop]
        if b_in is None:
            torch.mm(rows[start:stop], w_in[e], out=h)
        else:
            torch.addmm(b_in[e], rows[start:stop], w_in[e], out=h)
        if inplace is None:
            a = hidden_of(h)
        elif gated:
            gate, up = h.chunk(2, dim=-1)
            a = inplace(gate).mul_(up)  # a strided view of the buffer: BLAS takes its stride
        else:
            a = inplace(h)
        if b_out is None:
            torch.mm(a, w_out[e], out=out[start:stop])
        else:
            torch.addmm(b_out[e], a, w_out[e], out=out[start:stop])
        start = stop
    return out


def _hidden_fn(activation: str, gated: bool) -> Callable[[Tensor], Tensor]:
    act = activation_fn(activation)

    def hidden_of(h: Tensor) -> Tensor:
        if gated:
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
        return act(h)

    return hidden_of


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

    ``"loop"`` runs each expert whole on its rows (:class:`_LoopExpertMLP`);
    ``"grouped_mm"`` makes two ``torch._grouped_mm`` calls around one activation over all
    rows. ``"auto"``: the loop on a CPU (measured faster there, ``benchmarks/moe.py``), the
    grouped matmul on a GPU when it applies.
    """
    if backend not in BACKENDS:
        raise LeanError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    use_grouped = backend == "grouped_mm" or (
        backend == "auto" and rows.device.type != "cpu" and grouped_mm_supported(rows, w_in)
        and grouped_mm_supported(rows, w_out))
    if use_grouped:
        hidden = grouped_matmul(rows, w_in, counts, b_in, "grouped_mm")
        return grouped_matmul(_hidden_fn(activation, gated)(hidden), w_out, counts, b_out,
                              "grouped_mm")
    activation_fn(activation)
    sizes = list(counts_list) if counts_list is not None else [int(c) for c in counts.tolist()]
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (rows, w_in, w_out, b_in, b_out)):
        return _run_experts(rows, w_in, w_out, b_in, b_out, sizes, activation, gated)
    return _LoopExpertMLP.apply(rows, w_in, w_out, b_in, b_out, sizes, activation, gated)


class _GatherTokens(torch.autograd.Function):
    """``flat.index_select(0, token_of_row)`` where every token owns exactly ``k`` rows; the
    backward gathers each token's ``k`` row gradients and sums them (no scatter-add)."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, token_of_row: Tensor, row_of_slot: Tensor,
                k: int) -> Tensor:
        ctx.save_for_backward(row_of_slot)
        ctx.tokens, ctx.k = flat.shape[0], k
        return flat.index_select(0, token_of_row)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (row_of_slot,) = ctx.saved_tensors
        per_slot = grad.index_select(0, row_of_slot).view(ctx.tokens, ctx.k, -1)
        return per_slot.sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for a permutation ``index``; the backward applies the
    inverse permutation (a gather, where autograd's generic backward would scatter-add)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass
class TopkLayout:
    """Where each of the ``tokens * k`` top-k assignments sits.

    A *slot* is an assignment in token-major order (``t * k + j``: token ``t``'s ``j``-th
    choice); a *row* is its position in dispatch order (grouped by expert: the kept
    assignments of :class:`DispatchPlan`, then the dropped ones). ``slot_of_row`` and
    ``row_of_slot`` are inverse permutations; ``token_of_row`` names each row's token.
    """

    tokens: int
    k: int
    token_of_row: Tensor
    slot_of_row: Tensor
    row_of_slot: Tensor


def topk_layout(plan: DispatchPlan, token_index: Tensor, choice: Tensor, tokens: int,
                k: int) -> TopkLayout:
    """The layout of ``plan`` over top-k assignments ``token_index (A,)``, ``choice (A,)``
    (as :class:`~leantorch.ops.moe.routing.Routing` holds them, in any priority order)."""
    order = plan.order if plan.dropped == 0 else torch.cat([plan.order, plan.dropped_order])
    token_of_row = token_index[order]
    slot_of_row = token_of_row * k + choice[order]
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(slot_of_row.numel(), device=order.device)
    return TopkLayout(tokens, k, token_of_row, slot_of_row, row_of_slot)


def dispatch_topk(flat: Tensor, layout: TopkLayout) -> Tensor:
    """Every assignment's token row in dispatch order: ``flat (tokens, dim)`` ->
    ``(tokens * k, dim)``. Backward: a gather and a sum over each token's ``k`` rows."""
    return _GatherTokens.apply(flat, layout.token_of_row, layout.row_of_slot, layout.k)


def combine_topk(rows_out: Tensor, layout: TopkLayout, gates: Tensor) -> Tensor:
    """``out[t] = sum_j gates[t, j] * rows_out[row of (t, j)]``: ``rows_out (tokens * k,
    dim)`` in dispatch order (zero rows for dropped and zero-expert assignments), ``gates
    (tokens, k)`` -> ``(tokens, dim)``.

    The rows are permuted token-major and each token's ``k`` rows mixed by one batched
    ``(1 x k) @ (k x dim)`` matmul: a gather instead of a multiply and a scatter-add, forward
    and backward.
    """
    slots = _PermuteRows.apply(rows_out, layout.row_of_slot, layout.slot_of_row)
    mixed = torch.bmm(gates.to(rows_out.dtype).unsqueeze(1),
                      slots.view(layout.tokens, layout.k, -1))
    return mixed.squeeze(1)


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
