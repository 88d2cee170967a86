"""Run under torchrun by test_ppo_max.py: each rank feeds its own score batches to the normaliser."""

import json
import sys

import torch
import torch.distributed as dist

from common import RunningMoments
from ppo_max import normalize_scores

dist.init_process_group("gloo")
rank = dist.get_rank()
stats, last = RunningMoments(), None
for step in range(3):
    scores = torch.arange(4.0) * (rank + 1) + step * 10 - rank  # different data on each rank
    last = normalize_scores(scores, stats, "paper", 0.8)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "mean": stats.mean, "std": stats.std, "last": last.tolist()}, f)
dist.destroy_process_group()
