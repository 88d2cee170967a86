"""GRPO and RLOO, the critic-free successors: their pieces computed by hand (group advantages and the three
scalings, the leave-one-out baseline, each --loss-agg's weight per token, k3, clip-higher, GSPO's sequence ratio,
RLOO's importance weight on stale samples), each --kl-term's exact expected gradient on a policy small enough to
enumerate, what main() passes to them in a recorded run, and the flags they refuse."""

import math

import pytest
import torch
from conftest import FAST, REPO, assert_adapter_merges_to_the_policy, main_error, read_metrics, run_script
from test_invariants import FLAGS, between, recorded

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
    for level in ("token", "sequence"):
        logprobs.grad = None
        losses, _ = grpo.policy_loss(logprobs, old, torch.zeros(4, 3), mask, 0.2, 0.2, level)
        grpo.aggregate(losses, mask, "seq-mean", 1.0, 4, 3, 1).backward()
        assert torch.isfinite(logprobs.grad).all() and logprobs.grad.abs().max() == 0
    logprobs.grad = None
    rloo.policy_loss(logprobs, old, torch.zeros(4), mask, 0.2, 4, 1)[0].backward()
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
        losses, was_clipped = grpo.policy_loss(logprobs, old, advantages, torch.ones(2).bool(), 0.2, high, "token")
        losses.sum().backward()
        expected = [-1.25 if high == 0.28 else -1.2, 0.8]  # max(-A rho, -A clip(rho))
        assert losses.tolist() == pytest.approx(expected, rel=1e-6)
        assert logprobs.grad.tolist() == pytest.approx(grads, abs=1e-6) and was_clipped.tolist() == clipped


def test_rloo_loss_is_reinforce_on_the_sequence_log_prob():
    logprobs = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    advantages = torch.tensor([2.0, -1.0])
    loss, clipped = rloo.policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, 2, 1)  # on-policy
    assert loss.item() == pytest.approx(-(2.0 + -1.0) / 2)  # rho = 1: the value is -mean(A)
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-1.0, -1.0, 0.0, 0.5, 0.5, 0.5])  # -A_i / N per token
    assert clipped.tolist() == [False, False]


def test_rloo_weights_stale_samples_by_their_clipped_sequence_ratio():
    """Samples of an older policy (later minibatches and epochs): the gradient of response i is -(A_i / N) rho_i on
    each of its tokens, rho_i = pi(y_i) / pi_old(y_i), zero where the clip binds (computed by hand here); the same
    responses on-policy give plain REINFORCE's -A_i / N."""
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]]).bool()
    # sequence log-ratios: +0.1 (inside [0.8, 1.2]), -0.15 (inside), +0.3 with A > 0 (clipped above: no gradient),
    # -0.3 with A < 0 (clipped below: no gradient); the padding's -9 counts for nothing
    old = logprobs - torch.tensor([[0.05, 0.05, -9.0], [-0.05, -0.05, -0.05], [0.1, 0.1, 0.1], [-0.1, -0.1, -0.1]])
    advantages = torch.tensor([2.0, -1.0, 1.5, -0.5])
    rho = [math.exp(0.1), math.exp(-0.15)]
    expected = [[-2.0 * rho[0] / 4] * 2 + [0.0], [1.0 * rho[1] / 4] * 3, [0.0] * 3, [0.0] * 3]
    stale = logprobs.clone().requires_grad_(True)
    loss, clipped = rloo.policy_loss(stale, old, advantages, mask, 0.2, 4, 1)
    loss.backward()
    assert stale.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert clipped.tolist() == [False, False, True, True]
    assert loss.item() == pytest.approx(-(2.0 * rho[0] - rho[1] + 1.5 * 1.2 - 0.5 * 0.8) / 4, rel=1e-6)
    fresh = logprobs.clone().requires_grad_(True)  # on-policy: REINFORCE
    rloo.policy_loss(fresh, logprobs, advantages, mask, 0.2, 4, 1)[0].backward()
    assert fresh.grad.tolist() == [pytest.approx([-a / 4 * m for m in row]) for a, row in
                                   zip(advantages.tolist(), mask.float().tolist())]  # fmt: skip


