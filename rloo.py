"""RLOO: REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019), critic-free.

grpo.py's rollout (--group-size K responses to each prompt, every group on one rank) and no value network, with
the KL to pi_ref back in the reward as in ppo.py (but at a fixed beta, and summed over the response: the whole
response is one action) and REINFORCE on the sequence's log-prob. With k1_t = log pi_old(a_t|s_t) -
log pi_ref(a_t|s_t) and response i of a group g of K:
    R_i = score_i - beta sum_t k1_t
    A_i = R_i - (1/(K - 1)) sum_{j in g, j != i} R_j        (the leave-one-out baseline: unbiased)
    L = -(1/N) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i),  rho_i = pi(y_i|x_i) / pi_old(y_i|x_i)
over the N responses of a minibatch on all ranks. On the first minibatch rho_i = 1 and the gradient is exactly
REINFORCE's, -(1/N) sum_i A_i grad log pi(y_i|x_i) (the paper's on-policy update). Later minibatches and
--update-epochs reuse samples of a policy a few steps old: the sequence's importance ratio corrects for that, and
its clip (as PPO's, per response: TRL's RLOOTrainer) bounds the step.

`diff grpo.py rloo.py` shows the reward (KL in it, not a loss term), the leave-one-out baseline in place of the
group's normalised score, and the sequence-level REINFORCE loss in place of the clipped, aggregated surrogate.
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
    lr: float = 3e-4  # policy learning rate (toy default; real models train near 1e-6)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay (torch's default)
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    # ---- ALGO LOGIC: RLOO's hyper-parameters
    group_size: int = 4  # K responses sampled per prompt (the paper: 2 to 4); at least 2
    kl_coef: float = 0.2  # fixed beta of the sequence KL penalty in the reward (toy default); 0 = no reference pass
    clip_eps: float = 0.2  # clip range of each response's importance ratio pi(y|x) / pi_old(y|x) (TRL: 0.2)
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


# ALGO LOGIC: the ranges of RLOO's own flags (plumbing/run.py checks those every script shares)
POSITIVE_FLAGS = "clip_eps"
NON_NEGATIVE_FLAGS = "kl_coef"


def check_groups(args, world_size: int):
    """Every group on one rank: K >= 2 and each rank's share of the rollout a whole number of groups."""
    if args.group_size < 2:
        run.fail(f"--group-size {args.group_size}: a group needs at least 2 responses to compare; pass 2 or more")
    if (args.rollout_batch_size // world_size) % args.group_size:
        run.fail(f"--rollout-batch-size {args.rollout_batch_size} is not {world_size} rank(s) x whole groups of "
                 f"--group-size {args.group_size}; make it a multiple of {world_size * args.group_size}")  # fmt: skip


# ALGO LOGIC: the pieces of RLOO, as plain functions the tests import
def leave_one_out_advantages(rewards, group_size: int):
    """(B,) advantages of responses in consecutive groups of `group_size`: the reward less the mean reward of the
    other K - 1 responses of its group (K/(K-1) times the reward less the group's mean). Equal rewards give A = 0."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).flatten()


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float, n_sequences: int, world_size: int):
    """This micro-batch's part of -(1/N) sum_i min(rho_i A_i, clip(rho_i) A_i) over the minibatch's N = `n_sequences`
    responses on all ranks (x world size: DDP averages gradients over ranks), so any split gives the same update;
    rho_i = exp(sum_t log pi - log pi_old) over the response. Returns (loss, clipped per response)."""
    ratio = torch.where(mask, logprobs - old_logprobs, 0.0).sum(1).exp()
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    losses = torch.max(-advantages * ratio, -advantages * clipped_ratio)
    return losses.sum() * world_size / n_sequences, (-advantages * clipped_ratio > -advantages * ratio)


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
        per_response = {
            "train/reward": scores,
            "train/response_length": r.response_mask.sum(1),
            "train/missing_eos_rate": ~r.ended,
            # the groups whose scores are all equal: no signal from the score (the KL's in the reward still differ)
            "train/zero_std_groups": (scores.view(-1, args.group_size).std(1) == 0).repeat_interleave(args.group_size),
        }
        if run.is_checker(score_fn, device):  # 0/1 rewards: the mean accuracy of the groups
            per_response["train/accuracy"] = raw_scores
        rewards = scores
        if ref_logprobs is not None:
            kl = torch.where(r.response_mask, logprobs - ref_logprobs, 0.0)  # k1 = log pi - log pi_ref per token
            per_response.update({"train/kl": kl.sum(1), "train/kl_k3": ((-kl).exp() - 1 + kl).sum(1)})
            rewards = scores - args.kl_coef * kl.sum(1)  # ALGO LOGIC: the sequence's KL penalty in its reward
        # ALGO LOGIC: each response's reward less the mean of the other K - 1 of its group
        advantages = leave_one_out_advantages(rewards, args.group_size)
        per_response.update({
            "train/kl_penalized_reward": rewards,
            "train/advantage_abs": advantages.abs(),
        })  # fmt: skip
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
            # The loss is a mean over the minibatch's responses on all ranks (its micro-batches' parts add up to it),
            # its statistics token means, weighted by each micro-batch's share of the tokens (times the world size, as
            # DDP averages over ranks: `loss_weight`). mb indexes its rows and response columns, seq its rows and the
            # columns they use, of which the first `context` are the prompt's.
            for mb, seq, context, loss_weight, sync in micro_batches:
                mb_mask = r.response_mask[mb]
                with models.gradient_sync([policy], sync):
                    with common.autocast(device, dtype):
                        logits = common.response_logits(
                            policy, r.input_ids[seq], r.attention_mask[seq], context, args.temperature
                        )
                    new_logprobs = common.gather_logprobs(logits, r.responses[mb])
                    # ALGO LOGIC: REINFORCE on the whole response's log-prob, weighted by its leave-one-out advantage
                    # and (after the first minibatch) by its clipped importance ratio
                    loss, clipped = policy_loss(
                        new_logprobs, logprobs[mb], advantages[mb[0]], mb_mask, args.clip_eps, args.mini_batch_size,
                        world_size,
                    )  # fmt: skip
                    loss.backward()
                with torch.no_grad():  # rho = pi / pi_old is exactly 1 on the first minibatch.
                    log_ratio = new_logprobs.detach() - logprobs[mb]
                    mb_stats = {
                        "policy/clipfrac": common.masked_mean(clipped[:, None].float().expand_as(mb_mask), mb_mask),
                        "policy/ratio": common.masked_mean(log_ratio.exp(), mb_mask),
                        "policy/abs_log_ratio": common.masked_mean(log_ratio.abs(), mb_mask),
                        "policy/approx_kl": common.masked_mean(log_ratio.exp() - 1 - log_ratio, mb_mask),
                        "policy/entropy": common.masked_mean(common.entropy_from_logits(logits.detach()), mb_mask),
                    }
                    for name, value in mb_stats.items():
                        minibatch_stats[name] = minibatch_stats.get(name, 0.0) + loss_weight * value.detach().float()
                    minibatch_stats["loss/policy"] = minibatch_stats.get("loss/policy", 0.0) + loss.detach()
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
