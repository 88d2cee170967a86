"""tests/launcher.py starts a run as `python` / `torchrun` would: the same exit status, the same view of the machine."""

import time

import launcher


def test_a_failed_rank_stops_the_others_and_the_run_has_its_status(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(120)\n")
    start, env = time.time(), dict(launcher.BASE_ENV)
    result = launcher.run([str(script)], env, str(tmp_path), nproc=2, timeout=100)
    # rank 1's status, not the SIGTERM that stopped rank 0 (a real torchrun exits 1 when a worker fails)
    assert result.returncode == (3 if launcher.forks(env) else 1)
    assert time.time() - start < 60  # rank 0 was stopped, not waited for


def test_a_run_sees_its_argv_cwd_and_the_path_of_a_new_interpreter(tmp_path):
    """The script's directory first on sys.path, and nothing the test process added (tests/, the repository)."""
    script = tmp_path / "view.py"
    script.write_text("import os, sys\nprint(sys.argv[1:], os.getcwd(), sys.path[0])\nprint('x' * 3, file=sys.stderr)\n"
                      "import conftest\n")  # fmt: skip
    result = launcher.run([str(script), "--a", "1"], dict(launcher.BASE_ENV), str(tmp_path))
    assert result.stdout.strip() == f"['--a', '1'] {tmp_path} {tmp_path}"
    assert result.returncode == 1 and "ModuleNotFoundError: No module named 'conftest'" in result.stderr
    assert result.stderr.startswith("xxx\n")
