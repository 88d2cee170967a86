import numpy as np
import pytest
import torch
from conftest import FAST, REPO, read_metrics, shared_runs

from common import RunningMoments, left_pad
from plumbing.models import load_tokenizer, load_value_model
from plumbing.scorers import ScoringOptions, load_scorer
from ppo_max import lr_factor, normalize_scores, ptx_loss


def test_score_normaliser_matches_numpy_over_a_stream_and_clips():
    rng = np.random.default_rng(0)
    stats, seen = RunningMoments(), []
    for n in (8, 3, 16):
        batch = rng.normal(2.0, 3.0, size=n)
        seen.append(batch)
        stats.update(torch.tensor(batch))  # (ppo_max.py updates them with the batch, then normalises it)
        out = normalize_scores(torch.tensor(batch, dtype=torch.float32), stats, "paper", 0.8)
        everything = np.concatenate(seen)
        expected = np.clip((batch - everything.mean()) / everything.std(), -0.8, 0.8)
        assert out.numpy() == pytest.approx(expected, abs=1e-4)
    assert (out.abs() <= 0.8).all() and (out.abs() == 0.8).any()


def test_released_recipe_divides_by_the_running_std_only():
    stats = RunningMoments()
    scores = torch.tensor([10.0, 12.0, 14.0])
    stats.update(scores)
    out = normalize_scores(scores, stats, "released", 0.8)
    assert out.numpy() == pytest.approx((scores / np.std([10.0, 12.0, 14.0])).numpy(), rel=1e-4)  # no mean, no clip


def test_released_lr_schedule_warms_up_from_a_tenth_then_decays_as_inverse_sqrt():
    assert [lr_factor(step, "released", 100) for step in (0, 5, 50, 100, 400)] == pytest.approx([0.1, 0.1, 0.5, 1, 0.5])
    assert lr_factor(400, "paper", 100) == 1.0


def test_ptx_loss_hand_computed():
    logprobs = torch.tensor([[-1.0, -3.0, -9.0], [-2.0, -4.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    assert ptx_loss(logprobs, mask).item() == pytest.approx((1 + 3 + 2 + 4 + 6) / 5)


def test_critic_from_the_reward_model_reads_its_score_at_the_last_token():
    """Before any update, the critic's value at the last response token is the RM's score of the text,
    here on the policy's left-padded token ids (as in a rollout)."""
    rm_path = str(REPO / "toy" / "reward_model")
    tokenizer = load_tokenizer(str(REPO / "toy" / "policy"))
    critic = load_value_model(rm_path, torch.float32, "--critic-model")
    score = load_scorer(rm_path, "--reward-model", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8))
    prompts = ["\n\nHuman: what matters most in chess?\n\nAssistant:", "\n\nHuman: hi about sleep?\n\nAssistant:"]
    responses = [" sure! watch the bishop early. good luck!", " whatever."]
    ids, mask = left_pad(
        [tokenizer(p + r)["input_ids"] for p, r in zip(prompts, responses)], tokenizer.pad_token_id, "cpu"
    )
    with torch.no_grad():
        values = critic(ids, mask)
    assert torch.allclose(values[:, -1], score(prompts, responses), atol=1e-4)


# the runs of the two tests below, made in one process (conftest.shared_runs)
RUNS = {"warmup": [*FAST, "--critic-warmup-steps", "2"], "released": [*FAST, "--recipe", "released",
                                                                      "--lr-warmup-steps", "2"]}  # fmt: skip


def test_critic_warmup_leaves_the_policy_unchanged(shared):
    out = shared_runs(shared, "ppo_max", RUNS)["warmup"]
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(REPO / "toy" / "policy", dtype=torch.float32).state_dict()
    assert all(torch.equal(trained[k].float(), initial[k]) for k in initial)
    critic = torch.load(out / "checkpoint.pt", weights_only=True)["value_model"]
    rm = load_value_model(str(REPO / "toy" / "reward_model"), torch.float32, "rm").state_dict()
    assert any(not torch.equal(critic[k], rm[k]) for k in critic)  # the critic did train
    assert read_metrics(out)[-1]["eval/kl"] == 0.0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)  # the paper recipe's AdamW: the release's
    assert optimizer_settings(checkpoint, "policy") == (1e-6, 0.0)
    assert optimizer_settings(checkpoint, "value_model") == (1e-8, 0.0)


def optimizer_settings(checkpoint: dict, name: str) -> tuple[float, float]:
    group = checkpoint[f"{name}_optimizer"]["param_groups"][0]
    return group["eps"], group["weight_decay"]


def test_released_recipe_end_to_end(shared):
    """The MOSS-RLHF release: no critic warm-up (the policy moves at iteration 1), KL coefficient 0.01, LR warm-up
    then 1/sqrt decay, AdamW eps 1e-6 (the critic's 1e-8) and no weight decay."""
    out = shared_runs(shared, "ppo_max", RUNS)["released"]
    rows = [row for row in read_metrics(out) if "train/lr" in row]
    assert rows[-1]["train/kl_coef"] == 0.01
    # two minibatches per iteration: optimizer steps 0, 1 then 2, 3; the logged LR is the last step's
    assert [row["train/lr"] for row in rows] == pytest.approx([3e-4 * 0.5, 3e-4 * (2 / 3) ** 0.5])
    assert rows[0]["eval/kl"] != 0.0  # the policy moved (with a critic warm-up it is exactly 0)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert optimizer_settings(checkpoint, "policy") == (1e-6, 0.0)
    assert optimizer_settings(checkpoint, "value_model") == (1e-8, 0.0)
