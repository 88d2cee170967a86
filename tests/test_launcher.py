import os
import subprocess
import sys
import time

import launcher
import pytest

# a parent that starts a child in a session of its own (as torchrun starts each worker), prints its pid, and waits
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # (a zombie has exited)
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_killing_a_real_interpreters_run_kills_workers_in_their_own_sessions():
    popen = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, start_new_session=True, text=True)
    child = int(popen.stdout.readline())
    assert set(launcher.descendants(popen.pid)) == {popen.pid, child}
    launcher.Run(["parent"], popen=popen).kill()
    popen.wait(10)
    deadline = time.time() + 10
    while running(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not running(child), "the worker in its own session outlived the kill (a process-group kill misses it)"
