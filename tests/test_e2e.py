"""End to end: the scripts run as a user runs them, on the toy task, with a few small iterations."""

import json
import os

import pytest
import torch
from conftest import FAST, REPO, kill_at_first_checkpoint, read_metrics, run_script

ONLINE = ["ppo.py", "apa.py", "awr.py", "ppo_max.py"]
CONTRACT = ["iteration", "episodes", "train/reward", "train/kl", "eval/reward", "eval/gold_reward", "eval/kl"]
CONTRACT += ["eval/response_length", "time/samples_per_s", "time/generate", "time/score", "time/update"]
CONTRACT += ["time/iteration", "time/decode_steps", "time/peak_memory_gb"]
# PPO-max trains only its critic for the first 4 rollout batches by default: more than these short runs have
EXTRA = {"ppo_max.py": ["--critic-warmup-steps", "0"]}


def load_policy_params(path):
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.mark.parametrize("script", ONLINE)
def test_default_run_writes_the_contract(script, tmp_path):
    out = tmp_path / "run"
    run_script(script, *FAST, *EXTRA.get(script, []), "--output-dir", str(out))
    sft, *rows = read_metrics(out)
    assert sft["iteration"] == sft["episodes"] == 0 and "eval/gold_reward" in sft  # the initial policy's evaluation
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        assert set(CONTRACT) <= set(row), set(CONTRACT) - set(row)
        assert all(v == v for v in row.values())  # no NaN anywhere
        assert 1 <= row["time/decode_steps"] <= 24 and row["time/peak_memory_gb"] > 0.1
    # the first minibatch of the first epoch re-scores the rollout exactly (ratio 1)
    assert rows[0]["policy/abs_log_ratio_first_mb"] < 1e-5
    assert rows[0]["policy/ratio_first_mb"] == pytest.approx(1.0, abs=1e-5)
    assert os.listdir(out / "tensorboard") and (out / "checkpoint.pt").exists()
    trained = load_policy_params(out / "policy")
    initial = load_policy_params(REPO / "toy" / "policy")
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # it trained something


@pytest.mark.parametrize("script", ONLINE)
def test_lora_saves_adapter_and_merged_model(script, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_script(
        script, *FAST, *EXTRA.get(script, []), "--use-lora", "--lora-r", "4", "--lr", "1e-3", "--output-dir", str(out)
    )
    assert read_metrics(out)[1]["policy/abs_log_ratio_first_mb"] < 1e-5
    merged = load_policy_params(out / "policy")
    base = AutoModelForCausalLM.from_pretrained(REPO / "toy" / "policy")
    reloaded = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    for k, v in reloaded.state_dict().items():
        assert torch.allclose(v.float(), merged[k], atol=1e-3), k
    initial = load_policy_params(REPO / "toy" / "policy")
    assert any(not torch.allclose(merged[k], initial[k]) for k in merged)


@pytest.mark.parametrize("script", ONLINE)
def test_torchrun_two_ranks_keeps_replicas_identical(script, tmp_path):
    out = tmp_path / "run"
    run_script(script, *FAST, *EXTRA.get(script, []), "--output-dir", str(out), nproc=2)
    rows = read_metrics(out)
    assert rows[-1]["dist/max_param_difference"] == 0.0
    if script == "awr.py":  # a max over the batch on both ranks, not a mean of per-minibatch maxima
        assert all(row["policy/weight_max"] >= row["policy/weight_mean"] for row in rows[1:])
    assert rows[1]["policy/abs_log_ratio_first_mb"] < 1e-5
    assert (out / "policy" / "config.json").exists()


@pytest.mark.parametrize("script", ONLINE)
def test_kill_and_resume_continues_exactly(script, tmp_path):
    args = [*FAST, *EXTRA.get(script, []), "--total-episodes", "64"]  # 4 iterations, a checkpoint after each
    run_script(script, *args, "--output-dir", str(tmp_path / "straight"))
    out = tmp_path / "killed"
    saved = kill_at_first_checkpoint(script, args, out)["iteration"]
    assert saved < 4, "the run finished before it could be killed"
    run_script(script, *args, "--output-dir", str(out), "--resume")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(out)
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(straight[1:], resumed[1:]):
        assert a["train/reward"] == pytest.approx(b["train/reward"], abs=1e-6)
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], abs=1e-5)
    final_a, final_b = load_policy_params(tmp_path / "straight" / "policy"), load_policy_params(out / "policy")
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-5) for k in final_a)


def _make_two_label_model(path):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForSequenceClassification

    config = GPTNeoXConfig(vocab_size=640, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=2)  # fmt: skip
    GPTNeoXForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer").save_pretrained(path)


BAD_INPUTS = {
    "model_path": (["--model", "/nonexistent/model"], "cannot load"),
    "reward_two_labels": (["--reward-model", "{tmp}/two_labels"], "num_labels=1"),
    "missing_column": (["--dataset", "{tmp}/bad.jsonl"], "expected 'prompt'"),
    "empty_dataset": (["--dataset", "{tmp}/empty.jsonl"], "--dataset"),
    "batch_sizes": (["--rollout-batch-size", "10", "--mini-batch-size", "4"], "not divisible"),
    "nan_reward": (["--reward-model", "tests.nan_reward:score"], "NaN"),
    "nan_loss": (["--lr", "1e30", "--value-lr", "1e30"], "NaN"),
    "run_exists": (["--output-dir", "{tmp}/existing"], "already holds a run"),
    "resume_nothing": (["--resume"], "no checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_writes_nothing(case, tmp_path):
    flags, expected = BAD_INPUTS[case]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "metrics.jsonl").write_text('{"iteration": 1}\n')
    if case == "reward_two_labels":
        _make_two_label_model(tmp_path / "two_labels")
    flags = [f.format(tmp=tmp_path) for f in flags]
    out = tmp_path / "out"
    if "--output-dir" not in flags:
        flags += ["--output-dir", str(out)]
    result = run_script("ppo.py", *FAST, *flags, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.stderr[-2000:]
    if case.startswith("nan_"):  # it stopped in the first iteration, before any checkpoint
        assert not (out / "checkpoint.pt").exists()
    elif case == "run_exists":
        assert os.listdir(tmp_path / "existing") == ["metrics.jsonl"]
    else:
        assert not out.exists()
