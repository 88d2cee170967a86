"""Evaluate saved policies as training evaluates them, and compare them pairwise on the same prompts.

    python bench/evaluate.py runs/ppo__1__1764000000/policy       # that run's final eval/* numbers, again
    python bench/evaluate.py toy/policy runs/ppo__1__1764000000/policy runs/apa__1__1764000000/policy
    torchrun --nproc_per_node 8 bench/evaluate.py POLICY ...     # prompts sharded over ranks, as in training

A policy is a `policy/` directory a script saved, a hub name or any causal-LM checkpoint. The evaluation settings
(dataset, split and --eval-size, reward model and gold scorer with their flags, sampling, stop strings, seed, the
reference policy of the KL) come from the first policy's `training_args.json` (every script writes it into
`policy/`) unless a flag below sets them; a policy without one gets the defaults of ppo.py. The metrics are
training's evaluation (the same function): eval/reward, eval/gold_reward, eval/kl (to the reference), length,
EOS rate, distinct-n. Policy i samples with seed + i, so the first one listed reproduces its run's final evaluation
(same seed, prompts and world size) and no two policies share their sampling noise: a policy against itself
wins 0.5 of the prompts up to the standard error printed beside each win rate (ties count one half). (A LoRA run's
merged policy/ reproduces its run's numbers up to the rounding of the merge; its adapter/ is not read here.)

Writes to --output-dir: evaluation.json (the metrics of every policy and the win-rate tables) and samples_<i>.jsonl
(the held-out samples of policy i: prompt, response, reward, gold reward, KL, length, ended).
"""

import dataclasses
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
import tyro
from transformers import GenerationConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import common  # noqa: E402  (the repository is on the path now)
from plumbing import data, models, run, scorers  # noqa: E402


@dataclass
class Args:
    policies: tyro.conf.Positional[tuple[str, ...]]
    """policies to evaluate: policy/ directories, hub names or paths"""
    output_dir: str = "runs/evaluation"  # evaluation.json and samples_<i>.jsonl go here
    reference: str | None = None  # pi_ref of eval/kl (default: the first policy's --model, else the first policy)
    dataset: str | None = None  # the prompts (default: the first policy's run's, else toy/data)
    eval_split: str | None = None  # the dataset split the prompts are read from (default: the run's --eval-split)
    eval_size: int | None = None  # how many of the split's first prompts (default: the run's --eval-size)
    reward_model: str | None = None  # the scorer of eval/reward (default: the run's --reward-model)
    eval_reward: str | None = None  # the gold scorer of eval/gold_reward (default: the run's); '' for none
    seed: int | None = None  # policy i samples with seed + i (default: the run's --seed)
    max_new_tokens: int | None = None  # longest response (default: the run's)
    max_prompt_length: int | None = None  # prompts left-truncated to this many tokens (default: the run's)
    temperature: float | None = None  # sampling temperature, also of the log-probs of eval/kl (default: the run's)
    rollout_forward_batch_size: int | None = None  # rows per generation chunk and no-grad pass (default: the run's)
    dtype: Literal["auto", "float32", "bfloat16"] | None = None  # compute dtype (default: the run's --dtype)


def settings_of(args: Args) -> SimpleNamespace:
    """The run's flags: ppo.py's defaults, then the first policy's training_args.json, then this command's flags."""
    saved = {}
    for policy in args.policies[:1]:
        path = os.path.join(run.repo_path(policy), "training_args.json")
        if os.path.isfile(path):
            saved = json.load(open(path))
    script = importlib.import_module(saved.get("script", "ppo.py")[: -len(".py")])
    settings = {**dataclasses.asdict(script.Args()), **saved.get("args", {})}
    settings["reference"] = saved["args"]["model"] if saved else args.policies[0]
    settings.update({k: v for k, v in dataclasses.asdict(args).items() if v is not None and k in settings})
    # the evaluation is not sharded by FSDP here; distinct-n over the n's the script reports (A-LoL also trigrams)
    settings.update(fsdp=False, ns=(1, 2, 3) if saved.get("script") == "alol.py" else (1, 2))
    return SimpleNamespace(**settings)


