"""The device check: one prepared run, on a bare GPU machine, of everything that only a GPU shows, built for the
device tool's limits (only files under OUTDIR come back, at most 8 of them, 16 MiB each, no deeper than two
folders; one command runs at most 10 minutes). Its stages, in the order of what we most need to know first, each
under its own time limit (docs/scale.md gives each one's expected time on an H100):

  packages    the machine's version of every package the carried wheels (.whl/, bench/device_wheels.txt) need,
              checked against the wheels' own requirements: a mismatch stops the check, in one line
  install     the wheels, offline, into /tmp/device-site
  versions    python, torch, CUDA device, and the packages the scripts import
  cuda tests  tests/test_cuda.py (pytest -m cuda): autocast in effect, device memory, the cast-once generation, a
              1B-shaped iteration's peak memory against bench/memory.py's model
  bf16 runs   a short bf16 run of every script: KL exactly 0 before training, ratio 1 on every first minibatch,
              finite metrics, device memory read (not the host's)
  torchrun 1  every online script (and ppo.py --fsdp) under `torchrun --nproc_per_node 1` with NCCL_DEBUG=WARN: a
              process group of one (NCCL for CUDA tensors), so every collective of a multi-GPU run runs
  host syncs  bench/instrument.py on ppo.py: operations that wait for the GPU per iteration, in generation and not
  throughput  bench/throughput.py, ppo.py on 160m- and 410m-shaped random Pythia models, against the floor of its
              model passes (overhead = iteration time / floor, at most 1.5)
  memory      a 410m-shaped ppo.py iteration: allocated memory after each load and after the update, and each
              phase's peak, against bench/memory.py's memory model, term by term

    bench/device_check.sh OUTDIR          # on the GPU machine (about 5 minutes; its budget: 7)
    bench/device_check.sh OUTDIR --cpu    # here and in CI: the stages that need no CUDA, smaller (no budget)

OUTDIR receives at most 6 files and no folder: device_check.log (everything printed), summary.md and summary.json,
stages.tar.gz (every stage's full log and its tables), throughput.md and memory.md. Runs, models and checkpoints go
to --scratch (outside OUTDIR). A failing stage's last 40 lines are in the log and the summary; a stage that did not
run (its time was spent) is reported as not run, and the check then says "incomplete" and exits 1. A stage's time
limit ends its whole process tree (torchrun's workers start sessions of their own: the tree is read from /proc).
"""

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = "/tmp/device-site"  # where the wheels are installed (on PYTHONPATH for every stage)
OUTPUTS = ("device_check.log", "summary.md", "summary.json", "stages.tar.gz", "throughput.md", "memory.md")
TAIL = 40  # lines of a failing stage's output kept in the log and the summary
BUDGET = 420  # seconds for the whole check on the GPU machine (the device tool runs one command for at most 600)
CPU_FACTOR = 5  # --cpu: each stage's limit is this times its GPU limit (a guard against a hang; no budget)
# a few iterations of the toy task with small batches (as the end-to-end tests run it)
FAST = ["--total-episodes", "32", "--rollout-batch-size", "16", "--mini-batch-size", "8", "--max-new-tokens", "24",
        "--eval-size", "16", "--eval-every", "1", "--save-every", "0"]  # fmt: skip
ONLINE = {"ppo": [], "ppo_max": ["--critic-warmup-steps", "0"], "apa": [], "awr": [], "grpo": [], "rloo": []}
ALOL = ["--total-steps", "4", "--batch-size", "8", "--eval-size", "16", "--eval-every", "4", "--save-every", "0",
        "--value-samples", "1", "--value-epochs", "2"]  # fmt: skip


