"""Invariants of a real run, checked on what each script's main() passes to its tested functions
(tests/wrap.py --record records every call): the rollout tensors reach the reward, advantage and loss functions as
the algorithm says (pi_old vs pi_ref log-probs, advantages vs returns, the missing-EOS penalty, the rollout values);
on the first minibatch of every iteration the ratio is 1 and the value net's outputs equal the rollout values; and
the logged losses are the tested loss functions' outputs, weighted by each micro-batch's share of the tokens."""

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, main_error, read_metrics, run_script, shared_runs, toy_rows

import apa
import awr
import ppo
import ppo_max

ONLINE = {"ppo": ppo, "apa": apa, "awr": awr, "ppo_max": ppo_max}
# two iterations of 8 rollouts: two minibatches of 4, each in two micro-batches of 2
FLAGS = ["--total-episodes", "16", "--rollout-batch-size", "8", "--mini-batch-size", "4", "--micro-batch-size", "2",
         "--update-epochs", "1", "--max-new-tokens", "16", "--eval-size", "8", "--eval-every", "100",
         "--save-every", "0"]  # fmt: skip
EXTRA = {"ppo_max": ["--critic-warmup-steps", "0"]}
EOS = 0  # the toy tokenizer's <|endoftext|>


def runs_of(script: str, data: str = "") -> dict:
    """Every run of `script` the tests below read, name -> flags (recorded once: `recorded`); `data`: A-LoL's."""
    if script == "alol":
        base = [*ALOL_FLAGS, "--dataset", data]
        return {"temperature": [*base, "--temperature", "0.7"],
                "v_ref": [*base, "--eval-size", "8", "--value-size", "10", "--total-steps", "1"],
                **{variant: [*base, "--variant", variant, *flags] for variant, flags in ALOL_RUNS.items()}}  # fmt: skip
    base = [*FLAGS, *EXTRA.get(script, [])]
    runs = {"main": base, "temperature": [*base, "--temperature", "0.7"]}
    if script == "ppo":
        runs["apa_authors"] = [*FLAGS, "--update-epochs", "2", "--kl-control", "apa-authors", "--kl-target", "0.5",
                               "--kl-horizon", "64", "--rollout-forward-batch-size", "3"]  # fmt: skip
    if script == "ppo_max":
        runs["ptx"] = [*FLAGS, "--critic-warmup-steps", "0", "--ptx-coef", "0.5"]
    return runs


def record(script: str, runs: list[list[str]], rollouts: str = "") -> list[list[tuple]]:
    """The events of each run of `script` (one process), as tests/wrap.py --record saves them; `rollouts`: fixed or
    next-turn responses in place of sampling (tests/wrap.py)."""
    out = runs[0][runs[0].index("--output-dir") + 1] + ".events.pt"
    wrap = ["--rollouts", rollouts] if rollouts else []
    run_script("tests/wrap.py", "--record", out, "--runs", json.dumps(runs), *wrap, script)
    return torch.load(out, weights_only=False)


def recorded(shared, script: str, runs: dict, name: str) -> tuple[list[tuple], Path]:
    """The events and output directory of run `name` of `runs` (name -> flags, without --output-dir), every run of
    which is recorded once per test session in one process for all the tests that read them
    (conftest.shared_runs: one interpreter start per script, not one per test)."""
    out = shared_runs(shared, script, runs, record=True)[name]
    return load_events(out.parent / "events.pt")[list(runs).index(name)], out


@functools.lru_cache(maxsize=1)
def load_events(path: Path) -> list[list[tuple]]:
    return torch.load(path, weights_only=False)


def last(events, name: str, before: int, n: int = 1) -> list[tuple]:
    return [e for e in events[:before] if e[0] == name][-n:]


def between(events, name: str, start: int, end: int) -> list[tuple]:
    return [e for e in events[start:end] if e[0] == name]


def per_step(events, start: int, end: int, loss: str, micro_batch: str = "token_micro_batch") -> list[list[tuple]]:
    """(share, loss value) of each micro-batch, grouped by optimizer step (a step ends at its gradient clip)."""
    steps, current, shares = [], [], []  # (ppo_max lists a step's micro-batches before its losses: a queue)
    for name, _, _, out in events[start:end]:
        if name == micro_batch:
            shares.append(out[-2] if micro_batch == "micro_batch" else out[3])
        elif name == loss:
            current.append((float(shares.pop(0)), out[0].item() if isinstance(out, tuple) else out.item()))
        elif name == "clip_grad_norm_" and current:
            steps, current, shares = [*steps, current], [], []
    return steps


