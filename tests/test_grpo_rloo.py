"""GRPO and RLOO, the critic-free successors: their pieces computed by hand (group advantages and the three
scalings, the leave-one-out baseline, each --loss-agg's weight per token, k3, clip-higher), what main() passes to
them in a recorded run, and the flags they refuse."""

import math

import pytest
import torch
from conftest import FAST, read_metrics, run_script
from test_invariants import FLAGS, between, record

import grpo
import rloo

SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two groups of 4; the second all equal


def test_group_advantages_and_the_three_scalings():
    centred = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])  # less each group's mean (3, then 5)
    group_std = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased, as torch.std: 2.1602
    batch_std = math.sqrt(((SCORES - 4.0) ** 2).sum().item() / 7)  # the batch's mean is 4: sqrt(22 / 7) = 1.7728
    group = grpo.group_advantages(SCORES, 4, "group")
    assert group[:4].tolist() == pytest.approx((centred[:4] / (group_std + 1e-4)).tolist(), rel=1e-6)
    assert group[4:].tolist() == [0.0] * 4  # equal scores: 0 / (0 + 1e-4), no NaN
    batch = grpo.group_advantages(SCORES, 4, "batch")
    assert batch.tolist() == pytest.approx((centred / (batch_std + 1e-4)).tolist(), rel=1e-6)
    assert grpo.group_advantages(SCORES, 4, "none").tolist() == centred.tolist()  # Dr. GRPO: not divided
    # groups are consecutive rows: the same scores grouped in pairs give other advantages
    assert grpo.group_advantages(SCORES, 2, "none").tolist() == [-0.5, 0.5, -1.5, 1.5, 0.0, 0.0, 0.0, 0.0]


def test_leave_one_out_baseline():
    # group 1: baselines (12 - r) / 3 = 11/3, 10/3, 3, 2; the same as K / (K - 1) (r - mean)
    advantages = rloo.leave_one_out_advantages(SCORES, 4)
    assert advantages[:4].tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], rel=1e-6)
    assert advantages[4:].tolist() == [0.0] * 4
    assert rloo.leave_one_out_advantages(torch.tensor([1.0, 3.0]), 2).tolist() == [-2.0, 2.0]  # K = 2: r_i - r_j


