"""The floor under common.py and plumbing/: reductions over ranks, autocast and position ids. It imports nothing of
the project, so common.py (which the scripts read) and plumbing/ (which they need not) both stand on it and
neither imports the other's internals in a circle; common.py re-exports these names (`common.all_reduce_sum`)."""

import torch
import torch.distributed as dist


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def global_means(per_sequence: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over all ranks' sequences of each per-sequence statistic: one all-reduce, one sync."""
    count = next(iter(per_sequence.values())).new_tensor(len(next(iter(per_sequence.values()))), dtype=torch.float)
    sums = all_reduce_sum(torch.stack([v.float().sum() for v in per_sequence.values()] + [count])).tolist()
    return {key: total / sums[-1] for key, total in zip(per_sequence, sums)}


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded and unpadded rows get the same positions, so padding never changes a log-prob."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