@pytest.mark.parametrize("script", list(ONLINE))
def test_what_main_passes_to_the_algorithm_and_the_first_minibatch(script, shared):
    module = ONLINE[script]
    events, out = recorded(shared, script, runs_of(script), "main")
    rows = read_metrics(out)[1:]
    starts = [i for i, e in enumerate(events) if e[0] == "compute_rewards"]
    assert len(starts) == len(rows) == 2
    for iteration, (start, end, row) in enumerate(zip(starts, starts[1:] + [len(events)], rows), 1):
        # ---- the rollout: pi_old and pi_ref log-probs, values and scores of the same sequences
        (_, (_, input_ids, attention_mask, responses, *_), _, logprobs), (*_, ref_logprobs) = last(
            events, "chunked_logprobs", start, 2
        )
        values = last(events, "chunked_values", start)[0][3]
        (_, (_, _, ended, _), _, raw_scores) = last(events, "score", start)[0]
        mask = attention_mask[:, -responses.shape[1] :].bool()
        assert torch.equal(ended, (mask & (responses == EOS)).any(1))  # stopped by itself, not cut
        scores = raw_scores - 1.0 * (~ended).float()  # the missing-EOS penalty (default 1.0)
        kl = torch.where(mask, logprobs - ref_logprobs, 0.0)
        if iteration == 2:  # the policy has moved: pi_old and pi_ref differ, so passing one for the other shows
            assert kl.abs().max() > 1e-3

        # ---- reward and advantages: the rollout tensors, in the right places
        (_, reward_args, _, rewards) = events[start]
        ppo_like = script in ("ppo", "ppo_max")  # a KL penalty in the reward, clipped losses
        (moments,) = [a["running_moments"] for a in reward_args if isinstance(a, dict) and "running_moments" in a]
        assert moments["count"] == 8 * iteration  # the running statistics hold this batch's scores before use
        assert torch.equal(reward_args[0], scores) and torch.equal(reward_args[2 if ppo_like else 1], mask)
        if ppo_like:
            assert torch.equal(reward_args[1], kl)
            assert reward_args[4] == pytest.approx(row["train/kl_coef"])
        (_, advantage_args, _, (advantages, returns)) = between(events, "compute_advantages", start, end)[0]
        assert torch.equal(advantage_args[0], rewards) and torch.equal(advantage_args[1], values)
        assert torch.equal(advantage_args[2], mask) and advantage_args[3:5] == (1.0, 0.95)
        if script == "ppo_max":
            assert advantage_args[5] is False  # --norm-adv off by default

        # ---- the first micro-batch: ratio 1, the value net re-computes the rollout values, the right tensors
        mb = between(events, "token_micro_batch", start, end)[0][3][0]  # (rows, response columns)
        (_, policy_args, _, (policy_loss, _)) = between(events, "policy_loss", start, end)[0]
        (_, value_args, _, (value_loss, _)) = between(events, "value_loss", start, end)[0]
        assert torch.allclose(policy_args[0], logprobs[mb], atol=1e-5)  # pi / pi_old = 1
        assert torch.allclose(value_args[0], values[mb], atol=1e-5)
        anchor = {"ppo": logprobs, "ppo_max": logprobs, "apa": ref_logprobs}.get(script)  # AWR: none
        loss_args = [logprobs[mb]] + ([anchor[mb]] if anchor is not None else []) + [advantages[mb], mask[mb]]
        assert all(torch.equal(a, b) for a, b in zip(policy_args[1:], loss_args[1:]))
        assert policy_loss == pytest.approx(module.policy_loss(*loss_args, *policy_args[len(loss_args) :])[0].item())
        if ppo_like:  # clipped value loss around the rollout values
            assert torch.equal(value_args[1], values[mb]) and torch.equal(value_args[2], returns[mb])
        else:
            assert torch.equal(value_args[1], returns[mb])
        assert torch.equal(value_args[-2 if ppo_like else -1], mask[mb])

        # ---- the logged row: the rollout's means, and the losses as the functions computed them
        assert row["train/reward"] == pytest.approx(scores.mean().item(), abs=1e-6)
        assert row["train/kl"] == pytest.approx(kl.sum(1).mean().item(), abs=1e-6)
        assert row["policy/ratio_first_mb"] == pytest.approx(1.0, abs=1e-5)
        micro_batches = [e[3] for e in between(events, "token_micro_batch", start, end)]
        assert sorted(i for (rows, _), *_ in micro_batches for i in rows.tolist()) == list(range(8))  # one epoch
        for key, name in [("loss/policy", "policy_loss"), ("loss/value", "value_loss")]:
            steps = per_step(events, start, end, name)
            assert len(steps) == 2 and [sum(s for s, _ in step) for step in steps] == pytest.approx([1.0, 1.0])
            assert row[key] == pytest.approx(sum(s * v for step in steps for s, v in step) / 2, rel=1e-5)
        # ---- one gradient-norm clip per network, or (PPO-max) one over policy and value net together
        clips = [e[1][0] for e in between(events, "clip_grad_norm_", start, end)]
        assert len(clips) == (2 if script == "ppo_max" else 4)
        if script == "ppo_max":
            assert clips[0] > 100  # every parameter of both networks in one norm
    if script == "ppo":  # the trlX controller: fed the batch's mean sequence KL once per rollout batch
        expected = ppo.adaptive_kl_update(rows[0]["train/kl_coef"], rows[0]["train/kl"], 6.0, 8, 10000)
        assert rows[1]["train/kl_coef"] == pytest.approx(expected, rel=1e-9) and expected != rows[0]["train/kl_coef"]