# ---------------------------------------------------------------- processes
def descendants(pid: int) -> list[int]:
    """Every process under `pid` (children in sessions of their own included), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(pid: int, grace: float = 5.0) -> list[int]:
    """SIGTERM to `pid` and everything under it, then SIGKILL to what is left after `grace` s; the survivors."""
    tree = [pid, *descendants(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in tree):
            time.sleep(0.1)
    return [p for p in tree if alive(p)]


def run_tree(cmd: list[str], timeout: float, env: dict, cwd=REPO) -> tuple[int, str]:
    """(exit status, output) of `cmd`, its process tree ended at `timeout` (status 124 then). The output goes to a
    file, not a pipe: a process that outlived the tree's end would hold a pipe open and block the read."""
    import tempfile

    with tempfile.TemporaryFile("w+", errors="replace") as output:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)  # fmt: skip
        try:
            code, note = process.wait(timeout=timeout), ""
        except subprocess.TimeoutExpired:
            survivors = kill_tree(process.pid)
            process.wait()
            code, note = 124, f"\n(timed out after {timeout:.0f} s; its process tree was ended"
            note += f"; still alive: {survivors})" if survivors else ")"
        output.seek(0)
        return code, output.read() + note


# ---------------------------------------------------------------- the check
class Check:
    def __init__(self, out: Path, scratch: Path, cpu: bool, budget: float):
        self.out, self.scratch, self.cpu, self.results = out, scratch, cpu, []
        self.deadline = math.inf if cpu else time.time() + budget  # --cpu: no budget decides a verdict
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.console = open(out / "device_check.log", "w")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if cpu:  # one thread per process: never more threads than the 2 cores, two runs at a time
            self.env["OMP_NUM_THREADS"] = "1"
        if Path(SITE).is_dir():
            self.env["PYTHONPATH"] = os.pathsep.join([SITE, *filter(None, [os.environ.get("PYTHONPATH")])])
        self.parallel = 2 if cpu else 4  # runs of one stage at a time (2 CPU cores here; 16 there, one GPU)
        self.stopped = ""  # set by a stage after which nothing can run (a package mismatch)

    def say(self, text: str):
        print(text, flush=True)
        self.console.write(text + "\n")
        self.console.flush()

    def command(self, stage: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        """Run `cmd` (its output appended to the stage's log); (exit status, its output); 124 on timeout."""
        timeout = max(1.0, min(timeout, self.deadline - time.time()))
        code, output = run_tree([str(c) for c in cmd], timeout, {**self.env, **(env or {})})
        with open(self.logs / f"{stage.replace(' ', '_')}.log", "a") as log:
            log.write(f"$ {' '.join(map(str, cmd))}\n{output}\n(exit status {code})\n\n")
        return code, output

    def stage(self, name: str, fn, cap: float, applies: bool = True):
        """Run one stage: fn(timeout) -> (passed, detail, tail); not run when the check's time is spent or a stage
        before stopped it; "n/a" when it does not apply to this mode (--cpu)."""
        start, tail = time.time(), ""
        if not applies:
            status, detail = "n/a", "needs CUDA (--cpu runs the other stages)"
        elif self.stopped:
            status, detail = "NOT RUN", f"stopped: {self.stopped}"
        elif self.deadline - time.time() < 5:
            status, detail = "NOT RUN", f"the check's budget is spent ({cap:.0f} s were planned for it)"
        else:
            try:
                limit = cap * CPU_FACTOR if self.cpu else min(cap, self.deadline - time.time())
                passed, detail, tail = fn(limit)
            except Exception as e:  # noqa: BLE001 -- a broken stage is reported, the next one still runs
                passed, detail = False, f"{type(e).__name__}: {e}"
            status = "PASS" if passed else "FAIL"
        tail = "\n".join(tail.rstrip().splitlines()[-TAIL:]) if status == "FAIL" else ""
        self.results.append({"stage": name, "status": status, "seconds": round(time.time() - start),
                             "cap": cap, "detail": detail, "tail": tail})  # fmt: skip
        self.say(f"[{status}] {name} ({time.time() - start:.0f} s): {detail}")
        if tail:
            self.say("\n".join(f"    | {line}" for line in tail.splitlines()))

    @property
    def verdict(self) -> tuple[bool, str]:
        statuses = [r["status"] for r in self.results]
        mode = "--cpu: the stages that need no CUDA" if self.cpu else "CUDA"
        if "FAIL" in statuses:
            return False, f"FAILED ({mode})"
        if "NOT RUN" in statuses:
            return False, f"incomplete: {statuses.count('NOT RUN')} stage(s) not run ({mode})"
        passed = statuses.count("PASS")
        return True, f"all {passed} stages that apply passed ({mode})"

    def finish(self) -> bool:
        ok, verdict = self.verdict
        lines = ["| stage | result | s | cap s | detail |", "|---|---|---|---|---|"]
        for r in self.results:
            detail = r["detail"].replace("|", "/")
            lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['cap']:.0f} | {detail} |")
        text = "\n".join(lines) + f"\n\n{verdict}\n"
        for r in self.results:
            if r["tail"]:
                text += f"\n## {r['stage']}: its last {TAIL} lines\n\n```\n{r['tail']}\n```\n"
        (self.out / "summary.md").write_text(text)
        (self.out / "summary.json").write_text(json.dumps({"verdict": verdict, "ok": ok, "stages": self.results},
                                                          indent=1))  # fmt: skip
        for name in ("throughput.md", "memory.md"):  # every output file exists, even when its stage did not run
            if not (self.out / name).exists():
                (self.out / name).write_text("(no table: its stage did not run; summary.md says why)\n")
        with tarfile.open(self.out / "stages.tar.gz", "w:gz") as archive:
            archive.add(self.logs, arcname="logs")
            for table in sorted(self.scratch.glob("tables/*")):
                archive.add(table, arcname=f"tables/{table.name}")
        self.say("\n# device check summary\n\n" + text)
        self.console.close()
        return ok


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def small_data(scratch: Path) -> str:
    """The first 256 train and 80 test rows of the toy data (A-LoL scores every row before it trains)."""
    data = scratch / "data"
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


