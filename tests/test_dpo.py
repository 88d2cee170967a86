"""dpo.py: DPO's loss and gradient by hand, the reference-free switch, PRO's two-candidate loss, the preference data
formats and their one-line errors, and a short run that learns the held-out preferences."""

import json
import math

import pytest
import torch
from conftest import REPO, main_error, read_metrics, shared_runs

from dpo import implicit_rewards, preference_loss, pro_loss


def test_dpo_loss_and_gradient_by_hand():
    """-log sigmoid(beta [(c - c_ref) - (r - r_ref)]) per pair, averaged; its gradient w.r.t. log pi(y_w|x) is
    -beta sigmoid(-beta h) / B and the opposite for y_l."""
    beta = 0.1
    chosen = torch.tensor([-10.0, -20.0], requires_grad=True)
    rejected = torch.tensor([-12.0, -15.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-11.0, -18.0]), torch.tensor([-11.0, -16.0])
    loss, stats = preference_loss(chosen, rejected, ref_chosen, ref_rejected, "dpo", beta)
    h = [(-10 + 11) - (-12 + 11), (-20 + 18) - (-15 + 16)]  # 2, -3
    expected = sum(-math.log(1 / (1 + math.exp(-beta * x))) for x in h) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    grad = [-beta / (1 + math.exp(beta * x)) / 2 for x in h]  # d/dc of -log sigmoid(beta h) / B
    assert chosen.grad.tolist() == pytest.approx(grad, rel=1e-5)
    assert rejected.grad.tolist() == pytest.approx([-g for g in grad], rel=1e-5)
    # the implicit rewards: beta (log pi - log pi_ref), their margin and accuracy (pair 1 right, pair 2 wrong)
    assert stats["rewards/margin"].item() == pytest.approx(beta * (2 - 3) / 2)
    assert stats["rewards/accuracy"].item() == 0.5
    assert stats["rewards/chosen"].item() == pytest.approx(beta * (1 - 2) / 2)


def test_reference_free_ignores_the_reference():
    chosen, rejected = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -1.0])
    ref_a, ref_b = torch.tensor([-1.0, -2.0]), torch.tensor([-7.0, 3.0])
    free = preference_loss(chosen, rejected, ref_a, ref_b, "dpo-ref-free", 0.5)[0]
    assert free == preference_loss(chosen, rejected, ref_b, ref_a, "dpo-ref-free", 0.5)[0]
    zeros = torch.zeros(2)
    assert free == pytest.approx(preference_loss(chosen, rejected, zeros, zeros, "dpo", 0.5)[0].item())
    assert free != pytest.approx(preference_loss(chosen, rejected, ref_a, ref_b, "dpo", 0.5)[0].item())


def test_pro_two_candidate_loss_by_hand():
    """-log sigmoid((r_w - r_l)(s_w - s_l)) + 0.05 x (-sum log pi(y_w)) with s the mean over each response's own
    tokens (padding excluded); with equal rewards the ranking term is log 2 and pushes nothing."""
    chosen = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    chosen_mask = torch.tensor([[True, True, True]])
    rejected = torch.tensor([[-0.5, -9.0, 0.0]], requires_grad=True)  # (its last column is padding)
    rejected_mask = torch.tensor([[True, False, False]])
    loss, stats = pro_loss(chosen, chosen_mask, rejected, rejected_mask, torch.tensor([2.0]), torch.tensor([0.5]), 0.05)
    s_w, s_l = -2.0, -0.5
    rank = -math.log(1 / (1 + math.exp(-(2.0 - 0.5) * (s_w - s_l))))
    assert loss.item() == pytest.approx(rank + 0.05 * 6.0, rel=1e-6)
    assert stats["loss/rank"].item() == pytest.approx(rank, rel=1e-6) and stats["loss/sft"].item() == 6.0
    loss.backward()
    assert rejected.grad[0, 1:].abs().sum() == 0  # padding gets no gradient
    assert (chosen.grad < 0).all() and rejected.grad[0, 0] > 0  # raise the preferred, lower the other
    chosen.grad, rejected.grad = None, None
    equal, _ = pro_loss(chosen, chosen_mask, rejected, rejected_mask, torch.tensor([1.0]), torch.tensor([1.0]), 0.0)
    equal.backward()
    assert equal.item() == pytest.approx(math.log(2)) and chosen.grad.abs().sum() == 0


