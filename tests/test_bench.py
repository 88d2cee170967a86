import json
import sys

import pytest
import torch
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
    runs = {"ppo": [compare.record(write_run(tmp_path / f"ppo__{s}", fake_rows(g, k, 10), w), s)
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


def test_stability_finds_the_best_evaluation_and_the_largest_fall(tmp_path):
    def run(golds, kls):  # one evaluation per iteration; the stale copies in between are not evaluations
        rows = [{"iteration": i, "episodes": 64 * i, "eval/iteration": i, "eval/gold_reward": g, "eval/kl": k}
                for i, (g, k) in enumerate(zip(golds, kls))]  # fmt: skip
        rows.insert(2, {**rows[1], "iteration": 9, "eval/gold_reward": 99.0, "eval/kl": 99.0})
        return compare.record(write_run(tmp_path / f"run{len(golds)}{golds[1]}", rows, 1.0), 1)

    runs = {"ppo": [run([0.0, 3.0, 1.0, 2.0], [0.0, 5.0, 4.0, 4.0]), run([0.0, 1.0, 2.0, 2.0], [0.0, 1.0, 3.0, 2.0])]}
    row = compare.stability(runs).splitlines()[2]
    # best 3 and 2 (at 64 and 128 episodes), final 2 and 2, falls 2 (3 -> 1, then it recovers) and 0, largest KL 5, 3
    assert row == "| ppo | 2 | 2.50 ± 0.71 | 96 ± 45 | 2.00 ± 0.00 | 1.00 ± 1.41 | 4.00 ± 1.41 |"


def test_script_flags_give_every_algorithm_the_same_budget():
    online = compare.script_flags("ppo", "quick")
    offline = compare.script_flags("a-lol", "quick")
    episodes = int(online[online.index("--total-episodes") + 1])
    steps = int(offline[offline.index("--total-steps") + 1])
    assert episodes == steps * compare.OFFLINE_BATCH == compare.MODES["quick"][0]
    assert compare.script_flags("nll", "smoke")[:2] == ["--variant", "nll"]


def test_extra_flags_for_the_scripts_parse_as_one_value():
    import tyro

    args = tyro.cli(compare.Args, args=["--extra=--lam 1.0 --model x", "--algorithms", "apa"])  # as README writes it
    assert args.extra == "--lam 1.0 --model x" and args.algorithms == ("apa",)


def final_row(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_smoke_comparison_writes_the_table_and_every_plot(tmp_path, small_toy_data, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)  # (the argv this test sets below is undone after it)
    algorithms = ["ppo", "a-lol"]  # one online, one offline (tests/test_e2e.py runs every script)
    sys.argv = ["compare.py", "--mode", "smoke", "--seeds", "1", "--output-dir", str(tmp_path), "--algorithms",
                *algorithms, f"--extra=--dataset {small_toy_data}"]  # fmt: skip
    compare.main()
    table = (tmp_path / "results.md").read_text()
    for name in algorithms:  # each run's final evaluation, as its metrics.jsonl has it
        final = final_row(tmp_path / "runs" / f"{name}__1")
        assert final["iteration"] == 2
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} | 1 |"))
        cells = dict(zip([c for c, _ in compare.TABLE], [c.strip() for c in row.strip("|").split("|")][2:]))
        assert cells["gold reward"] == f"{final['eval/gold_reward']:.2f} ± 0.00"
        assert cells["KL to ref"] == f"{final['eval/kl']:.2f} ± 0.00"
    for plot in ("reward", "gold_reward", "kl", "response_length", "gold_vs_kl"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000
    records = json.loads((tmp_path / "records.json").read_text())  # what the table is rendered from, committed
    assert compare.tables(records) == table and records["algorithms"]["ppo"][0]["evaluations"][0]["episodes"] == 0
    with pytest.raises(SystemExit, match="unknown --algorithms"):
        sys.argv = ["compare.py", "--algorithms", "trpo", "--output-dir", str(tmp_path)]
        compare.main()


# ---------------------------------------------------------------- bench/frontier.py
import frontier  # noqa: E402


def test_frontier_is_the_upper_envelope_and_aggregates_over_seeds():
    evals = {0.1: [{"eval/kl": 1.0, "eval/gold_reward": 1.0, "eval/reward": 2.0},
                   {"eval/kl": 3.0, "eval/gold_reward": 2.0, "eval/reward": 4.0}],
             0.5: [{"eval/kl": 1.0, "eval/gold_reward": 0.5, "eval/reward": 1.0}]}  # fmt: skip
    rows = frontier.summarize(
        {"ppo": evals, "apa": {1.0: [{"eval/kl": 4.0, "eval/gold_reward": 1.9, "eval/reward": 9}]}}
    )
    ppo = rows[0]
    assert (ppo["eval/kl"], ppo["eval/gold_reward"], ppo["seeds"]) == (2.0, 1.5, 2)
    assert ppo["eval/kl_std"] == pytest.approx(2**0.5)
    # (1.0, 0.5) and (2.0, 1.5) are on it; apa's (4.0, 1.9) has more KL and more gold: on it too
    assert [(r["algorithm"], r["value"]) for r in frontier.frontier(rows)] == [("ppo", 0.5), ("ppo", 0.1), ("apa", 1.0)]
    rows.append({**rows[2], "algorithm": "awr", "eval/kl": 5.0, "eval/gold_reward": 1.0})  # dominated by apa
    assert "awr" not in [r["algorithm"] for r in frontier.frontier(rows)]


def test_frontier_paper_regime_divides_each_scripts_own_learning_rates():
    flags = frontier.run_flags("apa", 0.5, frontier.Args(regime="paper"))
    lrs = frontier.default_lrs("apa.py")
    assert float(flags[flags.index("--lr") + 1]) == pytest.approx(lrs["lr"] / 20)
    assert float(flags[flags.index("--value-lr") + 1]) == pytest.approx(lrs["value_lr"] / 20)
    assert flags[flags.index("--total-episodes") + 1] == "2560" and flags[:2] == ["--lam", "0.5"]
    offline = frontier.run_flags("nll", 20, frontier.Args())  # the offline knob is the training length
    assert offline[:2] == ["--variant", "nll"] and offline[offline.index("--total-steps") + 1] == "20"


def test_frontier_smoke_writes_table_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)  # (the argv this test sets below is undone after it)
    sys.argv = ["frontier.py", "--mode", "smoke", "--algorithms", "ppo", "--output-dir", str(tmp_path)]
    frontier.main()
    rows = json.loads((tmp_path / "frontier_toy.json").read_text())
    assert [(r["algorithm"], r["value"], r["seeds"]) for r in rows] == [("ppo", 0.1, 1), ("ppo", 0.05, 1)]
    for row in rows:  # each point is its run's final evaluation
        final = final_row(tmp_path / "runs" / f"toy__ppo__{row['value']}__1")
        assert (row["eval/kl"], row["eval/gold_reward"]) == (final["eval/kl"], final["eval/gold_reward"])
    assert "on frontier" in (tmp_path / "frontier_toy.md").read_text()
    assert (tmp_path / "frontier_toy.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/wall_time.json")}
    sys.argv += ["--reuse"]  # nothing re-runs: the finished runs are kept and re-plotted
    frontier.main()
    assert len(stamps) == 2 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


# ---------------------------------------------------------------- bench/mutants.py
import mutants  # noqa: E402


def test_every_mutant_changes_one_existing_line_and_names_existing_tests():
    """bench/mutants.py stays in step with the code: each mutated line occurs exactly once, and its tests exist."""
    assert len(mutants.MUTANTS) >= 40 and len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS:
        assert (REPO / m.file).read_text().count(m.original) == 1, m.name
        assert m.original != m.mutated
        for target in m.tests:
            path, _, name = target.partition("::")
            assert (REPO / path).exists(), target
            assert not name or f"def {name.split('[')[0]}(" in (REPO / path).read_text(), target


# ---------------------------------------------------------------- bench/throughput.py
import throughput  # noqa: E402


def test_pythia_config_has_the_named_shape():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = throughput.pythia_config("1b", AutoConfig.from_pretrained(REPO / "toy" / "policy"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 16, 8)
    assert config.vocab_size == 635 and config.eos_token_id == 0 and config.pad_token_id == 1
    # Pythia-1b's 16 layers of 12 h^2 + 13 h (805.7M) plus in/out embeddings of the 635-token vocabulary (2.6M)
    assert sum(p.numel() for p in model.parameters()) == 16 * (12 * 2048**2 + 13 * 2048) + 2 * 635 * 2048 + 2 * 2048


def test_throughput_summary_excludes_the_warm_up_and_divides_by_the_floor():
    split = ("time/generate", "time/score", "time/update", "time/iteration")
    rows = [
        {"iteration": 1, **dict(zip(split, (9.0, 9.0, 9.0, 27.0))), "train/response_length": 1.0,
         "time/decode_steps": 48, "time/peak_memory_gb": 2.0},
        {"iteration": 2, **dict(zip(split, (1.0, 0.5, 2.0, 3.6))), "train/response_length": 10.0,
         "time/decode_steps": 12, "time/peak_memory_gb": 1.5},
    ]  # fmt: skip
    floors = [{"generate": 0.8, "policy": 0.1, "reference": 0.1, "value": 0.1, "reward": 0.1, "update": 1.6}]
    r = throughput.summarize(rows, floors, batch_size=8)
    assert r["iteration"] == 3.6 and r["decode_steps"] == 12  # iteration 1 is the warm-up
    assert r["floor"] == pytest.approx(2.8) and r["overhead"] == pytest.approx(3.6 / 2.8)
    assert r["overhead/generate"] == pytest.approx(1.25) and r["overhead/score"] == pytest.approx(1.25)
    assert r["overhead/update"] == pytest.approx(1.25)
    assert r["samples_per_s"] == pytest.approx(8 / 3.6) and r["tokens_per_s"] == pytest.approx(80 / 3.6)
    assert r["peak_memory_gb"] == 2.0  # the peak over the whole run
    table = throughput.tables({"ppo": r})
    assert "| ppo | 1.000 (1.25x) | 0.500 (1.25x) | 2.000 (1.25x) | 3.600 | 2.2 | 22 | 2.00 | 2.800 | 1.29x |" in table
    assert "| ppo | 12 | 0.800 | 0.100 | 0.100 | 0.100 | 0.100 | 1.600 |" in table


def test_floor_times_every_pass_and_generates_exactly_the_decode_steps():
    args = throughput.Args(rollout_batch_size=4, mini_batch_size=2, forward_batch_size=2, repeats=1)
    policy, reward_model = throughput.make_models("toy", REPO, torch.device("cpu"))
    floor = throughput.Floor(args, policy, reward_model, torch.device("cpu"))
    times = floor.measure(iteration=3, decode_steps=5, update_epochs=1)
    assert list(times) == throughput.PASSES and all(t > 0 for t in times.values())
    queries, query_mask, input_ids, attention_mask, responses = floor.batch(3, 5)
    assert responses.shape == (4, 5) and input_ids.shape == attention_mask.shape
    generated = floor.policy.generate(queries, attention_mask=query_mask, generation_config=floor.generation_config)
    assert generated.shape[1] == queries.shape[1] + 5  # EOS suppressed: the script's number of decode steps


def test_throughput_smoke_runs_a_script_and_writes_its_table(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)  # (the argv this test sets below is undone after it)
    sys.argv = ["throughput.py", "--size", "14m", "--algorithms", "ppo", "--iterations", "2", "--repeats", "1",
                "--rollout-batch-size", "8", "--mini-batch-size", "4", "--max-new-tokens", "8",
                "--output-dir", str(tmp_path)]  # fmt: skip
    throughput.main()
    assert (tmp_path / "runs" / "models_14m" / "reward_model" / "config.json").exists()
    assert not (tmp_path / "runs" / "throughput_ppo" / "checkpoint.pt").exists()  # --save-every 0
    result = json.loads((tmp_path / "throughput_14m_cpu.json").read_text())["results"]["ppo"]
    assert 1 <= result["decode_steps"] <= 8 and result["peak_memory_gb"] > 0.1
    assert all(result[f"floor/{p}"] > 0 for p in throughput.PASSES)
    assert result["overhead"] == pytest.approx(result["iteration"] / result["floor"])
    assert result["samples_per_s"] == pytest.approx(8 / result["iteration"])
    assert "| ppo | " in (tmp_path / "throughput_14m_cpu.md").read_text()
    with pytest.raises(SystemExit, match="unknown --algorithms"):
        sys.argv = ["throughput.py", "--algorithms", "alol", "--output-dir", str(tmp_path)]
        throughput.main()


def test_device_wheels_are_the_versions_requirements_and_this_environment_pin():
    """bench/device_wheels.txt (what bench/device_wheels.sh downloads and bench/device_check.py installs on the GPU
    machine, both reading that file) pins requirements.txt's versions, and for their dependencies the versions this
    environment runs; the check's install stage finds one wheel file per line."""
    import importlib.metadata

    def pins(path):
        lines = [line.split("#")[0].strip() for line in open(REPO / path)]
        return dict(line.lower().split("==") for line in lines if line)

    wanted, required = pins("bench/device_wheels.txt"), pins("requirements.txt")
    assert {"transformers", "peft", "tyro", "datasets"} <= set(wanted)
    for name, version in wanted.items():
        assert version == required.get(name, importlib.metadata.version(name)), name
    for script in ("bench/device_wheels.sh", "bench/device_check.py"):
        assert "bench/device_wheels.txt" in (REPO / script).read_text()
