"""DPO, reference-free DPO and PRO: offline training on preference pairs, the A-LoL paper's preference baselines
(Baheti et al. 2023, arXiv 2305.14718, Table 2: DPO, DPO without a reference model, PRO beside A-LoL and PPO).

Trains on a fixed dataset of (prompt, chosen, rejected) pairs: no generation during training except for evaluation.
With log pi(y|x) = sum_t log pi(a_t|s_t) over the response's tokens (its EOS included, the prompt not):
    dpo (Rafailov et al. 2023, eq. 7):
        -log sigmoid(beta [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])
    dpo-ref-free: the same without pi_ref's terms (the A-LoL authors' `reference_free=True`)
    pro (Song et al. 2023, "Preference Ranking Optimization", eq. 6-8) for two candidates, as the A-LoL authors'
        pro_qlora_llama_hh.py computes it: with s_i = (1/|y_i|) sum_t log pi(a_t|s_t) (length-normalised) and r_i the
        reward model's score of candidate i,
        -log sigmoid((r_w - r_l)(s_w - s_l)) + sft_weight (-log pi(y_w|x)),
        the ranking term's temperature the reward difference (the paper's T = 1 / (r_k - r_i) dividing the
        score gap, multiplied here as in the code) and the SFT term on the preferred candidate a sequence sum with
        weight 0.05 (n - 1)^2 = 0.05 for n = 2 (the paper's beta). Where the code differs from the paper: its s_i
        drops each response's first token and scores padding after a short response's EOS (an off-by-one mask);
        here s_i is the mean over exactly the response's tokens.
pi_ref's sequence log-probs of every pair are computed once, before training (no grad, in chunks; under LoRA the
policy with its adapter off), as the reward model's scores of both candidates are for pro.

A diff of alol.py: the data are pairs, not one response per prompt with its score; the loss is the preference loss;
and what goes away: the reward model pass over the training data (but for pro), V_ref and its samples, the
advantages and priority sampling (the batches are drawn without replacement, epoch by epoch, as DPO trains). The
evaluation is alol.py's (RM and gold reward of samples, KL to pi_ref, length, distinct-n) plus the preference
metrics people read for DPO: the implicit reward margin beta [(log pi - log pi_ref)(y_w) - (log pi - log pi_ref)(y_l)]
and its accuracy (the fraction of held-out pairs with a positive margin).
"""

import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import tyro
from torch import nn
from transformers import GenerationConfig

import common
from plumbing import checkpoints, data, models, padding, run, scorers