def test_each_loss_aggregation_weighs_the_tokens_of_short_and_long_responses():
    """Two responses of 2 and 4 tokens with the same advantage: the weight each mode gives a token is the gradient
    of the aggregated loss with respect to that token's loss. seq-mean gives the short response's tokens twice the
    long one's (the length bias); token-mean and constant give every token the same."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    expected = {
        "seq-mean": [[1 / 4, 1 / 4, 0, 0], [1 / 8] * 4],  # 1 / (N |y_i|), N = 2
        "token-mean": [[1 / 6, 1 / 6, 0, 0], [1 / 6] * 4],  # 1 / (sum_i |y_i|) = 1 / 6
        "constant": [[1 / 10, 1 / 10, 0, 0], [1 / 10] * 4],  # 1 / (N T_max), T_max = 5 (--max-new-tokens)
    }
    for mode, weights in expected.items():
        losses = torch.zeros(2, 4, requires_grad=True)
        grpo.aggregate(losses, mask, mode, 1.0, 2, 5, 1).backward()
        assert losses.grad.flatten().tolist() == pytest.approx(sum(weights, [])), mode
    # split over two micro-batches (one response each) the parts add up to the whole
    for mode in expected:
        values = torch.tensor([[1.0, 2.0, 9.0, 9.0], [3.0, 4.0, 5.0, 6.0]])
        whole = grpo.aggregate(values, mask, mode, 1.0, 2, 5, 1)
        shares = [2 / 6, 4 / 6]  # each response's share of the minibatch's tokens
        parts = [grpo.aggregate(values[i : i + 1], mask[i : i + 1], mode, shares[i], 2, 5, 1) for i in range(2)]
        assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-6), mode


def test_a_group_of_equal_rewards_gives_no_policy_gradient_and_no_nan():
    mask = torch.ones(4, 3, dtype=torch.bool)
    for advantages in (grpo.group_advantages(SCORES[4:], 4, "group"), rloo.leave_one_out_advantages(SCORES[4:], 4)):
        assert torch.isfinite(advantages).all() and advantages.abs().max() == 0
    logprobs = torch.full((4, 3), -1.0, requires_grad=True)
    old = logprobs.detach() - 0.1  # a moved policy: ratio e^0.1
    losses, _ = grpo.policy_loss(logprobs, old, torch.zeros(4, 3), 0.2, 0.2)
    grpo.aggregate(losses, mask, "seq-mean", 1.0, 4, 3, 1).backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad.abs().max() == 0
    logprobs.grad = None
    rloo.policy_loss(logprobs, torch.zeros(4), mask, 4, 1).backward()
    assert logprobs.grad.abs().max() == 0


def test_k3_value_and_gradient():
    # pi = 1/2, pi_ref = 1/4: pi_ref / pi = 1/2, k3 = 1/2 - log(1/2) - 1 = 0.1931; d k3 / d log pi = 1 - pi_ref / pi
    logprobs = torch.tensor([math.log(0.5), math.log(0.25)], requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.25)])
    value = grpo.k3(logprobs, ref)
    assert value.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-6)
    value.sum().backward()
    assert logprobs.grad.tolist() == pytest.approx([0.5, 0.0], abs=1e-6)


def test_clip_higher_lets_a_positive_advantage_raise_the_ratio_further():
    """ratio 1.25 with A > 0: inside DAPO's [0.8, 1.28] (gradient -A rho), clipped at 1.2 by the symmetric range (no
    gradient); ratio 0.7 with A < 0 is clipped at 0.8 by both."""
    old = torch.zeros(2)
    advantages = torch.tensor([1.0, -1.0])
    for high, grads, clipped in [(0.28, [-1.25, 0.0], [False, True]), (0.2, [0.0, 0.0], [True, True])]:
        logprobs = torch.tensor([math.log(1.25), math.log(0.7)], requires_grad=True)
        losses, was_clipped = grpo.policy_loss(logprobs, old, advantages, 0.2, high)
        losses.sum().backward()
        expected = [-1.25 if high == 0.28 else -1.2, 0.8]  # max(-A rho, -A clip(rho))
        assert losses.tolist() == pytest.approx(expected, rel=1e-6)
        assert logprobs.grad.tolist() == pytest.approx(grads, abs=1e-6) and was_clipped.tolist() == clipped


def test_rloo_loss_is_reinforce_on_the_sequence_log_prob():
    logprobs = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    advantages = torch.tensor([2.0, -1.0])
    loss = rloo.policy_loss(logprobs, advantages, mask, 2, 1)
    assert loss.item() == pytest.approx(-(2.0 * -3.0 + -1.0 * -1.5) / 2)  # the padding's -5 counts for nothing
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-1.0, -1.0, 0.0, 0.5, 0.5, 0.5])  # -A_i / N per token


@pytest.mark.parametrize("script", ["grpo", "rloo"])
def test_what_main_passes_groups_advantages_and_the_first_minibatch(script, tmp_path):
    """A recorded run (2 iterations of 8 responses: 2 prompts x K = 4): each group is K copies of one prompt on
    consecutive rows; the advantages are the tested function of the penalised scores (RLOO: less beta times the
    sequence KL); the first micro-batch's log-probs re-score the rollout (ratio 1); the KL term (GRPO) uses pi_ref."""
    module = {"grpo": grpo, "rloo": rloo}[script]
    flags = [*FLAGS, "--group-size", "4", "--output-dir", str(tmp_path / "run")]
    (events,) = record(script, [flags])
    rows = read_metrics(tmp_path / "run")[1:]
    name = {"grpo": "group_advantages", "rloo": "leave_one_out_advantages"}[script]
    starts = [i for i, e in enumerate(events) if e[0] == name]
    assert len(starts) == len(rows) == 2
    for iteration, (start, end, row) in enumerate(zip(starts, starts[1:] + [len(events)], rows), 1):
        (_, (_, input_ids, attention_mask, responses, *_), _, logprobs), (*_, ref_logprobs) = [
            e for e in events[:start] if e[0] == "chunked_logprobs"
        ][-2:]
        context = input_ids.shape[1] - responses.shape[1]
        prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids[:, :context], attention_mask[:, :context])]
        assert prompts[0] == prompts[1] == prompts[2] == prompts[3] != prompts[4] == prompts[7]  # groups of 4
        mask = attention_mask[:, context:].bool()
        (_, (_, _, ended), _, raw_scores) = [e for e in events[:start] if e[0] == "score"][-1]
        scores = raw_scores - 1.0 * (~ended).float()  # the missing-EOS penalty
        kl = torch.where(mask, logprobs - ref_logprobs, 0.0)
        (_, advantage_args, _, advantages) = events[start]
        if script == "grpo":
            assert torch.allclose(advantage_args[0], scores) and advantage_args[1:] == (4, "group")
        else:  # the sequence's KL penalty in the reward, beta fixed at 0.2
            assert torch.allclose(advantage_args[0], scores - 0.2 * kl.sum(1), atol=1e-6) and advantage_args[1] == 4
        assert torch.equal(advantages, module.__dict__[name](*advantage_args))
        assert row["train/reward"] == pytest.approx(scores.mean().item(), abs=1e-6)
        assert row["train/kl"] == pytest.approx(kl.sum(1).mean().item(), abs=1e-6)
        assert row["policy/abs_log_ratio_first_mb"] < 1e-5 and row["train/advantage_abs"] > 0
        (_, loss_args, _, _) = between(events, "policy_loss", start, end)[0]
        mb = between(events, "token_micro_batch", start, end)[0][3][0]
        assert torch.allclose(loss_args[0], logprobs[mb], atol=1e-5)  # pi / pi_old = 1
        if script == "grpo":
            assert torch.equal(loss_args[1], logprobs[mb]) and torch.equal(loss_args[2][:, 0], advantages[mb[0]])
            (_, k3_args, _, _) = between(events, "k3", start, end)[0]
            assert torch.equal(k3_args[1], ref_logprobs[mb])  # the KL term's anchor is pi_ref
            (_, agg_args, _, _) = between(events, "aggregate", start, end)[0]
            assert agg_args[2:] == ("seq-mean", agg_args[3], 4, 16, 1)  # N = the minibatch, T_max = --max-new-tokens
        else:
            assert torch.equal(loss_args[1], advantages[mb[0]]) and loss_args[3:] == (4, 1)
        if iteration == 2:
            assert kl.abs().max() > 1e-3


