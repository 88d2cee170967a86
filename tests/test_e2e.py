"""End to end: the scripts run as a user runs them, on the toy task, with a few small iterations."""

import json
import os

import pytest
import torch
from conftest import (
    FAST,
    REPO,
    assert_adapter_merges_to_the_policy,
    kill_at_first_checkpoint,
    main_error,
    read_metrics,
    run_script,
)

CONTRACT = ["iteration", "episodes", "train/reward", "train/kl", "eval/reward", "eval/gold_reward", "eval/kl"]
CONTRACT += ["eval/response_length", "time/samples_per_s", "time/generate", "time/score", "time/update"]
CONTRACT += ["time/iteration", "time/decode_steps", "time/peak_memory_gb"]


def load_policy_params(path):
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def tensorboard_scalars(path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path)).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# (apa.py and awr.py: ppo.py's lines but the loss; rloo.py: grpo.py's)
@pytest.mark.parametrize("script", ["ppo.py", "grpo.py"])
def test_run_writes_the_contract_and_ppo_resumes_exactly_after_a_kill(script, tmp_path):
    args = [*FAST, "--total-episodes", "48"]  # 3 iterations, a checkpoint after each
    straight = tmp_path / "straight"
    run_script(script, *args, "--output-dir", str(straight))
    sft, *rows = read_metrics(straight)
    # the row of iteration 0 evaluates the initial policy, which is the reference: KL exactly 0
    assert sft["iteration"] == sft["episodes"] == 0 and sft["eval/kl"] == 0.0 and "eval/gold_reward" in sft
    assert [(r["iteration"], r["episodes"], r["eval/iteration"]) for r in rows] == [(i, 16 * i, i) for i in range(1, 4)]
    assert rows[0]["train/kl"] == 0.0  # iteration 1 samples from pi_ref itself
    for row in rows:
        assert set(CONTRACT) <= set(row), set(CONTRACT) - set(row)
        assert all(v == v for v in row.values())  # no NaN anywhere
        assert 1 <= row["time/decode_steps"] <= 24 and 1 <= row["eval/response_length"] <= 24
        assert 0 <= row["eval/eos_rate"] <= 1 and row["time/peak_memory_gb"] > 0.1
        split = row["time/generate"] + row["time/score"] + row["time/update"]
        assert split == pytest.approx(row["time/iteration"], rel=1e-3)
        assert row["time/samples_per_s"] == pytest.approx(16 / row["time/iteration"], rel=1e-6)
        # the first minibatch of the first epoch re-scores the rollout exactly (ratio 1)
        assert row["policy/abs_log_ratio_first_mb"] < 1e-5
    # TensorBoard holds the same numbers, at the same episodes
    scalars = tensorboard_scalars(straight / "tensorboard")
    for key in ("train/reward", "eval/gold_reward", "loss/policy"):
        assert scalars[key] == pytest.approx({r["episodes"]: r[key] for r in [sft, *rows] if key in r}, rel=1e-6)
    # the saved policy is the last checkpoint's trained weights, with the checkpoint's generation_config.json
    trained = load_policy_params(straight / "policy")
    checkpoint = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 3 and all(torch.equal(trained[k], v) for k, v in checkpoint["policy"].items())
    initial = load_policy_params(REPO / "toy" / "policy")
    assert trained.keys() == initial.keys() and any(not torch.equal(trained[k], initial[k]) for k in trained)
    generation = json.loads((straight / "policy" / "generation_config.json").read_text())
    assert generation.items() >= json.loads((REPO / "toy" / "policy" / "generation_config.json").read_text()).items()

    if script != "ppo.py":  # (killed and resumed with fixed rollouts: tests/test_configurations.py, every script)
        return
    # killed after its first checkpoint, then --resume, sampling as a user's run does (the sampler's state resumes
    # too; the online scripts share these lines): the same rows and the same final policy
    killed = tmp_path / "killed"
    assert kill_at_first_checkpoint(script, args, killed)["iteration"] < 3, "the run finished before it was killed"
    run_script(script, *args, "--output-dir", str(killed), "--resume")
    resumed = read_metrics(killed)
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(rows, resumed[1:]):
        assert a["train/reward"] == pytest.approx(b["train/reward"], abs=1e-6)
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], abs=1e-5)
    final = load_policy_params(killed / "policy")
    assert all(torch.allclose(trained[k], final[k], atol=1e-5) for k in trained)


# ppo_max.py's LoRA lines (ppo.py's, which apa.py and awr.py share: tests/test_architectures.py on a LLaMA-shaped
# model; grpo.py's and rloo.py's: tests/test_grpo_rloo.py under torchrun; alol.py's: tests/test_alol.py)
def test_lora_saves_adapter_and_merged_model(tmp_path):
    out = tmp_path / "run"
    # (PPO-max trains only its critic for the first 4 rollout batches by default: more than this short run has)
    run_script("ppo_max.py", *FAST, "--critic-warmup-steps", "0", "--use-lora", "--lora-r", "4", "--lr", "1e-3",
               "--output-dir", str(out))  # fmt: skip
    assert read_metrics(out)[1]["policy/abs_log_ratio_first_mb"] < 1e-5
    assert_adapter_merges_to_the_policy(out, REPO / "toy" / "policy")


def _make_two_label_model(path):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForSequenceClassification

    config = GPTNeoXConfig(vocab_size=640, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=2)  # fmt: skip
    GPTNeoXForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer").save_pretrained(path)


# case: (flags, what the one-line error says); EARLY: the cases that must stop before any model loads, checked by
# calling main() in this process (conftest.main_error); the others run as processes: the exit status and stderr
BAD_INPUTS = {
    "model_path": (["--model", "/nonexistent/model"], "cannot load"),
    "missing_column": (["--dataset", "{tmp}/bad.jsonl"], "expected 'prompt'"),
    "empty_dataset": (["--dataset", "{tmp}/empty.jsonl"], "--dataset"),
    "batch_sizes": (["--rollout-batch-size", "10", "--mini-batch-size", "4"], "not divisible"),
    "scorer_column": (["--reward-model", "tests.bad_scorers:needs_answer"], "reads the column 'answer'"),
    "run_exists": (["--output-dir", "{tmp}/existing"], "already holds a run"),
    "resume_nothing": (["--resume"], "no checkpoint"),
    "reward_two_labels": (["--reward-model", "{tmp}/two_labels"], "num_labels=1"),
    "nan_reward": (["--reward-model", "tests.nan_reward:score"], "NaN"),
    "nan_loss": (["--lr", "1e30", "--value-lr", "1e30"], "NaN"),
    "push_without_token": (["--push-to-hub", "me/ppo-toy"], "needs a Hugging Face token"),  # (HF_HOME: a process)
}
EARLY = ["model_path", "missing_column", "empty_dataset", "batch_sizes", "scorer_column", "run_exists",
         "resume_nothing"]  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_writes_nothing(case, tmp_path, monkeypatch):
    flags, expected = BAD_INPUTS[case]
    if case == "push_without_token":  # no stored hub token
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
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
    if case in EARLY:
        last = main_error("ppo.py", *FAST, *flags)
    else:
        result = run_script("ppo.py", *FAST, *flags, check=False)
        assert result.returncode != 0
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: "), result.stderr[-2000:]
    assert expected in last, last
    if case.startswith("nan_"):  # it stopped in the first iteration, before any checkpoint
        assert not (out / "checkpoint.pt").exists()
    elif case == "run_exists":
        assert os.listdir(tmp_path / "existing") == ["metrics.jsonl"]
    else:
        assert not out.exists()
