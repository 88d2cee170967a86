"""Run an algorithm script (under torchrun) with checkpoints.load_checkpoint wrapped: right after a --resume restores
the trained models and optimizers, their full state (gathered under --fsdp, as training_state builds it for a
checkpoint) is saved to RESTORED_STATE, then the run goes on. Usage: RESTORED_STATE=path.pt python
tests/restored_state.py ppo [script flags...]."""

import importlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plumbing import checkpoints  # noqa: E402

load_checkpoint = checkpoints.load_checkpoint


def dumping_load_checkpoint(output_dir, trained):
    state = load_checkpoint(output_dir, trained)
    full = checkpoints.training_state(trained)  # (every rank takes part; rank 0 holds the tensors)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(full, os.environ["RESTORED_STATE"])
    return state


if __name__ == "__main__":
    script = importlib.import_module(sys.argv[1])
    checkpoints.load_checkpoint = dumping_load_checkpoint
    sys.argv = [sys.argv[1] + ".py", *sys.argv[2:]]
    script.main()