@pytest.mark.parametrize("script", ["grpo", "rloo"])
def test_no_kl_term_means_no_reference_pass_in_training(script, tmp_path):
    """--kl-coef 0: the rollout scores with the policy alone (the evaluation still measures KL to pi_ref)."""
    flags = [*FLAGS, "--kl-coef", "0", "--eval-every", "1", "--output-dir", str(tmp_path / "run")]
    (events,) = record(script, [flags])
    passes = [e for e in events if e[0] == "chunked_logprobs"]
    # 3 evaluations x (policy, pi_ref) + 2 rollouts x policy only
    assert len(passes) == 8
    rows = read_metrics(tmp_path / "run")
    assert "train/kl" not in rows[1] and rows[-1]["eval/kl"] > 0


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--group-size", "1"], "--group-size 1: a group needs at least 2"),
        (["--group-size", "3"], "--rollout-batch-size 16 is not 1 rank(s) x whole groups of --group-size 3"),
        (["--loss-agg", "sum"], "--loss-agg"),
    ],
)
def test_group_flags_are_one_line_errors(flags, expected, tmp_path):
    for script in ("grpo.py", "rloo.py") if flags[0] == "--group-size" else ("grpo.py",):
        out = tmp_path / script
        result = run_script(script, *FAST, *flags, "--output-dir", str(out), check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr and not out.exists()
        assert expected in result.stderr, result.stderr[-500:]


@pytest.mark.parametrize("script", ["grpo.py", "rloo.py"])
def test_chat_data_stop_strings_lora_and_micro_batches_under_torchrun(script, tmp_path):
    """What every script does, in the critic-free two: conversational prompts (the toy's chat template), a stop
    string, LoRA and micro-batches on 2 ranks; every held-out prompt in samples.jsonl at each evaluation, the model
    card, the adapter and the merged policy."""
    import json

    from conftest import REPO

    out = tmp_path / "run"
    run_script(script, *FAST, "--dataset", str(REPO / "toy" / "chat" / "prompts"), "--stop-strings", "Human:",
               "--use-lora", "--lora-r", "4", "--lr", "1e-3", "--micro-batch-size", "2", "--output-dir", str(out),
               nproc=2)  # fmt: skip
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[1]["policy/abs_log_ratio_first_mb"] < 1e-5
    assert rows[-1]["eval/kl"] > 0 and rows[1]["train/advantage_abs"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [0] * 16 + [1] * 16 + [2] * 16
    assert all("Human:" not in s["response"] for s in samples)
    card = (out / "policy" / "README.md").read_text()
    assert f"torchrun --nproc_per_node 2 {script}" in card and (out / "adapter" / "adapter_config.json").exists()
