"""The maths against a peer's own code: Hugging Face TRL's trainers called on fixed inputs, their outputs (values and
gradients) kept in tests/fixtures/conformance.json, which tests/test_conformance.py compares row by row with this
project's functions (no TRL needed there).

    bench/trl_venv.sh /tmp/trl-venv                 # TRL 1.16 (GRPO, RLOO, DPO)
    bench/trl_venv.sh /tmp/trl112 1.12.0            # TRL 1.12: the last release with the experimental PPOTrainer
    python bench/conformance.py --trl-python /tmp/trl-venv/bin/python --trl-ppo-python /tmp/trl112/bin/python

What each row calls on TRL's side:
- group advantages (GRPO, RLOO): the real trainer, built on the toy policy, its `_generate_and_score_completions`
  on one batch whose reward function returns fixed rewards (the samples themselves do not enter the advantages);
- losses (GRPO, RLOO): the trainers' own `_compute_loss`, called on an object holding the attributes it reads, with
  fixed per-token log-probs as the model's (their gradient is the row's gradient);
- PPO (TRL 1.12): `masked_whiten`, and one real `PPOTrainer.train()` step whose model passes return fixed tensors
  (rollout log-probs, reference, values, scores): its rewards, GAE advantages, returns, and the first minibatch's
  policy and value losses with their gradients, read where the trainer computes them.
Where the two differ by design, the row names the convention; the test then applies TRL's convention to this
project's numbers and must get TRL's. `compare` below is what the test and the table run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "conformance.json"
TABLE = REPO / "bench" / "results" / "conformance.md"

# ---------------------------------------------------------------- fixed inputs (both sides read these)
# four responses of 5, 3, 5 and 1 tokens; rollout (old), current and reference per-token log-probs; the current
# ones move the sequence ratios inside and outside the clip range (0.2) in both directions
MASK = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
OLD = [
    [-1.2, -0.4, -2.1, -0.9, -1.5],
    [-0.3, -1.7, -0.8, 0.0, 0.0],
    [-2.2, -1.1, -0.6, -0.5, -1.9],
    [-0.7, 0.0, 0.0, 0.0, 0.0],
]
MOVE = [
    [0.05, -0.02, 0.04, 0.01, 0.03],
    [-0.3, 0.1, -0.25, 0.0, 0.0],
    [0.02, -0.01, 0.0, 0.03, -0.02],
    [0.35, 0.0, 0.0, 0.0, 0.0],
]
REF = [
    [-1.0, -0.6, -1.8, -1.2, -1.4],
    [-0.5, -1.2, -1.0, 0.0, 0.0],
    [-2.0, -1.3, -0.9, -0.4, -1.6],
    [-1.1, 0.0, 0.0, 0.0, 0.0],
]
ADVANTAGES = [1.3, -0.7, 0.4, -1.1]
# rewards of two groups of 4 (the second all equal: no signal) and two groups of 2
REWARDS_4 = [1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]
REWARDS_2 = [0.5, -1.5, 2.0, 2.0]


def current_logprobs(on_policy: bool) -> list[list[float]]:
    if on_policy:
        return [row[:] for row in OLD]
    return [[o + d if m else 0.0 for o, d, m in zip(*rows)] for rows in zip(OLD, MOVE, MASK)]


# ---------------------------------------------------------------- TRL's side (run under the TRL interpreter)
def _fixed_reward(rewards):
    def fixed(prompts, completions, **kwargs):
        return list(rewards[: len(prompts)])

    return fixed


def _trainer(cls_name: str, config_kwargs: dict, rewards, out: str):
    """A real GRPOTrainer / RLOOTrainer on the toy policy and prompts whose reward function returns `rewards`."""
    import trl
    from datasets import Dataset

    config_cls = getattr(trl, cls_name.replace("Trainer", "Config"))
    config = config_cls(
        output_dir=out,
        use_cpu=True,
        report_to="none",
        max_completion_length=4,
        seed=0,
        per_device_train_batch_size=len(rewards),
        **config_kwargs,
    )
    dataset = Dataset.from_dict({"prompt": ["\n\nHuman: hello\n\nAssistant:"] * 16})
    return getattr(trl, cls_name)(
        model=str(REPO / "toy" / "policy"), reward_funcs=_fixed_reward(rewards), args=config, train_dataset=dataset
    )


def _advantages(trainer, rewards, group_size: int) -> list[float]:
    prompts = [f"\n\nHuman: question {i // group_size}\n\nAssistant:" for i in range(len(rewards))]
    outputs = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])
    return outputs["advantages"].tolist()


def _loss_object(**attributes):
    """What `_compute_loss` reads of its trainer, for a call on fixed log-probs (one process, no accumulation)."""
    import types
    from collections import defaultdict

    accelerator = types.SimpleNamespace(
        num_processes=1,
        sync_gradients=True,
        process_index=0,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction="sum": t,
    )
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return types.SimpleNamespace(
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics=metrics,
        **attributes,
    )


def _loss_inputs(logprobs, extra: dict):
    import torch

    mask = torch.tensor(MASK)
    batch, width = mask.shape
    return {
        "prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.zeros(batch, width, dtype=torch.long),
        "completion_mask": mask,
        **extra,
    }


def _logprob_leaf(on_policy: bool):
    import torch

    leaf = torch.tensor(current_logprobs(on_policy), requires_grad=True)
    entropies = torch.zeros_like(leaf)
    return leaf, (lambda model, *args, **kwargs: (leaf, entropies, None))


def trl_grpo_rows(out: str) -> list[dict]:
    import torch
    import trl
    from trl.trainer.grpo_trainer import GRPOTrainer

    version, rows = trl.__version__, []
    trainer = _trainer("GRPOTrainer", {"num_generations": 4, "beta": 0.0}, REWARDS_4, out)
    for scale in ("group", "batch", "none"):
        trainer.scale_rewards = scale
        rows.append(
            {
                "kind": "grpo_advantages",
                "name": f"GRPO advantages, --scale-rewards {scale}",
                "trl": f"GRPOTrainer._generate_and_score_completions ({version}), scale_rewards='{scale}'",
                "config": {"scale_rewards": scale, "group_size": 4},
                "inputs": {"rewards": REWARDS_4},
                "outputs": {"advantages": _advantages(trainer, REWARDS_4, 4)},
            }
        )
    configs = [  # (TRL loss_type, beta, use_bias_correction_kl, importance level, epsilon_high, on-policy)
        ("grpo", 0.04, True, "token", 0.2, False),
        ("grpo", 0.04, True, "token", 0.2, True),
        ("grpo", 0.04, False, "token", 0.2, False),
        ("bnpo", 0.04, True, "token", 0.28, False),
        ("dapo", 0.04, True, "token", 0.28, False),
        ("dr_grpo", 0.04, True, "token", 0.2, False),
        ("grpo", 0.0, True, "sequence", 0.2, False),
        ("grpo", 0.04, True, "sequence", 0.2, False),
        ("dr_grpo", 0.04, False, "sequence", 0.2, False),
    ]
    for loss_type, beta, correction, level, high, on_policy in configs:
        leaf, logps_fn = _logprob_leaf(on_policy)
        args = __import__("types").SimpleNamespace(
            use_bias_correction_kl=correction, delta=None, steps_per_generation=1
        )
        obj = _loss_object(
            _get_per_token_logps_and_entropies=logps_fn,
            importance_sampling_level=level,
            beta=beta,
            loss_type=loss_type,
            epsilon_low=0.2,
            epsilon_high=high,
            max_completion_length=6,
            args=args,
        )
        mask = torch.tensor(MASK)
        inputs = _loss_inputs(
            leaf,
            {
                "advantages": torch.tensor(ADVANTAGES),
                "old_per_token_logps": torch.tensor(OLD),
                "ref_per_token_logps": torch.tensor(REF),
                "num_items_in_batch": mask.sum(),
            },
        )
        loss = GRPOTrainer._compute_loss(obj, None, inputs)
        loss.backward()
        kl = ("k3 x ratio (use_bias_correction_kl)" if correction else "k3") if beta else "no KL"
        rows.append(
            {
                "kind": "grpo_loss",
                "name": f"GRPO loss, {loss_type}, {kl}, {level} ratio, eps_high {high}" + (", on-policy" * on_policy),
                "trl": f"GRPOTrainer._compute_loss ({version}), loss_type='{loss_type}', beta={beta}, "
                f"use_bias_correction_kl={correction}, importance_sampling_level='{level}', epsilon_high={high}",
                "config": {
                    "loss_type": loss_type,
                    "beta": beta,
                    "correction": correction,
                    "level": level,
                    "clip_eps": 0.2,
                    "clip_eps_high": high,
                    "max_new_tokens": 6,
                    "on_policy": on_policy,
                },
                "inputs": {
                    "logprobs": leaf.tolist(),
                    "old_logprobs": OLD,
                    "ref_logprobs": REF,
                    "mask": MASK,
                    "advantages": ADVANTAGES,
                },
                "outputs": {"loss": loss.item(), "grad": leaf.grad.tolist()},
            }
        )
    return rows


def trl_rloo_rows(out: str) -> list[dict]:
    import torch
    import trl
    from trl.trainer.rloo_trainer import RLOOTrainer

    version, rows = trl.__version__, []
    for rewards, k in ((REWARDS_4, 4), (REWARDS_2, 2)):
        trainer = _trainer("RLOOTrainer", {"num_generations": k, "beta": 0.0}, rewards, out)
        rows.append(
            {
                "kind": "rloo_advantages",
                "name": f"RLOO leave-one-out advantages, K = {k}",
                "trl": f"RLOOTrainer._generate_and_score_completions ({version}), beta=0",
                "config": {"group_size": k},
                "inputs": {"rewards": rewards},
                "outputs": {"advantages": _advantages(trainer, rewards, k)},
            }
        )
    for on_policy in (True, False):
        leaf, logps_fn = _logprob_leaf(on_policy)
        obj = _loss_object(_get_per_token_logps_and_entropies=logps_fn, epsilon_low=0.2, epsilon_high=0.2)
        old_sums = [sum(o * m for o, m in zip(*rows)) for rows in zip(OLD, MASK)]
        inputs = _loss_inputs(leaf, {"advantages": torch.tensor(ADVANTAGES), "old_logps": torch.tensor(old_sums)})
        loss = RLOOTrainer._compute_loss(obj, None, inputs)
        loss.backward()
        rows.append(
            {
                "kind": "rloo_loss",
                "name": "RLOO loss, " + ("on-policy (first minibatch)" if on_policy else "stale samples (later ones)"),
                "trl": f"RLOOTrainer._compute_loss ({version}), epsilon=0.2",
                "config": {"clip_eps": 0.2, "on_policy": on_policy},
                "inputs": {"logprobs": leaf.tolist(), "old_logprobs": OLD, "mask": MASK, "advantages": ADVANTAGES},
                "outputs": {"loss": loss.item(), "grad": leaf.grad.tolist()},
            }
        )
    return rows


# DPO: three pairs; the sequence log-probs of each chosen and rejected response under pi (the tokens of MASK's
# first three rows: chosen, then rejected, as TRL stacks them) and pi_ref's sums
DPO_REF = {"chosen": [-6.0, -2.5, -7.0], "rejected": [-5.5, -3.2, -6.1]}


def trl_dpo_rows() -> list[dict]:
    """DPOTrainer._compute_loss (loss_type sigmoid, precomputed reference log-probs) on fixed per-token log-probs:
    the model's fused head returns them (zero off the completion), and the gradient of each response's summed
    log-prob is read at one of its tokens."""
    import types

    import torch
    import trl
    from trl.trainer.dpo_trainer import DPOTrainer

    rows = []
    tokens = torch.tensor(OLD[:3] + MOVE[:3]) * torch.tensor(MASK[:3] * 2)  # (chosen rows, rejected rows)
    mask = torch.tensor(MASK[:3] * 2)
    for beta in (0.1, 0.5):
        leaf = (tokens + 0.0).requires_grad_(True)
        width = mask.shape[1] + 1  # one prompt column: the completion's log-probs are the last `width - 1`
        completion = torch.cat([torch.zeros(6, 1, dtype=torch.long), mask], 1)
        outputs = types.SimpleNamespace(log_probs=leaf, entropy=torch.zeros(6, width - 1),
                                        mean_logits=torch.zeros(6, width - 1),
                                        is_top1=torch.zeros(6, width - 1, dtype=torch.bool))  # fmt: skip
        obj = _loss_object(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
                           _total_train_tokens=0, _tp_size=1)  # fmt: skip
        obj.accelerator.device = torch.device("cpu")
        inputs = {"input_ids": torch.zeros(6, width, dtype=torch.long), "attention_mask": torch.ones(6, width),
                  "completion_mask": completion, "ref_chosen_logps": torch.tensor(DPO_REF["chosen"]),
                  "ref_rejected_logps": torch.tensor(DPO_REF["rejected"])}  # fmt: skip
        loss = DPOTrainer._compute_loss(obj, lambda out=outputs, **kwargs: out, inputs, return_outputs=False)
        loss.backward()
        sums = tokens.sum(1)
        rows.append(
            {
                "kind": "dpo_loss",
                "name": f"DPO loss (sigmoid), beta {beta}",
                "trl": f"DPOTrainer._compute_loss ({trl.__version__}), loss_type='sigmoid', beta={beta}, "
                "precompute_ref_log_probs=True",
                "config": {"beta": beta},
                "inputs": {"chosen": sums[:3].tolist(), "rejected": sums[3:].tolist(),
                           "ref_chosen": DPO_REF["chosen"], "ref_rejected": DPO_REF["rejected"]},
                "outputs": {"loss": loss.item(), "grad_chosen": leaf.grad[:3, 0].tolist(),
                            "grad_rejected": leaf.grad[3:, 0].tolist()},
            }
        )  # fmt: skip
    return rows


def trl_side() -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        return trl_grpo_rows(out) + trl_rloo_rows(out) + trl_dpo_rows()


# ---------------------------------------------------------------- this project's side
def _tensor(x, dtype=None):
    import torch

    return torch.tensor(x, dtype=dtype)


def project_outputs(row: dict, trl_convention: bool = False) -> dict:
    """This project's functions on the row's inputs; with `trl_convention`, TRL's convention (the row's) applied."""
    sys.path.insert(0, str(REPO))
    import torch

    import common
    import grpo
    import ppo
    import rloo

    kind, config, inputs = row["kind"], row["config"], row["inputs"]
    if kind.startswith("ppo_"):
        return _ppo_outputs(row, trl_convention, common, ppo)
    if kind == "grpo_advantages":
        return {
            "advantages": grpo.group_advantages(
                _tensor(inputs["rewards"]), config["group_size"], config["scale_rewards"]
            ).tolist()
        }
    if kind == "dpo_loss":
        import dpo

        chosen, rejected = (_tensor(inputs[k]).requires_grad_(True) for k in ("chosen", "rejected"))
        ref_chosen, ref_rejected = _tensor(inputs["ref_chosen"]), _tensor(inputs["ref_rejected"])
        loss, _ = dpo.preference_loss(chosen, rejected, ref_chosen, ref_rejected, "dpo", config["beta"])
        loss.backward()
        return {"loss": loss.item(), "grad_chosen": chosen.grad.tolist(), "grad_rejected": rejected.grad.tolist()}
    if kind == "rloo_advantages":
        return {"advantages": rloo.leave_one_out_advantages(_tensor(inputs["rewards"]), config["group_size"]).tolist()}
    logprobs = _tensor(inputs["logprobs"]).requires_grad_(True)
    mask, old = _tensor(inputs["mask"]).bool(), _tensor(inputs["old_logprobs"])
    advantages = _tensor(inputs["advantages"])
    batch = len(mask)
    if kind == "rloo_loss":
        loss, _ = rloo.policy_loss(logprobs, old, advantages, mask, config["clip_eps"], batch, 1)
    elif kind == "grpo_loss":
        agg = {"grpo": "seq-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "constant"}[
            config["loss_type"]
        ]
        expanded = advantages[:, None].expand_as(logprobs)
        pg_losses, _ = grpo.policy_loss(
            logprobs, old, expanded, mask, config["clip_eps"], config["clip_eps_high"], config["level"]
        )
        ref = _tensor(inputs["ref_logprobs"])
        kl_losses = grpo.kl_loss(logprobs, old, ref, "k3-ratio" if config["correction"] else "k3")
        if trl_convention and config["correction"] and config["level"] == "sequence":
            # TRL weights k3 by the response's sequence ratio (GSPO's) where this project uses each token's
            log_ratio = torch.where(mask, logprobs - old, 0.0).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
            kl_losses = grpo.k3(logprobs, ref) * log_ratio.exp()
        loss = grpo.aggregate(
            pg_losses + config["beta"] * kl_losses, mask, agg, 1.0, batch, config["max_new_tokens"], 1
        )
    else:
        raise ValueError(f"unknown row kind {kind}")
    loss.backward()
    return {"loss": loss.item(), "grad": logprobs.grad.tolist()}


def _ppo_outputs(row: dict, trl_convention: bool, common, ppo) -> dict:
    import torch

    kind, config, inputs = row["kind"], row["config"], row["inputs"]
    # TRL's rows end one position past the last real token, where it adds the score and keeps the value
    mask = _tensor(inputs["mask_p1" if trl_convention else "mask"]).bool()
    if kind == "ppo_rewards":
        kl = torch.where(mask, _tensor(inputs["old_logprobs"]) - _tensor(inputs["ref_logprobs"]), 0.0)
        stats, clip = common.RunningMoments(), 10.0
        if trl_convention:  # TRL adds the raw score: a running std of 1 (a long unit-variance history), no clip
            stats.load_state_dict({"mean": 0.0, "var": 1.0, "count": 1e15})
            clip = 1e9
        rewards = ppo.compute_rewards(_tensor(inputs["scores"]), kl, mask, stats, config["kl_coef"], clip)
        return {"rewards": rewards.tolist()}
    if kind == "ppo_gae":
        values = torch.where(mask, _tensor(inputs["values"]), 0.0)
        advantages, returns = ppo.compute_gae(
            _tensor(inputs["rewards"]), values, mask, config["gamma"], config["gae_lambda"]
        )
        return {"advantages": advantages.tolist(), "returns": returns.tolist()}
    if kind == "ppo_whiten":
        mask, advantages = _tensor(inputs["mask"]).bool(), _tensor(inputs["advantages"])
        whitened = common.masked_whiten(advantages, mask)
        if trl_convention:  # TRL's variance is the unbiased one, sum / (n - 1)
            n = mask.sum()
            mean = common.masked_mean(advantages, mask)
            variance = common.masked_mean((advantages - mean) ** 2, mask) * n / (n - 1)
            whitened = torch.where(mask, (advantages - mean) * torch.rsqrt(variance + 1e-8), 0.0)
        return {"whitened": whitened.tolist()}
    if kind == "ppo_policy_loss":
        logprobs = _tensor(inputs["logprobs"]).requires_grad_(True)
        loss, _ = ppo.policy_loss(
            logprobs, _tensor(inputs["old_logprobs"]), _tensor(inputs["advantages"]), mask, config["clip_eps"]
        )
        loss.backward()
        return {"loss": loss.item(), "grad": logprobs.grad.tolist()}
    values = _tensor(inputs["values"]).requires_grad_(True)  # ppo_value_loss
    loss, _ = ppo.value_loss(
        values, _tensor(inputs["old_values"]), _tensor(inputs["returns"]), mask, config["value_clip"]
    )
    loss.backward()
    return {"loss": loss.item(), "grad": values.grad.tolist()}


PPO_CONVENTIONS = {
    "ppo_rewards": "TRL adds the raw score one position past the last real token (when the row has room: "
    "`padding_mask_p1`); this project divides it by the running std of the scores and clips it (trlX, "
    "as the APA paper's PPO), at the last real token",
    "ppo_gae": "TRL's GAE runs one position past the last real token, through the value there (`padding_mask_p1`); "
    "this project's ends at the last real token (the EOS), V after it 0",
    "ppo_whiten": "TRL's variance is unbiased (n - 1); this project's is the mean square",
    "ppo_value_loss": "TRL's value loss also covers the position past the last real token (`padding_mask_p1`)",
}


def convention(row: dict) -> str | None:
    """Where this project differs from TRL by design, and why (None: it computes the same)."""
    config = row["config"]
    if row["kind"] in PPO_CONVENTIONS:
        return PPO_CONVENTIONS[row["kind"]]
    if row["kind"] == "grpo_loss" and config["beta"] and config["correction"] and config["level"] == "sequence":
        return (
            "TRL weights k3 by the response's sequence ratio; this project by each token's ratio, which is what "
            "makes the KL term's expected gradient the reverse KL's (docs/algorithms.md)"
        )
    return None


def largest_difference(a, b) -> float:
    if isinstance(a, list):
        return max((largest_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return abs(a - b)


def compare(row: dict) -> tuple[float, float]:
    """(largest difference of this project's outputs from TRL's, the same with TRL's convention applied)."""
    ours = project_outputs(row)
    exact = max(largest_difference(ours[k], row["outputs"][k]) for k in row["outputs"])
    if convention(row) is None:
        return exact, exact
    converted = project_outputs(row, trl_convention=True)
    return exact, max(largest_difference(converted[k], row["outputs"][k]) for k in row["outputs"])


def table(rows: list[dict]) -> str:
    lines = [
        "| quantity | TRL's code | largest difference | with TRL's convention | convention |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        exact, converted = compare(row)
        note = convention(row) or "the same"
        lines.append(f"| {row['name']} | {row['trl']} | {exact:.1e} | {converted:.1e} | {note} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-python", default="", help="python of a TRL 1.16 environment (bench/trl_venv.sh)")
    parser.add_argument("--trl-ppo-python", default="", help="python of a TRL 1.12 environment (PPO rows)")
    parser.add_argument("--side", default="", help=argparse.SUPPRESS)  # internal: run one TRL side, print JSON
    parser.add_argument("--table", action="store_true", help="only re-render bench/results/conformance.md")
    args = parser.parse_args()
    if args.side:
        rows = trl_side() if args.side == "trl" else ppo_side()
        print("CONFORMANCE " + json.dumps(rows))
        return
    if not args.table:
        rows = []
        for python, side in ((args.trl_python, "trl"), (args.trl_ppo_python, "ppo")):
            if not python or not os.path.exists(python):
                raise SystemExit(
                    f"error: pass --trl-python and --trl-ppo-python (bench/trl_venv.sh); missing {python!r}"
                )
            env = {
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "TRL_EXPERIMENTAL_SILENCE": "1",
            }
            done = subprocess.run([python, __file__, "--side", side], cwd=REPO, capture_output=True, text=True, env=env)
            out = [line for line in done.stdout.splitlines() if line.startswith("CONFORMANCE ")]
            if done.returncode != 0 or not out:
                raise SystemExit(f"error: TRL's side ({side}) failed:\n{done.stderr[-4000:]}")
            rows += json.loads(out[-1][len("CONFORMANCE ") :])
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps({"rows": rows}, indent=0) + "\n")
    rows = json.loads(FIXTURE.read_text())["rows"]
    text = (
        "# This project against TRL's own code on fixed inputs (`python bench/conformance.py`)\n\n"
        "Largest absolute difference over every value and gradient entry of the row.\n\n" + table(rows)
    )
    TABLE.write_text(text)
    print(text)


# PPO's rollout: rollout-time values and scores, and the update's new values (the log-probs are OLD, REF, MOVE's)
VALUES = [
    [0.3, 0.5, -0.2, 0.1, 0.4],
    [-0.6, 0.2, 0.7, 0.9, 0.0],
    [1.1, 0.8, 0.6, 0.2, -0.1],
    [0.05, -0.4, 0.0, 0.0, 0.0],
]
NEW_VALUES = [
    [0.35, 0.25, -0.1, 0.2, 0.5],
    [-0.3, 0.1, 0.75, 1.2, 0.0],
    [0.9, 0.85, 0.5, 0.3, 0.2],
    [0.4, -0.1, 0.0, 0.0, 0.0],
]
SCORES = [2.5, -1.0, 0.7, 1.8]
KL_COEF, GAE_LAMBDA = 0.05, 0.95


def ppo_side() -> list[dict]:
    """One PPOTrainer.train() step of TRL 1.12 on fixed tensors: the model passes are replaced by functions returning
    the fixture's log-probs, values and scores (so TRL's own code computes everything from them), and its rewards,
    GAE, whitening and losses are read where train() computes them."""
    import types

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "policy")
    batch, width, prompt = len(MASK), len(MASK[0]), [5, 6, 7]
    responses = torch.tensor([[9 + t if m else tokenizer.pad_token_id for t, m in enumerate(row)] for row in MASK])
    new_logprobs = torch.tensor(current_logprobs(False), requires_grad=True)
    new_values = torch.tensor(NEW_VALUES, requires_grad=True)
    seen = {}

    def batch_generation(model, queries, *args, **kwargs):
        return torch.cat([queries, responses], 1), torch.zeros(batch, width, len(tokenizer))

    def forward(model, query_responses, pad_token_id):
        logits = torch.zeros(*query_responses.shape, len(tokenizer))
        if model is not trainer.model:  # the reference pass (its log-probs come from selective_log_softmax below)
            return types.SimpleNamespace(logits=logits)
        rows = torch.as_tensor(sys._getframe(1).f_locals["micro_batch_inds"])
        pad = torch.zeros(len(rows), len(prompt) - 1, 1)
        values = torch.cat([pad, new_values[rows][..., None], torch.zeros(len(rows), 1, 1)], 1)
        return types.SimpleNamespace(logits=logits.requires_grad_(True) * 1.0), values

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is trainer.reward_model:
            return None, torch.tensor(SCORES), None
        values = torch.tensor(VALUES)[..., None]
        return torch.cat([torch.zeros(batch, context_length - 1, 1), values, torch.zeros(batch, 1, 1)], 1), None, None

    def selective_log_softmax(logits, index):
        caller = sys._getframe(1).f_locals
        if logits.requires_grad:  # the update's forward: the current policy's log-probs
            return new_logprobs[torch.as_tensor(caller["micro_batch_inds"])]
        return torch.tensor(REF if caller.get("ref_logits") is logits else OLD)

    original_whiten = module.masked_whiten

    def masked_whiten(values, mask, shift_mean=True):
        out = original_whiten(values, mask, shift_mean)
        caller = sys._getframe(1).f_locals
        if "returns" in caller:  # the advantages' whitening: what train() computed just before it
            seen.update(
                {k: caller[k].clone() for k in ("rewards", "values", "returns", "padding_mask", "padding_mask_p1")},
                raw=values.clone(),
                whitened=out.clone(),
            )
        return out

    for name, fn in (
        ("batch_generation", batch_generation),
        ("forward", forward),
        ("get_reward", get_reward),
        ("selective_log_softmax", selective_log_softmax),
        ("masked_whiten", masked_whiten),
    ):
        setattr(module, name, fn)
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            total_episodes=batch,
            num_ppo_epochs=1,
            response_length=width,
            local_rollout_forward_batch_size=batch,
            num_sample_generations=0,
            kl_coef=KL_COEF,
            kl_estimator="k1",
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=1.0,
            gamma=1.0,
            lam=GAE_LAMBDA,
            whiten_rewards=False,
            missing_eos_penalty=None,
            stop_token=None,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            temperature=1.0,
        )
        dataset = Dataset.from_dict({"input_ids": [prompt] * batch})
        load = AutoModelForCausalLM.from_pretrained
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=load(REPO / "toy" / "policy"),
            ref_model=load(REPO / "toy" / "policy"),
            reward_model=AutoModelForSequenceClassification.from_pretrained(REPO / "toy" / "reward_model"),
            value_model=AutoModelForSequenceClassification.from_pretrained(REPO / "toy" / "reward_model"),
            train_dataset=dataset,
        )
        trainer.train()
    logged = next(r for r in trainer.state.log_history if "loss/policy_avg" in r)
    mask_p1 = (~seen["padding_mask_p1"]).int().tolist()
    version = f"PPOTrainer.train ({trl.__version__}, experimental)"
    common = {"mask": MASK, "mask_p1": mask_p1}
    return [
        {
            "kind": "ppo_rewards",
            "name": "PPO per-token reward: -beta k1, plus the score",
            "trl": version + ", rewards",
            "config": {"kl_coef": KL_COEF},
            "inputs": {"scores": SCORES, "old_logprobs": OLD, "ref_logprobs": REF, **common},
            "outputs": {"rewards": seen["rewards"].tolist()},
        },
        {
            "kind": "ppo_gae",
            "name": "PPO GAE advantages and returns (gamma 1, lambda 0.95)",
            "trl": version + ", advantages and returns before whitening",
            "config": {"gamma": 1.0, "gae_lambda": GAE_LAMBDA},
            "inputs": {"rewards": seen["rewards"].tolist(), "values": seen["values"].tolist(), **common},
            "outputs": {"advantages": seen["raw"].tolist(), "returns": seen["returns"].tolist()},
        },
        {
            "kind": "ppo_whiten",
            "name": "PPO advantage whitening",
            "trl": f"masked_whiten ({trl.__version__})",
            "config": {},
            "inputs": {"advantages": seen["raw"].tolist(), **common},
            "outputs": {"whitened": torch.where(seen["padding_mask"], 0.0, seen["whitened"]).tolist()},
        },
        {
            "kind": "ppo_policy_loss",
            "name": "PPO clipped surrogate (eps 0.2)",
            "trl": version + ", pg_loss",
            "config": {"clip_eps": 0.2},
            "inputs": {
                "logprobs": current_logprobs(False),
                "old_logprobs": OLD,
                "advantages": torch.where(seen["padding_mask"], 0.0, seen["whitened"]).tolist(),
                **common,
            },
            "outputs": {"loss": logged["loss/policy_avg"], "grad": new_logprobs.grad.tolist()},
        },
        {
            "kind": "ppo_value_loss",
            "name": "PPO clipped value loss (0.2)",
            "trl": version + ", vf_loss",
            "config": {"value_clip": 0.2},
            "inputs": {
                "values": NEW_VALUES,
                "old_values": seen["values"].tolist(),
                "returns": seen["returns"].tolist(),
                **common,
            },
            "outputs": {"loss": logged["loss/value_avg"], "grad": new_values.grad.tolist()},
        },
    ]


if __name__ == "__main__":
    main()