@dataclass
class Args:
    # ---- the run: models, data, output
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # prefix of the default output directory
    seed: int = 1  # seed of the batches' order and of the evaluation's sampling
    model: str = "toy/policy"  # policy to train (hub name or local path); also the frozen reference
    reward_model: str = "toy/reward_model"  # reward model or module:function scorer: eval/reward, and PRO's ranking
    eval_reward: str = "toy.gold:score"  # scorer logged as eval/gold_reward (a model or module:function); '' for none
    dataset: str = "toy/data"  # preference pairs: hub name, dir, jsonl/json/parquet file or save_to_disk dir
    train_split: str = "train"  # dataset split of the training pairs
    eval_split: str = "test"  # split of the held-out pairs: the first --eval-size evaluate (samples and preferences)
    chosen_column: str = "chosen"  # column of the preferred responses (or hh-rlhf's chosen dialogues)
    rejected_column: str = "rejected"  # column of the dispreferred ones
    output_dir: str = ""  # metrics, TensorBoard, checkpoints and the final policy (default runs/<exp>__<seed>__<time>)
    resume: bool = False  # continue the run in --output-dir from its last checkpoint
    trust_remote_code: bool = False  # allow models and tokenizers that ship their own Python code
    chat_template: str = ""  # a .jinja file: the --model tokenizer's chat template (for conversational datasets)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # compute dtype; auto = bf16 on CUDA, fp32 on CPU
    # ---- budget and batch sizes
    total_steps: int = 400  # gradient steps (the A-LoL authors: 9000)
    batch_size: int = 16  # pairs per gradient step, summed over all ranks (the A-LoL authors: 16)
    rollout_forward_batch_size: int = 64  # chunk size of the no-grad pi_ref, scoring and evaluation passes
    # ---- sampling and scoring
    max_new_tokens: int = 48  # training responses are cut to this many tokens; evaluation generates at most this many
    max_prompt_length: int = 128  # prompts are left-truncated to this many tokens (the end of the dialogue is kept)
    stop_strings: tuple[str, ...] = ()  # trlX stop sequences, e.g. "Human:" (cut there; docs/real-models.md)
    temperature: float = 1.0  # sampling temperature of evaluation
    use_generation_config: bool = False  # also apply generation_config.json (off: sample exactly softmax(logits / T))
    reward_append_eos: Literal["ended", "always", "never"] = "ended"  # EOS after ended responses, all (trlX) or none
    reward_input: Literal["auto", "text", "pair"] = "auto"  # text, or (prompt, response) pair; auto: pair for encoders
    reward_score_at: Literal["last", "first-eos"] = "last"  # read a decoder RM at its last token, or first EOS (trlX)
    reward_truncate: bool = True  # left-truncate reward-model inputs over its max length; off: stop with an error
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never emits EOS (0 = off)
    # ---- optimisation
    lr: float = 1e-4  # policy learning rate (toy default; the A-LoL authors: 2e-4 with QLoRA on LLaMA-7B)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay (torch's default; the A-LoL authors' paged AdamW: 0.01 too)
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    # ---- ALGO LOGIC: the preference losses' hyper-parameters
    variant: Literal["dpo", "dpo-ref-free", "pro"] = "dpo"
    """loss: DPO, DPO without pi_ref (the A-LoL authors' reference_free), or PRO on two ranked candidates"""
    beta: float = 0.1  # DPO's beta, the KL constraint's strength (the A-LoL authors: 0.1); also the eval margin's
    sft_weight: float = 0.05  # PRO's SFT term on the preferred response (the paper's beta (n - 1)^2, n = 2)
    # ---- LoRA and scale (README: Scaling to real models; docs/scale.md)
    use_lora: bool = False  # train a LoRA adapter on the frozen base; the reference is the policy with its adapter off
    lora_r: int = 16  # LoRA rank
    lora_alpha: float = 0.0  # LoRA alpha: the adapter's output is scaled by alpha / r (0 = 2 x --lora-r)
    lora_dropout: float = 0.0  # dropout on the adapter's input, in the training forward only (QLoRA's recipe: 0.1)
    micro_batch_size: int = 0  # rows per forward/backward on each rank; a step's gradients add up over them (0 = all)
    dist_timeout: float = 60  # minutes a rank waits for the others in a collective (a 6.9B save takes minutes)
    fsdp: bool = False  # shard every model over the ranks with FSDP2; weights are gathered once per no-grad pass
    activation_checkpointing: bool = False  # recompute decoder layers' activations in backward instead of storing them
    num_layers_unfrozen: int = -1  # train only the top N decoder layers, the final norm and the LM head; -1 = all
    # ---- evaluation, checkpoints and logging
    log_every: int = 10  # log training metrics every N steps
    eval_every: int = 100  # evaluate every N steps (and before the first and after the last)
    eval_size: int = 128  # number of held-out prompts to evaluate on
    save_every: int = 100  # checkpoint every N steps (and at the end); 0 = never (the run cannot be resumed)
    track: bool = False  # log to Weights & Biases
    wandb_project: str = "rlhf-reference"  # wandb project name
    push_to_hub: str = ""  # at the end, upload policy/ (and adapter/) to this hub repository, e.g. me/ppo-1b


# ALGO LOGIC: the ranges of the preference losses' own flags (plumbing/run.py checks those every script shares)
POSITIVE_FLAGS = "total_steps batch_size log_every beta"
NON_NEGATIVE_FLAGS = "sft_weight"


