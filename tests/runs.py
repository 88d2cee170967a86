"""How the tests start the scripts: as a user does, `python SCRIPT ARGS` or `torchrun --nproc_per_node N --standalone
SCRIPT ARGS`, each run a new interpreter in a subprocess (tests/wrap.py in front of the script where a test needs
fixed rollouts, a record of the calls, or a pause after the first checkpoint); and the runs that several tests read
(`Shared`), each made once per test session, by whichever pytest-xdist worker asks first, under a file lock.
A run's whole process tree is ended on a timeout or a kill (torchrun's workers start sessions of their own: the
tree is read from /proc, bench/device_check.py's kill_tree)."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from device_check import kill_tree  # noqa: E402


def command(script: str, args: list[str], nproc: int = 1, torchrun: bool = False) -> list[str]:
    target = [str(REPO / script), *map(str, args)]
    if nproc > 1 or torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *target]
    return [sys.executable, *target]


class Started:
    """A started run; its output goes to files (a process that outlives a kill cannot block a pipe's read)."""

    def __init__(self, argv: list[str], env: dict, cwd):
        self.argv, self.out, self.err = argv, tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.out, stderr=self.err, text=True,
                                      start_new_session=True)  # fmt: skip

    def kill(self):
        kill_tree(self.popen.pid)

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.popen.wait()
            self.err.write(f"\n(killed after {timeout:.0f} s)")
        self.out.seek(0), self.err.seek(0)
        return subprocess.CompletedProcess(self.argv, self.popen.returncode, self.out.read(), self.err.read())


def run(script: str, args: list[str], env: dict, cwd=REPO, nproc: int = 1, timeout: float = 600,
        torchrun: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    return Started(command(script, args, nproc, torchrun), env, cwd).result(timeout)


def start(script: str, args: list[str], env: dict, cwd=REPO, nproc: int = 1) -> Started:
    return Started(command(script, args, nproc), env, cwd)


class Shared:
    """Runs made once per test session under `root` (shared by the pytest-xdist workers): `get(key, make)` returns
    the directory make(directory) filled, making it first if no worker has; a failed make is reported to every test
    that asks, not retried."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, make) -> Path:
        from filelock import FileLock

        directory = self.root / key
        with FileLock(str(self.root / f"{key}.lock")):
            if (directory / "FAILED").exists():
                raise AssertionError(f"the shared run '{key}' failed:\n{(directory / 'FAILED').read_text()}")
            if not (directory / "DONE").exists():
                directory.mkdir(exist_ok=True)
                start = time.time()
                try:
                    make(directory)
                except BaseException as e:
                    (directory / "FAILED").write_text(f"{type(e).__name__}: {e}")
                    raise
                (directory / "DONE").write_text(f"{time.time() - start:.1f} s\n")
        return directory


def session_root(basetemp: Path) -> Path:
    """A directory of this test session that every pytest-xdist worker sees (each worker's basetemp is below it)."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
