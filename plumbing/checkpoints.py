"""Plumbing (a reader of the algorithms can skip it): checkpoints. The trained weights and optimizer states in
atomic checkpoints (one file, or a sharded directory under --fsdp) and --resume, and saving, describing and
uploading the final policy."""

import dataclasses
import json
import os
import shlex
import shutil
import sys

import torch
import torch.distributed as dist
from torch import nn

from plumbing import models, run


# ---------------------------------------------------------------- trained weights in checkpoints and the final policy
def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state(model: nn.Module) -> dict:
    """The parameters that training changes (all of them, or the adapter and head with LoRA), as full tensors on
    rank 0 ({} elsewhere). Under --fsdp every rank must call it: the shards are gathered."""
    model = models.unwrap(model)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if models.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_state_options())
        return {name: t for name, t in state.items() if name in trained}
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {name: p.detach().cpu() for name, p in model.named_parameters() if name in trained}


def load_trainable_state(model: nn.Module, state: dict):
    model = models.unwrap(model)
    if models.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = {name for name, _ in model.named_parameters()}
        unexpected = [name for name in state if name not in names]
        if not unexpected and state:  # each rank holds the full state: it keeps its own shard
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected or not state:
        run.fail(
            f"checkpoint does not match the model ({len(unexpected)} unknown tensors); use the run's --model/--use-lora"
        )


def dcp_optimizer_state(model: nn.Module, optimizer, options=None) -> dict:
    """torch.distributed.checkpoint's state dict of an optimizer, leaving an optimizer that has not stepped yet as it
    was: to have states to save, DCP steps it once at lr 0, which counts as AdamW's first step, so the first real
    step's bias correction would be the second's (a checkpoint during PPO-max's critic warm-up changed the policy's
    first update). Such a state is saved marked `fresh` (load_checkpoint clears it again)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    fresh = not optimizer.state
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if fresh:
        optimizer.state.clear()
    return {"fresh": torch.tensor(fresh), "state": state}


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's state (full tensors under --fsdp, gathered; every rank must call it), {} except on rank 0."""
    if models.is_sharded(model):
        return dcp_optimizer_state(model, optimizer, _full_state_options())
    return optimizer.state_dict() if not dist.is_initialized() or dist.get_rank() == 0 else {}


def load_optimizer_state(model: nn.Module, optimizer, state: dict):
    if models.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["state"], options=StateDictOptions(full_state_dict=True))
        if state["fresh"]:
            optimizer.state.clear()
    else:
        optimizer.load_state_dict(state)


def max_replica_difference(model: nn.Module) -> float:
    """Largest difference between ranks of any parameter's checksum (0.0 when replicas agree)."""
    if not dist.is_initialized() or models.is_sharded(model):
        return 0.0  # under --fsdp each parameter exists once, as shards: there are no replicas to disagree
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return (hi - lo).abs().max().item()


def training_state(trained: dict) -> dict:
    """The checkpoint entries of `trained` ({name: (model, optimizer)}): `name` holds the model's trainable weights,
    `name_optimizer` its optimizer's state. Full tensors on rank 0; under --fsdp every rank must call it."""
    state = {}
    for name, (model, optimizer) in trained.items():
        state[name] = trainable_state(model)
        state[f"{name}_optimizer"] = optimizer_state(model, optimizer)
    return state


def load_training_state(checkpoint: dict, trained: dict):
    """Restore every (model, optimizer) of `trained` from the entries `training_state` wrote."""
    for name, (model, optimizer) in trained.items():
        load_trainable_state(model, checkpoint[name])
        load_optimizer_state(model, optimizer, checkpoint[f"{name}_optimizer"])


