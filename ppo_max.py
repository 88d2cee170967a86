"""PPO-max: "Secrets of RLHF in Large Language Models Part I: PPO" (Zheng et al. 2023, arXiv 2307.04964).

Shared by every online script: rollouts with the KV cache, reward-model scores
at the last real token, GAE (gamma 1, lambda 0.95) from a separate value network, advantages
whitened over the whole batch, then update epochs over shuffled minibatches.
PPO-max keeps PPO's clipped losses and changes the rest (defaults: the paper's recipe; `--recipe released`: the
MOSS-RLHF release, github.com/OpenLMLab/MOSS-RLHF train_ppo_en.sh: score / running_std, KL coef 0.01, no critic
warm-up, LR warm-up then inverse-sqrt decay; both use its AdamW; docs/algorithms.md, "PPO-max": what still differs):
    r_t = -eta k1_t + [t = last] clip((score - running_mean) / running_std, -delta, delta),  eta FIXED
    no advantage whitening (`--norm-adv` on), one gradient-norm clip over policy and critic together,
    critic initialised from the reward model, `--critic-warmup-steps`, one update epoch, PPO-ptx.

`diff ppo.py ppo_max.py` shows the components above: `# ALGO LOGIC:` blocks and lines, and the lines they govern
(the critic's path, AdamW's settings, the PPO-ptx micro-batches, the warm-up's optimizer step, the one clip).
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
    update_epochs: int = 1  # passes over each rollout batch (ALGO LOGIC: a small experience buffer, used once)
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
    weight_decay: float = 0.0  # AdamW weight decay (ALGO LOGIC: the MOSS-RLHF release's 0; the paper gives none)
    max_grad_norm: float = 1.0  # gradient clipping by global norm, one norm over policy and critic together
    gamma: float = 1.0  # discount
    gae_lambda: float = 0.95  # GAE lambda
    # ---- ALGO LOGIC: PPO-max's hyper-parameters
    recipe: Literal["paper", "released"] = "paper"
    """paper: (score - running mean) / running std clipped to +-reward_clip; released: score / running std"""
    kl_coef: float | None = None  # fixed token-level KL penalty coefficient eta (default: 0.05 paper, 0.01 released)
    reward_clip: float = 0.8  # delta, the clip of normalised scores (paper: 0.3 or 0.8; not used by --recipe released)
    clip_eps: float = 0.2  # policy ratio clip range
    value_clip: float = 0.2  # value clip range around the rollout-time values
    vf_coef: float = 1.0  # value loss weight
    norm_adv: bool = False  # whiten advantages over the batch (off in PPO-max)
    critic_model: str = ""  # the critic's initial weights (default: the reward model; needs the policy's tokenizer)
    critic_warmup_steps: int | None = None  # first rollout batches train only the critic (default: 4 paper, 0 released)
    lr_warmup_steps: int = 100  # released recipe: LR warm-up steps (linear from 0.1 lr), then lr x sqrt(warmup / step)
    ptx_coef: float = 0.0  # PPO-ptx: weight of the token-mean NLL of the dataset's chosen responses in the policy loss
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


# ALGO LOGIC: the ranges of PPO-max's own flags (plumbing/run.py checks those every script shares)
POSITIVE_FLAGS = "reward_clip clip_eps value_clip lr_warmup_steps"
NON_NEGATIVE_FLAGS = "kl_coef critic_warmup_steps vf_coef ptx_coef"


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


def compute_advantages(rewards, values, mask, gamma: float, gae_lambda: float, norm_adv: bool):
    """GAE advantages, whitened over every rank's real tokens only with --norm-adv (ALGO LOGIC), and the returns."""
    advantages, returns = compute_gae(rewards, values, mask, gamma, gae_lambda)
    return (common.masked_whiten(advantages, mask) if norm_adv else advantages), returns


# ALGO LOGIC: the pieces of PPO-max, as plain functions the tests import
def normalize_scores(scores, score_stats, recipe: str, reward_clip: float):
    """Paper eq. (18): normalised by the running statistics (this batch's included), then clipped."""
    if recipe == "released":  # the MOSS-RLHF scripts: no mean, no clip
        return scores / score_stats.std
    return ((scores - score_stats.mean) / score_stats.std).clamp(-reward_clip, reward_clip)


def compute_rewards(scores, kl, mask, score_stats, kl_coef: float, recipe: str, reward_clip: float):
    """A FIXED token-level KL penalty -eta k1 on every response token, plus the normalised score at the last real
    token (the EOS when there is one)."""
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    scaled_scores = normalize_scores(scores, score_stats, recipe, reward_clip)
    rewards[torch.arange(len(scores), device=mask.device), mask.sum(1) - 1] += scaled_scores
    return rewards


def lr_factor(step: int, recipe: str, warmup: int) -> float:
    """The LR multiplier at optimizer step `step` (from 0): constant in the paper; the MOSS-RLHF release warms up
    linearly from 0.1 over `warmup` steps, then decays as 1 / sqrt(step)."""
    if recipe == "paper":
        return 1.0
    return max(step / warmup, 0.1) if step < warmup else (warmup / step) ** 0.5


