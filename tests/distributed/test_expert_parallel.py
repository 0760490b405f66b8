"""Expert parallelism on 2 gloo processes equals the single-process layer: outputs, gradients,
loads, drops and the global-batch balance loss."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leantorch.distributed import ExpertParallelExperts, expert_parallel, expert_partition
from leantorch.errors import LeanError
from leantorch.nn.moe import MoE

DIM, HIDDEN, EXPERTS, K = 16, 24, 5, 2  # 5 experts on 2 ranks: an uneven 3 + 2 split
TOKENS = (7, 12)  # uneven token counts per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(**options: object) -> MoE:
    torch.manual_seed(1)
    return MoE(DIM, HIDDEN, EXPERTS, K, **options).double()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(sum(TOKENS), DIM, dtype=torch.float64, generator=generator)
    weights = torch.randn(sum(TOKENS), DIM, dtype=torch.float64, generator=generator)
    return x, weights


def _check(rank: int, options: dict[str, object], per_rank_reference: bool) -> None:
    x, weights = _inputs()
    mine = slice(0, TOKENS[0]) if rank == 0 else slice(TOKENS[0], sum(TOKENS))

    # single-process reference, computed on this rank without any collective
    reference = _layer(**options).train()
    reference.sync_ranks = False
    x_ref = x.clone().requires_grad_()
    if per_rank_reference:  # capacity: each rank's tokens are their own group
        outs = [reference(x_ref[:TOKENS[0]]), reference(x_ref[TOKENS[0]:])]
        y_ref = torch.cat(outs)
    else:
        y_ref = reference(x_ref)
        ref_counts = reference.stats.requested.clone()
        ref_balance = reference.stats.balance_loss.detach()
    (y_ref * weights).sum().backward()

    layer = expert_parallel(_layer(**options).train())
    assert isinstance(layer.experts, ExpertParallelExperts)
    x_mine = x[mine].clone().requires_grad_()
    y = layer(x_mine)
    (y * weights[mine]).sum().backward()

    torch.testing.assert_close(y, y_ref[mine], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_mine.grad, x_ref.grad[mine], rtol=1e-12, atol=1e-12)
    # expert weights: the owner holds the full gradient of its experts
    block = slice(layer.experts.first, layer.experts.first + layer.experts.num_local)
    torch.testing.assert_close(layer.experts.local.w_in.grad, reference.experts.w_in.grad[block])
    torch.testing.assert_close(layer.experts.local.w_out.grad,
                               reference.experts.w_out.grad[block])
    # the router is replicated: its gradients summed over ranks are the reference's
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, reference.router.weight.grad, rtol=1e-10,
                               atol=1e-12)
    # over the group, rows sent to other ranks equal rows received from them
    traffic = torch.tensor([layer.experts.last_sent_rows, layer.experts.last_received_rows])
    dist.all_reduce(traffic)
    assert traffic[0] == traffic[1] > 0
    assert layer.stats.exchanged_bytes == 2 * 8 * DIM * (
        layer.experts.last_sent_rows + layer.experts.last_received_rows)
    if options.get("balance") == "global":
        # f_i summed over ranks equals the concatenated batch's; the losses, weighted by
        # each rank's share of tokens, add up to the single-process loss
        assert torch.equal(layer.balance_counts, ref_counts)
        share = TOKENS[rank] / sum(TOKENS)
        weighted = (layer.stats.balance_loss.detach() * share).reshape(1)
        dist.all_reduce(weighted)
        torch.testing.assert_close(weighted[0], ref_balance, rtol=1e-12, atol=1e-12)
    if per_rank_reference:
        dropped = torch.tensor([layer.stats.dropped])
        dist.all_reduce(dropped)
        assert dropped.item() > 0  # the capacity actually bit


CASES = [
    # dropless, with shared, zero and copy experts: equals one process on the whole batch
    ({"balance": "global", "shared_experts": 1, "copy_experts": 1, "zero_experts": 1}, False),
    # capacity: each rank's tokens are their own group
    ({"capacity_factor": 0.5, "balance": "micro"}, True),
]


def _worker(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for options, per_rank_reference in CASES:
            _check(rank, options, per_rank_reference)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process() -> None:
    # one spawn for every case: starting two interpreters is most of the cost
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_partition_is_contiguous_and_uneven_when_it_must_be() -> None:
    assert expert_partition(5, 2) == [3, 2]
    assert expert_partition(8, 2) == [4, 4]
    assert sum(expert_partition(7, 3)) == 7
    with pytest.raises(LeanError, match="at least one"):
        expert_partition(2, 3)


def test_expert_parallel_needs_an_initialized_group() -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(LeanError, match="init_process_group"):
        expert_parallel(MoE(8, 8, 2, 1))