@pytest.mark.parametrize("script", [*ONLINE, "alol"])
def test_every_pass_divides_by_the_sampling_temperature(script, tiny_toy_data, shared):
    """--temperature 0.7: every log-prob describes the distribution sampled, so each pass divides its logits by T
    (the rollout's pi_old and pi_ref, the update's forward, the evaluation's): KL exactly 0 before training and ratio
    1 on every iteration's first minibatch, and every recorded forward at T (but PPO-ptx's SFT NLL and A-LoL's
    offline training passes, at T = 1 by design). A pass that forgot T would show in both."""
    events, out = recorded(shared, script, runs_of(script, tiny_toy_data), "temperature")
    rows = read_metrics(out)
    assert rows[0]["eval/kl"] == 0.0  # the initial policy against itself, at T
    temperatures = [e[1][0] for e in events if e[0] == "response_logits"]
    chunked = [e[1][4] for e in events if e[0] == "chunked_logprobs"]
    if script == "alol":  # two evaluations (policy and pi_ref at T each); 2 steps x 2 micro-batches offline (T = 1)
        assert sorted(chunked) == [0.7] * 4 + [1.0] * 4 and set(temperatures) == {0.7, 1.0}
        return
    assert rows[1]["train/kl"] == 0.0
    assert all(row["policy/abs_log_ratio_first_mb"] < 1e-6 for row in rows[1:])
    assert set(chunked) == {0.7} and set(temperatures) == {0.7} and len(temperatures) >= 8


def test_apa_authors_controller_input_and_schedule(shared):
    """--kl-control apa-authors: the controller is fed the mean over every position of prompt + response (masked by
    the predicting position, as theirs) of k3 = exp(d) - 1 - d, d = log pi_old - log pi_ref, over the rollout's last
    chunk of --rollout-forward-batch-size rows padded to its own longest prompt and response; after every minibatch,
    with n = the minibatch; and the update epochs are consecutive steps on one minibatch."""
    events, out = recorded(shared, "ppo", runs_of("ppo"), "apa_authors")
    rows = read_metrics(out)[1:]
    starts = [i for i, e in enumerate(events) if e[0] == "compute_rewards"]
    kl_coef = 0.05
    for start, end, row in zip(starts, starts[1:] + [len(events)], rows):
        (_, (_, input_ids, attention_mask, tokens, *_), _, all_logprobs), (*_, all_ref) = between(
            events, "chunked_logprobs", start, end
        )[:2]
        assert torch.equal(tokens, input_ids[:, 1:])  # every position after the first, prompt included
        context = attention_mask.shape[1] - last(events, "chunked_values", start)[0][1][3]  # the prompt's columns
        real = attention_mask.bool()
        columns = torch.arange(real.shape[1])
        first = torch.where(real, columns, 10**6).min(1).values[6:].min().item()  # the last chunk: rows 6 and 7
        end_column = torch.where(real, columns, -1).max(1).values[6:].max().item()
        assert first < context <= end_column  # (left-padded prompts, right-padded responses)
        d = ((all_logprobs - all_ref) * attention_mask[:, :-1])[6:, first:end_column]  # their chunk's positions
        assert row["train/kl_control_input"] == pytest.approx((d.exp() - 1 - d).mean().item(), rel=1e-5)
        everything = (all_logprobs - all_ref) * attention_mask[:, :-1]  # (every row: a different number, once it moved)
        if row["iteration"] == 2:
            assert row["train/kl_control_input"] != pytest.approx((everything.exp() - 1 - everything).mean().item())
        assert row["train/kl_coef"] == pytest.approx(kl_coef, rel=1e-9)
        for _ in range(2):  # two minibatches of 4 per rollout batch
            kl_coef = ppo.adaptive_kl_update(kl_coef, row["train/kl_control_input"], 0.5, 4, 64)
        steps, current = [], []  # the rows of each optimizer step (a step ends at its gradient clips)
        for name, _, _, out in events[start:end]:
            if name == "token_micro_batch":
                current += out[0][0].tolist()
            elif name == "clip_grad_norm_" and current:
                steps, current = [*steps, sorted(current)], []
        assert len(steps) == 4 and steps[0] == steps[1] and steps[2] == steps[3]  # each minibatch twice in a row
        assert sorted(steps[0] + steps[2]) == list(range(8))
    assert rows[1]["train/kl_control_input"] > 0


