import math

import pytest
import torch

import apa
import awr


def test_apa_loss_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0, -7.0]], requires_grad=True)
    ref_logprobs = torch.tensor([[-1.5, -1.0, 0.0]])
    advantages = torch.tensor([[0.1, -0.2, 3.0]])
    mask = torch.tensor([[1, 1, 0]]).bool()
    loss, stats = apa.policy_loss(logprobs, ref_logprobs, advantages, mask, lam=0.1)
    # residuals: (-1 + 1.5 - 1) = -0.5 and (-2 + 1 + 2) = 1; the masked token is ignored
    assert loss.item() == pytest.approx((0.25 + 1.0) / 2)
    assert stats["policy/log_ratio_ref"].item() == pytest.approx((0.5 - 1.0) / 2)
    assert stats["policy/scaled_advantage"].item() == pytest.approx((1.0 - 2.0) / 2)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5, 1.0, 0.0]]))


def test_apa_fixed_point_on_a_tabular_softmax_policy():
    """Theorem 1 / eq. (3): minimising the APA loss drives log pi to log pi_ref + A / lambda. With the
    advantage table normalised so the target is a distribution, the fixed point is exact."""
    torch.manual_seed(0)
    states, actions, lam = 4, 6, 0.5
    ref_logprobs = torch.log_softmax(torch.randn(states, actions), -1)
    raw = torch.randn(states, actions)
    advantages = lam * (raw - torch.logsumexp(ref_logprobs + raw, -1, keepdim=True))  # sum_a pi_ref e^{A/lam} = 1
    target = ref_logprobs + advantages / lam
    assert torch.allclose(target.exp().sum(-1), torch.ones(states))
    logits = torch.zeros(states, actions, requires_grad=True)  # start at the uniform policy
    optimizer = torch.optim.Adam([logits], lr=0.1)
    mask = torch.ones(states, actions, dtype=torch.bool)
    for _ in range(1000):
        loss, _ = apa.policy_loss(torch.log_softmax(logits, -1), ref_logprobs, advantages, mask, lam)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(torch.log_softmax(logits, -1), target, atol=1e-3)
    # and it is not pi_ref (the constraint is soft): the advantage moved the policy
    assert (torch.log_softmax(logits, -1) - ref_logprobs).abs().max() > 0.5


def test_apa_value_loss_is_unclipped():
    values, returns = torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 0.0]])
    loss, _ = apa.value_loss(values, returns, torch.ones(1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.5 * (1.0 + 9.0) / 2)


def test_awr_weights_clipping_and_loss_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    advantages = torch.tensor([[0.0, 2.0, 10.0, 50.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    loss, stats = awr.policy_loss(logprobs, advantages, mask, beta=2.0, max_weight=20.0)
    # w = exp(A / 2) = 1, e, e^5 = 148.4 -> clipped to 20; the masked token is ignored
    assert loss.item() == pytest.approx((1 * 1 + 2 * math.e + 3 * 20) / 3, rel=1e-5)
    assert stats["policy/weight_clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["policy/weight_mean"].item() == pytest.approx((1 + math.e + 20) / 3, rel=1e-5)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-1 / 3, -math.e / 3, -20 / 3, 0.0]]))
    assert advantages.grad is None  # the weights are detached
    unclipped, stats = awr.policy_loss(logprobs, advantages, mask, beta=2.0, max_weight=0.0)
    assert unclipped.item() == pytest.approx((1 + 2 * math.e + 3 * math.exp(5)) / 3, rel=1e-5)
    assert stats["policy/weight_clipfrac"].item() == 0.0
