"""How the tests start the scripts: as `python SCRIPT ARGS` or `torchrun --nproc_per_node N SCRIPT ARGS` would, but each
run is a fork of a server process that has already imported torch, transformers, peft, datasets and tyro.

A new interpreter spends ~4 s of CPU importing those before a script does anything (a short toy run takes ~8 s in
all), and most tests start one or more script runs; a fork starts in milliseconds. Each run is still its own process,
with its own argv, environment, working directory, stdout/stderr and exit status, running the script's `__main__`
(runpy); N ranks are N forks given the variables torchrun sets (RANK, WORLD_SIZE, MASTER_PORT, ...), and when one
fails the others are stopped, as torchrun does. The server never computes with torch (no OpenMP pool, no CUDA) so its
forks start clean. Only the tests' own runs (conftest.py's run_script and kill_at_first_checkpoint) come here: the
recipes and bench/ start real interpreters, and so does a run whose environment changes what a library reads when it
is imported (HF_*, TRANSFORMERS_*, ...), any run on a machine with CUDA, and every run when RLHF_TEST_FORK=0.
(docs/tests.md has the suite's time with and without it.)"""

import atexit
import gc
import importlib
import json
import os
import runpy
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# imported once by the server (what every script and tests/*.py helper imports, and the toy's model classes)
PRELOAD = [
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
HANDLED = {"PYTHONUNBUFFERED", "PYTHONPATH"}  # the forks apply these themselves


def torchrun_env(env: dict, rank: int, nproc: int, port: int) -> dict:
    """What torchrun --nproc_per_node nproc sets for one local rank (OMP_NUM_THREADS=1 unless set, as it does)."""
    ranks = {k: str(rank) for k in ("RANK", "LOCAL_RANK", "ROLE_RANK")}
    sizes = {k: str(nproc) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "ROLE_WORLD_SIZE")}
    extra = {"GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "none",
             "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"}  # fmt: skip
    return {"OMP_NUM_THREADS": "1", **env, **ranks, **sizes, **extra}


# ---------------------------------------------------------------- the server and its forks


def serve():
    """Requests come one per line on stdin, from the tests: fork the request's ranks, answer their pids on stdout,
    wait, answer the exit status. At the end of stdin (the tests have finished), return."""
    import torch

    torch.set_num_threads(1)  # (no thread pool here that a fork would inherit half of)
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the forks' garbage collector skips what was imported here (and leaves those pages shared)
    for line in sys.stdin:
        fork_and_wait(json.loads(line), lambda m: os.write(1, (json.dumps(m) + "\n").encode()))


def serves(env: dict, server_env: dict) -> bool:
    """Whether a fork of a server imported under `server_env` runs as a new interpreter given `env` would."""
    keys = {k for k in (*env, *server_env) if k.startswith(IMPORT_TIME) and k not in HANDLED}
    return all(env.get(k) == server_env.get(k) for k in keys)


def fork_and_wait(request: dict, answer):
    import torch.distributed as dist

    # As torchrun's agent does: the server holds the run's store, on a port the OS picked and that stays bound, and
    # the ranks join it as clients (TORCHELASTIC_USE_AGENT_STORE): no port is freed and then raced for.
    store = dist.TCPStore("127.0.0.1", 0, request["nproc"], is_master=True, wait_for_workers=False)
    port = store.port
    pids = []
    for rank in range(request["nproc"]):
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_rank(request, rank, port)  # never returns
        pids.append(pid)
    answer({"pids": pids})
    answer({"returncode": wait_ranks(pids)})
    del store


def run_rank(request: dict, rank: int, port: int):
    """In the fork: become `python SCRIPT ARGS` (one rank of torchrun when nproc > 1) and exit with its status."""
    code = 1
    try:
        fds = [os.open(os.devnull, os.O_RDONLY)]  # no stdin; stdout and stderr to the test's files
        fds += [os.open(request[k], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for k in ("stdout", "stderr")]
        for fd, source in enumerate(fds):
            os.dup2(source, fd)
        torchrun = request["nproc"] > 1 or request.get("torchrun")
        env = torchrun_env(request["env"], rank, request["nproc"], port) if torchrun else request["env"]
        os.environ.clear()
        os.environ.update(env)
        os.chdir(request["cwd"])
        import torch

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count()))
        if env.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True), sys.stderr.reconfigure(write_through=True)
        script = os.path.abspath(request["argv"][0])
        sys.argv = [request["argv"][0], *request["argv"][1:]]
        sys.path[0] = os.path.dirname(script)
        sys.path[1:1] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = 0
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # what the interpreter makes of sys.exit(code)
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush(), sys.stderr.flush()
    finally:
        os._exit(code)


