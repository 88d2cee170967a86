import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import compare  # noqa: E402


def write_run(path, rows, wall_time):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "wall_time.json").write_text(json.dumps({"wall_time": wall_time}))
    return path


def fake_rows(final_gold, final_kl, speed):
    ev = {"eval/reward": 1.0, "eval/response_length": 20.0, "eval/distinct_2": 0.5}
    start = {**ev, "eval/gold_reward": 0.0, "eval/kl": 0.0}
    final = {**ev, "eval/gold_reward": final_gold, "eval/kl": final_kl}
    return [
        {"iteration": 0, "episodes": 0, "eval/iteration": 0, **start},
        {"iteration": 1, "episodes": 64, "eval/iteration": 0, **start, "time/samples_per_s": speed},
        {"iteration": 2, "episodes": 128, "eval/iteration": 2, **final, "time/samples_per_s": speed + 2},
    ]


def test_summarize_reads_final_rows_and_aggregates_over_seeds(tmp_path):
    runs = {"ppo": [compare.read_run(write_run(tmp_path / f"ppo__{s}", fake_rows(g, k, 10), w))
                    for s, (g, k, w) in enumerate([(2.0, 4.0, 100), (3.0, 6.0, 120)])]}  # fmt: skip
    table = compare.summarize(runs)
    row = table.splitlines()[2]
    assert row.startswith("| ppo | 2 |")
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    columns = [c for c, _ in compare.TABLE]
    values = dict(zip(columns, cells))
    assert values["gold reward"] == "2.50 ± 0.71"  # mean, sample std of (2, 3)
    assert values["KL to ref"] == "5.00 ± 1.41"
    assert values["samples/s"] == "11.0 ± 0.0"  # the mean over each run's training rows: (10 + 12) / 2
    assert values["wall time (s)"] == "110 ± 14"
    assert compare.eval_curve(runs["ppo"][0], "eval/gold_reward") == [(0, 0.0), (128, 2.0)]  # fresh evaluations only


def test_script_flags_give_every_algorithm_the_same_budget():
    online = compare.script_flags("ppo", "quick")
    offline = compare.script_flags("a-lol", "quick")
    episodes = int(online[online.index("--total-episodes") + 1])
    steps = int(offline[offline.index("--total-steps") + 1])
    assert episodes == steps * compare.OFFLINE_BATCH == compare.MODES["quick"][0]
    assert compare.script_flags("nll", "smoke")[:2] == ["--variant", "nll"]


def test_smoke_comparison_writes_the_table_and_every_plot(tmp_path):
    sys.argv = ["compare.py", "--mode", "smoke", "--seeds", "1", "--output-dir", str(tmp_path)]
    compare.main()
    table = (tmp_path / "results.md").read_text()
    for name in compare.ALGORITHMS:
        assert f"| {name} | 1 |" in table
    for plot in ("reward", "gold_reward", "kl", "response_length", "gold_vs_kl"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="unknown --algorithms"):
        sys.argv = ["compare.py", "--algorithms", "trpo", "--output-dir", str(tmp_path)]
        compare.main()
