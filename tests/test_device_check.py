"""bench/device_check.py, the first run on a GPU machine, held to that machine's limits here: what OUTDIR receives
(at most 6 files, no folder, scratch elsewhere), a failing stage's last lines in the summary, a stage without time
reported as not run (incomplete, exit 1), a timed-out stage's whole process tree ended (a child in a session of its
own too, as torchrun's workers are), the wheels' requirements checked against the machine's packages, and --cpu
before or after OUTDIR. (CI's last step runs the real --cpu check.)"""

import json
import sys
import zipfile
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import device_check  # noqa: E402

PYTHON = sys.executable


def planted_stages(pid_file: Path):
    """A stage that passes, one that prints 100 lines and fails, one whose child starts a session of its own and
    sleeps (ended by the check's time limit), and one left without time."""

    def stages(check, args):
        def passing(timeout):
            code, output = check.command("passing", [PYTHON, "-c", "print('fine')"], timeout)
            return code == 0, output.strip(), output

        def failing(timeout):
            code, output = check.command("failing", [PYTHON, "-c", "[print(f'line {i}') for i in range(100)]; exit(3)"],
                                         timeout)  # fmt: skip
            return code == 0, f"exit status {code}", output

        def hanging(timeout):
            spawn = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
                     f"time.sleep(300)'], start_new_session=True); open({str(pid_file)!r}, 'w').write(str(child.pid)); "
                     "time.sleep(300)")  # fmt: skip
            code, output = check.command("hanging", [PYTHON, "-c", spawn], timeout)
            return code == 0, f"exit status {code}", output

        return [("passing", passing, 30, True), ("failing", failing, 30, True), ("hanging", hanging, 300, True),
                ("left without time", failing, 30, True)]  # fmt: skip

    return stages


def test_outdir_files_failing_tail_timeout_kills_the_tree_and_incomplete(tmp_path):
    out, scratch, pid_file = tmp_path / "out", tmp_path / "scratch", tmp_path / "child.pid"
    (out / "runs").mkdir(parents=True)  # an earlier layout's folder: removed
    code = device_check.main([str(out), "--budget", "8", "--scratch", str(scratch)], planted_stages(pid_file))
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(device_check.OUTPUTS)  # 6 files, no folder
    assert all(p.is_file() and p.stat().st_size < 2**20 for p in out.iterdir())  # (the limit: 16 MiB each)
    summary = json.loads((out / "summary.json").read_text())
    statuses = {s["stage"]: s["status"] for s in summary["stages"]}
    assert statuses == {"passing": "PASS", "failing": "FAIL", "hanging": "FAIL", "left without time": "NOT RUN"}
    assert not summary["ok"] and summary["verdict"] == "FAILED (CUDA)"  # (a failure is named before the incomplete)
    text = (out / "summary.md").read_text()
    assert "line 99" in text and "line 60" in text and "line 59\n" not in text  # the failing stage's last 40 lines
    assert "timed out" in text and "line 99" in (out / "device_check.log").read_text()
    child = int(pid_file.read_text())
    assert not device_check.alive(child)  # the child in its own session was ended with its parent
    import tarfile

    with tarfile.open(out / "stages.tar.gz") as archive:
        assert "logs/failing.log" in archive.getnames()


def test_a_stage_without_time_makes_the_check_incomplete(tmp_path):
    out = tmp_path / "out"

    def stages(check, args):
        def slow(timeout):
            code, output = check.command("slow", [PYTHON, "-c", "import time; time.sleep(300)"], timeout)
            return True, "finished", output  # (passes when its time limit stops it: only the next stage is at issue)

        return [("slow", slow, 300, True), ("next", slow, 30, True)]

    code = device_check.main([str(out), "--budget", "6", "--scratch", str(tmp_path / "s")], stages)
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1 and summary["verdict"].startswith("incomplete: 1 stage(s) not run")
    assert [s["status"] for s in summary["stages"]] == ["PASS", "NOT RUN"]
    assert "all" not in summary["verdict"]


def test_cpu_flag_before_or_after_outdir_and_no_budget_verdict_on_cpu(tmp_path):
    def stages(check, args):
        return [s for s in device_check.default_stages(check, args) if s[0] in ("packages", "install", "memory")]

    for argv in (["--cpu", str(tmp_path / "a")], [str(tmp_path / "b"), "--cpu", "--budget", "0"]):
        assert device_check.main([*argv, "--scratch", str(tmp_path / "s")], stages) == 0, argv
        summary = json.loads((Path(argv[0] if argv[0] != "--cpu" else argv[1]) / "summary.json").read_text())
        assert [s["status"] for s in summary["stages"]] == ["PASS", "n/a", "n/a"]  # (--budget 0: no verdict on CPU)


def test_the_wheels_requirements_against_the_machines_packages(tmp_path):
    def wheel(name, version, requires):
        path = tmp_path / f"{name}-{version}-py3-none-any.whl"
        lines = [f"Name: {name}", f"Version: {version}", *[f"Requires-Dist: {r}" for r in requires]]
        with zipfile.ZipFile(path, "w") as w:
            w.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
        return path

    typeguard = wheel("typeguard", "4.6.1", ["typing_extensions>=4.14.0", 'sphinx; extra == "doc"'])
    datasets = wheel("datasets", "5.2.0", ["pyarrow>=24.0.0", "tqdm>=4.66.3", "dill<0.4.2,>=0.3.0"])
    dill = wheel("dill", "0.4.1", [])
    machine = {"typing-extensions": "4.12.2", "pyarrow": "24.1.0", "tqdm": "4.67.1"}
    problems, checked = device_check.package_problems([typeguard, datasets, dill], machine)
    assert problems == ["typeguard 4.6.1 needs typing_extensions>=4.14.0; this machine has 4.12.2: add a matching "
                        "typing_extensions to bench/device_wheels.txt"]  # fmt: skip
    assert checked == {"typing-extensions": "4.12.2", "pyarrow": "24.1.0", "tqdm": "4.67.1", "dill": "0.4.1"}
    problems, _ = device_check.package_problems([datasets], {"pyarrow": "23.0.0"})  # (no dill wheel, no tqdm)
    assert [p.split(";")[0] for p in problems] == ["datasets 5.2.0 needs pyarrow>=24.0.0",
                                                   "datasets 5.2.0 needs tqdm>=4.66.3",
                                                   "datasets 5.2.0 needs dill<0.4.2,>=0.3.0"]  # fmt: skip
