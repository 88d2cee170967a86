"""The device check: one prepared run, on a bare GPU machine, of everything that only a GPU shows. Its stages, each
under its own time limit, every command's output in OUTDIR/<stage>.log, the summary printed last (and written to
OUTDIR/summary.md and summary.json):

  install     the wheels of bench/device_wheels.txt from .whl/ (bench/device_wheels.sh downloads them), offline
  versions    python, torch, CUDA device, and the packages the scripts import
  cuda tests  tests/test_cuda.py (pytest -m cuda): autocast in effect, device memory, the cast-once generation,
              a 1B-shaped iteration's peak memory against bench/memory.py's model
  bf16 runs   a short bf16 run of every script: KL exactly 0 before training, ratio 1 on every first minibatch,
              finite metrics, device memory read (not the host's)
  torchrun 1  every online script (and ppo.py --fsdp) under `torchrun --nproc_per_node 1`: a process group of one
              (NCCL for CUDA tensors), so every collective of a multi-GPU run runs
  host syncs  bench/instrument.py on ppo.py: operations that wait for the GPU per iteration, in generation and not
  throughput  bench/throughput.py, ppo.py on 160m- and 410m-shaped random Pythia models, against the floor of its
              model passes (overhead = iteration time / floor, at most 1.5)
  memory      a 410m-shaped ppo.py iteration: allocated memory after each load and after the update, and each
              phase's peak, against bench/memory.py's memory model, term by term

    bench/device_check.sh OUTDIR          # on the GPU machine (about 6 minutes)
    bench/device_check.sh OUTDIR --cpu    # here: every stage that needs no CUDA, smaller (under 3 minutes; CI)
"""

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = "/tmp/device-site"  # where the wheels are installed (on PYTHONPATH for every stage)
# a few iterations of the toy task with small batches (as the end-to-end tests run it)
FAST = ["--total-episodes", "32", "--rollout-batch-size", "16", "--mini-batch-size", "8", "--max-new-tokens", "24",
        "--eval-size", "16", "--eval-every", "1", "--save-every", "0"]  # fmt: skip
ONLINE = {"ppo": [], "ppo_max": ["--critic-warmup-steps", "0"], "apa": [], "awr": [], "grpo": [], "rloo": []}
ALOL = ["--total-steps", "4", "--batch-size", "8", "--eval-size", "16", "--eval-every", "4", "--save-every", "0",
        "--value-samples", "1", "--value-epochs", "2"]  # fmt: skip


class Check:
    def __init__(self, out: Path, cpu: bool, budget: float):
        self.out, self.cpu, self.deadline, self.results = out, cpu, time.time() + budget, []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if cpu:  # one thread per process: never more threads than the 2 cores, two runs at a time
            self.env["OMP_NUM_THREADS"] = "1"
        if Path(SITE).is_dir():
            self.env["PYTHONPATH"] = os.pathsep.join([SITE, *filter(None, [os.environ.get("PYTHONPATH")])])
        self.parallel = 2 if cpu else 4  # runs of one stage at a time (2 CPU cores here; 16 there, one GPU)

    def command(self, stage: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        """Run `cmd` (its output appended to OUTDIR/<stage>.log); (exit status, its last lines); 124 on timeout."""
        timeout = max(1.0, min(timeout, self.deadline - time.time()))
        try:
            result = subprocess.run(cmd, cwd=REPO, env={**self.env, **(env or {})}, capture_output=True, text=True,
                                    timeout=timeout)  # fmt: skip
            code, output = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired as e:
            code, output = 124, f"{(e.stdout or b'').decode(errors='replace')}\n(timed out after {timeout:.0f} s)"
        with open(self.out / f"{stage.replace(' ', '_')}.log", "a") as log:
            log.write(f"$ {' '.join(map(str, cmd))}\n{output}\n(exit status {code})\n\n")
        return code, "\n".join(output.strip().splitlines()[-3:])

    def stage(self, name: str, fn, timeout: float):
        """Run one stage (fn(timeout) -> (passed: bool or None for skipped, detail)), unless time is up."""
        start = time.time()
        if time.time() + 5 > self.deadline:
            passed, detail = None, "not run: the check's time budget is spent"
        else:
            try:
                passed, detail = fn(timeout)
            except Exception as e:  # noqa: BLE001 -- a broken stage is reported, the next one still runs
                passed, detail = False, f"{type(e).__name__}: {e}"
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[passed]
        self.results.append({"stage": name, "status": status, "seconds": round(time.time() - start), "detail": detail})
        print(f"[{status}] {name} ({time.time() - start:.0f} s): {detail}", flush=True)

    def summary(self) -> bool:
        lines = ["| stage | result | s | detail |", "|---|---|---|---|"]
        lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['detail'].replace('|', '/')} |"
                  for r in self.results]  # fmt: skip
        ok = all(r["status"] != "FAIL" for r in self.results)
        text = "\n".join(lines) + f"\n\n{'all stages passed' if ok else 'FAILED'} ({self.mode})\n"
        (self.out / "summary.md").write_text(text)
        (self.out / "summary.json").write_text(json.dumps(self.results, indent=1))
        print("\n# device check summary\n\n" + text, flush=True)
        return ok

    @property
    def mode(self) -> str:
        return "--cpu: the stages that need no CUDA" if self.cpu else "CUDA"

    def in_parallel(self, stage: str, jobs: dict[str, list[str]], timeout: float) -> dict[str, tuple[int, str]]:
        with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
            futures = {name: pool.submit(self.command, stage, cmd, timeout, {"OMP_NUM_THREADS": "1"})
                       for name, cmd in jobs.items()}  # fmt: skip
            return {name: future.result() for name, future in futures.items()}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def small_data(out: Path) -> str:
    """The first 256 train and 80 test rows of the toy data (A-LoL scores every row before it trains)."""
    data = out / "data"
    data.mkdir(exist_ok=True)
    for split, n in (("train", 256), ("test", 80)):
        lines = open(REPO / "toy" / "data" / f"{split}.jsonl").readlines()[:n]
        (data / f"{split}.jsonl").write_text("".join(lines))
    return str(data)


