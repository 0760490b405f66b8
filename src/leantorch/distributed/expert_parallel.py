"""Expert parallelism: the routed experts of a :class:`~leantorch.nn.moe.MoE` layer are
sharded over the ranks of a process group; tokens travel to their experts' rank and back with
``torch.distributed.all_to_all_single`` (gloo on CPU, NCCL on GPU).

Every rank keeps the router (replicated, as data parallelism keeps it), the shared and
zero-computation experts, and a contiguous block of the FFN experts: with ``E`` experts on
``P`` ranks, rank ``r`` holds ``E // P`` of them, one more when ``r < E % P`` (uneven splits are
fine). One layer forward is:

1. route locally and sort the assignments by expert (the single-process code path); the rows
   for rank ``r``'s experts are then one contiguous slice;
2. exchange the per-expert counts (one small all-to-all), then the rows (one all-to-all with
   uneven split sizes);
3. regroup the received rows from source-major to expert-major order, run the local experts,
   and undo the regrouping;
4. send the outputs back (the reverse all-to-all) and combine them with the gates locally.

Backward runs the same two all-to-alls in reverse. Capacity limits apply per rank before
sending (each rank's assignments are its own group, as in GShard), so with a capacity factor a
P-rank layer equals the single-process layer applied to each rank's tokens separately; dropless,
it equals the single-process layer on the concatenated batch. The global-batch balance loss sums
the expert loads over the group with an all-reduce (``MoE(balance="global")``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from leantorch.errors import LeanError, LeanTypeError
from leantorch.nn.moe.experts import StackedExperts
from leantorch.nn.moe.layer import MoE, moe_layers

__all__ = [
    "ExpertParallelExperts",
    "all_to_all",
    "expert_parallel",
    "expert_partition",
]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradients back the way rows came."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, output_splits: list[int], input_splits: list[int],
                group: Any) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = rows.new_empty((sum(output_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        grad_rows = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_rows, grad.contiguous(), ctx.input_splits,
                               ctx.output_splits, group=ctx.group)
        return grad_rows, None, None, None


def all_to_all(rows: Tensor, output_splits: list[int], input_splits: list[int],
               group: Any = None) -> Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: ``rows (sum(input_splits), ...)``,
    slice ``r`` goes to rank ``r``; returns ``(sum(output_splits), ...)``, slice ``r`` from
    rank ``r``."""
    return _AllToAll.apply(rows, list(output_splits), list(input_splits), group)


def expert_partition(num_experts: int, world_size: int) -> list[int]:
    """Experts per rank: contiguous blocks, the first ``num_experts % world_size`` ranks one
    larger. Every rank must hold at least one expert."""
    if world_size > num_experts:
        raise LeanError(f"expert parallelism: {num_experts} experts cannot be spread over "
                        f"{world_size} ranks (every rank needs at least one); use a smaller "
                        "group")
    base, extra = divmod(num_experts, world_size)
    return [base + (r < extra) for r in range(world_size)]