def test_implicit_rewards_accuracy_counts_pairs():
    stats = implicit_rewards(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3),
                             torch.zeros(3), 1.0)  # fmt: skip
    assert stats["rewards/accuracy"].item() == pytest.approx(2 / 3)


def write(directory, rows, test_rows=None):
    directory.mkdir(parents=True, exist_ok=True)
    for split, split_rows in (("train", rows), ("test", test_rows or rows)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return str(directory)


def toy_pairs(n: int, start: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in open(REPO / "toy" / "data" / "train.jsonl")][start : start + n]
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


SHORT = ["--total-steps", "2", "--batch-size", "4", "--eval-size", "4", "--eval-every", "2", "--log-every", "1",
         "--save-every", "0", "--max-new-tokens", "16"]  # fmt: skip


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no-rejected", "has no 'rejected' column"),
        ("same", "its chosen response equals its rejected one"),
        ("empty-prompt", "has a prompt that is an empty string"),
        ("cut-to-same", "are the same tokens; raise --max-new-tokens"),
        ("hh-prompts-differ", "do not share a prompt"),
    ],
)
def test_bad_preference_data_is_one_line(case, expected, tmp_path):
    rows = toy_pairs(8)
    if case == "no-rejected":
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in rows]
    elif case == "same":
        rows[3]["rejected"] = rows[3]["chosen"]
    elif case == "empty-prompt":
        rows[2]["prompt"] = "  "
    elif case == "cut-to-same":
        rows[1]["rejected"] = rows[1]["chosen"] + " and more words here"
    elif case == "hh-prompts-differ":
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
        rows[0]["rejected"] = "\n\nHuman: another question\n\nAssistant: no"
    data = write(tmp_path / "data", rows)
    flags = [*SHORT, "--dataset", data, "--output-dir", str(tmp_path / "run")]
    if case == "cut-to-same":
        flags += ["--max-new-tokens", "3"]
    assert expected in main_error("dpo.py", *flags)  # before any model loads
    assert not (tmp_path / "run").exists()


def hh_pairs(directory):
    """240 toy pairs in hh-rlhf's format (full chosen / rejected dialogues, the prompt their shared part)."""
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in toy_pairs(240)]
    write(directory, rows[:200], rows[200:])


def conversational_pairs(directory):
    """TRL's conversational preference format: prompt as messages, chosen / rejected as assistant messages."""
    rows = []
    for r in toy_pairs(64):
        question = r["prompt"].split("Human:")[-1].split("\n\nAssistant:")[0].strip()
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                     "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]})  # fmt: skip
    write(directory, rows[:48], rows[48:])


def runs(shared) -> dict:
    """The runs of the two tests below, made in one process (conftest.shared_runs)."""
    hh, chat = str(shared.get("dpo-hh-pairs", hh_pairs)), str(shared.get("dpo-chat-pairs", conversational_pairs))
    learn = ["--dataset", hh, "--total-steps", "20", "--batch-size", "8", "--eval-size", "40", "--eval-every", "20",
             "--log-every", "10", "--save-every", "0", "--lr", "3e-4"]  # fmt: skip
    return shared_runs(shared, "dpo", {"dpo-ref-free": [*learn, "--variant", "dpo-ref-free"],
                                       "pro": [*learn, "--variant", "pro"],
                                       "conversational": [*SHORT, "--dataset", chat, "--lr", "1e-3"]})  # fmt: skip


@pytest.mark.parametrize("variant", ["dpo-ref-free", "pro"])  # (dpo: tests/test_learning.py)
def test_each_variant_runs_on_hh_dialogues_and_learns_the_preferences(variant, shared):
    """hh-rlhf's format: 20 steps of 8 pairs raise the held-out implicit reward margin and accuracy from the initial
    policy's 0 / 0."""
    out = runs(shared)[variant]
    first, *_, last = read_metrics(out)
    assert first["eval/rewards/margin"] == 0.0 and first["eval/kl"] == 0.0  # the initial policy is pi_ref
    assert last["eval/rewards/margin"] > 0.05 and last["eval/rewards/accuracy"] > 0.6, last
    assert (out / "policy" / "config.json").exists()


def test_conversational_pairs_run_through_the_chat_template(shared):
    """TRL's conversational preference format, rendered by the toy policy's chat template: a short run trains (KL
    moves off 0) and scores its held-out pairs."""
    first, *_, last = read_metrics(runs(shared)["conversational"])
    assert first["eval/kl"] == 0.0 and last["eval/kl"] != 0.0 and last["eval/rewards/margin"] != 0.0