# ---------------------------------------------------------------- packages: the wheels' requirements on the machine
def wanted_wheels() -> list[str]:
    return [line.strip() for line in open(REPO / "bench" / "device_wheels.txt") if line.strip()[:1].isalnum()]


def wheel_files(wheels: Path) -> tuple[list[Path], list[str]]:
    """The .whl file of each requirement of device_wheels.txt, and the requirements without one."""
    files, missing = [], []
    for wanted in wanted_wheels():
        name, version = wanted.split("==")
        prefix = f"{name.replace('-', '_').lower()}-{version}-"
        found = next((f for f in sorted(wheels.glob("*.whl")) if f.name.lower().startswith(prefix)), None)
        (files if found else missing).append(found or wanted)
    return files, missing


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a wheel, read from its METADATA."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(meta).decode().splitlines()
    field = {k: v for k, v in (line.split(": ", 1) for line in lines if ": " in line and not line.startswith(" "))}
    return (
        field["Name"],
        field["Version"],
        [line.split(": ", 1)[1] for line in lines if line.startswith("Requires-Dist: ")],
    )


def package_problems(wheels: list[Path], installed: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Each wheel's requirements (for this interpreter, no extras) against the other wheels and the machine's
    packages (`installed`: normalised name -> version): (one line per mismatch, the versions that were checked)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    carried = {canonicalize_name(n): v for n, v, _ in map(wheel_metadata, wheels)}
    problems, checked = [], {}
    for path in wheels:
        name, version, requires = wheel_metadata(path)
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            key = canonicalize_name(requirement.name)
            have, where = (carried[key], "the wheels") if key in carried else (installed.get(key), "this machine")
            checked[key] = have or "none"
            if have is None or not requirement.specifier.contains(Version(have), prereleases=True):
                needs = f"{name} {version} needs {requirement.name}{requirement.specifier}"
                fix = f"add a matching {requirement.name} to bench/device_wheels.txt"
                problems.append(f"{needs}; {where} has {have or 'none'}: {fix}")
    return problems, checked


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    from packaging.utils import canonicalize_name

    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


# ---------------------------------------------------------------- the stages
def main(argv: list[str] | None = None, stages=None) -> int:
    """The check; `stages(check, args)` gives its stages (default_stages; tests plant their own)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="where the (at most 6) result files go")
    parser.add_argument("--cpu", action="store_true", help="the stages that need no CUDA (here, and in CI)")
    parser.add_argument("--budget", type=float, default=BUDGET, help=f"seconds in all on a GPU (default {BUDGET})")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/device-check-scratch"),
                        help="runs, models and checkpoints (outside OUTDIR; emptied first)")  # fmt: skip
    args = parser.parse_args(argv)  # (argparse takes --cpu before or after OUTDIR)
    out, scratch = args.outdir.resolve(), args.scratch.resolve()
    if scratch == out or out in scratch.parents:
        raise SystemExit(f"error: --scratch {scratch} is inside OUTDIR {out}; it must be outside it")
    out.mkdir(parents=True, exist_ok=True)
    # a check owns OUTDIR's six names (and what an earlier layout of it wrote there); anything else is left alone
    earlier = [out / n for n in (*OUTPUTS, "runs", "torchrun", "throughput", "data") if (out / n).exists()]
    earlier += [f for f in out.glob("*.log") if f.name != "device_check.log"]
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "tables").mkdir(parents=True)
    check = Check(out, scratch, args.cpu, args.budget)
    if earlier:
        check.say(f"removed an earlier check's {len(earlier)} files from {out}")
    for name, fn, cap, applies in (stages or default_stages)(check, args):
        check.stage(name, fn, cap, applies)
    return 0 if check.finish() else 1


def default_stages(check: Check, args) -> list[tuple]:
    python, scratch, out, cpu = sys.executable, check.scratch, check.out, args.cpu
    nccl = {"NCCL_DEBUG": "WARN"}  # a failed NCCL start says why

    def packages(timeout):
        wheels = REPO / ".whl"
        files, missing = wheel_files(wheels)
        if cpu and not files:
            names = ", ".join(w.split("==")[0] for w in wanted_wheels())
            return True, f"--cpu: no .whl/; this environment's own packages ({names})", ""
        if missing:
            detail = f"no wheel in .whl/ for {missing}: run bench/device_wheels.sh where PyPI answers, carry .whl"
            check.stopped = "the wheels are missing"
            return False, detail, ""
        problems, checked = package_problems(files, installed_versions())
        check.say("packages the wheels need, as found: " + ", ".join(f"{k} {v}" for k, v in sorted(checked.items())))
        if problems:
            check.stopped = "a package mismatch (packages)"
            return False, problems[0], "\n".join(problems)
        return True, f"{len(files)} wheels' {len(checked)} requirements met", ""

    def install(timeout):
        files, _ = wheel_files(REPO / ".whl")
        code, output = check.command("install", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                                 "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE,
                                                 *files], timeout)  # fmt: skip
        check.env["PYTHONPATH"] = os.pathsep.join([SITE, *filter(None, [os.environ.get("PYTHONPATH")])])
        return code == 0, f"{len(files)} wheels into {SITE}" if code == 0 else "pip failed", output

    def versions(timeout):
        code = ("import sys, torch, transformers, peft, tyro, datasets; "
                "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'; "
                "print(f'python {sys.version.split()[0]}, torch {torch.__version__}, {gpu}, transformers "
                "{transformers.__version__}, peft {peft.__version__}, tyro {tyro.__version__}, datasets "
                "{datasets.__version__}')")  # fmt: skip
        status, output = check.command("versions", [python, "-c", code], timeout)
        line = output.strip().splitlines()[-1] if output.strip() else ""
        if status == 0 and not cpu and "no CUDA" in line:
            return False, f"{line} (a GPU machine without a visible GPU)", output
        return status == 0, line, output

    def cuda_tests(timeout):
        status, output = check.command("cuda tests", [python, "-m", "pytest", "-q", "-n", "0", "-m", "cuda", "tests",
                                                      "-p", "no:cacheprovider"], timeout, nccl)  # fmt: skip
        last = output.strip().splitlines()[-1] if output.strip() else ""
        return status == 0, last, output

    def in_parallel(stage: str, jobs: dict[str, list[str]], timeout: float, env: dict | None = None) -> dict:
        with concurrent.futures.ThreadPoolExecutor(check.parallel) as pool:
            futures = {name: pool.submit(check.command, stage, cmd, timeout, {"OMP_NUM_THREADS": "1", **(env or {})})
                       for name, cmd in jobs.items()}  # fmt: skip
            return {name: future.result() for name, future in futures.items()}

    def bf16_runs(timeout):
        data = small_data(scratch)
        jobs = {s: [python, f"{s}.py", *FAST, *extra, "--dtype", "bfloat16", "--output-dir", scratch / "runs" / s]
                for s, extra in ONLINE.items()}  # fmt: skip
        jobs["alol"] = [python, "alol.py", *ALOL, "--dataset", data, "--dtype", "bfloat16", "--output-dir",
                        scratch / "runs" / "alol"]  # fmt: skip
        problems, failed = [], ""
        for name, (status, output) in in_parallel("bf16 runs", jobs, timeout).items():
            if status != 0:
                problems.append(f"{name}.py failed ({status})")
                failed = failed or output
                continue
            problems += [f"{name}.py: {p}" for p in run_problems(read_metrics(scratch / "runs" / name), name, not cpu)]
        detail = "; ".join(problems) or f"{len(jobs)} scripts: KL 0 at start, ratio 1, finite, memory"
        return not problems, detail, failed

    def torchrun_one(timeout):
        torchrun = [python, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone"]
        jobs = {s: [*torchrun, f"{s}.py", *FAST, *extra, "--output-dir", scratch / "torchrun" / s]
                for s, extra in ONLINE.items()}  # fmt: skip
        jobs["ppo --fsdp"] = [*torchrun, "ppo.py", *FAST, "--fsdp", "--output-dir", scratch / "torchrun" / "ppo_fsdp"]
        problems, failed = [], ""
        for name, (status, output) in in_parallel("torchrun 1", jobs, timeout, nccl).items():
            directory = scratch / "torchrun" / name.replace(" --", "_").split(" ")[0]
            if status != 0:
                problems.append(f"{name} failed ({status})")
                failed = failed or output
            elif read_metrics(directory)[-1].get("dist/max_param_difference") != 0.0:
                problems.append(f"{name}: no process group (dist/max_param_difference missing)")
        backend = "gloo" if cpu else "NCCL + gloo"
        return not problems, "; ".join(problems) or f"{len(jobs)} runs in a process group of one ({backend})", failed

    def host_syncs(timeout):
        report = scratch / "tables" / "host_syncs_ppo.json"
        batch = [8, 4] if cpu else [16, 8]  # prompts per iteration, minibatch
        flags = ["--total-episodes", str(4 * batch[0]), "--rollout-batch-size", str(batch[0]), "--mini-batch-size",
                 str(batch[1]), "--max-new-tokens", "24", "--eval-size", "8", "--eval-every", "1000", "--save-every",
                 "0", "--output-dir", scratch / "runs" / "syncs"]  # fmt: skip
        status, output = check.command("host syncs", [python, "bench/instrument.py", report, "ppo.py", *flags],
                                       timeout)  # fmt: skip
        if status != 0:
            return False, f"bench/instrument.py failed ({status})", output
        iterations = json.loads(report.read_text())["iterations"][1:]  # (the first warms up)
        steps = [r["time/decode_steps"] for r in read_metrics(scratch / "runs" / "syncs")[2:]]
        generate = sorted(r["syncs"]["generate"] for r in iterations)[len(iterations) // 2]
        other = sorted(r["syncs"]["other"] for r in iterations)[len(iterations) // 2]
        what = "Python reads of tensor values (the CPU's proxy)" if cpu else "host syncs"
        return True, (f"{what} per iteration (median of {len(iterations)}): {generate} in generation "
                      f"(~{sum(steps) / len(steps):.0f} decode steps), {other} elsewhere"), ""  # fmt: skip

    def throughput(timeout):
        sizes = ["14m"] if cpu else ["160m", "410m"]
        small = ["--iterations", "2", "--rollout-batch-size", "8", "--mini-batch-size", "8", "--max-new-tokens",
                 "16"] if cpu else ["--iterations", "3"]  # fmt: skip
        details, ok, tables = [], True, []
        for size in sizes:
            status, output = check.command("throughput", [python, "bench/throughput.py", "--size", size,
                                                          "--algorithms", "ppo", "--repeats", "1", *small,
                                                          "--output-dir", scratch / "tables"], timeout)  # fmt: skip
            if status != 0:
                return False, f"{size}: bench/throughput.py failed ({status})", output
            tag = f"{size}_{'cpu' if cpu else 'cuda'}"
            tables.append((scratch / "tables" / f"throughput_{tag}.md").read_text())
            r = json.loads((scratch / "tables" / f"throughput_{tag}.json").read_text())["results"]["ppo"]
            ok &= cpu or r["overhead"] <= 1.5
            details.append(f"{size} {r['samples_per_s']:.1f} samples/s, {r['overhead']:.2f}x its floor "
                           f"(generate {r['overhead/generate']:.2f}x, score {r['overhead/score']:.2f}x, update "
                           f"{r['overhead/update']:.2f}x)")  # fmt: skip
        (out / "throughput.md").write_text("\n\n".join(tables))
        return ok, "; ".join(details), ""

    def memory(timeout):
        return memory_terms(check, scratch, timeout)

    gpu = not cpu
    return [  # (name, function, seconds it may take on the GPU machine, whether it applies to this mode)
        ("packages", packages, 15, True),
        ("install", install, 40, gpu),
        ("versions", versions, 20, True),
        ("cuda tests", cuda_tests, 80, gpu),
        ("bf16 runs", bf16_runs, 60, True),
        ("torchrun 1", torchrun_one, 60, True),
        ("host syncs", host_syncs, 30, True),
        ("throughput", throughput, 75, True),
        ("memory", memory, 40, gpu),
    ]  # caps: 420 s, the budget (the expected times on an H100 add to about 5 minutes: docs/scale.md)


def memory_terms(check: Check, scratch: Path, timeout: float) -> tuple[bool, str, str]:
    """A 410m-shaped ppo.py iteration (bf16 autocast) instrumented: allocated GiB after each load and after the
    update, each phase's peak, against memory_model's terms (within 10% for the stored bytes, 25% for the peaks)."""
    sys.path[:0] = [SITE, str(REPO), str(REPO / "bench")]
    import memory
    import throughput

    policy, reward_model = throughput.make_models("410m", scratch / "models", "cuda")
    rows, response, prompt = 8, 64, 17  # (the toy's prompts: 14-20 tokens)
    flags = ["--model", policy, "--reward-model", reward_model, "--eval-reward", "", "--total-episodes", str(rows),
             "--rollout-batch-size", str(rows), "--mini-batch-size", str(rows), "--max-new-tokens", str(response),
             "--eval-size", "8", "--save-every", "0", "--update-epochs", "1", "--output-dir",
             scratch / "runs" / "memory"]  # fmt: skip
    report = scratch / "tables" / "memory_410m.json"
    status, output = check.command("memory", [sys.executable, "bench/instrument.py", report, "ppo.py", *flags],
                                   timeout)  # fmt: skip
    if status != 0:
        return False, f"bench/instrument.py failed ({status})", output
    measured = json.loads(report.read_text())
    hidden, layers, _ = throughput.SIZES["410m"]
    shape = (hidden, layers, memory.TOY_VOCAB)
    p = memory.parameters(*shape)
    fitted = json.loads((REPO / "bench" / "results" / "memory_cpu.json").read_text())
    steps = read_metrics(scratch / "runs" / "memory")[-1]["time/decode_steps"]
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
    (check.out / "memory.md").write_text("\n".join(lines) + "\n")
    off = [f"{t} {m:.2f} vs {q:.2f} GiB" for t, m, q, tol in terms if abs(m / q - 1) > tol]
    return not off, ("; ".join(off) or f"{len(terms)} terms within 10% (stored) / 25% (peaks)") + " (memory.md)", ""


if __name__ == "__main__":
    sys.exit(main())