class ExpertParallelExperts(nn.Module):
    """The local shard of a :class:`StackedExperts`, with the all-to-all exchange around it.
    Same ``forward(rows, counts)`` contract as :class:`StackedExperts`: ``rows (S, dim)``
    grouped by *global* expert id, ``counts (E,)`` -> ``(S, dim)``."""

    def __init__(self, experts: StackedExperts, group: Any = None) -> None:
        super().__init__()
        if not isinstance(experts, StackedExperts):
            raise LeanTypeError(f"ExpertParallelExperts: expected StackedExperts, got "
                                f"{type(experts).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise LeanError("expert parallelism needs torch.distributed initialized "
                            "(dist.init_process_group('gloo' or 'nccl', ...))")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = experts.num_experts
        self.sizes = expert_partition(self.num_experts, self.world_size)
        self.first = sum(self.sizes[: self.rank])
        self.num_local = self.sizes[self.rank]
        local = StackedExperts(dim=experts.dim, hidden=experts.hidden,
                               num_experts=self.num_local, activation=experts.activation,
                               gated=experts.gated, bias=experts.bias, backend=experts.backend)
        local = local.to(device=experts.w_in.device, dtype=experts.w_in.dtype)
        block = slice(self.first, self.first + self.num_local)
        with torch.no_grad():
            local.w_in.copy_(experts.w_in[block])
            local.w_out.copy_(experts.w_out[block])
            if experts.b_in is not None:
                local.b_in.copy_(experts.b_in[block])
            if experts.b_out is not None:  # bias="in" (an exact split) has none
                local.b_out.copy_(experts.b_out[block])
        self.local = local
        self.dim, self.hidden = experts.dim, experts.hidden
        self.params_per_expert = experts.params_per_expert
        self.last_exchanged_bytes = 0
        self.last_sent_rows = self.last_received_rows = 0  # to / from other ranks

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, experts {self.first}.."
                f"{self.first + self.num_local - 1} of {self.num_experts}")

    def forward(self, rows: Tensor, counts: Tensor,
                counts_list: list[int] | None = None) -> Tensor:
        """Run this rank's rows through the experts wherever they live.

        Args:
            rows: (S, dim), grouped by global expert id (expert 0's rows first).
            counts: (num_experts,) integer, rows per global expert; sums to S.
            counts_list: ``counts`` as Python ints, when the caller already has them (saves
                a device-to-host copy).

        Returns:
            (S, dim), each row's expert output in the order of ``rows``. Collective: every
            rank of the group must call it (with its own rows) the same number of times.
        """
        world, local_e = self.world_size, self.num_local
        if counts_list is None:
            counts_list = [int(c) for c in counts.tolist()]
        bounds = [sum(self.sizes[:r]) for r in range(world + 1)]
        send = [sum(counts_list[bounds[r]: bounds[r + 1]]) for r in range(world)]
        # 1. counts: rank r receives, from every source, the counts of r's experts
        counts_in = counts.to(torch.int64).contiguous()
        received_counts = counts_in.new_empty(world * local_e)
        dist.all_to_all_single(received_counts, counts_in, [local_e] * world, self.sizes,
                               group=self.group)
        by_source = received_counts.view(world, local_e)  # (source, local expert)
        table = [[int(c) for c in row] for row in by_source.tolist()]
        receive = [sum(row) for row in table]
        # 2. rows, source-major (and expert-major within a source)
        arrived = all_to_all(rows, receive, send, self.group)
        # 3. regroup expert-major: row block (source s, expert j) moves to (j, s)
        block_of_row = torch.arange(world * local_e, device=rows.device).repeat_interleave(
            by_source.reshape(-1).to(rows.device), output_size=arrived.shape[0])
        source, expert = block_of_row // local_e, block_of_row % local_e
        regroup = torch.argsort(expert * world + source, stable=True)
        local_counts = by_source.sum(0).to(rows.device)
        local_list = [sum(table[s][j] for s in range(world)) for j in range(local_e)]
        out_local = self.local(arrived.index_select(0, regroup), local_counts, local_list)
        restore = torch.argsort(regroup)
        outputs = out_local.index_select(0, restore)
        # 4. back to the ranks the rows came from
        result = all_to_all(outputs, send, receive, self.group)
        # bytes this rank sent plus received in the forward: rows out and outputs back
        self.last_sent_rows = sum(send) - send[self.rank]
        self.last_received_rows = sum(receive) - receive[self.rank]
        remote_rows = self.last_sent_rows + self.last_received_rows
        self.last_exchanged_bytes = 2 * remote_rows * self.dim * rows.element_size()
        return result


def expert_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Shard the FFN experts of every :class:`MoE` layer of ``model`` (or of the layer
    itself) over ``group`` (None: the default group), in place, and sum balance loads over the
    same group. Every rank must call it on an identical model (same seed or same weights)."""
    layers = [("", model)] if isinstance(model, MoE) else moe_layers(model)
    if not layers:
        raise LeanError(f"expert_parallel: {type(model).__name__} has no leantorch MoE layer")
    for _, layer in layers:
        if isinstance(layer.experts, ExpertParallelExperts):
            continue
        layer.experts = ExpertParallelExperts(layer.experts, group)
        layer.process_group = group
    return model
