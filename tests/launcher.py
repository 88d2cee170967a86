"""How the tests start the scripts: as `python SCRIPT ARGS` or `torchrun --nproc_per_node N SCRIPT ARGS` would, but
each process is a child of multiprocessing's fork server, which has imported torch, transformers, peft, datasets and
tyro once (`set_forkserver_preload`).

A new interpreter spends ~9 s of CPU importing those before a script does anything, and the suite starts about a
hundred script processes; a fork starts in milliseconds. Each run is still its own process, with its own argv,
environment, working directory, stdout/stderr and exit status, running the script's `__main__` (runpy); N ranks are
N processes given the variables torchrun sets, and when one fails the others are stopped, as torchrun does. The fork
server only imports (no torch computation: no OpenMP pool, no CUDA), so its children start clean. A run whose
environment changes what a library reads when it is imported (HF_*, TRANSFORMERS_*, ...), any run on a machine with
CUDA, and every run when RLHF_TEST_FORK=0 start a real interpreter instead (under `torchrun --standalone` for
ranks), as do the commands that bench/ and the recipes start themselves."""

import atexit
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# imported once by the fork server (what every script and tests/*.py helper imports, and the toy's model classes)
PRELOAD = [
    "launcher",  # (this module: its children run run_rank)
    "numpy",
    "torch",
    "torch.distributed",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch.distributed.fsdp",
    "torch.nn.parallel",
    "torch.utils.tensorboard",
    "transformers",
    "transformers.models.gpt_neox.modeling_gpt_neox",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "peft",
    "datasets",
    "tyro",
]
# variables the libraries read when imported: a run that sets them differently gets a real interpreter
# (not TORCHINDUCTOR_CACHE_DIR, which torch sets in the test process itself)
IMPORT_TIME = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "PYTORCH_", "CUDA_", "NCCL_", "PYTHON")
HANDLED = {"PYTHONUNBUFFERED", "PYTHONPATH"}  # run_rank applies these itself
BASE_ENV = dict(os.environ)  # the environment the fork server imports under (conftest sets it before any test runs)


def torchrun_env(env: dict, rank: int, nproc: int, port: int) -> dict:
    """What torchrun --nproc_per_node nproc sets for one local rank (OMP_NUM_THREADS=1 unless set, as it does). As
    torchrun's agent does, the launcher holds the run's store and the ranks join it (TORCHELASTIC_USE_AGENT_STORE)."""
    ranks = {k: str(rank) for k in ("RANK", "LOCAL_RANK", "ROLE_RANK")}
    sizes = {k: str(nproc) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "ROLE_WORLD_SIZE")}
    extra = {"GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "none",
             "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"}  # fmt: skip
    return {"OMP_NUM_THREADS": "1", **env, **ranks, **sizes, **extra}


def run_rank(argv: list[str], env: dict, cwd: str, stdout: str, stderr: str, base_path: list[str]):
    """In the fork server's child: become `python SCRIPT ARGS` (its exit status is the script's: multiprocessing
    turns SystemExit and an exception into it as the interpreter does), with the sys.path a new interpreter would
    have (`base_path`, not the test process's)."""
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count()))
    if env.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True), sys.stderr.reconfigure(write_through=True)
    sys.argv = list(argv)
    pythonpath = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *pythonpath, *base_path]
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # (what the interpreter runs at exit; multiprocessing's child ends in os._exit)