def test_ppo_ptx_trains_on_the_datasets_responses_with_a_token_mean_of_its_own(shared):
    """PPO-ptx: each step's SFT rows are the dataset's chosen responses as the policy would write them (cut at
    --max-new-tokens without a stop token), scored at T = 1 by the policy being trained, and their NLL is a mean over
    the step's SFT tokens (each micro-batch weighted by its share of them, not of the rollout tokens)."""
    from transformers import AutoModelForCausalLM

    from plumbing.data import load_rows, tokenize_prompts, tokenize_responses
    from plumbing.models import load_tokenizer

    events, out = recorded(shared, "ppo_max", runs_of("ppo_max"), "ptx")
    tokenizer = load_tokenizer(str(REPO / "toy" / "policy"))
    prompts, chosen = load_rows(str(REPO / "toy" / "data"), "train")
    prompt_ids = tokenize_prompts(tokenizer, prompts, 128)
    sft = [ids[:16] for ids in tokenize_responses(tokenizer, prompts, chosen, [EOS])]
    assert any(len(ids) == 16 and ids[-1] != EOS for ids in sft) and any(len(ids) < 16 for ids in sft)
    steps, current = [], []  # per optimizer step: [rows, share, pad_pairs args, ptx_loss event] per micro-batch
    for event in events:
        if event[0] == "micro_batch":
            current.append([event[3][0], float(event[3][1])])
        elif event[0] in ("pad_pairs", "ptx_loss"):
            current[-1].append(event)
        elif event[0] == "clip_grad_norm_" and current:
            steps, current = [*steps, current], []
    assert len(steps) == 4  # 2 iterations x 2 steps, each in 1 or 2 micro-batches
    for step in steps:
        tokens = [sum(len(sft[i]) for i in rows.tolist()) for rows, *_ in step]
        assert [share for _, share, *_ in step] == pytest.approx([t / sum(tokens) for t in tokens])  # of SFT tokens
        for rows, _, (_, (got_prompts, got_responses, *_), _, _), _ in step:
            assert got_prompts == [prompt_ids[i] for i in rows.tolist()]
            assert got_responses == [sft[i] for i in rows.tolist()]
    # the first micro-batch, before any update: the SFT policy's log-probs at T = 1, one row at a time
    policy = AutoModelForCausalLM.from_pretrained(REPO / "toy" / "policy", dtype=torch.float32).eval()
    first_rows, _, _, (_, (logprobs, mask), _, _) = steps[0][0]
    for row, i in enumerate(first_rows.tolist()):
        with torch.no_grad():
            logits = policy(torch.tensor([prompt_ids[i] + sft[i]])).logits[0, len(prompt_ids[i]) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sft[i])[:, None]).squeeze(-1)
        assert mask[row].sum() == len(sft[i]) and torch.allclose(logprobs[row, : len(sft[i])], expected, atol=1e-5)
    rows = read_metrics(out)[1:]
    for iteration, row in enumerate(rows):
        means = [
            sum(share * loss[3].item() for _, share, _, loss in step)
            for step in steps[2 * iteration : 2 * iteration + 2]
        ]
        assert row["loss/ptx"] == pytest.approx(sum(means) / 2, rel=1e-5)


ALOL_FLAGS = ["--total-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--log-every", "2",
              "--eval-size", "16", "--eval-every", "100", "--save-every", "0", "--value-samples", "2",
              "--value-epochs", "2"]  # fmt: skip
# each A-LoL variant once (one process), with the --sampling and --reward-transform choices spread over them
ALOL_RUNS = {"a-lol": [], "a-lol-ref-free": [], "a-lol-seq": ["--sampling", "uniform"], "a-lol-kl": [],
             "r-lol": ["--reward-transform", "sigmoid"], "wbc": [], "nll": []}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_toy_data(tmp_path_factory):
    """The first 64 train and 24 test rows of the toy dataset: seven recorded A-LoL runs score them all."""
    return toy_rows(REPO / "toy" / "data", tmp_path_factory.mktemp("tiny_toy_data"), 64, 24)


