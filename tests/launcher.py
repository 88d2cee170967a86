"""How the tests start the scripts: as `python SCRIPT ARGS` or `torchrun --nproc_per_node N SCRIPT ARGS` would, but
each run is a fork of a server process that has already imported torch, transformers, peft, datasets and tyro.

A new interpreter spends ~9 s of CPU importing those before a script does anything, and the suite starts about a
hundred script processes; a fork starts in milliseconds. Each run is still its own process, with its own argv,
environment, working directory, stdout/stderr and exit status, running the script's `__main__` (runpy); N ranks are
N forks given the variables torchrun sets (RANK, WORLD_SIZE, MASTER_PORT, ...), and when one fails the others are
stopped, as torchrun does. The server never computes with torch (no OpenMP pool, no CUDA) so its forks start clean.
The recipes' own `python` and `torchrun` commands reach the server through shims on their PATH (see shims()). A run
whose environment changes what a library reads when it is imported (HF_*, TRANSFORMERS_*, ...), any run on a
machine with CUDA, and every run when RLHF_TEST_FORK=0 start a real interpreter instead."""

import atexit
import gc
import importlib
import json
import os
import runpy
import select
import shutil
import signal
import socket
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
    """Requests come one per line on stdin (from the tests, answered on stdout) or on the Unix socket LAUNCHER_SOCKET
    (from the `python` and `torchrun` shims below, with their stdin/stdout/stderr passed along): fork the request's
    ranks, answer their pids, wait, answer the exit status."""
    import torch

    torch.set_num_threads(1)  # (no thread pool here that a fork would inherit half of)
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the forks' garbage collector skips what was imported here (and leaves those pages shared)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.environ["LAUNCHER_SOCKET"])
    listener.listen()
    pending = b""
    while True:
        if b"\n" not in pending and listener in select.select([0, listener], [], [])[0]:
            connection = listener.accept()[0]
            with connection:
                _, fds, _, _ = socket.recv_fds(connection, 1, 3)  # the shim's stdin, stdout and stderr
                request = json.loads(connection.makefile().readline())
                if serves(request["env"], os.environ):
                    request["env"].pop("LAUNCHER_SOCKET")  # (its own python commands: real ones; this one waits)
                    fork_and_wait(request, lambda m, c=connection: c.sendall((json.dumps(m) + "\n").encode()), fds)
                else:
                    connection.sendall(b'{"fallback": true}\n')
                for fd in fds:
                    os.close(fd)
            continue
        while b"\n" not in pending:
            chunk = os.read(0, 65536)
            if not chunk:  # the tests have finished
                shutil.rmtree(os.path.dirname(os.environ["LAUNCHER_SOCKET"]), ignore_errors=True)
                return
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        fork_and_wait(json.loads(line), lambda m: os.write(1, (json.dumps(m) + "\n").encode()))


def serves(env: dict, server_env: dict) -> bool:
    """Whether a fork of a server imported under `server_env` runs as a new interpreter given `env` would."""
    keys = {k for k in (*env, *server_env) if k.startswith(IMPORT_TIME) and k not in HANDLED}
    return all(env.get(k) == server_env.get(k) for k in keys)


def fork_and_wait(request: dict, answer, fds=None):
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
            run_rank(request, rank, port, fds)  # never returns
        pids.append(pid)
    answer({"pids": pids})
    answer({"returncode": wait_ranks(pids)})
    del store


def run_rank(request: dict, rank: int, port: int, fds=None):
    """In the fork: become `python SCRIPT ARGS` (one rank of torchrun when nproc > 1) and exit with its status."""
    code = 1
    try:
        if fds is None:  # the tests' runs: stdout and stderr to files, no stdin
            fds = [os.open(os.devnull, os.O_RDONLY)]
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
        if self.popen is not None:
            os.killpg(self.popen.pid, signal.SIGKILL)  # torchrun and its workers: one process group
        else:
            for pid in self.pids:
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


class Server:
    def __init__(self, env: dict, cwd: str):
        short = "/tmp" if os.path.isdir("/tmp") else None  # (a Unix socket's path must stay under 108 bytes)
        self.socket = os.path.join(tempfile.mkdtemp(prefix="launcher-", dir=short), "socket")
        self.env = {**env, "LAUNCHER_SOCKET": self.socket}
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


def shims(env: dict) -> dict:
    """`env` for a shell script (a recipe) whose `python SCRIPT ...` and `torchrun --nproc_per_node N SCRIPT ...`
    should start as forks of the server: `python` and `torchrun` on its PATH become shims that ask the server (any
    other use of them, and a server that does not serve that environment, runs the real ones)."""
    if not fork_allowed():
        return env
    bin_dir = os.path.join(os.path.dirname(server().socket), "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for name in ("python", "torchrun"):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" -S "{__file__}" {name} "$@"\n')
        os.chmod(path, 0o755)
    return {**env, "PATH": f"{bin_dir}:{env.get('PATH', '')}", "LAUNCHER_SOCKET": server().socket}


def shim(name: str, args: list[str]):
    """A `python` or `torchrun` shim (see shims): run as a fork of the server when it can, else exec the real one."""
    real = sys.executable if name == "python" else os.path.join(os.path.dirname(sys.executable), name)
    nproc = 1
    if name == "torchrun" and len(args) > 2 and args[0] in ("--nproc_per_node", "--nproc-per-node"):
        nproc, args = int(args[1]), args[2:]
    elif name == "torchrun":
        args = []  # a form the shim does not handle
    if args and args[0].endswith(".py") and os.environ.get("LAUNCHER_SOCKET"):
        with socket.socket(socket.AF_UNIX) as connection:
            try:
                connection.connect(os.environ["LAUNCHER_SOCKET"])
            except OSError:  # no server there: the real one
                os.execv(real, [real, *sys.argv[2:]])
            socket.send_fds(connection, [b"r"], [0, 1, 2])
            request = {"argv": args, "env": dict(os.environ), "cwd": os.getcwd(), "nproc": nproc}
            connection.sendall((json.dumps(request) + "\n").encode())
            replies = connection.makefile()
            reply = json.loads(replies.readline())
            if "pids" in reply:
                code = json.loads(replies.readline())["returncode"]
                sys.exit(code if code >= 0 else 128 - code)
    os.execv(real, [real, *sys.argv[2:]])  # the real one, with the arguments as given


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


class Subprocess:
    """Stands in for the subprocess module inside a module under test (bench/ starts the scripts itself): its
    `python SCRIPT ...` and `python -m torch.distributed.run --nproc_per_node N SCRIPT ...` commands start through
    start() above; any other command, and everything else, is subprocess's own."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, cwd=None, env=None, timeout=None, **kwargs):
        cmd, nproc = [str(c) for c in cmd], 1
        if cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"]:
            cmd, nproc = [cmd[0], *cmd[5:]], int(cmd[4])
            cmd = [c for c in cmd if c != "--standalone"]  # (the store is the launcher's)
        if cmd[0] != sys.executable or len(cmd) < 2 or not cmd[1].endswith(".py"):
            return subprocess.run(cmd, *args, cwd=cwd, env=env, timeout=timeout, **kwargs)
        return run(cmd[1:], dict(env or os.environ), str(cwd or os.getcwd()), nproc, timeout or 3600)


def fork_allowed() -> bool:
    import torch

    return os.environ.get("RLHF_TEST_FORK", "1") != "0" and hasattr(os, "fork") and not torch.cuda.is_available()


if __name__ == "__main__":
    shim(sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else serve()