def ptx_loss(logprobs, mask):
    """PPO-ptx: token-mean negative log-likelihood of SFT responses."""
    return common.masked_mean(-logprobs, mask)


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


def check_same_tokenizer(tokenizer, path: str, flag: str, trust_remote_code: bool):
    """The critic starts as the reward model but reads the policy's token ids: it needs the policy's vocabulary."""
    if scorers.is_scoring_function(path):
        run.fail(f"{flag} '{path}' is a scoring function, not a model; pass a --critic-model path or hub name")
    if models.load_tokenizer(path, trust_remote_code).get_vocab() != tokenizer.get_vocab():
        run.fail(f"{flag} '{path}' does not share the tokenizer of --model; pass a --critic-model that does")


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
    critic_path = args.critic_model or args.reward_model  # ALGO LOGIC: the critic starts as the reward model
    check_same_tokenizer(tokenizer, critic_path, "--critic-model", args.trust_remote_code)
    train_rows, sft_responses = data.load_rows(args.dataset, args.train_split)  # strings, or message lists
    eval_rows = data.load_rows(args.dataset, args.eval_split)[0][: args.eval_size]
    train_columns = scorers.dataset_columns(args, args.train_split, evaluation=False)  # what a scoring function reads
    eval_columns = scorers.dataset_columns(args, args.eval_split)[: args.eval_size]
    train_prompts = data.tokenize_prompts(tokenizer, train_rows, args.max_prompt_length)
    eval_prompts = data.tokenize_prompts(tokenizer, eval_rows, args.max_prompt_length)
    # Generation stops at EOS and at every end-of-turn token the checkpoint's generation_config.json lists.
    stop_ids = torch.tensor(data.stop_token_ids(args.model, tokenizer), device=device)
    if args.ptx_coef > 0:  # ALGO LOGIC: PPO-ptx data, the dataset's chosen responses ending in a stop token
        if sft_responses is None or None in sft_responses:
            run.fail(f"--ptx-coef needs responses: --dataset '{args.dataset}' has no 'chosen' column or assistant turn")
        # one longer than --max-new-tokens is cut there and keeps no stop token, like a sample cut there
        sft_responses = [
            ids[: args.max_new_tokens]
            for ids in data.tokenize_responses(tokenizer, train_rows, sft_responses, stop_ids.tolist())
        ]
        sft_lengths = torch.tensor([len(ids) for ids in sft_responses])  # (on the host)
    # ---- models: the policy and pi_ref (None under LoRA: the policy with its adapter off), the critic (ALGO LOGIC:
    # the reward model's backbone and head), the scorers (eval_score_fn: None without --eval-reward)
    policy, ref_policy = models.policy_and_reference(args, device, dtype)
    unwrapped_policy = models.unwrap(policy)
    value_model = models.value_network(critic_path, "--critic-model", args, device, dtype)
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
    # ALGO LOGIC: the MOSS-RLHF release's AdamW eps, 1e-6 for the policy (the critic: 1e-8; the paper gives neither)
    policy_optimizer = torch.optim.AdamW(models.trainable(policy), lr=args.lr, eps=1e-6, **adamw)
    value_optimizer = torch.optim.AdamW(models.trainable(value_model), lr=args.value_lr, **adamw)
    # The trained (model, optimizer) pairs are saved in every checkpoint and restored by --resume.
    trained = {"policy": (policy, policy_optimizer), "value_model": (value_model, value_optimizer)}
    score_stats = common.RunningMoments()
    kl_coef = args.kl_coef if args.kl_coef is not None else {"paper": 0.05, "released": 0.01}[args.recipe]  # ALGO LOGIC
    warmup = {"paper": 4, "released": 0}[args.recipe]
    critic_warmup_steps = args.critic_warmup_steps if args.critic_warmup_steps is not None else warmup
    start_iteration = 0
    if args.resume:
        checkpoint = checkpoints.load_checkpoint(output_dir, trained)  # (restores the trained models and optimizers)
        start_iteration = checkpoint["iteration"]
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
        # ALGO LOGIC: PPO-max reward: fixed KL penalty on every token, normalised, clipped score at the last one
        score_stats.update(scores)  # the running statistics of the scores, this batch's (all ranks) included
        rewards = compute_rewards(scores, kl, r.response_mask, score_stats, kl_coef, args.recipe, args.reward_clip)
        advantages, returns = compute_advantages(
            rewards, values, r.response_mask, args.gamma, args.gae_lambda, args.norm_adv
        )
        rollout_stats = common.global_means(
            {
                "train/reward": scores,
                "train/kl": kl.sum(1),
                "train/kl_k3": ((-kl).exp() - 1 + kl).sum(1),
                "train/response_length": r.response_mask.sum(1),
                "train/missing_eos_rate": ~r.ended,
            }
        )
        train_policy = iteration > critic_warmup_steps  # ALGO LOGIC: critic warm-up first
        t_score = run.clock(device)

        # ---- update: update_epochs passes of shuffled minibatches
        per_minibatch = []  # each minibatch's statistics on this rank (name -> token mean), reduced after the update
        permutations = [torch.randperm(local_batch) for _ in range(args.update_epochs)]  # (on the host)
        schedule = [p[i : i + local_mini_batch] for p in permutations for i in range(0, local_batch, local_mini_batch)]
        # every minibatch's micro-batches, planned at once from the rollout's lengths (no read of the device here)
        for micro_batches in common.token_micro_batches(schedule, r.lengths, args.micro_batch_size):
            policy_optimizer.zero_grad(set_to_none=True)
            value_optimizer.zero_grad(set_to_none=True)
            minibatch_stats = {}
            ptx_micro_batches = [(None, 0.0, None)] * len(micro_batches)
            if args.ptx_coef > 0:  # ALGO LOGIC: PPO-ptx rows for this step, drawn the same for any number of ranks
                generator = torch.Generator().manual_seed(args.seed + 10_000 * iteration + len(per_minibatch))
                ptx_rows = torch.randint(len(sft_responses), (args.mini_batch_size,), generator=generator)
                # (this rank's share of those rows, each micro-batch's share of their tokens)
                ptx_micro_batches = common.micro_batches(ptx_rows, sft_lengths, parts=len(micro_batches))
            # A loss is a token mean over the whole minibatch on all ranks, so each micro-batch's is weighted by its
            # share of those tokens (times the world size, as DDP averages over ranks: `loss_weight`). mb indexes its
            # rows and response columns, seq its rows and the columns they use, of which the first `context` are the
            # prompt's.
            for (mb, seq, context, loss_weight, sync), (ptx_mb, ptx_weight, _) in zip(micro_batches, ptx_micro_batches):
                mb_mask = r.response_mask[mb]
                with models.gradient_sync([policy, value_model], sync):
                    with common.autocast(device, dtype):
                        new_values = value_model(r.input_ids[seq], r.attention_mask[seq])[:, context - 1 : -1]
                        logits = common.response_logits(
                            policy, r.input_ids[seq], r.attention_mask[seq], context, args.temperature
                        )
                    new_logprobs = common.gather_logprobs(logits, r.responses[mb])
                    # ALGO LOGIC: clipped surrogate (+ PPO-ptx) and clipped value loss; one gradient clip over both
                    pg_loss, pg_stats = policy_loss(new_logprobs, logprobs[mb], advantages[mb], mb_mask, args.clip_eps)
                    vf_loss, vf_stats = value_loss(new_values, values[mb], returns[mb], mb_mask, args.value_clip)
                    ptx = 0.0
                    if args.ptx_coef > 0:  # a token mean over the step's SFT rows: weighted by its own share of them
                        k = ptx_mb.tolist()
                        ptx_ids, ptx_attention, ptx_context, ptx_tokens, ptx_mask, _ = common.pad_pairs(
                            [train_prompts[i] for i in k], [sft_responses[i] for i in k], tokenizer.pad_token_id, device
                        )
                        with common.autocast(device, dtype), torch.set_grad_enabled(train_policy):  # T = 1: SFT NLL
                            ptx_logits = common.response_logits(policy, ptx_ids, ptx_attention, ptx_context, 1.0)
                        ptx = ptx_loss(common.gather_logprobs(ptx_logits, ptx_tokens), ptx_mask)
                        minibatch_stats["loss/ptx"] = minibatch_stats.get("loss/ptx", 0.0) + ptx_weight * ptx.detach()
                    loss = ((pg_loss if train_policy else 0.0) + args.vf_coef * vf_loss) * loss_weight
                    (loss + args.ptx_coef * ptx * ptx_weight).backward()
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
            torch.nn.utils.clip_grad_norm_([*policy.parameters(), *value_model.parameters()], args.max_grad_norm)
            step = (iteration - 1) * len(schedule) + len(per_minibatch)  # optimizer steps so far
            for optimizer, lr in [(policy_optimizer, args.lr), (value_optimizer, args.value_lr)]:  # ALGO LOGIC
                optimizer.param_groups[0]["lr"] = lr * lr_factor(step, args.recipe, args.lr_warmup_steps)
            if train_policy:
                policy_optimizer.step()
            value_optimizer.step()
            per_minibatch.append(minibatch_stats)
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
            "train/lr": policy_optimizer.param_groups[0]["lr"],
            "train/kl_coef": kl_coef,  # ALGO LOGIC: PPO-max monitoring: collapse = length up, perplexity down, KL up
            "train/perplexity": common.masked_mean(-logprobs, r.response_mask, global_batch=True).exp().item(),
            "train/ref_perplexity": common.masked_mean(-ref_logprobs, r.response_mask, global_batch=True).exp().item(),
            "value/advantages_mean": common.masked_mean(advantages, r.response_mask, global_batch=True).item(),
            "value/advantages_abs_max": common.all_reduce_max(
                torch.where(r.response_mask, advantages.abs(), 0.0).max()
            ).item(),
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
            checkpoints.save_checkpoint(output_dir, trained, state)

    checkpoints.save_final_policy(policy, tokenizer, output_dir, args)
    logger.close()
    run.close_distributed()


if __name__ == "__main__":
    main()
