import math

import pytest
import torch

from ppo import adaptive_kl_update, compute_gae, policy_loss, value_loss


def slow_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE, one sequence and one step at a time, on the real tokens only."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        for t in range(length):
            total = 0.0
            for k in range(t, length):
                next_value = values[b, k + 1] if k + 1 < length else 0.0  # V after the last real token = 0
                delta = rewards[b, k] + gamma * next_value - values[b, k]
                total += (gamma * lam) ** (k - t) * delta
            advantages[b, t] = total
    return advantages, torch.where(mask, advantages + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_matches_slow_loop_with_masks(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 7), torch.randn(5, 7)
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 1, 5, 6])[:, None]
    rewards = torch.where(mask, rewards, 0.0)  # the script builds rewards this way
    values_with_junk = torch.where(mask, values, 99.0)  # padding values must not leak in
    advantages, returns = compute_gae(rewards, values_with_junk, mask, gamma, lam)
    expected_adv, expected_ret = slow_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, expected_adv, atol=1e-5)
    assert torch.allclose(returns, expected_ret, atol=1e-5)


def test_adaptive_kl_controller_rule():
    # KL above target: error clipped at +0.2, beta grows by 0.2 * n / horizon
    assert adaptive_kl_update(0.05, kl=100.0, kl_target=6.0, n=64, horizon=10000) == pytest.approx(
        0.05 * (1 + 0.2 * 64 / 10000)
    )
    # KL below target by 1/6: beta shrinks proportionally
    assert adaptive_kl_update(0.1, kl=5.0, kl_target=6.0, n=128, horizon=1000) == pytest.approx(
        0.1 * (1 - (1 / 6) * 0.128)
    )
    assert adaptive_kl_update(0.1, kl=0.0, kl_target=6.0, n=10, horizon=10) == pytest.approx(0.1 * (1 - 0.2))
    assert adaptive_kl_update(0.1, kl=50.0, kl_target=0.0, n=64, horizon=10) == 0.1  # target 0: fixed beta


def test_policy_loss_hand_computed():
    old = torch.zeros(1, 6)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5, 1.5, 3.0]]))
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]]).bool()
    loss, stats = policy_loss(new, old, advantages, mask, clip_eps=0.2)
    # per token: max(-A r, -A clip(r, 0.8, 1.2)): A=1,r=1.5 -> max(-1.5,-1.2)=-1.2; A=1,r=0.5 -> max(-0.5,-0.8)=-0.5;
    # A=-2,r=1.1 -> 2.2; A=-1,r=0.5 -> max(0.5, 0.8)=0.8 (clipped from below); A=-1,r=1.5 -> max(1.5, 1.2)=1.5;
    # the masked token (ratio 3) is ignored
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.8 + 1.5) / 5, rel=1e-5)
    assert stats["policy/clipfrac"].item() == pytest.approx(4 / 5)
    # the clipped branch carries no gradient: d loss / d log pi = -A r / 5 only where the unclipped term is the max
    new = new.clone().requires_grad_(True)
    policy_loss(new, old, advantages, mask, 0.2)[0].backward()
    assert torch.allclose(new.grad, torch.tensor([[0.0, -0.5, 2.2, 0.0, 1.5, 0.0]]) / 5, atol=1e-6)


def test_value_loss_hand_computed():
    old_values = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, -0.1, 2.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0]]).bool()
    loss, stats = value_loss(values, old_values, returns, mask, value_clip=0.2)
    # token 0: V=0.5, V_clip=0.2 -> max(0.25, 0.64) = 0.64; token 1: V=-0.1, V_clip=-0.1 -> 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert stats["value/clipfrac"].item() == pytest.approx(0.5)
    assert math.isfinite(loss.item())


def test_apa_authors_controller_steps_with_the_global_minibatch_on_any_number_of_ranks(tmp_path):
    """--kl-control apa-authors with the recipe's shape (a minibatch shared by the ranks): beta moves by n = the
    whole minibatch per update (trlX's per-process batch; the authors ran one process), not by a rank's share of it,
    so the schedule does not depend on NPROC. Two ranks here; one rank's schedule, the same formula with the same n:
    tests/test_invariants.py::test_apa_authors_controller_input_and_schedule."""
    from conftest import read_metrics, run_script

    flags = ["--total-episodes", "16", "--rollout-batch-size", "8", "--mini-batch-size", "4", "--max-new-tokens",
             "12", "--eval-size", "4", "--eval-every", "100", "--save-every", "0", "--kl-control", "apa-authors",
             "--kl-target", "0.5", "--kl-horizon", "64"]  # fmt: skip
    run_script("ppo.py", *flags, "--output-dir", str(tmp_path / "run"), nproc=2)
    first, second = read_metrics(tmp_path / "run")[1:]
    expected = first["train/kl_coef"]
    for _ in range(2):  # rollout 8 / minibatch 4: two controller updates, each with n = 4 (not a rank's 2)
        expected = adaptive_kl_update(expected, first["train/kl_control_input"], 0.5, 4, 64)
    assert second["train/kl_coef"] == pytest.approx(expected, rel=1e-12) and expected != first["train/kl_coef"]