class Run:
    """A started run: poll(), wait(timeout), kill() (every rank), result() (a CompletedProcess)."""

    def __init__(self, argv, stdout, stderr, processes=(), popen=None, store=None):
        self.argv, self.stdout, self.stderr = argv, stdout, stderr
        self.processes, self.popen, self.store = list(processes), popen, store  # (the store lives as long as the run)
        self.returncode, self.deadline, self.first_failure = None, None, 0
        _live.add(self)

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: the signal that killed it): the first failed rank's, else 0. When a rank fails,
        the others get SIGTERM, and SIGKILL 30 s later, as under torchrun."""
        if self.popen is not None:
            self.returncode = self.popen.wait(timeout)
            _live.discard(self)
            return self.returncode
        end = None if timeout is None else time.time() + timeout
        while self.returncode is None:
            running = [p for p in self.processes if p.exitcode is None]
            failed = [p.exitcode for p in self.processes if p.exitcode not in (None, 0)]
            if failed and self.deadline is None:  # (the first failure's status, not that of the ranks stopped then)
                self.deadline, self.first_failure = time.time() + 30, failed[0]
                for p in running:
                    p.terminate()
            if not running:
                self.returncode, self.store = self.first_failure, None
                _live.discard(self)
                break
            limits = [t - time.time() for t in (end, self.deadline) if t is not None]
            if self.deadline is not None and time.time() > self.deadline:
                for p in running:
                    p.kill()
            elif end is not None and time.time() >= end:
                raise subprocess.TimeoutExpired(self.argv, timeout)
            multiprocessing.connection.wait([p.sentinel for p in running], max(0.0, min(limits)) if limits else None)
            for p in running:
                p.join(0)  # (reads the exit status of those that ended)
        return self.returncode

    def poll(self):
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.popen is not None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)  # torchrun and its workers: one process group
            except ProcessLookupError:  # (ended already)
                pass
        for p in self.processes:
            if p.exitcode is None:
                p.kill()

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        texts = [Path(p).read_text(errors="replace") for p in (self.stdout, self.stderr)]
        shutil.rmtree(os.path.dirname(self.stdout), ignore_errors=True)
        return subprocess.CompletedProcess(self.argv, self.returncode, *texts)


_live: set[Run] = set()  # runs not yet waited for: killed when the test process exits (else multiprocessing joins them)
atexit.register(lambda: [run.kill() for run in list(_live)])
_context, _base_path = None, None


def fork_server():
    """multiprocessing's forkserver context, its server started (at first use) under BASE_ENV, importing PRELOAD, and
    the sys.path of a new interpreter under BASE_ENV (its children's, whatever the test process has added)."""
    global _context, _base_path
    if _context is None:
        env = {k: v for k, v in BASE_ENV.items() if k != "PYTHONPATH"}
        probe = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"]
        _base_path = json.loads(subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout)
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        current = dict(os.environ)
        os.environ.clear(), os.environ.update(BASE_ENV)  # (the server inherits the environment it starts in)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear(), os.environ.update(current)
    return _context


def forks(env: dict) -> bool:
    """Whether a child of the fork server runs as a new interpreter given `env` would."""
    import torch

    if os.environ.get("RLHF_TEST_FORK", "1") == "0" or torch.cuda.is_available():
        return False
    keys = {k for k in (*env, *BASE_ENV) if k.startswith(IMPORT_TIME) and k not in HANDLED}
    return all(env.get(k) == BASE_ENV.get(k) for k in keys)


def start(argv: list[str], env: dict, cwd: str, nproc: int = 1, torchrun: bool = False) -> Run:
    """Start `python argv...` (nproc == 1, not `torchrun`) or `torchrun --nproc_per_node nproc argv...`."""
    outputs = tempfile.mkdtemp(prefix="launcher-")
    stdout, stderr = os.path.join(outputs, "stdout"), os.path.join(outputs, "stderr")
    for path in (stdout, stderr):  # (there even when a child dies before it runs the script)
        open(path, "w").close()
    torchrun = torchrun or nproc > 1
    if forks(env):
        import torch.distributed as dist

        # the run's store, on a port the OS picked and that stays bound: no free port looked up and then raced for
        store = dist.TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False) if torchrun else None
        envs = [torchrun_env(env, rank, nproc, store.port) if torchrun else env for rank in range(nproc)]
        context = fork_server()
        processes = [
            context.Process(target=run_rank, args=(argv, e, str(cwd), stdout, stderr, _base_path)) for e in envs
        ]
        for p in processes:
            p.start()
        return Run(argv, stdout, stderr, processes=processes, store=store)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if torchrun else []
    with open(stdout, "w") as out, open(stderr, "w") as err:
        popen = subprocess.Popen([sys.executable, *launcher, *argv], stdout=out, stderr=err, env=env, cwd=cwd,
                                 stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    return Run(argv, stdout, stderr, popen=popen)


def run(argv: list[str], env: dict, cwd: str, nproc: int = 1, timeout: float = 600, torchrun: bool = False):
    return start(argv, env, cwd, nproc, torchrun).result(timeout)