def run_problems(rows: list[dict], script: str, cuda: bool) -> list[str]:
    """What a short run's metrics show wrong: KL not exactly 0 before training, a first-minibatch ratio not 1, a
    non-finite value, the host's memory reported instead of the device's."""
    problems = []
    if rows[0]["eval/kl"] != 0.0:
        problems.append(f"eval/kl of the initial policy {rows[0]['eval/kl']} (not exactly 0)")
    for row in rows[1:]:
        if script != "alol" and row["iteration"] == 1 and row["train/kl"] != 0.0:
            problems.append(f"train/kl {row['train/kl']} at iteration 1 (not exactly 0)")
        if script != "alol" and not row["policy/abs_log_ratio_first_mb"] < 1e-3:
            problems.append(f"first-minibatch |log ratio| {row['policy/abs_log_ratio_first_mb']:.2g} (not 1)")
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        problems += [f"{k} is not finite at iteration {row['iteration']}" for k in bad]
        if cuda and not 0 < row["time/peak_memory_gb"] < 1.0:  # toy models: tens of MB of GPU memory
            problems.append(f"time/peak_memory_gb {row['time/peak_memory_gb']:.2f}: not the device's memory")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--cpu", action="store_true", help="the stages that need no CUDA (here, and in CI)")
    parser.add_argument("--budget", type=float, default=0, help="seconds in all (default 330; --cpu 170)")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    # a check owns OUTDIR: a previous check's runs would make every script refuse its --output-dir
    previous = [args.outdir / n for n in ("runs", "torchrun", "throughput", "data") if (args.outdir / n).exists()]
    previous += [f for f in args.outdir.glob("*.log") if f.name != "device_check.log"]  # the .sh's own log is live
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if previous:
        print(f"removed a previous check's {len(previous)} runs and logs from {args.outdir}", flush=True)
    check = Check(args.outdir.resolve(), args.cpu, args.budget or (170 if args.cpu else 330))
    out, python = check.out, sys.executable

    def install(timeout):
        wheels = REPO / ".whl"
        wanted = [line.strip() for line in open(REPO / "bench" / "device_wheels.txt") if line.strip()[:1].isalnum()]
        if args.cpu:
            return None, f"--cpu: this environment's packages ({len(wanted)} wheels listed for the GPU machine)"
        names = [w.split("==")[0].replace("-", "_").lower() + "-" + w.split("==")[1] + "-" for w in wanted]
        files = [next((f for f in wheels.glob("*.whl") if f.name.lower().startswith(n)), None) for n in names]
        missing = [w for w, f in zip(wanted, files) if f is None]
        if missing:
            return False, f"no wheel in .whl/ for {missing}: run bench/device_wheels.sh where PyPI answers, carry .whl"
        code, tail = check.command("install", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                               "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE,
                                               *map(str, files)], timeout)  # fmt: skip
        check.env["PYTHONPATH"] = os.pathsep.join([SITE, *filter(None, [os.environ.get("PYTHONPATH")])])
        return code == 0, f"{len(files)} wheels into {SITE}" if code == 0 else tail

    def versions(timeout):
        code = ("import sys, torch, transformers, peft, tyro, datasets; "
                "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'; "
                "print(f'python {sys.version.split()[0]}, torch {torch.__version__}, {gpu}, transformers "
                "{transformers.__version__}, peft {peft.__version__}, tyro {tyro.__version__}, datasets "
                "{datasets.__version__}')")  # fmt: skip
        status, tail = check.command("versions", [python, "-c", code], timeout)
        if status == 0 and not args.cpu and "no CUDA" in tail:
            return False, f"{tail} (a GPU machine without a visible GPU)"
        return status == 0, tail

    def cuda_tests(timeout):
        if args.cpu:
            return None, "--cpu: needs CUDA"
        status, tail = check.command("cuda tests", [python, "-m", "pytest", "-q", "-n", "0", "-m", "cuda", "tests",
                                                    "-p", "no:cacheprovider"], timeout)  # fmt: skip
        return status == 0, tail.splitlines()[-1] if tail else ""

    def bf16_runs(timeout):
        data = small_data(out)
        jobs = {s: [python, f"{s}.py", *FAST, *extra, "--dtype", "bfloat16", "--output-dir", str(out / "runs" / s)]
                for s, extra in ONLINE.items()}  # fmt: skip
        jobs["alol"] = [python, "alol.py", *ALOL, "--dataset", data, "--dtype", "bfloat16", "--output-dir",
                        str(out / "runs" / "alol")]  # fmt: skip
        problems = []
        for name, (status, tail) in check.in_parallel("bf16 runs", jobs, timeout).items():
            if status != 0:
                problems.append(f"{name}.py failed ({status}): {tail}")
                continue
            problems += [f"{name}.py: {p}" for p in run_problems(read_metrics(out / "runs" / name), name, not args.cpu)]
        return not problems, "; ".join(problems) or f"{len(jobs)} scripts: KL 0 at start, ratio 1, finite, memory"

    def torchrun_one(timeout):
        torchrun = [python, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
        jobs = {s: [*torchrun, "--standalone", f"{s}.py", *FAST, *extra, "--output-dir",
                    str(out / "torchrun" / s)] for s, extra in ONLINE.items()}  # fmt: skip
        jobs["ppo --fsdp"] = [*torchrun, "--standalone", "ppo.py", *FAST, "--fsdp",
                              "--output-dir", str(out / "torchrun" / "ppo_fsdp")]  # fmt: skip
        problems = []
        for name, (status, tail) in check.in_parallel("torchrun 1", jobs, timeout).items():
            directory = out / "torchrun" / name.replace(" --", "_").split(" ")[0]
            if status != 0:
                problems.append(f"{name} failed ({status}): {tail}")
            elif read_metrics(directory)[-1].get("dist/max_param_difference") != 0.0:
                problems.append(f"{name}: no process group (dist/max_param_difference missing)")
        backend = "gloo" if args.cpu else "NCCL + gloo"
        return not problems, "; ".join(problems) or f"{len(jobs)} runs in a process group of one ({backend})"

    def host_syncs(timeout):
        report = out / "host_syncs_ppo.json"
        batch = [8, 4] if args.cpu else [16, 8]  # prompts per iteration, minibatch
        flags = ["--total-episodes", str(4 * batch[0]), "--rollout-batch-size", str(batch[0]), "--mini-batch-size",
                 str(batch[1]), "--max-new-tokens", "24", "--eval-size", "8", "--eval-every", "1000", "--save-every",
                 "0", "--output-dir", str(out / "runs" / "syncs")]  # fmt: skip
        status, tail = check.command("host syncs", [python, "bench/instrument.py", str(report), "ppo.py", *flags],
                                     timeout)  # fmt: skip
        if status != 0:
            return False, tail
        iterations = json.loads(report.read_text())["iterations"][1:]  # (the first warms up)
        steps = [r["time/decode_steps"] for r in read_metrics(out / "runs" / "syncs")[2:]]
        generate = sorted(r["syncs"]["generate"] for r in iterations)[len(iterations) // 2]
        other = sorted(r["syncs"]["other"] for r in iterations)[len(iterations) // 2]
        what = "Python reads of tensor values (the CPU's proxy)" if args.cpu else "host syncs"
        return True, (f"{what} per iteration (median of {len(iterations)}): {generate} in generation "
                      f"(~{sum(steps) / len(steps):.0f} decode steps), {other} elsewhere")  # fmt: skip

    def throughput(timeout):
        sizes = ["14m"] if args.cpu else ["160m", "410m"]
        small = ["--iterations", "2", "--rollout-batch-size", "8", "--mini-batch-size", "8", "--max-new-tokens",
                 "16"] if args.cpu else ["--iterations", "3"]  # fmt: skip
        details, ok = [], True
        for size in sizes:
            status, tail = check.command("throughput", [python, "bench/throughput.py", "--size", size, "--algorithms",
                                                        "ppo", "--repeats", "1", *small, "--output-dir",
                                                        str(out / "throughput")], timeout)  # fmt: skip
            if status != 0:
                return False, f"{size}: {tail}"
            device = "cpu" if args.cpu else "cuda"
            r = json.loads((out / "throughput" / f"throughput_{size}_{device}.json").read_text())["results"]["ppo"]
            ok &= args.cpu or r["overhead"] <= 1.5
            details.append(f"{size} {r['samples_per_s']:.1f} samples/s, {r['overhead']:.2f}x its floor "
                           f"(generate {r['overhead/generate']:.2f}x, score {r['overhead/score']:.2f}x, update "
                           f"{r['overhead/update']:.2f}x)")  # fmt: skip
        return ok, "; ".join(details)

    def memory(timeout):
        if args.cpu:
            return None, "--cpu: needs CUDA memory"
        return memory_terms(check, out, timeout)

    for name, fn, timeout in [("install", install, 60), ("versions", versions, 60), ("cuda tests", cuda_tests, 150),
                              ("bf16 runs", bf16_runs, 120), ("torchrun 1", torchrun_one, 120),
                              ("host syncs", host_syncs, 90), ("throughput", throughput, 150),
                              ("memory", memory, 90)]:  # fmt: skip
        check.stage(name, fn, timeout)
    sys.exit(0 if check.summary() else 1)


def memory_terms(check: Check, out: Path, timeout: float) -> tuple[bool, str]:
    """A 410m-shaped ppo.py iteration (bf16 autocast) instrumented: allocated GiB after each load and after the
    update, each phase's peak, against memory_model's terms (within 10% for the stored bytes, 25% for the peaks)."""
    sys.path[:0] = [SITE, str(REPO), str(REPO / "bench")]
    import memory
    import throughput

    policy, reward_model = throughput.make_models("410m", out / "throughput" / "runs", "cuda")
    rows, response, prompt = 8, 64, 17  # (the toy's prompts: 14-20 tokens)
    flags = ["--model", policy, "--reward-model", reward_model, "--eval-reward", "", "--total-episodes", str(rows),
             "--rollout-batch-size", str(rows), "--mini-batch-size", str(rows), "--max-new-tokens", str(response),
             "--eval-size", "8", "--save-every", "0", "--update-epochs", "1", "--output-dir",
             str(out / "runs" / "memory")]  # fmt: skip
    report = out / "memory_410m.json"
    status, tail = check.command("memory", [sys.executable, "bench/instrument.py", str(report), "ppo.py", *flags],
                                 timeout)  # fmt: skip
    if status != 0:
        return False, tail
    measured = json.loads(report.read_text())
    hidden, layers, _ = throughput.SIZES["410m"]
    shape = (hidden, layers, memory.TOY_VOCAB)
    p = memory.parameters(*shape)
    fitted = json.loads((REPO / "bench" / "results" / "memory_cpu.json").read_text())
    steps = read_metrics(out / "runs" / "memory")[-1]["time/decode_steps"]
    model = memory.memory_model(shape, p, "ddp", 1, 2, rows, prompt + steps, rows, steps, fitted["k_act"], 0.0)
    gib = 2**30
    loads = measured["loads"]
    static = model["policy + value"] + model["reference"] + model["reward model"]
    iteration = measured["iterations"][-1]
    terms = [  # (term, measured GiB, predicted GiB, tolerance)
        ("policy + reference (loaded)", loads["policy and reference"], (4 * p + model["reference"]) / gib, 0.10),
        ("+ value network (loaded)", loads["value network"], (8 * p + model["reference"]) / gib, 0.10),
        ("+ reward model (loaded)", loads["scorers"], (8 * p + model["reference"] + model["reward model"]) / gib,
         0.10),
        ("after the update (+ gradients, AdamW)", iteration["allocated_gb"], static / gib, 0.10),
    ]  # fmt: skip
    for phase in ("generation", "no-grad passes", "update"):
        if phase in iteration["peaks_gb"]:
            predicted = (static + model[f"phase/{phase}"]) / gib
            terms.append((f"peak of {phase}", iteration["peaks_gb"][phase], predicted, 0.25))
    lines = ["| term | measured GiB | predicted GiB | ratio |", "|---|---|---|---|"]
    lines += [f"| {t} | {m:.2f} | {q:.2f} | {m / q:.2f} |" for t, m, q, _ in terms]
    (out / "memory_terms.md").write_text("\n".join(lines) + "\n")
    off = [f"{t} {m:.2f} vs {q:.2f} GiB" for t, m, q, tol in terms if abs(m / q - 1) > tol]
    return not off, ("; ".join(off) or f"{len(terms)} terms within 10% (stored) / 25% (peaks)") + " (memory_terms.md)"


if __name__ == "__main__":
    main()