def wait_ranks(pids: list[int]) -> int:
    """Wait for every rank; when one fails, stop the rest (SIGTERM, SIGKILL 30 s later) as torchrun does. The exit
    status is the first failure's (negative: the signal that killed it), else 0."""
    codes, first_failure, deadline = {}, 0, None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG if deadline else 0)
        if pid == 0:  # stopping the others: wait a little, then kill
            if time.time() > deadline:
                for other in set(pids) - set(codes):
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.05)
            continue
        if pid not in pids:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and not first_failure:
            first_failure, deadline = codes[pid], time.time() + 30
            for other in set(pids) - set(codes):
                os.kill(other, signal.SIGTERM)
    return first_failure


# ---------------------------------------------------------------- the tests' side


class Run:
    """A started run: poll(), wait(timeout), kill() (every rank), result() (a CompletedProcess)."""

    def __init__(self, argv, pids=None, server=None, popen=None, stdout=None, stderr=None):
        self.argv, self.pids, self.server, self.popen = argv, pids, server, popen
        self.stdout, self.stderr, self.returncode = stdout, stderr, None

    def poll(self):
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            else:
                message = self.server.receive(timeout=0)
                self.returncode = None if message is None else message["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.popen is not None:
            self.returncode = self.popen.wait(timeout)
        elif self.returncode is None:
            message = self.server.receive(timeout)
            if message is None:
                raise subprocess.TimeoutExpired(self.argv, timeout)
            self.returncode = message["returncode"]
        return self.returncode

    def kill(self):
        # a real torchrun starts each worker in a session of its own: every descendant, not a process group
        if self.popen is not None and self.popen.poll() is not None:
            return  # (exited and reaped: its pid may be another process's by now)
        for pid in descendants(self.popen.pid) if self.popen is not None else self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

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


def descendants(pid: int) -> list[int]:
    """pid and every process under it (Linux's /proc; elsewhere pid's process group)."""
    if not os.path.isdir("/proc"):
        return [-pid]  # (os.kill of -pid: the group)
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # (the name in parentheses may hold spaces)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


class Server:
    def __init__(self, env: dict, cwd: str):
        self.env = env
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=self.env, cwd=cwd)  # fmt: skip
        self.buffer = b""
        self.current: Run | None = None  # the run it answers for (one at a time)

    def serves(self, env: dict) -> bool:
        return self.proc.poll() is None and serves(env, self.env)

    def send(self, request: dict):
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float | None) -> dict | None:
        end = None if timeout is None else time.time() + timeout
        while b"\n" not in self.buffer:
            left = None if end is None else max(0.0, end - time.time())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the test launcher's server stopped (exit status {self.proc.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


_server: Server | None = None
BASE_ENV = dict(os.environ)  # the environment the server imports under (conftest sets it before any test runs)


def server() -> Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = Server({**BASE_ENV, "OMP_NUM_THREADS": "1"}, str(Path(__file__).parent.parent))
    return _server


def start(argv: list[str], env: dict, cwd: str, nproc: int = 1, torchrun: bool = False) -> Run:
    """Start `python argv...` (nproc == 1, not `torchrun`) or `torchrun --nproc_per_node nproc argv...`."""
    global _server
    outputs = tempfile.mkdtemp(prefix="launcher-")
    stdout, stderr = os.path.join(outputs, "stdout"), os.path.join(outputs, "stderr")
    if fork_allowed():
        server()
        if _server.serves(env):
            if _server.current is not None and _server.current.poll() is None:  # a run a failed test left behind
                _server.current.kill()
                _server.current.wait()
            _server.send({"argv": argv, "env": env, "cwd": str(cwd), "nproc": nproc, "torchrun": torchrun,
                          "stdout": stdout, "stderr": stderr})  # fmt: skip
            pids = _server.receive(timeout=None)["pids"]
            _server.current = Run(argv, pids=pids, server=_server, stdout=stdout, stderr=stderr)
            return _server.current
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]  # (its own free port)
    launcher = launcher if nproc > 1 or torchrun else []
    with open(stdout, "w") as out, open(stderr, "w") as err:
        popen = subprocess.Popen([sys.executable, *launcher, *argv], stdout=out, stderr=err, env=env, cwd=cwd,
                                 stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    return Run(argv, popen=popen, stdout=stdout, stderr=stderr)


def run(argv: list[str], env: dict, cwd: str, nproc: int = 1, timeout: float = 600, torchrun: bool = False):
    return start(argv, env, cwd, nproc, torchrun).result(timeout)


def fork_allowed() -> bool:
    import torch

    return os.environ.get("RLHF_TEST_FORK", "1") != "0" and hasattr(os, "fork") and not torch.cuda.is_available()


if __name__ == "__main__":
    serve()