# ALGO LOGIC: the losses, as plain functions the tests import
def preference_loss(chosen, rejected, ref_chosen, ref_rejected, variant: str, beta: float):
    """DPO's loss (eq. 7) from sequence log-probs (B,) of the chosen and rejected responses under pi and pi_ref,
    averaged over the pairs; dpo-ref-free drops pi_ref's terms. Returns (loss, stats); the stats' implicit rewards
    beta (log pi - log pi_ref) are DPO's whatever the variant."""
    logits = (chosen - rejected) - (0.0 if variant == "dpo-ref-free" else ref_chosen - ref_rejected)
    losses = -nn.functional.logsigmoid(beta * logits)
    return losses.mean(), implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, beta)


def pro_loss(chosen, chosen_mask, rejected, rejected_mask, reward_chosen, reward_rejected, sft_weight: float):
    """PRO on two candidates (pro_qlora_llama_hh.py's loss): log-probs (B, R) and masks of each response, their
    reward-model scores (B,). -log sigmoid((r_w - r_l)(s_w - s_l)) with s the length-normalised log-prob, plus
    sft_weight times the preferred response's summed NLL; averaged over the pairs."""
    score_chosen = torch.where(chosen_mask, chosen, 0.0).sum(1) / chosen_mask.sum(1).clamp(min=1)
    score_rejected = torch.where(rejected_mask, rejected, 0.0).sum(1) / rejected_mask.sum(1).clamp(min=1)
    rank = -nn.functional.logsigmoid((reward_chosen - reward_rejected) * (score_chosen - score_rejected))
    sft = -torch.where(chosen_mask, chosen, 0.0).sum(1)
    margin = (score_chosen - score_rejected).mean()
    stats = {"loss/rank": rank.mean(), "loss/sft": sft.mean(), "train/score_margin": margin}
    return (rank + sft_weight * sft).mean(), stats


def implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> dict:
    """DPO's implicit rewards beta (log pi - log pi_ref) of each response (means over the pairs), their margin and
    accuracy (the fraction of pairs whose chosen response has the larger one)."""
    reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    margin = reward_chosen - reward_rejected
    return {"rewards/chosen": reward_chosen.mean(), "rewards/rejected": reward_rejected.mean(),
            "rewards/margin": margin.mean(), "rewards/accuracy": (margin > 0).float().mean()}  # fmt: skip


