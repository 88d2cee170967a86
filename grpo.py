"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath, Section 4.1), critic-free.

ppo.py's rollout with --group-size K responses to each prompt (a group; every group on one rank), the reward
model's score of each, and no value network, no GAE and no KL in the reward. With r_i the score of response i of
its group g (outcome supervision, Section 4.1.2), d_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t), rho_t = pi / pi_old:
    A_i = (r_i - mean_g r) / (std_g r + 1e-4)  on every token of response i   (--scale-rewards group)
          (r_i - mean_g r) / (std of the batch's r + 1e-4)                     (batch)
          r_i - mean_g r                                                        (none: Dr. GRPO, Liu et al. 2025)
    l_t = max(-A_i rho_t, -A_i clip(rho_t, 1 - eps, 1 + eps_high)) + beta kl_t
          (eps_high > eps: DAPO's clip-higher, Yu et al. 2025, Section 3.1; --ratio-level sequence: GSPO, Zheng et
          al. 2025, eq. 7, rho_t replaced by the response's exp(mean_t log rho_t), clipped per response)
    L = (1/N) sum_i (1/|y_i|) sum_t l_t        (--loss-agg seq-mean: eq. 3 as published)
        (1/sum_i |y_i|) sum_i sum_t l_t        (token-mean: DAPO, Section 3.3)
        (1/(N T_max)) sum_i sum_t l_t          (constant: Dr. GRPO; T_max = --max-new-tokens)
over the N responses of a minibatch on all ranks. seq-mean weighs a token by 1/|y_i|: a short response's tokens
count more than a long one's, which is the length bias Dr. GRPO removes. The KL term kl_t (--kl-term) is a loss
differentiated through pi, so what matters is its gradient, not only its value (E: the expectation over samples
of pi_old, each option's expected gradient; tests/test_grpo_rloo.py enumerates them on a small policy):
    k3-ratio  rho_t (e^-d_t + d_t - 1)   grad KL(pi || pi_ref), the reverse KL the objective names, on- and
                                          off-policy (DeepSeek-V3.2, arXiv 2512.02556)
    k3        e^-d_t + d_t - 1            grad KL(pi_ref || pi), the forward KL: eq. 4 as published (an unbiased
                                          estimate of the reverse KL's value, not of its gradient)
    k2        d_t^2 / 2                   grad KL(pi || pi_ref) on-policy only (rho = 1)
each per state: the KL of pi(.|s_t) to pi_ref(.|s_t) at the states the rollout visited (the state distribution's
own dependence on pi is not differentiated, as in every per-token KL loss; rloo.py's KL in the reward is).

`diff ppo.py grpo.py` shows the value network, GAE and the KL controller removed, the groups in the rollout, the
group advantages and the loss with its aggregation; `diff grpo.py rloo.py` shows RLOO's leave-one-out baseline.
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
    model: str = "toy/policy"  # policy to train (hub name or path); also pi_ref
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
    rollout_batch_size: int = 64  # responses per iteration (prompts x --group-size, whole groups per rank), all ranks
    mini_batch_size: int = 16  # responses per gradient step, summed over all ranks
    update_epochs: int = 2  # passes over each rollout batch
    rollout_forward_batch_size: int = 64  # chunk size of the no-grad generation, reference and reward passes
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
    lr: float = 3e-4  # policy learning rate (toy default; DeepSeekMath's GRPO: 1e-6 on a 7B model)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay (torch's default)
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    # ---- ALGO LOGIC: GRPO's hyper-parameters
    group_size: int = 4  # K responses sampled per prompt (DeepSeekMath: 64); at least 2
    scale_rewards: Literal["group", "batch", "none"] = "group"  # divide A by the group's std, the batch's, or not
    loss_agg: Literal["seq-mean", "token-mean", "constant"] = "seq-mean"
    """the loss's mean over a minibatch's N responses: seq-mean, of each response's token mean (GRPO eq. 3: a short
    response's tokens weigh more); token-mean, over all their tokens (DAPO); constant, their token sum divided by
    N times the maximum new tokens (Dr. GRPO: no length bias)"""
    kl_coef: float = 0.04  # beta of the KL loss term (DeepSeekMath: 0.04); 0 = no reference pass in training
    kl_term: Literal["k3-ratio", "k3", "k2"] = "k3-ratio"
    """the KL loss term per token, d = log pi - log pi_ref, rho = pi / pi_old; its expected gradient:
    k3-ratio, rho (e^-d + d - 1): the reverse KL(pi || pi_ref)'s, on- and off-policy (DeepSeek-V3.2);
    k3, e^-d + d - 1 (DeepSeekMath eq. 4 as published): the forward KL(pi_ref || pi)'s;
    k2, d^2 / 2: the reverse KL's on-policy only"""
    ratio_level: Literal["token", "sequence"] = "token"
    """the importance ratio the surrogate clips: per token (GRPO), or per response, exp(mean_t log rho_t) (GSPO,
    Zheng et al. 2025; its paper clips it at --clip-eps 3e-4 --clip-eps-high 4e-4)"""
    clip_eps: float = 0.2  # policy ratio clip range, below (and above unless --clip-eps-high)
    clip_eps_high: float = 0.0  # the ratio's upper clip, 1 + this (DAPO: 0.28); 0 = --clip-eps
    # ---- LoRA and scale (README: Scaling to real models; docs/scale.md)
    use_lora: bool = False  # train a LoRA adapter on the frozen policy; pi_ref is the policy with its adapter off
    lora_r: int = 16  # LoRA rank
    lora_alpha: float = 0.0  # LoRA alpha: the adapter's output is scaled by alpha / r (0 = 2 x --lora-r)
    lora_dropout: float = 0.0  # dropout on the adapter's input, in the training forward only (QLoRA's recipe: 0.1)
    micro_batch_size: int = 0  # rows per forward/backward per rank; a minibatch's gradients add up over them (0 = all)
    dist_timeout: float = 60  # minutes a rank waits for the others in a collective (a 6.9B save takes minutes)
    fsdp: bool = False  # shard every model over the ranks with FSDP2; weights are gathered once per no-grad pass
    activation_checkpointing: bool = False  # recompute decoder layers' activations in backward instead of storing them
    num_layers_unfrozen: int = -1  # train only the top N decoder layers, final norm and head; -1 = all
    # ---- evaluation, checkpoints and logging
    eval_every: int = 16  # evaluate every N iterations (and before the first and after the last)
    eval_size: int = 128  # number of held-out prompts to evaluate on
    save_every: int = 16  # checkpoint every N iterations (and at the end); 0 = never (the run cannot be resumed)
    track: bool = False  # log to Weights & Biases
    wandb_project: str = "rlhf-reference"  # wandb project name
    push_to_hub: str = ""  # at the end, upload policy/ (and adapter/) to this hub repository, e.g. me/ppo-1b


# ALGO LOGIC: the ranges of GRPO's own flags (plumbing/run.py checks those every script shares)
POSITIVE_FLAGS = "clip_eps"
NON_NEGATIVE_FLAGS = "kl_coef clip_eps_high"


def check_groups(args, world_size: int):
    """Every group on one rank: K >= 2 and each rank's share of the rollout a whole number of groups."""
    if args.group_size < 2:
        run.fail(f"--group-size {args.group_size}: a group needs at least 2 responses to compare; pass 2 or more")
    if (args.rollout_batch_size // world_size) % args.group_size:
        run.fail(f"--rollout-batch-size {args.rollout_batch_size} is not {world_size} rank(s) x whole groups of "
                 f"--group-size {args.group_size}; make it a multiple of {world_size * args.group_size}")  # fmt: skip


# ALGO LOGIC: the pieces of GRPO, as plain functions the tests import
def group_advantages(scores, group_size: int, scale_rewards: str):
    """(B,) advantages of responses in consecutive groups of `group_size`: the score less its group's mean, divided
    by the group's std (unbiased, as torch.std), the whole batch's std on all ranks, or nothing. A group whose scores
    are all equal gets A = 0: no gradient from the surrogate, and no NaN."""
    grouped = scores.view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale_rewards == "group":
        return centred / (grouped.std(1).repeat_interleave(group_size) + 1e-4)
    if scale_rewards == "batch":  # one all-reduce of float64 sums over every rank's responses
        x = scores.double()
        total, squares, n = common.all_reduce_sum(torch.stack([x.sum(), (x**2).sum(), x.new_tensor(len(x))])).tolist()
        return centred / ((max(squares - total**2 / n, 0.0) / max(n - 1, 1)) ** 0.5 + 1e-4)
    return centred


def k3(logprobs, ref_logprobs):
    """DeepSeekMath's KL estimator (eq. 4): pi_ref/pi - log(pi_ref/pi) - 1 per token, >= 0."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - log_ratio - 1


def kl_loss(logprobs, old_logprobs, ref_logprobs, kl_term: str):
    """The per-token KL loss term of --kl-term (the docstring above gives each one's gradient)."""
    if kl_term == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kl_term == "k3-ratio":  # the ratio is differentiated too: that is what makes the gradient the reverse KL's
        return torch.exp(logprobs - old_logprobs) * k3(logprobs, ref_logprobs)
    return k3(logprobs, ref_logprobs)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float, clip_eps_high: float, ratio_level: str):
    """Per-token clipped surrogate, ratio clipped to [1 - eps, 1 + eps_high]: each token's own ratio, or (GSPO,
    eq. 7) its response's exp(mean_t log rho_t) on all its tokens; returns (losses, clipped)."""
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        log_ratio = torch.where(mask, log_ratio, 0.0).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        log_ratio = log_ratio.expand_as(logprobs)
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps_high)
    losses = torch.max(-advantages * ratio, -advantages * clipped_ratio)
    return losses, (-advantages * clipped_ratio > -advantages * ratio)


def aggregate(losses, mask, loss_agg: str, loss_weight, n_sequences: int, max_new_tokens: int, world_size: int):
    """This micro-batch's part of the minibatch loss (whose N = `n_sequences` responses lie on every rank): with
    `loss_weight` (its share of the minibatch's response tokens, x world size) and the world size, as DDP averages
    gradients over ranks, any split into ranks and micro-batches gives the same update."""
    if loss_agg == "token-mean":
        return common.masked_mean(losses, mask) * loss_weight
    if loss_agg == "seq-mean":
        per_sequence = torch.where(mask, losses, 0.0).sum(1) / mask.sum(1).clamp(min=1)
        return per_sequence.sum() * world_size / n_sequences
    return common.masked_sum(losses, mask) * world_size / (n_sequences * max_new_tokens)


def main():
    args = tyro.cli(Args)
    rank, world_size, device = run.setup_distributed(args.dist_timeout)
    run.check_batch_sizes(args, world_size, POSITIVE_FLAGS, NON_NEGATIVE_FLAGS)
    check_groups(args, world_size)  # ALGO LOGIC
    output_dir = args.output_dir or run.broadcast_object(f"runs/{args.exp_name}__{args.seed}__{int(time.time())}")
    run.check_output_dir(output_dir, args.resume)
    torch.manual_seed(args.seed)
    dtype = run.resolve_dtype(args.dtype, device)
    local_batch, local_mini_batch = args.rollout_batch_size // world_size, args.mini_batch_size // world_size
    clip_eps_high = args.clip_eps_high or args.clip_eps  # ALGO LOGIC
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
    # ---- models: the policy and pi_ref (None under LoRA: the policy with its adapter off), the scorers
    # (eval_score_fn: None without --eval-reward); no value network
    policy, ref_policy = models.policy_and_reference(args, device, dtype)
    unwrapped_policy = models.unwrap(policy)
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
    # The trained (model, optimizer) pairs are saved in every checkpoint and restored by --resume.
    trained = {"policy": (policy, policy_optimizer)}
    start_iteration = 0
    if args.resume:
        checkpoint = checkpoints.load_checkpoint(output_dir, trained)  # (restores the trained models and optimizers)
        start_iteration = checkpoint["iteration"]
    run.barrier()  # every rank has checked the output directory before rank 0 creates it
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
    logger = run.Logger(output_dir, args, rank, num_iterations, start_iteration)

    @torch.no_grad()
    def logprobs_and_reference(input_ids, attention_mask, responses, lengths=None, with_reference=True):
        """The rollout-time log-probs of `responses` (the last columns of input_ids) under the policy and under pi_ref
        (None without): no grad, in chunks, one model at a time (under --fsdp each model is gathered once per pass);
        `lengths`: the rollout's host copy of its row lengths (padding.RowLengths), for grouping rows by length."""
        chunk, temp = args.rollout_forward_batch_size, args.temperature
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, responses=responses, lengths=lengths)
        logprobs = common.chunked_logprobs(unwrapped_policy, **batch, temperature=temp, chunk_size=chunk, dtype=dtype)
        ref_logprobs = None
        if with_reference:
            with models.reference_model(unwrapped_policy, ref_policy) as ref_model:
                ref_logprobs = common.chunked_logprobs(
                    ref_model, **batch, temperature=temp, chunk_size=chunk, dtype=dtype
                )
        return logprobs, ref_logprobs

    @torch.no_grad()
    def rollout(prompts: list[list[int]], rows: list, columns: list[dict]):
        """Sample one response per prompt (a group: K copies of it) with the KV cache; the rollout tensors and what the
        scorers read."""
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
        logprobs, ref_logprobs = logprobs_and_reference(r.input_ids, r.attention_mask, r.responses, r.lengths)
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
        # ---- rollout: sample a group of K responses to each prompt of this rank's share (ALGO LOGIC)
        prompts = n // args.group_size  # ALGO LOGIC: a group is K consecutive rows, on one rank
        indices = data.prompt_indices(len(train_prompts), prompts, iteration - 1, args.seed, rank, world_size)
        indices = [i for i in indices for _ in range(args.group_size)]
        r = rollout(*([x[i] for i in indices] for x in (train_prompts, train_rows, train_columns)))  # a common.Rollout
        t_generate = run.clock(device)

        # ---- score: rollout-time policy and reference passes (chunked, no grad; pi_ref only for a KL term), the score
        logprobs, ref_logprobs = logprobs_and_reference(
            r.input_ids, r.attention_mask, r.responses, r.lengths, with_reference=args.kl_coef > 0
        )
        # a scorer's score of each (prompt, response): a reward model on its own tokenization and template, its EOS
        # after a response that ended (--reward-append-eos), read at the last token (--reward-score-at), or a
        # module:function scorer of the texts (plumbing/scorers.py defines the reward)
        raw_scores = score_fn(r.prompt_texts, r.response_texts, r.ended, r.columns)
        scores = common.penalize_missing_eos(raw_scores, r.ended, args.missing_eos_penalty)  # (and stop on NaN/inf)
        # ALGO LOGIC: the group-relative advantage of each response, on every one of its tokens
        advantages = group_advantages(scores, args.group_size, args.scale_rewards)[:, None].expand_as(logprobs)
        per_response = {
            "train/reward": scores,
            "train/response_length": r.response_mask.sum(1),
            "train/missing_eos_rate": ~r.ended,
            "train/advantage_abs": advantages[:, 0].abs(),
            "train/zero_std_groups": (scores.view(-1, args.group_size).std(1) == 0).repeat_interleave(args.group_size),
        }  # (zero_std_groups: the groups whose rewards are all equal, which give no signal)
        if run.is_checker(score_fn, device):  # 0/1 rewards: the mean accuracy of the groups
            per_response["train/accuracy"] = raw_scores
        if ref_logprobs is not None:
            kl = torch.where(r.response_mask, logprobs - ref_logprobs, 0.0)  # k1 = log pi - log pi_ref per token
            per_response.update({"train/kl": kl.sum(1), "train/kl_k3": k3(logprobs, ref_logprobs).sum(1)})
        rollout_stats = common.global_means(per_response)
        t_score = run.clock(device)

        # ---- update: update_epochs passes of shuffled minibatches
        per_minibatch = []  # each minibatch's statistics on this rank (name -> token mean), reduced after the update
        permutations = [torch.randperm(local_batch) for _ in range(args.update_epochs)]  # (on the host)
        schedule = [p[i : i + local_mini_batch] for p in permutations for i in range(0, local_batch, local_mini_batch)]
        # every minibatch's micro-batches, planned at once from the rollout's lengths (no read of the device here)
        for micro_batches in common.token_micro_batches(schedule, r.lengths, args.micro_batch_size):
            policy_optimizer.zero_grad(set_to_none=True)
            minibatch_stats = {}
            # The loss is a mean over the whole minibatch on all ranks (aggregate: per --loss-agg), its statistics token
            # means, weighted by each micro-batch's share of the tokens (times the world size, as DDP averages over
            # ranks: `loss_weight`). mb indexes its rows and response columns, seq its rows and the columns they use, of
            # which the first `context` are the prompt's.
            for mb, seq, context, loss_weight, sync in micro_batches:
                mb_mask = r.response_mask[mb]
                with models.gradient_sync([policy], sync):
                    with common.autocast(device, dtype):
                        logits = common.response_logits(
                            policy, r.input_ids[seq], r.attention_mask[seq], context, args.temperature
                        )
                    new_logprobs = common.gather_logprobs(logits, r.responses[mb])
                    # ALGO LOGIC: clipped surrogate plus beta times the KL term per token, aggregated as --loss-agg says
                    pg_losses, clipped = policy_loss(
                        new_logprobs, logprobs[mb], advantages[mb], mb_mask, args.clip_eps, clip_eps_high,
                        args.ratio_level,
                    )  # fmt: skip
                    kl_losses = (
                        kl_loss(new_logprobs, logprobs[mb], ref_logprobs[mb], args.kl_term)
                        if args.kl_coef
                        else torch.zeros_like(pg_losses)
                    )
                    loss = aggregate(
                        pg_losses + args.kl_coef * kl_losses, mb_mask, args.loss_agg, loss_weight,
                        args.mini_batch_size, args.max_new_tokens, world_size,
                    )  # fmt: skip
                    loss.backward()
                with torch.no_grad():  # rho = pi / pi_old is exactly 1 on the first minibatch.
                    log_ratio = new_logprobs.detach() - logprobs[mb]
                    mb_stats = {
                        "loss/policy": common.masked_mean(pg_losses.detach(), mb_mask),  # (token means)
                        "loss/kl": common.masked_mean(kl_losses.detach(), mb_mask),
                        "policy/clipfrac": common.masked_mean(clipped.float(), mb_mask),
                        "policy/ratio": common.masked_mean(log_ratio.exp(), mb_mask),
                        "policy/abs_log_ratio": common.masked_mean(log_ratio.abs(), mb_mask),
                        "policy/approx_kl": common.masked_mean(log_ratio.exp() - 1 - log_ratio, mb_mask),
                        "policy/entropy": common.masked_mean(common.entropy_from_logits(logits.detach()), mb_mask),
                    }
                    for name, value in mb_stats.items():
                        minibatch_stats[name] = minibatch_stats.get(name, 0.0) + loss_weight * value.detach().float()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            policy_optimizer.step()
            per_minibatch.append(minibatch_stats)
        names = list(per_minibatch[0])  # the statistics' names; (minibatches, K), averaged over ranks:
        stats = common.all_reduce_sum(torch.stack([torch.stack(list(m.values())) for m in per_minibatch])) / world_size
        if not torch.isfinite(stats).all():
            run.fail(f"NaN/inf loss at iteration {iteration}; stopped before checkpointing it; lower --lr")
        t_end = run.clock(device)

        # ---- log, evaluate, checkpoint
        first = dict(zip(names, stats[0].tolist()))  # the first minibatch of the first epoch (ratio 1)
        row = {
            "iteration": iteration,
            "episodes": iteration * n,
            **rollout_stats,
            "train/reward_std": torch.tensor(run.all_gather_list(scores.tolist())).std().item(),
            "train/reward_truncated": getattr(score_fn, "num_truncated", 0),  # RM inputs cut to its max length
            **dict(zip(names, stats.mean(0).tolist())),
            "policy/ratio_first_mb": first["policy/ratio"],
            "policy/abs_log_ratio_first_mb": first["policy/abs_log_ratio"],
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
            state = {"iteration": iteration, "args": asdict(args)}
            checkpoints.save_checkpoint(output_dir, trained, state)

    checkpoints.save_final_policy(policy, tokenizer, output_dir, args)
    logger.close()
    run.close_distributed()


if __name__ == "__main__":
    main()