@torch.no_grad()
def evaluate(path: str, s: SimpleNamespace, seed: int, scorer_fns, rank: int, world_size: int, device, dtype) -> dict:
    """The training scripts' evaluate(), for the policy at `path`: metrics and samples."""
    tokenizer = models.load_tokenizer(path, s.trust_remote_code, s.chat_template)
    rows = data.load_rows(s.dataset, s.eval_split)[0][: s.eval_size][rank::world_size]
    columns = scorers.dataset_columns(s, s.eval_split)[: s.eval_size][rank::world_size]  # what scoring functions read
    prompts = data.tokenize_prompts(tokenizer, rows, s.max_prompt_length)
    stop_ids = torch.tensor(data.stop_token_ids(path, tokenizer), device=device)
    # the policy computes in float32 weights under autocast as in training; the reference as training prepares it
    policy = models.load_causal_lm(path, torch.float32, s.trust_remote_code, s.use_generation_config).to(device)
    ref_policy = models.load_causal_lm(s.reference, torch.float32, s.trust_remote_code)
    ref_policy = models.prepare_model(ref_policy, s, device, dtype, train=False)
    generation_config = GenerationConfig(
        max_new_tokens=s.max_new_tokens,
        do_sample=True,
        temperature=s.temperature,
        top_k=0,
        top_p=1.0,
        eos_token_id=stop_ids.tolist(),
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=s.stop_strings or None,
    )
    torch.manual_seed(seed + rank)
    chunk = s.rollout_forward_batch_size
    queries, query_mask = common.left_pad(prompts, tokenizer.pad_token_id, device)
    with common.autocast(device, dtype):
        responses, response_mask = common.generate(policy, queries, query_mask, generation_config, chunk, tokenizer)
    if s.stop_strings:
        responses, response_mask = data.cut_at_stop_strings(tokenizer, responses, response_mask, s.stop_strings)
    input_ids, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
    logprobs = common.chunked_logprobs(policy, input_ids, attention_mask, responses, s.temperature, chunk, dtype)
    ref_logprobs = common.chunked_logprobs(
        ref_policy, input_ids, attention_mask, responses, s.temperature, chunk, dtype
    )
    kl = torch.where(response_mask, logprobs - ref_logprobs, 0.0)
    prompt_texts = data.scoring_prompts(tokenizer, queries, rows)
    response_texts = data.response_texts(tokenizer, queries, responses)
    ended = torch.isin(responses, stop_ids).any(1)
    greedy = lambda: common.greedy_texts(policy, prompts, tokenizer, generation_config, chunk, dtype, s.stop_strings)
    return run.evaluation_metrics(*scorer_fns, prompt_texts, response_texts, ended, kl, response_mask, s.ns, columns,
                                  greedy)  # fmt: skip


def win_rate(a: list[float], b: list[float]) -> tuple[float, float]:
    """Share of prompts where a's sample scores higher than b's (ties count one half), and its standard error."""
    wins = torch.tensor([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)], dtype=torch.float64)
    return wins.mean().item(), (wins.std() / len(wins) ** 0.5).item()


def main():
    args = tyro.cli(Args)
    rank, world_size, device = run.setup_distributed()
    if not args.policies:
        run.fail("pass one or more policies to evaluate (policy/ directories, hub names or paths)")
    s = settings_of(args)
    dtype = run.resolve_dtype(s.dtype, device)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    scorer_fns = scorers.load_scorers(s, device, dtype)
    results = []
    for i, policy in enumerate(args.policies):
        metrics = evaluate(policy, s, s.seed + i, scorer_fns, rank, world_size, device, dtype)
        samples = metrics.pop("samples")
        results.append({"policy": policy, "seed": s.seed + i, "metrics": metrics, "samples": samples})
        if rank == 0:
            with open(os.path.join(args.output_dir, f"samples_{i}.jsonl"), "w") as f:
                f.writelines(json.dumps(sample) + "\n" for sample in samples)
            print(f"[{i}] {policy} (seed {s.seed + i})", *(f"{k} {v:.4f}" for k, v in metrics.items()), sep="  ")
    win_rates = {}
    for key in ("reward", "gold_reward") if scorer_fns[1] else ("reward",):
        table = {}
        for i, a in enumerate(results):
            for j, b in enumerate(results[i + 1 :], i + 1):
                rate, se = win_rate([x[key] for x in a["samples"]], [x[key] for x in b["samples"]])
                table[f"{i} vs {j}"] = {"win_rate": rate, "standard_error": se}
                if rank == 0:
                    print(f"win rate by {key}: [{i}] over [{j}] {rate:.3f} +- {se:.3f} ({len(a['samples'])} prompts)")
        win_rates[key] = table
    if rank == 0:
        evaluation = {
            "settings": {k: v for k, v in vars(s).items() if k != "ns"},
            "policies": [{k: v for k, v in r.items() if k != "samples"} for r in results],
            "win_rates": win_rates,
        }
        with open(os.path.join(args.output_dir, "evaluation.json"), "w") as f:
            json.dump(evaluation, f, indent=1)
        print(f"wrote {args.output_dir}/evaluation.json and samples_<i>.jsonl")
    run.close_distributed()


if __name__ == "__main__":
    main()
