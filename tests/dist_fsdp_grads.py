"""Run under torchrun (2 ranks) by test_scale.py: a 70m-shaped GPT-NeoX (toy vocabulary) sharded with FSDP2 takes one
step over 4 micro-batches, as the scripts accumulate gradients (models.gradient_sync), and again with FSDP2's
gradient sync switched off until the last micro-batch (the old way). After each micro-batch's backward the gradient
memory each rank holds is summed tensor by tensor (the sharded gradients and any unsharded accumulation buffer);
rank<r>.json gets those sums, the full gradient size, and a checksum of the final sharded gradients."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from throughput import pythia_config  # noqa: E402

from plumbing import models, run  # noqa: E402


def gradient_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            total += grad.numel() * grad.element_size()
    for module in models.fsdp_modules(model):
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group else []:  # unsharded gradients kept for a later reduce
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            for buffer in (fsdp_param.unsharded_accumulated_grad, getattr(unsharded, "grad", None)):
                total += buffer.numel() * buffer.element_size() if buffer is not None else 0
    return total


def step(model, batches, old_way: bool) -> list[int]:
    held = []
    for i, ids in enumerate(batches):
        last = i == len(batches) - 1
        if old_way:
            for module in models.fsdp_modules(model):
                module.set_requires_gradient_sync(last, recurse=False)
        with models.gradient_sync([model], last):
            model(input_ids=ids, labels=ids).loss.backward()
        held.append(gradient_bytes(model))
    return held


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from transformers import AutoConfig, GPTNeoXForCausalLM

    config = pythia_config("70m", AutoConfig.from_pretrained(run.repo_path("toy/policy")))
    out = {"rank": rank}
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(2, 600, (2, 16), generator=generator) for _ in range(4)]
    torch.manual_seed(0)
    initial = GPTNeoXForCausalLM(config).eval()
    full = sum(p.numel() * 4 for p in initial.parameters())
    for name, old_way in (("scripts", False), ("sync_off", True)):
        model = models.shard_model(copy.deepcopy(initial), torch.float32)
        out[name] = step(model, batches, old_way)
        out[f"{name}_checksum"] = sum(float(p.grad.to_local().double().sum()) for p in model.parameters())
    out["full_gradient_bytes"] = full
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
