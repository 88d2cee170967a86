"""Run an algorithm script the way a test needs it, under `python` or `torchrun` (tests/runs.py starts it):

    python tests/wrap.py [--rollouts fixed|next-turn] [--record OUT] [--pause PATH] SCRIPT [script flags...]
    python tests/wrap.py --record OUT --runs '[[flags of run 1...], [flags of run 2...]]' SCRIPT

--rollouts fixed: responses that depend only on the prompt (and, in grpo.py/rloo.py, the row's place in its group),
  not on the rank or the batch that sampled it, so runs with 1 rank, 2 ranks, DDP, FSDP and micro-batches train on
  the same data and must reach the same parameters; next-turn: every row writes its answer and then the next turn
  itself, with no EOS (what --stop-strings cuts).
--record OUT: the script's algorithm functions and the shared passes wrapped, each call's arguments and result
  saved in call order to OUT (rank r > 0: OUT.rank<r>), one event list per run; for the invariant tests.
--pause PATH: once the first checkpoint is written on every rank, rank 0 writes PATH and every rank waits there, so
  a test can kill the run after a checkpoint and before the next iteration, with no race.
--runs: several runs of SCRIPT in this one process (each given its flags), one interpreter start for all.
"""

import functools
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from plumbing import checkpoints, scorers  # noqa: E402

# ---------------------------------------------------------------- rollouts
GROUPED = False  # grpo.py / rloo.py: the K copies of a prompt (consecutive rows) get K different responses


def fixed_generate(model, queries, query_mask, generation_config, chunk_size, tokenizer=None):
    """Random response tokens seeded by the prompt's ids (and, GROUPED, the row's place in its group): lengths
    1..max_new_tokens, half of them ending in EOS."""
    eos, pad, width = generation_config.eos_token_id, generation_config.pad_token_id, generation_config.max_new_tokens
    eos = eos[0] if isinstance(eos, list) else eos  # the scripts pass every stop id
    rows, previous, k = [], None, 0
    for ids, mask in zip(queries.tolist(), query_mask.tolist()):
        prompt = [t for t, m in zip(ids, mask) if m]
        k, previous = (k + 1 if GROUPED and prompt == previous else 0), prompt
        seed = (sum((i + 1) * t for i, t in enumerate(prompt)) + 7919 * k) % (2**31)
        generator = torch.Generator().manual_seed(seed)
        ends_with_eos = bool(torch.randint(2, (1,), generator=generator))
        length = int(torch.randint(1, width + 1, (1,), generator=generator)) if ends_with_eos else width
        tokens = torch.randint(2, 600, (length,), generator=generator).tolist()
        rows.append(tokens[:-1] + [eos] if ends_with_eos else tokens)
    longest = max(len(r) for r in rows)
    responses = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=queries.device)
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=queries.device)
    return responses, mask.bool()


def next_turn_generate(model, queries, query_mask, generation_config, chunk_size, tokenizer=None):
    """Every row writes its answer and then the next turn itself (no EOS): what --stop-strings cuts."""
    from transformers import AutoTokenizer

    toy = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "toy" / "policy")
    ids = toy(" sure! watch the bishop.\n\nHuman: and more", add_special_tokens=False)["input_ids"]
    ids = ids[: generation_config.max_new_tokens]
    responses = torch.tensor([ids] * len(queries), device=queries.device)
    return responses, torch.ones_like(responses, dtype=torch.bool)


# ---------------------------------------------------------------- recording
events = []
RECORDED = ("compute_rewards", "compute_advantages", "policy_loss", "value_loss", "rewards_from_scores",
            "advantages_and_weights", "sample_rows", "ptx_loss", "fit_value_head", "group_advantages",
            "leave_one_out_advantages", "kl_loss", "aggregate", "preference_loss", "reference_logprobs")  # fmt: skip


def snapshot(x):
    """A copy that later in-place changes cannot touch: tensors cloned, RunningMoments as their state."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone().cpu()
    if isinstance(x, common.RunningMoments):
        return {"running_moments": x.state_dict()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
        return type(x)(*(snapshot(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(snapshot(v) for v in x)
    if isinstance(x, dict):
        return {k: snapshot(v) for k, v in x.items()}
    if isinstance(x, (int, float, str, bool, slice, type(None), torch.device)):
        return x
    return type(x).__name__  # models, generators, ...: their name only


def recorded(name, fn):
    """`fn`, each call recorded with its arguments bound to its signature (a keyword argument that can be positional
    is recorded in its place: the tests read a call the same however the script wrote it). Its name and docstring
    are fn's, not its attributes (a scorer's `is_checker` copied once would go stale: a recorded scorer has none)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn, updated=())
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        before = (snapshot(bound.args), snapshot(bound.kwargs))
        out = fn(*args, **kwargs)
        events.append((name, *before, snapshot(out)))
        return out

    return wrapper


