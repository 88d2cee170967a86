"""PPO for RLHF, trlX style: the baseline of the APA paper (Zhu et al. 2023, arXiv 2306.02231).

Shared by every online script: rollouts with the KV cache, reward-model scores
at the last real token, GAE (gamma 1, lambda 0.95) from a separate value network, advantages
whitened over the whole batch, then update epochs over shuffled minibatches.
PPO (Ziegler et al. 2019; Schulman et al. 2017), with k1_t = log pi_old(a_t|s_t) - log pi_ref(a_t|s_t):
    r_t = -beta k1_t + [t = last] clip(score / running_std, -c, c),  beta adapted to a KL target
    L_pi = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi / pi_old
    L_V = 0.5 mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -0.2, 0.2) - R_t)^2)

The online scripts' template: `diff ppo.py apa.py` and `diff apa.py awr.py` show the docstring and `# ALGO LOGIC:`
lines only; ppo_max.py, grpo.py and rloo.py (a diff of grpo.py) say what theirs show; alol.py has its own loop.
"""

import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import tyro
from transformers import GenerationConfig

import common
from plumbing import checkpoints, data, models, padding, run, scorers


@dataclass
class Args:
    # ---- the run: models, data, output
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # prefix of the default output directory
    seed: int = 1  # seed of prompt order, sampling and initialisation
    model: str = "toy/policy"  # policy to train (hub name or path); also pi_ref and the value net's initial backbone
    reward_model: str = "toy/reward_model"  # reward model (hub name or path, num_labels=1) or a module:function scorer
    eval_reward: str = "toy.gold:score"  # scorer logged as eval/gold_reward (a model or module:function); '' for none
    dataset: str = "toy/data"  # prompts: hub name, dir, jsonl/json/parquet file, save_to_disk dir (docs/real-models.md)
    train_split: str = "train"  # dataset split the rollout prompts are drawn from
    eval_split: str = "test"  # dataset split of the held-out evaluation prompts
    output_dir: str = ""  # metrics, TensorBoard, checkpoints and the final policy (default runs/<exp>__<seed>__<time>)
    resume: bool = False  # continue the run in --output-dir from its last checkpoint
    trust_remote_code: bool = False  # allow models and tokenizers that ship their own Python code
    chat_template: str = ""  # a .jinja file: the --model tokenizer's chat template (for conversational datasets)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # compute dtype; auto = bf16 on CUDA, fp32 on CPU
    # ---- budget and batch sizes
    total_episodes: int = 4096  # sampled responses to train on (iterations = total_episodes // rollout_batch_size)
    rollout_batch_size: int = 64  # prompts per iteration, summed over all ranks
    mini_batch_size: int = 16  # responses per gradient step, summed over all ranks
    update_epochs: int = 2  # passes over each rollout batch
    rollout_forward_batch_size: int = 64  # chunk size of the no-grad generation, reference, reward and value passes
    # ---- sampling and scoring
    max_new_tokens: int = 48  # longest response; a response without EOS by then is truncated and penalised
    max_prompt_length: int = 128  # prompts are left-truncated to this many tokens (the end of the dialogue is kept)
    stop_strings: tuple[str, ...] = ()  # trlX stop sequences, e.g. "Human:" (cut there; docs/real-models.md)
    temperature: float = 1.0  # sampling temperature; every log-prob is computed from logits / temperature
    use_generation_config: bool = False  # also apply generation_config.json (off: sample exactly softmax(logits / T))
    reward_append_eos: Literal["ended", "always", "never"] = "ended"  # EOS after ended responses, all (trlX) or none
    reward_input: Literal["auto", "text", "pair"] = "auto"  # text, or (prompt, response) pair; auto: pair for encoders
    reward_score_at: Literal["last", "first-eos"] = "last"  # read a decoder RM at its last token, or first EOS (trlX)
    reward_truncate: bool = True  # left-truncate reward-model inputs over its max length (train/reward_truncated)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never emits EOS (0 = off)
    # ---- optimisation
    lr: float = 3e-4  # policy learning rate (toy default; the APA paper used 8e-6 for 125M and 1e-6 for 1B)
    value_lr: float = 3e-4  # value network learning rate
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay (torch's default; the APA authors: 1e-6)
    max_grad_norm: float = 1.0  # gradient clipping by global norm, per network
    gamma: float = 1.0  # discount
    gae_lambda: float = 0.95  # GAE lambda
    # ---- ALGO LOGIC: PPO's hyper-parameters
    kl_coef: float = 0.05  # initial KL penalty coefficient beta
    kl_target: float = 6.0  # target sequence KL of the adaptive controller; 0 keeps beta fixed
    kl_horizon: int = 10000  # horizon of the adaptive KL controller, in episodes
    kl_control: Literal["trlx", "apa-authors"] = "trlx"
    """trlx: the controller sees the batch's mean sequence KL (k1 summed over the response) once per rollout batch, as
    Ziegler et al. (2019) define it (trlX itself, at the version the APA fork forked, fed k3 = exp(d) - 1 - d over
    prompt + response positions); apa-authors: the APA authors' trlX fork (their PPO baseline): k3 averaged over every
    position of prompt + response (padding counted as 0), fed after every minibatch, --update-epochs steps in a row"""
    reward_clip: float = 10.0  # scores divided by their running std are clipped to +-reward_clip
    clip_eps: float = 0.2  # policy ratio clip range
    value_clip: float = 0.2  # value clip range around the rollout-time values
    vf_coef: float = 1.0  # value loss weight
    # ---- LoRA and scale (README: Scaling to real models; docs/scale.md)
    use_lora: bool = False  # train LoRA adapters (policy, value net) on frozen bases; pi_ref is the policy, adapter off
    lora_r: int = 16  # LoRA rank
    lora_alpha: float = 0.0  # LoRA alpha: the adapter's output is scaled by alpha / r (0 = 2 x --lora-r)
    lora_dropout: float = 0.0  # dropout on the adapter's input, in the training forward only (QLoRA's recipe: 0.1)
    micro_batch_size: int = 0  # rows per forward/backward per rank; a minibatch's gradients add up over them (0 = all)
    dist_timeout: float = 60  # minutes a rank waits for the others in a collective (a 6.9B save takes minutes)
    fsdp: bool = False  # shard every model over the ranks with FSDP2; weights are gathered once per no-grad pass
    activation_checkpointing: bool = False  # recompute decoder layers' activations in backward instead of storing them
    num_layers_unfrozen: int = -1  # train only the top N decoder layers, final norm and heads (APA paper: 2); -1 = all
    value_num_layers_unfrozen: int | None = None  # the same for the value network (default: --num-layers-unfrozen)
    value_head: Literal["linear", "mlp"] = "linear"  # the value network's head: linear, or trlX's MLP (h -> 2h -> 1)
    # ---- evaluation, checkpoints and logging
    eval_every: int = 16  # evaluate every N iterations (and before the first and after the last)
    eval_size: int = 128  # number of held-out prompts to evaluate on
    save_every: int = 16  # checkpoint every N iterations (and at the end); 0 = never (the run cannot be resumed)
    track: bool = False  # log to Weights & Biases
    wandb_project: str = "rlhf-reference"  # wandb project name
    push_to_hub: str = ""  # at the end, upload policy/ (and adapter/) to this hub repository, e.g. me/ppo-1b


# ALGO LOGIC: the ranges of PPO's own flags (plumbing/run.py checks those every script shares)
POSITIVE_FLAGS = "kl_horizon reward_clip clip_eps value_clip"
NON_NEGATIVE_FLAGS = "kl_coef kl_target vf_coef"


def compute_gae(rewards, values, mask, gamma: float, gae_lambda: float):
    """GAE (Schulman et al. 2016, eq. 16) over response tokens; V after the last real token is 0 (the episode ends
    there). Returns (advantages, returns)."""
    values = torch.where(mask, values, 0.0)
    last_gae, advantages = torch.zeros_like(values[:, 0]), []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * gae_lambda * last_gae
        advantages.append(last_gae)
    advantages = torch.stack(advantages[::-1], dim=1)
    return torch.where(mask, advantages, 0.0), torch.where(mask, advantages + values, 0.0)


def compute_advantages(rewards, values, mask, gamma: float, gae_lambda: float):
    """GAE advantages whitened over the whole rollout batch (every rank's real tokens), and the returns."""
    advantages, returns = compute_gae(rewards, values, mask, gamma, gae_lambda)
    return common.masked_whiten(advantages, mask), returns


# ALGO LOGIC: the pieces of PPO, as plain functions the tests import
def compute_rewards(scores, kl, mask, score_stats, kl_coef: float, reward_clip: float):
    """trlX's per-token reward: -beta k1 on every response token, plus the score divided by the running std of the
    scores (this batch's included), clipped, at the last real token (the EOS when there is one)."""
    scaled_scores = (scores / score_stats.std).clamp(-reward_clip, reward_clip)
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    rewards[torch.arange(len(scores), device=mask.device), mask.sum(1) - 1] += scaled_scores
    return rewards


def adaptive_kl_update(kl_coef: float, kl: float, kl_target: float, n: int, horizon: int) -> float:
    """Ziegler et al. (2019) proportional controller on the batch's mean sequence KL."""
    if kl_target == 0:
        return kl_coef
    error = min(max(kl / kl_target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n / horizon)


def authors_kl_input(logprobs, ref_logprobs, attention_mask, lengths, chunk_size: int, world_size: int) -> float:
    """The APA authors' controller input (--kl-control apa-authors; microsoft/RLHF-APA@cfe7da2,
    trlx/trainer/accelerate_ppo_trainer.py, make_experience): k3 = exp(d) - 1 - d of d = log pi - log pi_ref at every
    position of prompt and response (`logprobs` of input_ids[:, 1:]), masked by the predicting position's mask,
    averaged over the positions of the rollout's LAST chunk of `chunk_size` rows as that chunk is padded (to its own
    longest prompt and response; their mean_kl is overwritten chunk by chunk, so the last one is fed), then over
    ranks. `lengths`: the rollout's padding.RowLengths."""
    start, context = (len(logprobs) - 1) // chunk_size * chunk_size, lengths.context_length
    p, r = (max(side[start:]) for side in (lengths.prompt, lengths.response))
    columns = slice(context - p, context + r - 1)  # the chunk's positions but its last (which predicts nothing)
    d = (logprobs[start:, columns] - ref_logprobs[start:, columns]) * attention_mask[start:, columns]
    return common.all_reduce_sum((d.exp() - 1 - d).mean()).item() / world_size


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float):
    """Clipped surrogate; returns (loss, stats)."""
    ratio = torch.exp(logprobs - old_logprobs)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    return common.masked_mean(losses, mask), {
        "policy/clipfrac": common.masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
    }


def value_loss(values, old_values, returns, mask, value_clip: float):
    """Clipped value loss; returns (loss, stats)."""
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = common.masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)
    return 0.5 * common.masked_mean(losses, mask), {"value/clipfrac": clipfrac}


