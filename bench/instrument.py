"""Run one script in this process with its shared calls wrapped, and report per iteration what leaves the device's
queue and where the memory goes: the device check's sync and memory stages (bench/device_check.py).

    python bench/instrument.py OUT.json ppo.py --total-episodes 128 ...      # any script and its flags
    python bench/instrument.py --repo /path/to/other/checkout OUT.json ppo.py ...   # the same for another checkout

Host syncs: on CUDA, torch.cuda.set_sync_debug_mode("warn") reports every operation that waits for the GPU (a
tensor's value read by Python, a blocking copy, nonzero, ...); counted per iteration, inside the generation
(common.generate, where transformers' generate() reads a flag per decode step) and elsewhere. On a CPU nothing waits
for a device, so the count is a proxy: every read of a tensor's value by Python (.item(), .tolist(), int(), float(),
bool()), each of which would be a sync of the same tensor on a GPU (host tensors' reads included, so it
over-counts what a GPU would see; but not AdamW's reads of its step counters, host tensors on a CPU, on the device
and unread in the fused AdamW the scripts use on CUDA).
Memory (CUDA only): allocated bytes after each load (policy and reference, value network, scorers), after the
first update (the trained weights' gradients and AdamW states exist then), and the peak of each phase of each
iteration (generation, the no-grad passes, the update)."""

import functools
import json
import runpy
import sys
import warnings
from pathlib import Path

import torch


class Counter:
    """Host syncs (or, on CPU, Python reads of tensor values) since the last iteration, inside generation or not."""

    def __init__(self, cuda: bool):
        self.cuda, self.inside_generate, self.counts, self.where = cuda, 0, {"generate": 0, "other": 0}, {}
        if cuda:
            original = warnings.showwarning

            def show(message, category, *args, **kwargs):
                if "synchronizing" in str(message):
                    self.count()
                else:
                    original(message, category, *args, **kwargs)

            warnings.showwarning = show
            warnings.simplefilter("always", UserWarning)
            torch.cuda.set_sync_debug_mode("warn")
        else:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
                setattr(torch.Tensor, name, self.counted(getattr(torch.Tensor, name)))

    def counted(self, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            if "/torch/optim/" not in sys._getframe(1).f_code.co_filename:  # (CPU AdamW's host step counters)
                self.count()
            return method(*args, **kwargs)

        return wrapper

    def count(self):
        self.counts["generate" if self.inside_generate else "other"] += 1
        if not self.inside_generate:  # where: the first caller outside torch
            frame = sys._getframe(2)
            while frame and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame:
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                self.where[where] = self.where.get(where, 0) + 1

    def take(self) -> dict:
        """The counts since the last call, and (outside generation) the lines they came from, most first."""
        where = dict(sorted(self.where.items(), key=lambda kv: -kv[1]))
        counts, self.counts, self.where = {**self.counts, "where": where}, {"generate": 0, "other": 0}, {}
        return counts


def main():
    args = sys.argv[1:]
    repo = Path(__file__).resolve().parent.parent
    if args[0] == "--repo":
        repo, args = Path(args[1]).resolve(), args[2:]
    out_path, script, flags = args[0], args[1], args[2:]
    sys.path.insert(0, str(repo))
    import common
    from plumbing import models, run, scorers

    cuda = torch.cuda.is_available()
    counter = Counter(cuda)
    report = {"device": "cuda" if cuda else "cpu", "loads": {}, "iterations": []}
    phase_peaks, open_phase = {}, [None]  # the phase whose peak is being measured (the update: until the next)

    def allocated() -> float:
        return torch.cuda.memory_allocated() / 2**30 if cuda else 0.0

    def close_phase():
        if cuda and open_phase[0]:
            peak = torch.cuda.max_memory_allocated() / 2**30
            phase_peaks[open_phase[0]] = max(phase_peaks.get(open_phase[0], 0.0), peak)
        open_phase[0] = None

    def open_new_phase(name):
        close_phase()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        open_phase[0] = name

    def after_load(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            out = fn(*a, **k)
            report["loads"][name] = allocated()
            return out

        return wrapper

    def phase(name, fn, generate=False, runs_on=False):
        """`fn` is phase `name` (its peak measured); `runs_on`: the phase goes on after fn returns (the update)."""

        @functools.wraps(fn)
        def wrapper(*a, **k):
            open_new_phase(name)
            counter.inside_generate += generate
            try:
                return fn(*a, **k)
            finally:
                counter.inside_generate -= generate
                if not runs_on:
                    close_phase()

        return wrapper

    models.policy_and_reference = after_load("policy and reference", models.policy_and_reference)
    models.value_network = after_load("value network", models.value_network)
    scorers.load_scorers = after_load("scorers", scorers.load_scorers)
    common.generate = phase("generation", common.generate, generate=True)
    common.chunked_logprobs = phase("no-grad passes", common.chunked_logprobs)
    common.chunked_values = phase("no-grad passes", common.chunked_values)
    common.token_micro_batches = phase("update", common.token_micro_batches, runs_on=True)
    log = run.Logger.log

    def logged(self, row):
        close_phase()
        if row["iteration"] > 0:
            report["iterations"].append(
                {
                    "iteration": row["iteration"],
                    "syncs": counter.take(),
                    "peaks_gb": dict(phase_peaks),
                    "allocated_gb": allocated(),
                }  # fmt: skip
            )
            phase_peaks.clear()
        else:
            counter.take()  # (the setup and the evaluation of the initial policy)
        return log(self, row)

    run.Logger.log = logged
    sys.argv = [str(repo / script), *flags]
    try:
        runpy.run_path(str(repo / script), run_name="__main__")
    finally:
        Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
