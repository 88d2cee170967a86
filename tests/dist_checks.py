"""Run under torchrun (2 ranks) by test_common.py: each rank holds different data; every statistic that must be
over the whole batch on all ranks is computed here and written to rank<r>.json for the test to check."""

import json
import sys

import torch
import torch.distributed as dist

from common import RunningMoments, masked_whiten, micro_batches, token_micro_batches
from plumbing.padding import row_lengths
from ppo_max import normalize_scores

dist.init_process_group("gloo")
rank = dist.get_rank()
out = {"rank": rank}

# the running score statistics over both ranks' scores, three batches (then PPO-max's normaliser reads them)
stats = RunningMoments()
for step in range(3):
    scores = torch.arange(4.0) * (rank + 1) + step * 10 - rank
    stats.update(scores)
    normalize_scores(scores, stats, "paper", 0.8)
out["moments"] = {"mean": stats.mean, "std": stats.std}

# a step drawn the same on both ranks: rows [0, 3, 1, 5, 6, 2] of a dataset with these token counts; rank r takes
# rows r, r + 2, ...; micro-batches of 2 rows
counts = torch.tensor([3, 1, 4, 2, 1, 1, 2, 5])
out["micro_batches"] = [(rows.tolist(), share, sync) for rows, share, sync in micro_batches(
    torch.tensor([0, 3, 1, 5, 6, 2]), counts, 2)]  # fmt: skip
lengths = [[3, 1, 4, 2], [1, 1, 2, 5]][rank]
mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]

# the update's micro-batches: left-padded prompts (3 columns) and right-padded responses (5), a budget of one full row
prompt_lengths = [[3, 1, 2, 3], [1, 2, 3, 1]][rank]
prompts = torch.arange(3)[None] >= 3 - torch.tensor(prompt_lengths)[:, None]
attention_mask = torch.cat([prompts, mask], 1).long()
out["token_micro_batches"] = [
    (mb[0].tolist(), mb[1].stop, seq[1].start, seq[1].stop, context, share, sync)
    for mb, seq, context, share, sync in token_micro_batches(
        [torch.tensor([0, 3, 1, 2])], row_lengths(attention_mask, 3), 1
    )[0]
]
out["prompt_lengths"] = prompt_lengths

# whitening over both ranks' real tokens
values = torch.arange(20.0).view(4, 5) * (1 + rank) - 3 * rank
out["whitened"] = masked_whiten(values, mask).tolist()
out["mask"], out["values"] = mask.tolist(), values.tolist()

with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