def test_gspo_sequence_ratio_is_the_geometric_mean_of_the_token_ratios():
    """--ratio-level sequence: exp(mean_t log rho_t) on every token of a response (read off the surrogate with A = -1
    and no clip: its loss is the ratio): equal policies give 1 at every length; one token's log-prob moved by d moves
    its response's ratio by exactly exp(d / |y|), and the gradient of that ratio is ratio / |y| on each token."""
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    logprobs = torch.tensor([[-1.0, -9.0, -9.0, -9.0], [-0.3, -2.0, 0.0, 0.0], [-1.5, -0.1, -0.7, -3.0]])
    minus_one = -torch.ones(3, 4)

    def ratio(new):
        losses, _ = grpo.policy_loss(new, logprobs, minus_one, mask, 0.99, 100.0, "sequence")
        return losses

    assert torch.equal(ratio(logprobs)[mask], torch.ones(7))
    d = 0.6
    for row, length in [(0, 1), (1, 2), (2, 4)]:
        moved = logprobs.clone()
        moved[row, 0] += d
        r = ratio(moved)
        assert r[row][mask[row]].tolist() == pytest.approx([math.exp(d / length)] * length, rel=1e-6)
        others = [i for i in range(3) if i != row]
        assert torch.allclose(r[others][mask[others]], torch.ones(int(mask[others].sum())))
    new = logprobs.clone().requires_grad_(True)
    r = ratio(new)
    (r[:, 0]).sum().backward()  # one ratio per response (the first token's copy)
    lengths = mask.sum(1, keepdim=True).float()
    assert torch.allclose(new.grad, torch.where(mask, 1 / lengths, 0.0))
    # the token-level ratio of the same move is exp(d) on that token alone
    moved = logprobs.clone()
    moved[2, 0] += d
    token, _ = grpo.policy_loss(moved, logprobs, minus_one, mask, 0.99, 100.0, "token")
    assert token[2].tolist() == pytest.approx([math.exp(d), 1.0, 1.0, 1.0], rel=1e-6)


# ---------------------------------------------------------------- the KL term's gradient, enumerated exactly
V = 5  # a vocabulary small enough to sum over every sequence


def _free_logits(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, V, generator=torch.Generator().manual_seed(seed))


def _expected_kl_gradient(kl_term: str, logp, old, ref, weights, params) -> torch.Tensor:
    """E_{y ~ pi_old}[grad sum_t kl_t(y)] exactly: the sum over every sequence y (rows of the (S, T) log-prob tables)
    of pi_old(y) times the gradient of grpo.kl_loss's terms, summed over its tokens."""
    losses = grpo.kl_loss(logp, old, ref, kl_term).sum(1)
    (gradient,) = torch.autograd.grad((weights * losses).sum(), params, retain_graph=True)
    return gradient


def _gradients(value, params) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(value, params, retain_graph=True)


def _gradient(value, params) -> torch.Tensor:
    return torch.autograd.grad(value, params, retain_graph=True)[0]


