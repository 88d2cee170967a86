"""The reward each online script builds, its advantage normalisation and the missing-EOS penalty, hand-computed:
the score at the last real token (the EOS) and nowhere else, the KL penalty's sign and coefficient, the running
statistics updated with this batch before use, nothing leaking from padding; whitening on in ppo/apa/awr and off in
PPO-max unless --norm-adv."""

import numpy as np
import pytest
import torch

import apa
import awr
import ppo
import ppo_max
from common import RunningMoments, penalize_missing_eos

SCORES = torch.tensor([2.0, -1.0, 0.5])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool()  # lengths 3, 1, 4
KL = torch.tensor([[0.5, -0.2, 0.1, 99.0], [0.3, 99.0, 99.0, 99.0], [0.0, 0.4, -0.1, 0.2]])  # 99: junk in padding
EARLIER = [0.0, 4.0]  # a batch the running statistics saw before this one


def stats_after_earlier() -> RunningMoments:
    """The running statistics as the scripts pass them: updated with an earlier batch, then with this one."""
    stats = RunningMoments()
    stats.update(torch.tensor(EARLIER))
    stats.update(SCORES)
    return stats


def expected_rewards(kl_coef: float, scaled: np.ndarray) -> torch.Tensor:
    """By hand: -kl_coef * k1 on real tokens, 0 on padding, plus the scaled score at the last real token."""
    rewards = np.where(MASK.numpy(), -kl_coef * KL.numpy(), 0.0)
    for row, length in enumerate(MASK.sum(1).tolist()):
        rewards[row, length - 1] += scaled[row]
    return torch.tensor(rewards, dtype=torch.float32)


def test_ppo_reward_kl_penalty_on_every_token_and_the_scaled_score_at_the_last():
    seen = np.array(EARLIER + SCORES.tolist())
    std = seen.std()  # the running std includes this batch; not mean-centred (trlX)
    scaled = np.clip(SCORES.numpy() / std, -0.9, 0.9)  # 2 / 1.92 = 1.04 is clipped, -0.52 and 0.26 are not
    stats = stats_after_earlier()
    rewards = ppo.compute_rewards(SCORES, KL, MASK, stats, kl_coef=0.1, reward_clip=0.9)
    assert torch.allclose(rewards, expected_rewards(0.1, scaled), atol=1e-6)
    assert stats.std == pytest.approx(std) and stats.count == 5
    assert rewards[0, 2] == pytest.approx(-0.1 * 0.1 + 0.9)  # the EOS position of row 0: penalty + clipped score


@pytest.mark.parametrize("module", [apa, awr])
def test_apa_awr_reward_is_the_scaled_score_at_the_last_token_only(module):
    scaled = np.clip(SCORES.numpy() / np.array(EARLIER + SCORES.tolist()).std(), -0.9, 0.9)
    rewards = module.compute_rewards(SCORES, MASK, stats_after_earlier(), reward_clip=0.9)
    assert torch.allclose(rewards, expected_rewards(0.0, scaled), atol=1e-6)  # no KL penalty


@pytest.mark.parametrize("recipe", ["paper", "released"])
def test_ppo_max_reward_fixed_kl_penalty_and_normalised_score(recipe):
    seen = np.array(EARLIER + SCORES.tolist())
    if recipe == "paper":  # eq. (18): mean-centred, divided by the std, clipped to +-delta
        scaled = np.clip((SCORES.numpy() - seen.mean()) / seen.std(), -0.5, 0.5)
    else:
        scaled = SCORES.numpy() / seen.std()
    rewards = ppo_max.compute_rewards(SCORES, KL, MASK, stats_after_earlier(), 0.05, recipe, reward_clip=0.5)
    assert torch.allclose(rewards, expected_rewards(0.05, scaled), atol=1e-6)


def whitened(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    real = values[mask].double().numpy()
    out = np.zeros(values.shape)
    out[mask.numpy()] = (real - real.mean()) / real.std()
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("module", [ppo, apa, awr, ppo_max])
def test_advantages_whitened_over_real_tokens_except_in_ppo_max(module):
    torch.manual_seed(0)
    rewards, values = torch.where(MASK, torch.randn(3, 4), 0.0), torch.randn(3, 4)
    gae, returns = ppo.compute_gae(rewards, values, MASK, 1.0, 0.95)
    if module is ppo_max:
        advantages, got_returns = module.compute_advantages(rewards, values, MASK, 1.0, 0.95, False)
        assert torch.equal(advantages, gae)  # PPO-max: no advantage normalisation by default
        advantages, _ = module.compute_advantages(rewards, values, MASK, 1.0, 0.95, True)  # --norm-adv
    else:
        advantages, got_returns = module.compute_advantages(rewards, values, MASK, 1.0, 0.95)
    assert torch.allclose(advantages, whitened(gae, MASK), atol=1e-5)
    assert torch.allclose(got_returns, returns)  # the returns are the unwhitened A + V


def test_missing_eos_penalty_is_subtracted_from_responses_that_never_ended():
    ended = torch.tensor([True, False, True])
    assert penalize_missing_eos(SCORES, ended, 1.5).tolist() == [2.0, -2.5, 0.5]
    assert penalize_missing_eos(SCORES, ended, 0.0).tolist() == SCORES.tolist()
    with pytest.raises(SystemExit, match="NaN/inf scores"):
        penalize_missing_eos(torch.tensor([1.0, float("nan")]), ended[:2], 1.0)
