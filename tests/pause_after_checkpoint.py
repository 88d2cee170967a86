"""Run an algorithm script with checkpoints.save_checkpoint wrapped: once the first checkpoint is written (on every
rank), rank 0 writes PAUSED (a path) and every rank waits there, so a test can kill the run at that point, after a
checkpoint and before the next iteration, with no race. Usage: PAUSED=path python tests/pause_after_checkpoint.py
ppo [script flags...] (or under torchrun)."""

import importlib
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plumbing import checkpoints  # noqa: E402

save_checkpoint = checkpoints.save_checkpoint


def pausing_save_checkpoint(*args, **kwargs):
    save_checkpoint(*args, **kwargs)
    if dist.is_initialized():
        dist.barrier()  # every rank has written its part
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(os.environ["PAUSED"]).write_text("paused\n")
    while True:  # until the test kills the run
        time.sleep(1)


if __name__ == "__main__":
    script = importlib.import_module(sys.argv[1])
    checkpoints.save_checkpoint = pausing_save_checkpoint
    sys.argv = [sys.argv[1] + ".py", *sys.argv[2:]]
    script.main()