def recorded_generator(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for item in fn(*args, **kwargs):
            events.append((name, (), {}, snapshot(item)))
            yield item

    return wrapper


class RecordedList(list):
    """A list whose items are recorded (as `name` events) when it is iterated."""

    def __init__(self, name, items):
        super().__init__(items)
        self.name = name

    def __iter__(self):
        for item in super().__iter__():
            events.append((self.name, (), {}, snapshot(item)))
            yield item


def recorded_plan(name, fn):
    """A function returning a list of lists (token_micro_batches' plan): each item recorded when it is used."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return [RecordedList(name, items) for items in fn(*args, **kwargs)]

    return wrapper


def recorded_temperature(fn):
    """common.response_logits, recording only the temperature each forward divides its logits by."""

    @functools.wraps(fn)
    def wrapper(model, input_ids, attention_mask, context_length, temperature):
        events.append(("response_logits", (temperature,), {}, None))
        return fn(model, input_ids, attention_mask, context_length, temperature)

    return wrapper


def recorded_scorers(load_scorers):
    @functools.wraps(load_scorers)
    def wrapper(*args, **kwargs):
        score_fn, eval_score_fn = load_scorers(*args, **kwargs)
        return recorded("score", score_fn), eval_score_fn

    return wrapper


def recorded_clip(original):
    @functools.wraps(original)
    def wrapper(parameters, *args, **kwargs):
        parameters = list(parameters)
        events.append(("clip_grad_norm_", (len(parameters),), {}, None))
        return original(parameters, *args, **kwargs)

    return wrapper


def record(script):
    for fn in RECORDED:
        if hasattr(script, fn):
            setattr(script, fn, recorded(fn, getattr(script, fn)))
    for fn in ("chunked_logprobs", "chunked_values", "penalize_missing_eos", "pad_pairs"):
        setattr(common, fn, recorded(fn, getattr(common, fn)))
    common.micro_batches = recorded_generator("micro_batch", common.micro_batches)
    common.response_logits = recorded_temperature(common.response_logits)
    common.token_micro_batches = recorded_plan("token_micro_batch", common.token_micro_batches)
    scorers.load_scorers = recorded_scorers(scorers.load_scorers)
    torch.nn.utils.clip_grad_norm_ = recorded_clip(torch.nn.utils.clip_grad_norm_)


# ---------------------------------------------------------------- pausing after the first checkpoint
def pause_after_first_checkpoint(path: str):
    import torch.distributed as dist

    save_checkpoint = checkpoints.save_checkpoint

    def pausing_save_checkpoint(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        if dist.is_initialized():
            dist.barrier()  # every rank has written its part
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(path).write_text("paused\n")
        while True:  # until the test kills the run
            time.sleep(1)

    checkpoints.save_checkpoint = pausing_save_checkpoint


def main():
    """wrap.py's own options first, then the script, then its flags verbatim (never parsed here)."""
    options, argv = {}, sys.argv[1:]
    while argv and argv[0] in ("--rollouts", "--record", "--pause", "--runs"):
        options[argv[0][2:]], argv = argv[1], argv[2:]
    if not argv or options.get("rollouts", "fixed") not in ("fixed", "next-turn"):
        raise SystemExit(__doc__)
    name, flags = argv[0].removesuffix(".py"), argv[1:]
    script = importlib.import_module(name)
    global GROUPED
    GROUPED = name in ("grpo", "rloo")
    if "rollouts" in options:
        common.generate = fixed_generate if options["rollouts"] == "fixed" else next_turn_generate
    if "record" in options:
        record(script)
    if "pause" in options:
        pause_after_first_checkpoint(options["pause"])
    recorded_runs = []
    for run_flags in json.loads(options["runs"]) if "runs" in options else [flags]:
        events.clear()
        sys.argv = [name + ".py", *run_flags]
        script.main()
        recorded_runs.append(list(events))
    if "record" in options:
        rank = int(os.environ.get("RANK", "0"))
        torch.save(recorded_runs, options["record"] if rank == 0 else f"{options['record']}.rank{rank}")


if __name__ == "__main__":
    main()