def test_alol_variants_train_on_the_weights_they_define(tiny_toy_data, shared):
    """Every variant end to end: r(x, y) from the scores (sigmoid first when asked, then the missing-EOS penalty),
    A = r - V_ref, the variant's weights, rows drawn only among positive weights (in proportion to them unless
    uniform or nll), the loss given the drawn rows' weights; at the first step pi = pi_ref; the logged loss is the
    tested loss weighted by each micro-batch's share of the examples."""
    for variant, flags in ALOL_RUNS.items():
        events, out = recorded(shared, "alol", runs_of("alol", tiny_toy_data), variant)
        (_, (_, _, ended, _), _, raw_scores) = next(e for e in events if e[0] == "score")  # the training pairs first
        transform = "sigmoid" in flags
        rewards = (torch.sigmoid(raw_scores) if transform else raw_scores) - 1.0 * (~ended).float()
        (_, (got_rewards, ref_values, got_variant), _, (advantages, weights)) = next(
            e for e in events if e[0] == "advantages_and_weights"
        )
        assert torch.allclose(got_rewards, rewards) and got_variant == variant
        assert torch.equal(advantages, rewards - ref_values)
        draws = [e for e in events if e[0] == "sample_rows"]
        assert len(draws) == 2
        for _, (drawn_from, n, priority, _), _, rows in draws:
            assert torch.equal(drawn_from, weights) and n == 4 and (weights[rows] > 0).all()
            assert priority == (variant != "nll" and "uniform" not in flags)
        losses = [e for e in events if e[0] == "policy_loss"]
        micro = [e[3] for e in events if e[0] == "micro_batch"]
        assert len(losses) == len(micro) == 4
        for (_, args, _, _), (micro_rows, share, _) in zip(losses, micro):
            assert torch.equal(args[3], weights[micro_rows]) and args[4] == variant and share == pytest.approx(0.5)
        first = losses[0][1]
        assert torch.allclose(first[0], first[1], atol=1e-5)  # the first step: pi = pi_ref
        assert first[0].abs().sum() > 0  # (log-probs of real tokens)
        setup, row = read_metrics(out)
        assert setup["train/kept_fraction"] == pytest.approx((weights > 0).float().mean().item())
        per_step = [sum(0.5 * e[3][0].item() for e in losses[i : i + 2]) for i in (0, 2)]
        assert row["loss/policy"] == pytest.approx(sum(per_step) / 2, rel=1e-5)
        assert (out / "policy" / "config.json").exists()


def test_alol_fits_v_ref_on_exactly_value_size_prompts(tiny_toy_data, shared, tmp_path):
    """--value-size N: V_ref is fitted on the N held-out prompts after the --eval-size ones (the A-LoL authors' 280
    dev prompts), each with --value-samples samples; more than the split holds is a one-line error."""
    flags = runs_of("alol", tiny_toy_data)["v_ref"]
    events, _ = recorded(shared, "alol", runs_of("alol", tiny_toy_data), "v_ref")
    (_, (features, targets, prompt_ids, *_), _, _) = next(e for e in events if e[0] == "fit_value_head")
    assert features.shape[0] == len(targets) == 20 and sorted(set(prompt_ids.tolist())) == list(range(10))
    # the pairing: each target is the reward of a sample of its own prompt, each row its prompt's features. The
    # samples were scored sample-major (row s * 10 + i: sample s of prompt i); the fit reads them prompt-major.
    (_, (texts, _, ended, _), _, raw) = [e for e in events if e[0] == "score"][1]  # the training pairs', then these
    assert texts[:10] == texts[10:]  # the 10 prompts, once per sample
    rewards = raw - 1.0 * (~ended).float()  # the missing-EOS penalty (no --reward-transform)
    assert torch.allclose(targets, rewards.view(2, 10).T.reshape(-1))
    by_prompt = features.view(10, 2, -1)
    assert torch.equal(by_prompt[:, 0], by_prompt[:, 1]) and not torch.equal(by_prompt[0, 0], by_prompt[1, 0])
    assert torch.equal(prompt_ids, torch.arange(10).repeat_interleave(2))
    assert "fewer than --value-size 17" in main_error("alol.py", *flags, "--value-size", "17", "--output-dir",
                                                      str(tmp_path / "big"))  # fmt: skip