def sharded_training_state(trained: dict) -> dict:
    """Under --fsdp, each rank's shards of what `training_state` holds: the trainable weights and optimizer states."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {}
    for name, (model, optimizer) in trained.items():
        model = models.unwrap(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state[name] = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
        state[f"{name}_optimizer"] = dcp_optimizer_state(model, optimizer)
    return state


def save_checkpoint_file(output_dir: str, state: dict):
    """Atomic: a killed save leaves the previous checkpoint intact. Rank 0 writes; every rank calls it."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = os.path.join(output_dir, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(output_dir: str, trained: dict, state: dict):
    """Atomic (a killed save leaves the previous checkpoint whole); every rank calls it. Without --fsdp rank 0 writes
    checkpoint.pt: `state` and the trainable weights and optimizer states of `trained` ({name: (model, optimizer)}).
    Under --fsdp torch.distributed.checkpoint writes checkpoint/: each rank its own shards of the latter (no rank
    gathers a full copy; a run resumes on any number of ranks), rank 0 `state` (state.pt)."""
    if not any(models.is_sharded(models.unwrap(model)) for model, _ in trained.values()):
        return save_checkpoint_file(output_dir, {**state, **training_state(trained)})
    import torch.distributed.checkpoint as dcp

    final, tmp, old = (os.path.join(output_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed before
    dist.barrier()
    dcp.save(sharded_training_state(trained), checkpoint_id=tmp)
    if dist.get_rank() == 0:
        torch.save(state, os.path.join(tmp, "state.pt"))
        if os.path.exists(final):
            os.replace(final, old)  # (killed between these two renames: load_checkpoint reads checkpoint.old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def sharded_checkpoint_dir(output_dir: str) -> str | None:
    """The sharded checkpoint of `output_dir` (checkpoint/, or checkpoint.old/ if a save died while renaming)."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.exists(os.path.join(output_dir, name, "state.pt")):
            return os.path.join(output_dir, name)
    return None


def load_checkpoint(output_dir: str, trained: dict) -> dict:
    """Restore `trained` from the checkpoint `save_checkpoint` wrote in `output_dir`; returns its `state`."""
    directory = sharded_checkpoint_dir(output_dir)
    if directory is None:
        checkpoint = torch.load(os.path.join(output_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
        load_training_state(checkpoint, trained)
        return checkpoint
    if not all(models.is_sharded(models.unwrap(model)) for model, _ in trained.values()):
        run.fail(f"the checkpoint in {directory} was written under --fsdp; resume it with --fsdp (any ranks)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sharded = sharded_training_state(trained)
    dcp.load(sharded, checkpoint_id=directory)  # each rank reads the parts of its own shards
    for name, (model, optimizer) in trained.items():
        set_model_state_dict(models.unwrap(model), sharded[name], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(models.unwrap(model), optimizer, sharded[f"{name}_optimizer"]["state"])
        if sharded[f"{name}_optimizer"]["fresh"]:  # saved before its first step: it starts fresh again
            optimizer.state.clear()
    return torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)


def save_final_policy(policy, tokenizer, output_dir: str, args):
    """`save_pretrained` of the policy (+ tokenizer) by rank 0; with LoRA the adapter and the merged model. Under
    --fsdp the full weights are gathered on rank 0 (on the CPU) and assigned to an empty (meta) --model: one full
    copy. Every rank calls it."""
    policy = models.unwrap(policy)
    if models.is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from transformers import AutoConfig, AutoModelForCausalLM

        state = get_model_state_dict(policy, options=_full_state_options())
        if dist.get_rank() != 0:
            return
        config = models.load_pretrained(AutoConfig, args.model, "--model", trust_remote_code=args.trust_remote_code)
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
        empty.generation_config = models.hf_model(policy).generation_config
        empty.checkpoint_generation_config = getattr(models.hf_model(policy), "checkpoint_generation_config", None)
        policy = (
            models.add_lora(empty, args.lora_r, "CAUSAL_LM", args.lora_alpha, args.lora_dropout)
            if args.use_lora
            else empty
        )
        policy.load_state_dict(state, strict=False, assign=True)
        models.hf_model(policy).tie_weights()
    elif dist.is_initialized() and dist.get_rank() != 0:
        return
    model = models.hf_model(policy)
    model.generation_config = getattr(model, "checkpoint_generation_config", None) or model.generation_config
    if args.use_lora:
        policy.save_pretrained(os.path.join(output_dir, "adapter"))
        tokenizer.save_pretrained(os.path.join(output_dir, "adapter"))
        policy = policy.merge_and_unload()
    final, tmp, old = (os.path.join(output_dir, name) for name in ("policy", "policy.tmp", "policy.old"))
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_model_card(tmp, output_dir, args)
    if os.path.exists(final):  # a resumed run that had finished before: the new policy replaces it
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"saved the final policy to {final}")
    if args.push_to_hub:
        push_to_hub(output_dir, args.push_to_hub)


def write_model_card(directory: str, output_dir: str, args):
    """policy/training_args.json (the script, its command line and every flag: bench/evaluate.py reads it) and
    policy/README.md, a model card: the algorithm, the command, the models and data it started from, the final
    evaluation (the last row of metrics.jsonl)."""
    script = os.path.basename(sys.argv[0])
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    launcher = f"torchrun --nproc_per_node {world_size}" if dist.is_initialized() else "python"
    command = " ".join([launcher, script, *map(shlex.quote, sys.argv[1:])])
    flags = dataclasses.asdict(args)
    with open(os.path.join(directory, "training_args.json"), "w") as f:
        json.dump({"script": script, "command": command, "world_size": world_size, "args": flags}, f, indent=1)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    algorithm = (getattr(sys.modules["__main__"], "__doc__", None) or script).strip().splitlines()[0]
    metrics = "\n".join(f"| `{key}` | {value:.4g} |" for key, value in last.items() if key.startswith("eval/"))
    sources = [("policy (and pi_ref)", "model"), ("reward model", "reward_model"), ("evaluation scorer", "eval_reward")]
    sources += [("prompts", "dataset")]
    base = f"base_model: {args.model}\n" if not os.path.exists(args.model) and not args.model.startswith("toy/") else ""
    card = f"""---
library_name: transformers
tags: [rlhf, {script[: -len(".py")].replace("_", "-")}]
{base}---

# {os.path.basename(os.path.abspath(output_dir))}

{algorithm}

Trained with `{script}` of rlhf-reference for {last["iteration"]} iterations ({last["episodes"]} episodes).

```
{command}
```

## Models and data

{chr(10).join(f"- {what}: `{getattr(args, name)}`" for what, name in sources if getattr(args, name, ""))}

## Final evaluation ({args.eval_size} held-out prompts of the `{args.eval_split}` split)

| metric | value |
|---|---|
{metrics}

Every flag of the run is in `training_args.json`; `python bench/evaluate.py <this directory>` evaluates it again.
"""
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(card)


def push_to_hub(output_dir: str, repo: str):
    """Upload policy/ (and adapter/, into its adapter/ folder) to the hub repository `repo` (rank 0 only)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=os.path.join(output_dir, "policy"), commit_message="policy")
        if os.path.isdir(os.path.join(output_dir, "adapter")):
            api.upload_folder(
                repo_id=repo, folder_path=os.path.join(output_dir, "adapter"), path_in_repo="adapter",
                commit_message="LoRA adapter",
            )  # fmt: skip
    except Exception as error:  # the run is saved: say how to finish the upload by hand
        reason = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
        run.fail(
            f"--push-to-hub {repo}: the upload failed ({reason}); the policy is saved in {output_dir}/policy; "
            f"upload it with `hf upload {repo} {output_dir}/policy`"
        )
    print(f"uploaded the final policy to {url}")
