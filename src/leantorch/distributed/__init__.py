"""Distributed execution on ``torch.distributed``: expert parallelism for MoE layers."""

from leantorch.distributed.expert_parallel import (
    ExpertParallelExperts,
    all_to_all,
    expert_parallel,
    expert_partition,
)

__all__ = ["ExpertParallelExperts", "all_to_all", "expert_parallel", "expert_partition"]
