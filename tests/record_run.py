"""Run an algorithm script with its algorithm functions and the shared passes wrapped, recording what each call was
given and returned, for the invariant tests (tests/test_invariants.py). Usage:
    python tests/record_run.py SCRIPT OUT.pt '[[flags of run 1...], [flags of run 2...], ...]' [module:generate]
runs SCRIPT's main() once per flag list in this one process and saves, per run, the list of events
(name, args, kwargs, output) in call order."""

import functools
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from plumbing import scorers  # noqa: E402

events = []


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
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = (snapshot(args), snapshot(kwargs))  # before the call: compute_rewards updates the running stats
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


def clip_grad_norm_(original):
    @functools.wraps(original)
    def wrapper(parameters, *args, **kwargs):
        parameters = list(parameters)
        events.append(("clip_grad_norm_", (len(parameters),), {}, None))
        return original(parameters, *args, **kwargs)

    return wrapper


if __name__ == "__main__":
    name, out, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    script = importlib.import_module(name)
    if len(sys.argv) > 4:  # module:function replacing common.generate (fixed rollouts)
        module, function = sys.argv[4].split(":")
        common.generate = getattr(importlib.import_module(module), function)
    for fn in ("compute_rewards", "compute_advantages", "policy_loss", "value_loss", "rewards_from_scores",
               "advantages_and_weights", "sample_rows", "ptx_loss", "fit_value_head", "group_advantages",
               "leave_one_out_advantages", "kl_loss", "aggregate"):  # fmt: skip
        if hasattr(script, fn):
            setattr(script, fn, recorded(fn, getattr(script, fn)))
    for fn in ("chunked_logprobs", "chunked_values", "penalize_missing_eos", "pad_pairs"):
        setattr(common, fn, recorded(fn, getattr(common, fn)))
    common.micro_batches = recorded_generator("micro_batch", common.micro_batches)
    common.response_logits = recorded_temperature(common.response_logits)
    common.token_micro_batches = recorded_plan("token_micro_batch", common.token_micro_batches)
    scorers.load_scorers = recorded_scorers(scorers.load_scorers)
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_(torch.nn.utils.clip_grad_norm_)
    recorded_runs = []
    for flags in runs:
        events.clear()
        sys.argv = [name + ".py", *flags]
        script.main()
        recorded_runs.append(list(events))
    torch.save(recorded_runs, out)