def main():
    args = tyro.cli(Args)
    rank, world_size, device = run.setup_distributed(args.dist_timeout)
    run.check_batch_sizes(args, world_size, POSITIVE_FLAGS, NON_NEGATIVE_FLAGS)
    output_dir = args.output_dir or run.broadcast_object(f"runs/{args.exp_name}__{args.seed}__{int(time.time())}")
    run.check_output_dir(output_dir, args.resume)
    torch.manual_seed(args.seed)
    dtype = run.resolve_dtype(args.dtype, device)
    local_batch, local_mini_batch = args.rollout_batch_size // world_size, args.mini_batch_size // world_size
    num_iterations = args.total_episodes // args.rollout_batch_size

    # ---- tokenizer and data first: a bad dataset stops the run before any model is loaded
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code, args.chat_template)
    train_rows = data.load_rows(args.dataset, args.train_split)[0]  # strings, or message lists (conversational)
    eval_rows = data.load_rows(args.dataset, args.eval_split)[0][: args.eval_size]
    train_columns = scorers.dataset_columns(args, args.train_split, evaluation=False)  # what a scoring function reads
    eval_columns = scorers.dataset_columns(args, args.eval_split)[: args.eval_size]
    train_prompts = data.tokenize_prompts(tokenizer, train_rows, args.max_prompt_length)
    eval_prompts = data.tokenize_prompts(tokenizer, eval_rows, args.max_prompt_length)
    # Generation stops at EOS and at every end-of-turn token the checkpoint's generation_config.json lists.
    stop_ids = torch.tensor(data.stop_token_ids(args.model, tokenizer), device=device)
    # ---- models: the policy and pi_ref (None under LoRA: the policy with its adapter off), the value network (the
    # policy's backbone and a new head), the scorers (eval_score_fn: None without --eval-reward)
    policy, ref_policy = models.policy_and_reference(args, device, dtype)
    unwrapped_policy = models.unwrap(policy)
    value_model = models.value_network(args.model, "--model", args, device, dtype)
    score_fn, eval_score_fn = scorers.load_scorers(args, device, dtype)
    generation_config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        eos_token_id=stop_ids.tolist(),
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=args.stop_strings or None,
    )

    adamw = dict(betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    policy_optimizer = torch.optim.AdamW(models.trainable(policy), lr=args.lr, **adamw)
    value_optimizer = torch.optim.AdamW(models.trainable(value_model), lr=args.value_lr, **adamw)
    # The trained (model, optimizer) pairs are saved in every checkpoint and restored by --resume.
    trained = {"policy": (policy, policy_optimizer), "value_model": (value_model, value_optimizer)}
    score_stats = common.RunningMoments()
    kl_coef = args.kl_coef  # ALGO LOGIC: the adaptive KL controller's state
    start_iteration = 0
    if args.resume:
        checkpoint = checkpoints.load_checkpoint(output_dir, trained)  # (restores the trained models and optimizers)
        start_iteration = checkpoint["iteration"]
        kl_coef = checkpoint["kl_coef"]  # ALGO LOGIC
        score_stats.load_state_dict(checkpoint["score_stats"])
    run.barrier()  # every rank has checked the output directory before rank 0 creates it
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
    logger = run.Logger(output_dir, args, rank, num_iterations, start_iteration)

    @torch.no_grad()
    def logprobs_and_values(input_ids, attention_mask, responses, lengths=None, with_values=True):
        """The rollout-time log-probs of `responses` (the last columns of input_ids) under the policy and under pi_ref,
        and the values: no grad, in chunks, one model at a time (under --fsdp each model is gathered once per pass);
        `lengths`: the rollout's host copy of its row lengths (padding.RowLengths), for grouping rows by length."""
        chunk, temp = args.rollout_forward_batch_size, args.temperature
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, responses=responses, lengths=lengths)
        logprobs = common.chunked_logprobs(unwrapped_policy, **batch, temperature=temp, chunk_size=chunk, dtype=dtype)
        with models.reference_model(unwrapped_policy, ref_policy) as ref_model:
            ref_logprobs = common.chunked_logprobs(ref_model, **batch, temperature=temp, chunk_size=chunk, dtype=dtype)
        values = None
        if with_values:  # V(s_t) is read at the token before a_t.
            values = common.chunked_values(value_model, input_ids, attention_mask, responses.shape[1], chunk, dtype,
                                           lengths)  # fmt: skip
        return logprobs, ref_logprobs, values

    @torch.no_grad()
    def rollout(prompts: list[list[int]], rows: list, columns: list[dict]):
        """Sample one response per prompt with the KV cache; the rollout tensors and what the scorers read."""
        queries, query_mask = common.left_pad(prompts, tokenizer.pad_token_id, device)  # (B, P), left-padded
        with common.autocast(device, dtype):
            responses, response_mask = common.generate(
                unwrapped_policy, queries, query_mask, generation_config, args.rollout_forward_batch_size, tokenizer
            )  # (B, R), right-padded; the mask is 1 up to and including the first stop token
        if args.stop_strings:  # trlX's stop sequences: cut at the first, stripped, ended with EOS, re-tokenized
            responses, response_mask = data.cut_at_stop_strings(tokenizer, responses, response_mask, args.stop_strings)
        input_ids = torch.cat([queries, responses], 1)  # (B, P + R): the sequences every later pass reads
        attention_mask = torch.cat([query_mask, response_mask], 1)
        ended = torch.isin(responses, stop_ids).any(1)  # (B,): stopped by itself, not cut at --max-new-tokens
        lengths = padding.row_lengths(attention_mask, queries.shape[1])  # on the host: one read for every pass
        prompt_texts = data.scoring_prompts(tokenizer, queries, rows)  # what the scorers read
        response_texts = data.response_texts(tokenizer, queries, responses)
        return common.Rollout(
            input_ids, attention_mask, responses, response_mask, ended, lengths, prompt_texts, response_texts, columns
        )

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out prompts, sharded over ranks: RM and gold reward, KL to pi_ref, length, EOS rate, distinct-n."""
        torch.manual_seed(args.seed + rank)  # the same samples for the same policy
        shard = slice(rank, None, world_size)
        r = rollout(eval_prompts[shard], eval_rows[shard], eval_columns[shard])
        logprobs, ref_logprobs, _ = logprobs_and_values(
            r.input_ids, r.attention_mask, r.responses, r.lengths, with_values=False
        )
        kl = torch.where(r.response_mask, logprobs - ref_logprobs, 0.0)
        return run.evaluation_metrics(
            score_fn, eval_score_fn, r.prompt_texts, r.response_texts, r.ended, kl, r.response_mask, columns=r.columns,
            greedy=lambda: common.greedy_texts(unwrapped_policy, eval_prompts[shard], tokenizer, generation_config,
                                               args.rollout_forward_batch_size, dtype, args.stop_strings),
        )  # fmt: skip

    eval_metrics = {"eval/iteration": start_iteration, **evaluate()}
    if start_iteration == 0:  # the row of iteration 0 holds the evaluation of the initial (SFT) policy
        logger.log({"iteration": 0, "episodes": 0, **eval_metrics})
    for iteration in range(start_iteration + 1, num_iterations + 1):
        # All randomness of an iteration is a function of (seed, iteration, rank), so --resume repeats it exactly.
        torch.manual_seed(args.seed + 10_000 * iteration + rank)
        t_start, n = run.clock(device), args.rollout_batch_size
        # ---- rollout: sample responses to this rank's share of the prompts
        indices = data.prompt_indices(len(train_prompts), n, iteration - 1, args.seed, rank, world_size)
        r = rollout(*([x[i] for i in indices] for x in (train_prompts, train_rows, train_columns)))  # a common.Rollout
        t_generate = run.clock(device)

        # ---- score: rollout-time policy, reference and value passes (chunked, no grad), then the reward
        logprobs, ref_logprobs, values = logprobs_and_values(r.input_ids, r.attention_mask, r.responses, r.lengths)
        # a scorer's score of each (prompt, response): a reward model on its own tokenization and template, its EOS
        # after a response that ended (--reward-append-eos), read at the last token (--reward-score-at), or a
        # module:function scorer of the texts (plumbing/scorers.py defines the reward)
        scores = score_fn(r.prompt_texts, r.response_texts, r.ended, r.columns)
        scores = common.penalize_missing_eos(scores, r.ended, args.missing_eos_penalty)  # (and stop on NaN/inf)
        kl = torch.where(r.response_mask, logprobs - ref_logprobs, 0.0)  # k1 = log pi - log pi_ref per token
        # ALGO LOGIC: trlX reward: KL penalty on every token, score / running std at the last one
        score_stats.update(scores)  # the running statistics of the scores, this batch's (all ranks) included
        rewards = compute_rewards(scores, kl, r.response_mask, score_stats, kl_coef, args.reward_clip)
        advantages, returns = compute_advantages(rewards, values, r.response_mask, args.gamma, args.gae_lambda)
        rollout_stats = common.global_means(
            {
                "train/reward": scores,
                "train/kl": kl.sum(1),
                "train/kl_k3": ((-kl).exp() - 1 + kl).sum(1),
                "train/response_length": r.response_mask.sum(1),
                "train/missing_eos_rate": ~r.ended,
            }
        )
        # ALGO LOGIC: the KL controller's input; trlx adapts beta to it now, apa-authors after each minibatch
        kl_coef_used, kl_control_input = kl_coef, rollout_stats["train/kl"]
        if args.kl_control == "trlx":
            kl_coef = adaptive_kl_update(kl_coef, kl_control_input, args.kl_target, n, args.kl_horizon)
        else:  # a pass over every position of prompt and response (the log-probs of input_ids[:, 1:])
            every_logprob, every_ref_logprob, _ = logprobs_and_values(
                r.input_ids, r.attention_mask, r.input_ids[:, 1:], with_values=False
            )
            kl_control_input = authors_kl_input(
                every_logprob, every_ref_logprob, r.attention_mask, r.lengths, args.rollout_forward_batch_size,
                world_size,
            )  # fmt: skip
        t_score = run.clock(device)

        # ---- update: update_epochs passes of shuffled minibatches
        per_minibatch = []  # each minibatch's statistics on this rank (name -> token mean), reduced after the update
        permutations = [torch.randperm(local_batch) for _ in range(args.update_epochs)]  # (on the host)
        schedule = [p[i : i + local_mini_batch] for p in permutations for i in range(0, local_batch, local_mini_batch)]
        if args.kl_control == "apa-authors":  # ALGO LOGIC: their epochs are consecutive steps on each minibatch
            schedule = [minibatch for minibatch in schedule[: local_batch // local_mini_batch] for _ in permutations]
        # every minibatch's micro-batches, planned at once from the rollout's lengths (no read of the device here)
        for micro_batches in common.token_micro_batches(schedule, r.lengths, args.micro_batch_size):
            policy_optimizer.zero_grad(set_to_none=True)
            value_optimizer.zero_grad(set_to_none=True)
            minibatch_stats = {}
            # A loss is a token mean over the whole minibatch on all ranks, so each micro-batch's is weighted by its
            # share of those tokens (times the world size, as DDP averages over ranks: `loss_weight`). mb indexes its
            # rows and response columns, seq its rows and the columns they use, of which the first `context` are the
            # prompt's.
            for mb, seq, context, loss_weight, sync in micro_batches:
                mb_mask = r.response_mask[mb]
                with models.gradient_sync([policy, value_model], sync):
                    with common.autocast(device, dtype):
                        new_values = value_model(r.input_ids[seq], r.attention_mask[seq])[:, context - 1 : -1]
                        logits = common.response_logits(
                            policy, r.input_ids[seq], r.attention_mask[seq], context, args.temperature
                        )
                    new_logprobs = common.gather_logprobs(logits, r.responses[mb])
                    # ALGO LOGIC: clipped surrogate and clipped value loss
                    pg_loss, pg_stats = policy_loss(new_logprobs, logprobs[mb], advantages[mb], mb_mask, args.clip_eps)
                    vf_loss, vf_stats = value_loss(new_values, values[mb], returns[mb], mb_mask, args.value_clip)
                    (pg_loss * loss_weight).backward()
                    (args.vf_coef * vf_loss * loss_weight).backward()
                with torch.no_grad():  # rho = pi / pi_old is exactly 1 on the first minibatch.
                    log_ratio = new_logprobs.detach() - logprobs[mb]
                    mb_stats = {
                        "loss/policy": pg_loss,
                        "loss/value": vf_loss,
                        **pg_stats,
                        **vf_stats,
                        "policy/ratio": common.masked_mean(log_ratio.exp(), mb_mask),
                        "policy/abs_log_ratio": common.masked_mean(log_ratio.abs(), mb_mask),
                        "policy/approx_kl": common.masked_mean(log_ratio.exp() - 1 - log_ratio, mb_mask),
                        "policy/entropy": common.masked_mean(common.entropy_from_logits(logits.detach()), mb_mask),
                    }
                    for name, value in mb_stats.items():
                        minibatch_stats[name] = minibatch_stats.get(name, 0.0) + loss_weight * value.detach().float()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            policy_optimizer.step()
            torch.nn.utils.clip_grad_norm_(value_model.parameters(), args.max_grad_norm)
            value_optimizer.step()
            per_minibatch.append(minibatch_stats)
            if args.kl_control == "apa-authors" and len(per_minibatch) % args.update_epochs == 0:  # ALGO LOGIC
                # n: the minibatch on all ranks (trlX's n_steps is its per-process batch; the authors ran one process)
                kl_coef = adaptive_kl_update(
                    kl_coef, kl_control_input, args.kl_target, args.mini_batch_size, args.kl_horizon
                )
        names = list(per_minibatch[0])  # the statistics' names; (minibatches, K), averaged over ranks:
        stats = common.all_reduce_sum(torch.stack([torch.stack(list(m.values())) for m in per_minibatch])) / world_size
        if not torch.isfinite(stats).all():
            run.fail(f"NaN/inf loss at iteration {iteration}; stopped before checkpointing it; lower --lr")
        t_end = run.clock(device)

        # ---- log, evaluate, checkpoint
        # The explained variance of the returns by the rollout-time values, over the whole batch on all ranks.
        returns_mean = common.masked_mean(returns, r.response_mask, global_batch=True)
        returns_var = common.masked_mean((returns - returns_mean) ** 2, r.response_mask, global_batch=True)
        explained = 1 - common.masked_mean((returns - values) ** 2, r.response_mask, global_batch=True) / returns_var
        first = dict(zip(names, stats[0].tolist()))  # the first minibatch of the first epoch (ratio 1)
        row = {
            "iteration": iteration,
            "episodes": iteration * n,
            **rollout_stats,
            "train/reward_std": torch.tensor(run.all_gather_list(scores.tolist())).std().item(),
            "train/score_running_std": score_stats.std,
            "train/reward_truncated": getattr(score_fn, "num_truncated", 0),  # RM inputs cut to its max length
            "train/kl_coef": kl_coef_used,  # ALGO LOGIC: and what the controller was fed
            "train/kl_control_input": kl_control_input,
            **dict(zip(names, stats.mean(0).tolist())),
            "policy/ratio_first_mb": first["policy/ratio"],
            "policy/abs_log_ratio_first_mb": first["policy/abs_log_ratio"],
            "value/explained_variance": explained.item(),
            "value/mean": common.masked_mean(values, r.response_mask, global_batch=True).item(),
            "value/returns_mean": returns_mean.item(),
            "time/generate": t_generate - t_start,
            "time/score": t_score - t_generate,
            "time/update": t_end - t_score,
            "time/iteration": t_end - t_start,
            "time/samples_per_s": n / (t_end - t_start),
            "time/decode_steps": r.responses.shape[1],  # generation steps (longest response): bench/throughput.py
            "time/peak_memory_gb": run.peak_memory_gb(device),
            **padding.padding_fractions(),  # padding / computed tokens: generation, no-grad passes, update
        }
        if iteration % args.eval_every == 0 or iteration == num_iterations:
            eval_metrics = {"eval/iteration": iteration, **evaluate()}
        if iteration == num_iterations and torch.distributed.is_initialized():
            row["dist/max_param_difference"] = checkpoints.max_replica_difference(unwrapped_policy)
        logger.log({**row, **eval_metrics})
        if args.save_every and (iteration % args.save_every == 0 or iteration == num_iterations):
            state = {"iteration": iteration, "args": asdict(args), "score_stats": score_stats.state_dict()}
            state["kl_coef"] = kl_coef  # ALGO LOGIC: the adaptive KL controller's state
            checkpoints.save_checkpoint(output_dir, trained, state)

    checkpoints.save_final_policy(policy, tokenizer, output_dir, args)
    logger.close()
    run.close_distributed()


if __name__ == "__main__":
    main()