@pytest.mark.parametrize("on_policy", [True, False])
def test_each_kl_term_has_the_gradient_it_claims_one_token(on_policy):
    """One token from a 5-word vocabulary, pi = softmax(theta) with free logits: each --kl-term's exact expected
    gradient against the analytic gradients of KL(pi || pi_ref) (reverse) and KL(pi_ref || pi) (forward).
    On-policy (pi_old = pi): k3-ratio and k2 give the reverse KL's, k3 (DeepSeekMath eq. 4) the forward KL's.
    Off-policy (pi_old != pi, a later minibatch): only k3-ratio still gives the reverse KL's."""
    theta = _free_logits(0).requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    ref = torch.log_softmax(_free_logits(1), -1)
    old = logp.detach() if on_policy else torch.log_softmax(_free_logits(2), -1)
    table = [t[:, None] for t in (logp, old, ref)]  # (S = 5 sequences, T = 1 token)
    reverse = _gradient((logp.exp() * (logp - ref)).sum(), theta)
    forward = _gradient((ref.exp() * (ref - logp)).sum(), theta)
    assert (reverse - forward).norm() > 0.1  # the two differ here: the test tells them apart
    got = {k: _expected_kl_gradient(k, *table, old.exp(), theta) for k in ("k3-ratio", "k3", "k2")}
    torch.testing.assert_close(got["k3-ratio"], reverse)
    if on_policy:
        torch.testing.assert_close(got["k2"], reverse)
        torch.testing.assert_close(got["k3"], forward)
    else:
        for kind in ("k3", "k2"):
            assert min((got[kind] - reverse).norm(), (got[kind] - forward).norm()) > 0.05, kind


def test_per_token_kl_terms_leave_the_state_distribution_alone_the_reward_penalty_does_not():
    """Two tokens (25 sequences), pi(a2|a1) a free softmax per first token. On-policy, the per-token terms' expected
    gradients are per state: k3-ratio and k2 give the gradient of sum_t E_{s_t ~ rollout}[KL(pi(.|s_t) ||
    pi_ref(.|s_t))] with the states' distribution held fixed, k3 the forward KL's of the same; neither is the gradient
    of the sequences' KL(pi || pi_ref), whose first-token part also moves which states are reached. rloo.py's penalty,
    beta sum_t k1_t in the reward with REINFORCE (its first minibatch), gives the sequences' reverse KL's gradient."""
    theta1, theta2 = _free_logits(0).requires_grad_(True), _free_logits(3, V).requires_grad_(True)
    logp1, logp2 = torch.log_softmax(theta1, -1), torch.log_softmax(theta2, -1)  # (V,), (V, V): pi(a2 | a1)
    ref1, ref2 = torch.log_softmax(_free_logits(1), -1), torch.log_softmax(_free_logits(4, V), -1)
    first, second = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)  # y = (a1, a2), 25 rows

    def table(l1, l2):
        return torch.stack([l1[first], l2[first, second]], 1)  # (25, 2)

    logp, ref = table(logp1, logp2), table(ref1, ref2)
    old = logp.detach()
    weights, params = old.sum(1).exp(), (theta1, theta2)
    state_weights = logp1.detach().exp()  # the rollout's distribution of the second token's state, held fixed
    kl_rev = [(logp1.exp() * (logp1 - ref1)).sum(), (logp2.exp() * (logp2 - ref2)).sum(1)]
    kl_fwd = [(ref1.exp() * (ref1 - logp1)).sum(), (ref2.exp() * (ref2 - logp2)).sum(1)]
    per_state_rev = _gradients(kl_rev[0] + (state_weights * kl_rev[1]).sum(), params)
    per_state_fwd = _gradients(kl_fwd[0] + (state_weights * kl_fwd[1]).sum(), params)
    sequence_rev = _gradients((logp.sum(1).exp() * (logp - ref).sum(1)).sum(), params)
    assert (sequence_rev[0] - per_state_rev[0]).norm() > 0.05  # the first token's part differs: the test can tell

    def expected(kind):
        return _gradients((weights * grpo.kl_loss(logp, old, ref, kind).sum(1)).sum(), params)

    for kind, target in [("k3-ratio", per_state_rev), ("k2", per_state_rev), ("k3", per_state_fwd)]:
        for got, want in zip(expected(kind), target):
            torch.testing.assert_close(got, want)
    # rloo.py: R = -beta sum_t k1_t (rollout-time, no gradient), loss -(R) rho log-prob per response, rho = 1
    mask = torch.ones(V * V, 2, dtype=torch.bool)
    penalty = -(old - ref).sum(1)  # beta = 1; the leave-one-out baseline does not change the expectation
    reinforce = sum(
        weights[i] * rloo.policy_loss(logp[i : i + 1], old[i : i + 1], penalty[i : i + 1], mask[:1], 0.2, 1, 1)[0]
        for i in range(V * V)
    )
    for got, want in zip(_gradients(reinforce, params), sequence_rev):
        torch.testing.assert_close(got, want)