def main():
    args = tyro.cli(Args)
    rank, world_size, device = run.setup_distributed(args.dist_timeout)
    run.check_flags(args, world_size, args.batch_size // world_size, POSITIVE_FLAGS, NON_NEGATIVE_FLAGS)
    if args.batch_size % world_size:
        run.fail(f"--batch-size {args.batch_size} is not divisible by the {world_size} ranks; make it a multiple")
    output_dir = args.output_dir or run.broadcast_object(f"runs/{args.exp_name}__{args.seed}__{int(time.time())}")
    run.check_output_dir(output_dir, args.resume)
    torch.manual_seed(args.seed)
    dtype = run.resolve_dtype(args.dtype, device)
    chunk = args.rollout_forward_batch_size  # rows per no-grad forward pass (pi_ref, scoring, evaluation)

    # ---- tokenizer and data first: a bad dataset stops the run before any model is loaded
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code, args.chat_template)
    stop_ids = torch.tensor(data.stop_token_ids(args.model, tokenizer), device=device)
    columns = (args.chosen_column, args.rejected_column)
    limits = (stop_ids.tolist(), args.max_prompt_length, args.max_new_tokens)
    train_rows, train_pairs = data.preference_pairs(tokenizer, args.dataset, args.train_split, columns, *limits)
    held_out_rows, held_out_pairs = data.preference_pairs(tokenizer, args.dataset, args.eval_split, columns, *limits)
    eval_rows, eval_pairs = held_out_rows[: args.eval_size], held_out_pairs[: args.eval_size]
    train_columns = scorers.dataset_columns(args, args.train_split, evaluation=False) if args.variant == "pro" else []
    eval_columns = scorers.dataset_columns(args, args.eval_split)[: args.eval_size]
    eval_prompts = [prompt for prompt, _, _ in eval_pairs]
    # ---- models: the policy and pi_ref (None under LoRA: the policy with its adapter off), the scorers
    # (eval_score_fn: None without --eval-reward)
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
    trained = {"policy": (policy, policy_optimizer)}  # saved in every checkpoint, restored by --resume

    def shard(n: int) -> slice:  # a contiguous block per rank, so gathered results keep the row order
        return slice(rank * n // world_size, (rank + 1) * n // world_size)

    @torch.no_grad()
    def sequence_logprobs(model, pairs: list[tuple]) -> torch.Tensor:
        """log pi(y_w|x) and log pi(y_l|x) (P, 2) of every pair (this rank's block, then gathered): no grad, in
        sorted, trimmed chunks of pairs' rows, at T = 1 (offline)."""
        block, sums = pairs[shard(len(pairs))], [torch.zeros(0, 2, device=device)]
        for start in range(0, len(block), 16 * chunk):  # (a bounded padded batch at a time)
            part = block[start : start + 16 * chunk]
            prompts, responses = [p for p, _, _ in part] * 2, [w for _, w, _ in part] + [lo for _, _, lo in part]
            input_ids, attention_mask, _, padded, response_mask, lengths = common.pad_pairs(
                prompts, responses, tokenizer.pad_token_id, device
            )
            logprobs = common.chunked_logprobs(model, input_ids=input_ids, attention_mask=attention_mask,
                                               responses=padded, temperature=1.0, chunk_size=chunk, dtype=dtype,
                                               lengths=lengths)  # fmt: skip
            sums.append(torch.where(response_mask, logprobs, 0.0).sum(1).view(2, -1).T)  # (part, 2): chosen, rejected
        return torch.tensor(run.all_gather_list(torch.cat(sums).tolist())).view(-1, 2)

    def reference_logprobs(pairs: list[tuple]) -> torch.Tensor:
        with models.reference_model(unwrapped_policy, ref_policy) as ref_model:
            return sequence_logprobs(ref_model, pairs)

    def pair_rewards(rows, columns, pairs: list[tuple]) -> torch.Tensor:
        """The reward model's scores (P, 2) of each pair's chosen and rejected response, less the missing-EOS penalty
        for a response cut by --max-new-tokens (this rank's block, then gathered): PRO's ranking."""
        block = shard(len(pairs))
        prompts = [prompt for prompt, _, _ in pairs[block]]
        prompt_texts = data.scoring_prompts(tokenizer, prompts, rows[block])
        scores = [torch.zeros(0, device=device)] * 2
        for k in (1, 2) if prompts else ():  # the chosen responses, then the rejected ones
            responses = [pair[k] for pair in pairs[block]]
            ended = torch.tensor([r[-1] in limits[0] for r in responses], device=device)  # (host stop ids)
            texts = data.response_texts(tokenizer, prompts, responses)
            scores[k - 1] = common.penalize_missing_eos(score_fn(prompt_texts, texts, ended, columns[block]), ended,
                                                        args.missing_eos_penalty)  # fmt: skip
        return torch.tensor(run.all_gather_list(torch.stack(scores, 1).tolist())).view(-1, 2)

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out prompts, sharded over ranks: RM and gold reward, KL to pi_ref, length, EOS rate, distinct-n of
        samples; and on the held-out pairs, DPO's implicit reward margin and accuracy."""
        torch.manual_seed(args.seed + rank)  # the same samples for the same policy
        queries, query_mask = common.left_pad(eval_prompts[rank::world_size], tokenizer.pad_token_id, device)
        with common.autocast(device, dtype):  # (the unwrapped policy: DDP's wrapper has no generate)
            responses, response_mask = common.generate(
                unwrapped_policy, queries, query_mask, generation_config, chunk, tokenizer
            )
        if args.stop_strings:  # trlX's stop sequences: cut at the first, stripped, ended with EOS, re-tokenized
            responses, response_mask = data.cut_at_stop_strings(tokenizer, responses, response_mask, args.stop_strings)
        input_ids, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        temp, lengths = args.temperature, padding.row_lengths(attention_mask, queries.shape[1])  # (one read)
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, responses=responses, lengths=lengths)
        logprobs = common.chunked_logprobs(unwrapped_policy, **batch, temperature=temp, chunk_size=chunk, dtype=dtype)
        with models.reference_model(unwrapped_policy, ref_policy) as ref_model:
            ref_logprobs = common.chunked_logprobs(ref_model, **batch, temperature=temp, chunk_size=chunk, dtype=dtype)
        kl = torch.where(response_mask, logprobs - ref_logprobs, 0.0)
        prompt_texts = data.scoring_prompts(tokenizer, queries, eval_rows[rank::world_size])
        response_texts = data.response_texts(tokenizer, queries, responses)
        ended = torch.isin(responses, stop_ids).any(1)
        metrics = run.evaluation_metrics(
            score_fn, eval_score_fn, prompt_texts, response_texts, ended, kl, response_mask, ns=(1, 2, 3),
            columns=eval_columns[rank::world_size],
            greedy=lambda: common.greedy_texts(unwrapped_policy, eval_prompts[rank::world_size], tokenizer,
                                               generation_config, chunk, dtype, args.stop_strings),
        )  # fmt: skip
        pairs = sequence_logprobs(unwrapped_policy, eval_pairs)  # ALGO LOGIC: the held-out preference metrics
        rewards = implicit_rewards(pairs[:, 0], pairs[:, 1], eval_ref[:, 0], eval_ref[:, 1], args.beta)
        return {**metrics, **{f"eval/{k}": v.item() for k, v in rewards.items()}}

    start_iteration = 0
    setup_metrics = {}  # the one-off setup's timings, logged in the row of iteration 0
    if args.resume:
        checkpoint = checkpoints.load_checkpoint(output_dir, trained)  # (restores the trained models and optimizers)
        start_iteration = checkpoint["iteration"]
        ref, eval_ref, rewards = checkpoint["ref_logprobs"], checkpoint["eval_ref_logprobs"], checkpoint["rewards"]
    else:
        # ---- pi_ref's log-probs of every pair (and, for PRO, the reward model's scores), once
        t0 = run.clock(device)
        ref, eval_ref = reference_logprobs(train_pairs), reference_logprobs(eval_pairs)
        no_rewards = torch.zeros(len(train_pairs), 2)
        rewards = pair_rewards(train_rows, train_columns, train_pairs) if args.variant == "pro" else no_rewards
        setup_metrics["time/reference_logprobs"] = run.clock(device) - t0
    pair_counts = torch.ones(len(train_pairs))  # every pair counts once in a batch's mean

    def draw(iteration: int) -> torch.Tensor:
        return torch.tensor(data.prompt_indices(len(train_pairs), args.batch_size, iteration - 1, args.seed, 0, 1))

    run.barrier()  # every rank has checked the output directory before rank 0 creates it
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
    logger = run.Logger(output_dir, args, rank, args.total_steps, start_iteration)
    eval_metrics = {"eval/iteration": start_iteration, **evaluate()}
    if start_iteration == 0:  # the row of iteration 0 holds the evaluation of the initial (SFT) policy and the setup
        logger.log({"iteration": 0, "episodes": 0, **setup_metrics, **eval_metrics})

    stats = []  # per-iteration statistics since the last logged row
    t_start = run.clock(device)
    for iteration in range(start_iteration + 1, args.total_steps + 1):
        # the global batch: epochs of seeded permutations of the pairs, the same for any number of ranks (no
        # replacement within an epoch, as DPO trains); this rank trains on its share
        batch_rows = draw(iteration)
        policy_optimizer.zero_grad(set_to_none=True)
        step_stats_sum = {}  # each statistic's mean over this rank's pairs of the batch
        # the loss is a mean over the global batch's pairs: each micro-batch's is weighted by its share of them
        # (times the world size, as DDP averages over ranks: `loss_weight`)
        for micro_rows, loss_weight, sync in common.micro_batches(batch_rows, pair_counts, args.micro_batch_size):
            rows = micro_rows.tolist()
            prompts = [train_pairs[i][0] for i in rows] * 2  # the chosen responses, then the rejected ones
            responses = [train_pairs[i][1] for i in rows] + [train_pairs[i][2] for i in rows]
            input_ids, attention_mask, context_length, padded, response_mask, lengths = common.pad_pairs(
                prompts, responses, tokenizer.pad_token_id, device
            )
            padding.count_padding("update", sum(lengths.prompt) + sum(lengths.response), attention_mask.numel())
            row_ref, row_rewards = padding.to_device(torch.stack([ref[micro_rows], rewards[micro_rows]]), device)
            with models.gradient_sync([policy], sync):
                with common.autocast(device, dtype):  # offline: T = 1; chosen and rejected in one forward
                    logits = common.response_logits(policy, input_ids, attention_mask, context_length, 1.0)
                logprobs = common.gather_logprobs(logits, padded)
                chosen, rejected = logprobs.chunk(2)
                chosen_mask, rejected_mask = response_mask.chunk(2)
                chosen_sum = torch.where(chosen_mask, chosen, 0.0).sum(1)
                rejected_sum = torch.where(rejected_mask, rejected, 0.0).sum(1)
                # ALGO LOGIC: the variant's loss
                if args.variant == "pro":
                    loss, loss_stats = pro_loss(chosen, chosen_mask, rejected, rejected_mask, row_rewards[:, 0],
                                                row_rewards[:, 1], args.sft_weight)  # fmt: skip
                else:
                    loss, loss_stats = preference_loss(chosen_sum, rejected_sum, row_ref[:, 0], row_ref[:, 1],
                                                       args.variant, args.beta)  # fmt: skip
                (loss * loss_weight).backward()
            with torch.no_grad():
                step_stats = {
                    "loss/policy": loss,
                    **loss_stats,
                    **(
                        {}
                        if args.variant != "pro"
                        else implicit_rewards(chosen_sum, rejected_sum, row_ref[:, 0], row_ref[:, 1], args.beta)
                    ),  # fmt: skip
                    "train/kl_chosen": (chosen_sum - row_ref[:, 0]).mean(),
                    "train/response_length": response_mask.sum(1).float().mean(),
                }
                for name, value in step_stats.items():
                    step_stats_sum[name] = step_stats_sum.get(name, 0.0) + loss_weight * value.detach().float()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        policy_optimizer.step()
        stats.append(step_stats_sum)

        if iteration % args.log_every == 0 or iteration == args.total_steps or iteration % args.eval_every == 0:
            names = list(stats[0])  # the statistics' names; their means since the last row, averaged over ranks:
            means = (
                common.all_reduce_sum(torch.stack([torch.stack(list(s.values())) for s in stats]).mean(0)) / world_size
            )
            if not torch.isfinite(means).all():
                run.fail(f"NaN/inf loss at iteration {iteration}; stopped before checkpointing it; lower --lr")
            elapsed = run.clock(device) - t_start
            row = {
                "iteration": iteration,
                "episodes": iteration * args.batch_size,
                **dict(zip(names, means.tolist())),
                "time/update": elapsed / len(stats),
                "time/samples_per_s": len(stats) * args.batch_size / elapsed,
                "time/peak_memory_gb": run.peak_memory_gb(device),
                **padding.padding_fractions(),  # padding / computed tokens (each micro-batch padded to its own rows)
            }
            if iteration % args.eval_every == 0 or iteration == args.total_steps:
                eval_metrics = {"eval/iteration": iteration, **evaluate()}
            if iteration == args.total_steps and torch.distributed.is_initialized():
                row["dist/max_param_difference"] = checkpoints.max_replica_difference(unwrapped_policy)
            logger.log({**row, **eval_metrics})
            stats = []  # per-iteration statistics since the last logged row
            t_start = run.clock(device)
        if args.save_every and (iteration % args.save_every == 0 or iteration == args.total_steps):
            state = {"iteration": iteration, "args": asdict(args), "ref_logprobs": ref, "eval_ref_logprobs": eval_ref,
                     "rewards": rewards}  # fmt: skip
            checkpoints.save_checkpoint(output_dir, trained, state)

    checkpoints.save_final_policy(policy, tokenizer, output_dir, args)
    logger.close()
    run.close_distributed()


if __name__ == "__main__":
    main()
