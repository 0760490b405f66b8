"""``MoE``: a routed FFN layer (top-k or expert choice; capacity or dropless), with shared
experts, MoE++ zero-computation experts and gating residuals, and the balancing losses.

Expert ids: ``[0, E)`` are the FFN experts, then the ``zero_experts`` (output 0), the
``copy_experts`` (output x) and the ``constant_experts`` (output ``a1 x + a2 v`` with
``(a1, a2) = softmax(W_c x)``, MoE++, Jin et al. 2024). A token routed to a zero or copy expert
runs no matmul at all: that is where MoE++ gets its throughput.

After every forward, ``layer.stats`` (:class:`MoEStats`) holds the per-expert load, the number
of dropped assignments, the router logits (feed them to the next layer as
``prev_router_logits`` for MoE++'s gating residual) and, in training mode, the losses
(``layer.aux_loss`` is their weighted sum, ready to add to the task loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantorch.errors import LeanError, describe
from leantorch.nn.moe.experts import FeedForward, StackedExperts
from leantorch.nn.moe.router import Router
from leantorch.ops.moe.dispatch import (
    combine,
    combine_topk,
    dispatch_topk,
    plan_dispatch,
    topk_layout,
)
from leantorch.ops.moe.routing import balance_loss, capacity_for, z_loss
from leantorch.serialize import register_module
from leantorch.validate import one_of, positive_int, ratio

__all__ = ["BALANCE_MODES", "MoE", "MoEStats", "moe_aux_loss", "moe_layers"]

BALANCE_MODES = ("micro", "global")


@dataclass
class MoEStats:
    """What one forward of a :class:`MoE` layer did.

    ``load (E_total,)``: assignments each expert ran (after the capacity limit);
    ``requested (E_total,)``: assignments the router made to each expert; ``dropped``: the
    difference, summed; ``router_logits (tokens, E_total)``; ``balance_loss``, ``z_loss``,
    ``aux_loss``: training mode only (None in eval); ``exchanged_bytes``: token bytes sent to
    and received from other ranks (expert parallelism; 0 on one process).
    """

    tokens: int
    load: Tensor
    requested: Tensor
    dropped: int
    router_logits: Tensor = field(repr=False)
    kept_token_index: Tensor = field(repr=False)
    balance_loss: Tensor | None = None
    z_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    exchanged_bytes: int = 0

    @property
    def unrouted(self) -> int:
        """Tokens that no expert processed (every assignment dropped, or expert choice left
        them out): the residual stream alone carries them."""
        hit = torch.zeros(self.tokens, dtype=torch.bool, device=self.kept_token_index.device)
        hit[self.kept_token_index] = True
        return int(self.tokens - hit.sum())


@register_module(name="leantorch.MoE")
class MoE(nn.Module):
    """A mixture-of-experts FFN. ``x (..., dim)`` -> ``(..., dim)``.

    Args:
        dim: model width.
        hidden: hidden width of each routed expert.
        num_experts: routed FFN experts E.
        k: experts per token.
        activation, gated, bias: the expert FFN (``gated=True, activation="silu"`` is SwiGLU,
            ``"gelu"`` GeGLU; ``bias`` puts biases on both projections, ``"in"`` on the input
            projection only).
        output_bias: one bias added once to the layer output (what an exact split of a dense
            FFN with a down-projection bias needs).
        score, gates, routing, noisy, priority, router_bias, balance_bias_rate: the router
            (see :class:`Router`).
        capacity_factor: None (dropless) or ``cf``: each FFN expert runs at most
            ``ceil(cf * k * tokens / E)`` assignments and drops the rest in priority order
            (``priority="position"``: first choices before second choices, earlier tokens
            first; ``"score"``: larger gates first). With expert choice it sets the pick:
            ``ceil(cf * k * tokens / E_total)`` tokens per expert (None: cf = 1).
        shared_experts: FFN experts every token uses, added ungated (DeepSeekMoE); they run as
            one dense FFN of ``shared_hidden`` (default ``shared_experts * hidden``) units.
        zero_experts, copy_experts, constant_experts: MoE++ zero-computation experts.
        prev_experts: gating residual from a previous layer with that many experts (MoE++).
        balance: ``"micro"`` (the fraction f_i of this micro-batch), ``"global"`` (f_i
            accumulated over micro-batches since :meth:`reset_balance_window` and summed over
            the ranks of ``process_group``), or None (no balance loss).
        balance_loss_weight, z_loss_weight: weights of the two losses in ``aux_loss``.
        zc_balance_weight: MoE++'s tau, the balance-loss weight of zero-computation experts.
        dropout: dropout on the layer output.
        backend: grouped-matmul backend of the experts (``"auto"``, ``"loop"``,
            ``"grouped_mm"``).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        k: int = 2,
        *,
        activation: str = "silu",
        gated: bool = True,
        bias: bool | str = False,
        output_bias: bool = False,
        score: str = "softmax",
        gates: str = "renorm",
        routing: str = "topk",
        noisy: bool = False,
        priority: str = "position",
        router_bias: bool = False,
        balance_bias_rate: float = 0.0,
        capacity_factor: float | None = None,
        shared_experts: int = 0,
        shared_hidden: int | None = None,
        zero_experts: int = 0,
        copy_experts: int = 0,
        constant_experts: int = 0,
        prev_experts: int = 0,
        balance: str | None = "micro",
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        zc_balance_weight: float = 1.0,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        owner = "MoE"
        positive_int(owner, "dim", dim)
        positive_int(owner, "hidden", hidden)
        positive_int(owner, "num_experts", num_experts)
        for name, value in (("shared_experts", shared_experts), ("zero_experts", zero_experts),
                            ("copy_experts", copy_experts),
                            ("constant_experts", constant_experts)):
            positive_int(owner, name, value, minimum=0)
        one_of(owner, "balance", balance, (*BALANCE_MODES, None))
        if capacity_factor is not None:  # None: dropless
            ratio(owner, "capacity_factor", capacity_factor, include_low=False,
                  high=float("inf"))
        ratio(owner, "dropout", dropout)
        zc = zero_experts + copy_experts + constant_experts
        if routing == "expert_choice" and zc:
            raise LeanError("MoE: expert_choice routing does not take zero-computation experts "
                            "(an expert that picks tokens for nothing does nothing); use "
                            "routing='topk'")
        self.dim, self.hidden, self.num_experts, self.k = dim, hidden, num_experts, k
        self.zero_experts, self.copy_experts = zero_experts, copy_experts
        self.constant_experts = constant_experts
        self.capacity_factor = capacity_factor
        self.balance = balance
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.zc_balance_weight = zc_balance_weight
        self.dropout = dropout
        self.shared_experts = shared_experts
        self.shared_hidden = (shared_hidden if shared_hidden is not None
                              else shared_experts * hidden)
        self.router = Router(dim, num_experts + zc, k, score=score, gates=gates,
                             routing=routing, noisy=noisy, priority=priority,
                             prev_experts=prev_experts, bias=router_bias,
                             balance_bias_rate=balance_bias_rate)
        self.experts = StackedExperts(dim=dim, hidden=hidden, num_experts=num_experts,
                                      activation=activation, gated=gated, bias=bias,
                                      backend=backend)
        self.shared = (FeedForward(dim, self.shared_hidden, activation, gated, bool(bias))
                       if self.shared_hidden else None)
        self.output_bias = nn.Parameter(torch.zeros(dim)) if output_bias else None
        if constant_experts:
            self.constant_w = nn.Parameter(torch.empty(constant_experts, 2, dim))
            self.constant_v = nn.Parameter(torch.empty(constant_experts, dim))
            with torch.no_grad():
                self.constant_w.uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim))
                self.constant_v.normal_(0.0, 0.02)
        else:
            self.constant_w = self.constant_v = None
        # f_i accumulated over a window of micro-batches (and ranks): global-batch balancing
        # (an integer buffer: model.to(dtype) must not round the counts)
        self.register_buffer("balance_counts", torch.zeros(self.total_experts, dtype=torch.int64),
                             persistent=False)
        # loads are summed over the ranks of process_group (None: the default group) when
        # torch.distributed is initialized and sync_ranks is True
        self.process_group: Any = None
        self.sync_ranks = True
        self.stats: MoEStats | None = None

    # ----------------------------------------------------------------- description
    @property
    def total_experts(self) -> int:
        """Routed experts of every kind: FFN experts plus zero, copy and constant experts."""
        return (self.num_experts + self.zero_experts + self.copy_experts +
                self.constant_experts)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments, read back from the layer and its router and experts: sizes,
        ``k``, routing and gating options, the zero-computation experts, the balancing and loss
        weights, ``dropout`` and ``backend``."""
        r, e = self.router, self.experts
        return {
            "dim": self.dim, "hidden": self.hidden, "num_experts": self.num_experts,
            "k": self.k, "activation": e.activation, "gated": e.gated,
            "bias": e.bias, "output_bias": self.output_bias is not None,
            "score": r.score, "gates": r.gates, "routing": r.routing, "noisy": r.noisy,
            "priority": r.priority, "router_bias": r.bias is not None,
            "balance_bias_rate": r.balance_bias_rate, "capacity_factor": self.capacity_factor,
            "shared_experts": self.shared_experts,
            "shared_hidden": self.shared_hidden if self.shared_hidden else None,
            "zero_experts": self.zero_experts, "copy_experts": self.copy_experts,
            "constant_experts": self.constant_experts, "prev_experts": r.prev_experts,
            "balance": self.balance, "balance_loss_weight": self.balance_loss_weight,
            "z_loss_weight": self.z_loss_weight, "zc_balance_weight": self.zc_balance_weight,
            "dropout": self.dropout, "backend": e.backend,
        }

    def extra_repr(self) -> str:
        zc = (f", zero={self.zero_experts}, copy={self.copy_experts}, "
              f"constant={self.constant_experts}") if self.total_experts > self.num_experts \
            else ""
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, "
                f"k={self.k}, capacity_factor={self.capacity_factor}{zc}")

    def active_params(self) -> int:
        """Parameters one token touches: router, k routed FFN experts (an upper bound with
        zero-computation experts), the shared experts and the output bias."""
        count = sum(p.numel() for p in self.router.parameters())
        count += self.k * self.experts.params_per_expert
        if self.shared is not None:
            count += sum(p.numel() for p in self.shared.parameters())
        if self.output_bias is not None:
            count += self.dim
        return count

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor, prev_router_logits: Tensor | None = None) -> Tensor:
        """``x (..., dim)`` -> ``(..., dim)``: each token through its routed experts, mixed by the
        gates, plus the shared experts. ``prev_router_logits (..., prev_experts)``: the previous
        MoE layer's router logits (MoE++ gating residual). Sets ``self.stats``."""
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            raise LeanError(f"MoE: x must be a tensor (..., {self.dim}), got "
                            f"{describe(getattr(x, 'shape', x))}")
        shape = x.shape
        flat = x.reshape(-1, self.dim)
        tokens = flat.shape[0]
        if prev_router_logits is not None:
            prev_router_logits = prev_router_logits.reshape(tokens, -1)
        logits = self.router.logits(flat, prev_router_logits)
        if self.router.routing == "expert_choice":
            pick = math.ceil((self.capacity_factor or 1.0) * self.k * tokens /
                             self.total_experts)
            routing = self.router.route(logits, capacity=pick)
            capacity = None
        else:
            routing = self.router.route(logits)
            capacity = capacity_for(tokens, num_experts=self.num_experts, k=self.k,
                                    capacity_factor=self.capacity_factor)
        plan = plan_dispatch(routing.expert_index, self.total_experts, capacity,
                             capped_experts=self.num_experts)
        counts = plan.counts_list()
        if self.router.routing == "topk":
            # every token owns k rows: dispatch and combine are permutations (gathers both
            # ways, no scatter-add), the gates mixed in by one batched matmul
            layout = topk_layout(plan, routing.token_index, routing.choice, tokens, self.k)
            rows = dispatch_topk(flat, layout)
            pieces = self._expert_outputs(rows, plan, counts)
            if plan.dropped:
                pieces.append(rows.new_zeros(plan.dropped, self.dim))
            if self.router.priority == "position":  # choice-major: (k, T) -> (T, k) view
                gates = routing.gates.view(self.k, tokens).t()
            else:
                assignment_of_slot = torch.cat([plan.order, plan.dropped_order])[
                    layout.row_of_slot] if plan.dropped else plan.order[layout.row_of_slot]
                gates = routing.gates[assignment_of_slot].view(tokens, self.k)
            rows_out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            out = combine_topk(rows_out, layout, gates)
            kept_tokens = layout.token_of_row[: plan.order.numel()]
        else:  # expert choice: a token has any number of rows
            kept_tokens = routing.token_index[plan.order]
            rows = flat.index_select(0, kept_tokens)
            rows_out = torch.cat(self._expert_outputs(rows, plan, counts))
            out = combine(rows_out, routing.gates[plan.order], kept_tokens, tokens)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.output_bias is not None:
            out = out + self.output_bias
        if self.dropout and self.training:
            out = F.dropout(out, self.dropout, training=True)

        self.stats = MoEStats(tokens=tokens, load=plan.counts, requested=plan.requested,
                              dropped=plan.dropped, router_logits=logits,
                              kept_token_index=kept_tokens,
                              exchanged_bytes=int(getattr(self.experts, "last_exchanged_bytes",
                                                          0)))
        if self.training:
            self._training_side(routing.probs, logits, plan.requested)
        return out.reshape(shape)

    def _expert_outputs(self, rows: Tensor, plan: Any, counts: list[int]) -> list[Tensor]:
        """Outputs of the kept rows (dispatch order, grouped by expert id): the FFN experts,
        then zeros for the zero experts, the rows themselves for the copy experts (no matmul
        for either), then the constant experts ``a1 x + a2 v``."""
        pieces = []
        n_ffn = sum(counts[: self.num_experts])
        if n_ffn:
            pieces.append(self.experts(rows[:n_ffn], plan.counts[: self.num_experts],
                                       counts[: self.num_experts]))
        start = n_ffn
        first_copy = self.num_experts + self.zero_experts
        n_zero = sum(counts[self.num_experts: first_copy])
        if n_zero:
            pieces.append(rows.new_zeros(n_zero, self.dim))
        start += n_zero
        n_copy = sum(counts[first_copy: first_copy + self.copy_experts])
        if n_copy:
            pieces.append(rows[start: start + n_copy])
        start += n_copy
        first_constant = first_copy + self.copy_experts
        for c in range(self.constant_experts):
            n = counts[first_constant + c]
            if not n:
                continue
            x = rows[start: start + n]
            alpha = torch.softmax(x @ self.constant_w[c].t(), dim=-1)  # (n, 2)
            pieces.append(alpha[:, :1] * x + alpha[:, 1:] * self.constant_v[c])
            start += n
        if not pieces:
            pieces.append(rows.new_zeros(0, self.dim))
        return pieces

    def _training_side(self, probs: Tensor, logits: Tensor, requested: Tensor) -> None:
        """Balance and z losses, and the auxiliary-loss-free bias step."""
        stats = self.stats
        needs_sum = self.balance == "global" or self.router.expert_bias is not None
        summed = self._sum_over_ranks(requested) if needs_sum else None
        if self.balance is not None and self.router.routing == "topk":
            if self.balance == "global":
                self.balance_counts += summed
                fractions_from = self.balance_counts
            else:
                fractions_from = requested
            weights = None
            if self.total_experts > self.num_experts and self.zc_balance_weight != 1.0:
                weights = torch.ones(self.total_experts, dtype=probs.dtype,
                                     device=probs.device)
                weights[self.num_experts:] = self.zc_balance_weight
            stats.balance_loss = balance_loss(probs, fractions_from, weights)
        if self.z_loss_weight:
            stats.z_loss = z_loss(logits)
        terms = []
        if stats.balance_loss is not None and self.balance_loss_weight:
            terms.append(self.balance_loss_weight * stats.balance_loss)
        if stats.z_loss is not None:
            terms.append(self.z_loss_weight * stats.z_loss)
        if terms:
            stats.aux_loss = terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])
        if self.router.expert_bias is not None:
            self.router.update_expert_bias(summed)

    def _sum_over_ranks(self, value: Tensor) -> Tensor:
        import torch.distributed as dist

        if self.sync_ranks and dist.is_available() and dist.is_initialized():
            value = value.clone()
            dist.all_reduce(value, group=self.process_group)
        return value

    def reset_balance_window(self) -> None:
        """Start a new global-batch window (call after each optimizer step)."""
        self.balance_counts.zero_()

    @property
    def aux_loss(self) -> Tensor | None:
        """The weighted balance + z losses of the last training forward (None otherwise)."""
        return None if self.stats is None else self.stats.aux_loss


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every :class:`MoE` layer of ``model`` with its path."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, MoE)]


def moe_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the auxiliary losses of every MoE layer's last training forward (None if none)."""
    losses = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    if not losses:
        return None
    return sum(losses[1:], losses[0])