# each script's recorded runs (one process for both tests below)
RUNS = {"main": [*FLAGS, "--group-size", "4"], "no_kl": [*FLAGS, "--kl-coef", "0", "--eval-every", "1"]}


@pytest.mark.parametrize("script", ["grpo", "rloo"])
def test_what_main_passes_groups_advantages_and_the_first_minibatch(script, shared):
    """A recorded run (2 iterations of 8 responses: 2 prompts x K = 4): each group is K copies of one prompt on
    consecutive rows; the advantages are the tested function of the penalised scores (RLOO: less beta times the
    sequence KL); the first micro-batch's log-probs re-score the rollout (ratio 1); the KL term (GRPO) uses pi_ref."""
    module = {"grpo": grpo, "rloo": rloo}[script]
    events, out = recorded(shared, script, RUNS, "main")
    rows = read_metrics(out)[1:]
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
        (_, (_, _, ended, _), _, raw_scores) = [e for e in events[:start] if e[0] == "score"][-1]
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
        assert torch.equal(loss_args[1], logprobs[mb])  # pi_old: the rollout's log-probs
        if script == "grpo":
            assert torch.equal(loss_args[2][:, 0], advantages[mb[0]]) and loss_args[4:] == (0.2, 0.2, "token")
            (_, kl_args, _, _) = between(events, "kl_loss", start, end)[0]
            assert torch.equal(kl_args[2], ref_logprobs[mb]) and kl_args[3] == "k3-ratio"  # the anchor is pi_ref
            assert torch.equal(kl_args[1], logprobs[mb])  # rho = pi / pi_old
            (_, agg_args, _, _) = between(events, "aggregate", start, end)[0]
            assert agg_args[2:] == ("seq-mean", agg_args[3], 4, 16, 1)  # N = the minibatch, T_max = --max-new-tokens
        else:
            assert torch.equal(loss_args[2], advantages[mb[0]]) and loss_args[4:] == (0.2, 4, 1)
        if iteration == 2:
            assert kl.abs().max() > 1e-3


@pytest.mark.parametrize("script", ["grpo", "rloo"])
def test_no_kl_term_means_no_reference_pass_in_training(script, shared):
    """--kl-coef 0: the rollout scores with the policy alone (the evaluation still measures KL to pi_ref)."""
    events, out = recorded(shared, script, RUNS, "no_kl")
    passes = [e for e in events if e[0] == "chunked_logprobs"]
    # 3 evaluations x (policy, pi_ref) + 2 rollouts x policy only
    assert len(passes) == 8
    rows = read_metrics(out)
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
        if flags[0] == "--loss-agg":  # a choice tyro refuses: its own message and exit status, from a process
            result = run_script(script, *FAST, *flags, "--output-dir", str(out), check=False)
            assert result.returncode == 2 and "Traceback" not in result.stderr and expected in result.stderr
        else:
            assert expected in main_error(script, *FAST, *flags, "--output-dir", str(out))
        assert not out.exists()


@pytest.mark.parametrize("script", ["grpo.py", "rloo.py"])
def test_chat_data_stop_strings_lora_and_micro_batches_under_torchrun(script, tmp_path):
    """What every script does, in the critic-free two: conversational prompts (the toy's chat template), a stop
    string, LoRA and micro-batches on 2 ranks; every held-out prompt in samples.jsonl at each evaluation, the model
    card, the adapter and the merged policy."""
    import json

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
    assert f"torchrun --nproc_per_node 2 {script}" in card
    assert_adapter_merges_to_the_policy(out, REPO / "toy" / "policy")
