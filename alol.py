"""A-LoL: Advantage-Leftover Lunch RL (Baheti et al. 2023, arXiv 2305.14718), offline policy gradient.

Trains on a fixed dataset's existing (prompt, response) pairs: no generation during training except
for evaluation and for fitting the reference value estimate. Once, before training:
    r(x, y)   the reward model's score of every training pair
    V_ref(x)  a small head on the FROZEN reference's last-layer hidden states of the prompt (masked mean
              pooling + MLP), fit by MSE to the rewards of pi_ref's own samples on held-out prompts
    A(x, y) = r(x, y) - V_ref(x); rows with A <= 0 are dropped (A+ = max(A, 0))
Per example, with S = sum_t -log pi(a_t|s_t) and rho = clip(exp(sum_t log pi - sum_t log pi_ref), 1-eps, 1+eps)
detached (sequence sums, not length-normalised):
    a-lol: A+ rho S    a-lol-ref-free: A+ S    a-lol-seq: A+ sum_t w_t (-log pi(a_t)), w_t per-token rho
    a-lol-kl: A+ S + beta_kl (log pi(y|x) - log pi_ref(y|x))    r-lol: r rho S    wbc: r S    nll: S
Training examples are drawn with replacement in proportion to A+ (to r for r-lol and wbc): priority sampling.

Not a diff of ppo.py (no rollout loop, value network or KL penalty), but its loading, evaluation, logging and
checkpoint code uses the online scripts' names (policy, ref_policy, evaluate, iteration...) for a reader of both.
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
    seed: int = 1  # seed of sampling, the value head and initialisation
    model: str = "toy/policy"  # policy to train (hub name or local path); also the frozen reference
    reward_model: str = "toy/reward_model"  # reward model (hub name or path, num_labels=1) or a module:function scorer
    eval_reward: str = "toy.gold:score"  # scorer logged as eval/gold_reward (a model or module:function); '' for none
    dataset: str = "toy/data"  # training pairs and prompts: hub name, dir, jsonl/json/parquet file or save_to_disk dir
    train_split: str = "train"  # dataset split of the training pairs
    eval_split: str = "test"  # split of the held-out prompts: the first --eval-size evaluate, the rest fit V_ref
    response_column: str = "chosen"  # column holding the responses to train on
    output_dir: str = ""  # metrics, TensorBoard, checkpoints and the final policy (default runs/<exp>__<seed>__<time>)
    resume: bool = False  # continue the run in --output-dir from its last checkpoint
    trust_remote_code: bool = False  # allow models and tokenizers that ship their own Python code
    chat_template: str = ""  # a .jinja file: the --model tokenizer's chat template (for conversational datasets)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # compute dtype; auto = bf16 on CUDA, fp32 on CPU
    # ---- budget and batch sizes
    total_steps: int = 400  # gradient steps (the authors: 9000 x the fraction of rows with positive advantage)
    batch_size: int = 16  # examples per gradient step, summed over all ranks
    rollout_forward_batch_size: int = 64  # chunk size of the no-grad scoring, value-fitting and evaluation passes
    # ---- sampling and scoring
    max_new_tokens: int = 48  # training responses are cut to this many tokens; evaluation generates at most this many
    max_prompt_length: int = 128  # prompts are left-truncated to this many tokens (the end of the dialogue is kept)
    stop_strings: tuple[str, ...] = ()  # trlX stop sequences, e.g. "Human:" (cut there; docs/real-models.md)
    temperature: float = 1.0  # sampling temperature of evaluation and of pi_ref's samples for V_ref
    use_generation_config: bool = False  # also apply generation_config.json (off: sample exactly softmax(logits / T))
    reward_append_eos: Literal["ended", "always", "never"] = "ended"  # EOS after ended responses, all (trlX) or none
    reward_input: Literal["auto", "text", "pair"] = "auto"  # text, or (prompt, response) pair; auto: pair for encoders
    reward_score_at: Literal["last", "first-eos"] = "last"  # read a decoder RM at its last token, or first EOS (trlX)
    reward_truncate: bool = True  # left-truncate reward-model inputs over its max length; off: stop with an error
    missing_eos_penalty: float = 1.0  # subtracted from the score of a sampled response that never emits EOS (0 = off)
    # ---- optimisation
    lr: float = 1e-4  # policy learning rate (toy default; the authors: 2e-4 with QLoRA on LLaMA-7B)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay (torch's default; the A-LoL authors' paged AdamW: 0.01 too)
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    # ---- ALGO LOGIC: A-LoL's hyper-parameters
    reward_transform: Literal["none", "sigmoid"] = "none"
    """applied to every reward-model score before advantages and r-lol/wbc weights (the A-LoL authors: sigmoid)"""
    variant: Literal["a-lol", "a-lol-ref-free", "a-lol-seq", "a-lol-kl", "r-lol", "wbc", "nll"] = "a-lol"
    """loss: the A-LoL variants, reward-weighted r-lol and wbc, or plain nll (SFT) as a baseline"""
    clip_eps: float = 0.9  # importance weights are clipped to [1 - clip_eps, 1 + clip_eps]
    kl_beta: float = 0.1  # weight of the sequence log-ratio term of a-lol-kl
    sampling: Literal["auto", "priority", "uniform"] = "auto"
    """priority: with replacement, proportional to A+ (r for r-lol/wbc); auto = priority except for nll"""
    value_samples: int = 8  # pi_ref samples per held-out prompt to fit V_ref on
    value_size: int = 0  # held-out prompts V_ref is fitted on (after the --eval-size ones; 0 = all; the authors: 280)
    value_greedy: bool = False  # pi_ref's V_ref samples greedy (the A-LoL authors: one per prompt), not sampled
    value_epochs: int = 30  # epochs of V_ref fitting (the epoch with the best held-out loss is kept)
    value_lr: float = 3e-3  # V_ref head learning rate (the authors: 1e-5 on LLaMA-7B)
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


# ALGO LOGIC: the ranges of A-LoL's own flags (plumbing/run.py checks those every script shares)
POSITIVE_FLAGS = "total_steps batch_size log_every value_samples value_epochs clip_eps"
NON_NEGATIVE_FLAGS = "kl_beta value_size"


# ALGO LOGIC: the pieces of A-LoL, as plain functions the tests import
def policy_loss(logprobs, ref_logprobs, mask, weights, variant: str, clip_eps: float, kl_beta: float):
    """Per-example A-LoL losses (weights: A+ or r; unused by nll), averaged over the batch; returns (loss, stats)."""
    nll = torch.where(mask, -logprobs, 0.0).sum(1)  # S, a sequence sum
    seq_log_ratio = torch.where(mask, logprobs - ref_logprobs, 0.0).sum(1)
    rho = seq_log_ratio.detach().exp().clamp(1 - clip_eps, 1 + clip_eps)  # exp overflow -> inf -> clipped, no NaN
    if variant in ("a-lol", "r-lol"):
        losses = weights * rho * nll
    elif variant in ("a-lol-ref-free", "wbc"):
        losses = weights * nll
    elif variant == "a-lol-seq":
        token_rho = (logprobs - ref_logprobs).detach().exp().clamp(1 - clip_eps, 1 + clip_eps)
        losses = weights * torch.where(mask, -token_rho * logprobs, 0.0).sum(1)
    elif variant == "a-lol-kl":
        losses = weights * nll + kl_beta * seq_log_ratio
    else:  # nll
        losses = nll
    clipped = (seq_log_ratio.detach().exp() - rho).abs() > 0
    return losses.mean(), {"policy/rho_mean": rho.mean(), "policy/rho_clipfrac": clipped.float().mean()}


def rewards_from_scores(scores, ended, reward_transform: str, missing_eos_penalty: float):
    """r(x, y): the reward model's score, through --reward-transform, less the missing-EOS penalty (the same for the
    dataset's responses and for pi_ref's samples, the V_ref targets)."""
    if reward_transform == "sigmoid":  # the A-LoL authors' choice (scores in (0, 1), hence all positive)
        scores = torch.sigmoid(scores)
    return common.penalize_missing_eos(scores, ended, missing_eos_penalty)


def advantages_and_weights(rewards, ref_values, variant: str):
    """A = r - V_ref, and each row's loss weight: A+ for the A-LoL variants, r+ for r-lol and wbc, 1 for nll. Rows
    of weight 0 (A <= 0, or r <= 0) are dropped: they are never drawn."""
    advantages = rewards - ref_values
    weights = {"r-lol": rewards, "wbc": rewards, "nll": torch.ones_like(rewards)}.get(variant, advantages)
    return advantages, weights.clamp(min=0)


def sample_rows(weights: torch.Tensor, n: int, priority: bool, generator: torch.Generator) -> torch.Tensor:
    """Indices of n training rows among those with weight > 0, with replacement: proportional to the
    weight (priority sampling) or uniform."""
    probs = weights.clamp(min=0) if priority else (weights > 0).float()
    return torch.multinomial(probs, n, replacement=True, generator=generator)


class ValueHead(nn.Module):
    """V_ref(x): an MLP on the masked mean of the frozen reference's last hidden states over the prompt."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).squeeze(-1)


def fit_value_head(features, targets, prompt_ids, epochs: int, lr: float, seed: int):
    """Fit V_ref by MSE on pi_ref's sample rewards; 20% of the prompts are held out and the epoch with
    the best held-out loss is kept. Returns (head, stats)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.unique(prompt_ids)
    held_out_prompts = prompts[torch.randperm(len(prompts), generator=generator)[: max(1, len(prompts) // 5)]]
    held_out = torch.isin(prompt_ids, held_out_prompts)
    torch.manual_seed(seed)
    head = ValueHead(features.shape[1]).to(features.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    train_x, train_y, val_x, val_y = features[~held_out], targets[~held_out], features[held_out], targets[held_out]
    best = (float("inf"), None)
    for _ in range(epochs):
        head.train()
        for batch in torch.randperm(len(train_x), generator=generator).split(64):
            loss = nn.functional.mse_loss(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            val_loss = nn.functional.mse_loss(head(val_x), val_y).item()
        if val_loss < best[0]:
            best = (val_loss, {k: v.clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[1])
    baseline = ((val_y - train_y.mean()) ** 2).mean().item()  # predicting the mean reward
    return head.eval(), {"value/heldout_mse": best[0], "value/heldout_mse_of_mean": baseline}


def main():
    args = tyro.cli(Args)
    rank, world_size, device = run.setup_distributed(args.dist_timeout)
    run.check_flags(args, world_size, args.batch_size // world_size, POSITIVE_FLAGS, NON_NEGATIVE_FLAGS)
    if args.batch_size % world_size:
        run.fail(f"--batch-size {args.batch_size} is not divisible by the {world_size} ranks; make it a multiple")
    if args.value_greedy and args.value_samples != 1:
        run.fail(f"--value-greedy gives one sample per prompt; pass --value-samples 1 (not {args.value_samples})")
    output_dir = args.output_dir or run.broadcast_object(f"runs/{args.exp_name}__{args.seed}__{int(time.time())}")
    run.check_output_dir(output_dir, args.resume)
    torch.manual_seed(args.seed)
    dtype = run.resolve_dtype(args.dtype, device)
    chunk = args.rollout_forward_batch_size  # rows per no-grad forward pass (scoring, V_ref, evaluation, pi_ref)

    # ---- tokenizer and data first: a bad dataset stops the run before any model is loaded
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code, args.chat_template)
    train_rows, response_texts = data.load_rows(args.dataset, args.train_split, args.response_column)
    if response_texts is None or None in response_texts:
        run.fail(f"--dataset '{args.dataset}' lacks a '{args.response_column}' column or assistant turn; fix --dataset")
    train_prompts = data.tokenize_prompts(tokenizer, train_rows, args.max_prompt_length)
    # Generation stops at EOS and at every end-of-turn token the checkpoint's generation_config.json lists.
    stop_ids = torch.tensor(data.stop_token_ids(args.model, tokenizer), device=device)
    # A response continues its prompt as the policy would write it (its tokens + EOS, or the chat template's turn);
    # one longer than --max-new-tokens is cut and, like a sample that never stopped, keeps no EOS and is penalised.
    response_ids = data.tokenize_responses(tokenizer, train_rows, response_texts, stop_ids.tolist())
    train_ended = torch.tensor([len(ids) <= args.max_new_tokens for ids in response_ids])
    train_responses = [ids[: args.max_new_tokens] for ids in response_ids]
    held_out_rows = data.load_rows(args.dataset, args.eval_split)[0]
    train_columns = scorers.dataset_columns(args, args.train_split, evaluation=False)  # what a scoring function reads
    held_out_columns = scorers.dataset_columns(args, args.eval_split)
    held_out_prompts = data.tokenize_prompts(tokenizer, held_out_rows, args.max_prompt_length)
    value_end = args.eval_size + args.value_size if args.value_size else len(held_out_prompts)
    eval_prompts, value_prompts = held_out_prompts[: args.eval_size], held_out_prompts[args.eval_size : value_end]
    eval_rows, value_rows = held_out_rows[: args.eval_size], held_out_rows[args.eval_size : value_end]
    eval_columns, value_columns = held_out_columns[: args.eval_size], held_out_columns[args.eval_size : value_end]
    if len(value_prompts) < (args.value_size or 1):
        run.fail(
            f"split '{args.eval_split}' has {len(value_prompts)} prompts after --eval-size {args.eval_size} to fit "
            f"V_ref on, fewer than --value-size {args.value_size or 1}; lower --value-size or --eval-size"
        )
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
    # pi_ref's samples for V_ref: sampled like the evaluation, or greedy (the A-LoL authors': one per prompt)
    greedy = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None} if args.value_greedy else {}
    value_generation_config = GenerationConfig(**{**generation_config.to_dict(), **greedy})
    adamw = dict(betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    policy_optimizer = torch.optim.AdamW(models.trainable(policy), lr=args.lr, **adamw)
    trained = {"policy": (policy, policy_optimizer)}  # saved in every checkpoint, restored by --resume

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out prompts, sharded over ranks: RM and gold reward, KL to pi_ref, length, EOS rate, distinct-n."""
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
        return run.evaluation_metrics(
            score_fn, eval_score_fn, prompt_texts, response_texts, ended, kl, response_mask, ns=(1, 2, 3),
            columns=eval_columns[rank::world_size],
            greedy=lambda: common.greedy_texts(unwrapped_policy, eval_prompts[rank::world_size], tokenizer,
                                               generation_config, chunk, dtype, args.stop_strings),
        )  # fmt: skip

    def prompt_features(prompts: list[list[int]]) -> torch.Tensor:
        """V_ref's input: the masked mean of the frozen reference's last hidden states over each prompt."""
        with models.reference_model(unwrapped_policy, ref_policy) as ref_model:
            return common.chunked_prompt_features(ref_model, prompts, tokenizer.pad_token_id, chunk, dtype)

    def rewards_of(prompts, rows, columns, responses, ended) -> torch.Tensor:
        """r(x, y) of (prompt, response) token ids (ALGO LOGIC: rewards_from_scores)."""
        prompt_texts = data.scoring_prompts(tokenizer, prompts, rows)
        response_texts = data.response_texts(tokenizer, prompts, responses)
        scores = score_fn(prompt_texts, response_texts, ended, columns)
        return rewards_from_scores(scores, ended, args.reward_transform, args.missing_eos_penalty)

    def shard(n: int) -> slice:  # a contiguous block per rank, so gathered results keep the row order
        return slice(rank * n // world_size, (rank + 1) * n // world_size)

    start_iteration = 0
    setup_metrics = {}  # the one-off setup's timings and V_ref fit, logged in the row of iteration 0
    if args.resume:
        checkpoint = checkpoints.load_checkpoint(output_dir, trained)  # (restores the trained models and optimizers)
        start_iteration = checkpoint["iteration"]
        rewards, ref_values = checkpoint["rewards"], checkpoint["ref_values"]
    else:
        # ---- score every training pair once (this rank's block, then gathered)
        t0 = run.clock(device)
        block = shard(len(train_prompts))
        pair_ended = train_ended[block].to(device)
        rewards = rewards_of(train_prompts[block], train_rows[block], train_columns[block], train_responses[block],
                             pair_ended)  # fmt: skip
        rewards = torch.tensor(run.all_gather_list(rewards.tolist()))
        # ---- fit V_ref on the rewards of pi_ref's own samples for the held-out prompts
        t1 = run.clock(device)
        block = shard(len(value_prompts))  # row s * prompts + i of the queries: sample s of prompt i
        queries, query_mask = common.left_pad(value_prompts[block] * args.value_samples, tokenizer.pad_token_id, device)
        with models.reference_model(unwrapped_policy, ref_policy) as ref_model, common.autocast(device, dtype):
            responses, response_mask = common.generate(
                ref_model, queries, query_mask, value_generation_config, chunk, tokenizer
            )
        if args.stop_strings:
            responses, response_mask = data.cut_at_stop_strings(tokenizer, responses, response_mask, args.stop_strings)
        responses = torch.where(response_mask, responses, tokenizer.pad_token_id)  # nothing after the stop token
        sample_ended = torch.isin(responses, stop_ids).any(1)
        samples = (value_rows[block] * args.value_samples, value_columns[block] * args.value_samples)
        sample_scores = rewards_of(queries, *samples, responses, sample_ended)
        sample_scores = torch.tensor(run.all_gather_list(sample_scores.view(args.value_samples, -1).T.tolist()))
        features = prompt_features(value_prompts)
        prompt_ids = torch.arange(len(value_prompts))[:, None].expand(-1, args.value_samples).reshape(-1)
        sample_features = features.repeat_interleave(args.value_samples, 0).cpu()  # one row per sample
        head, setup_metrics = fit_value_head(
            sample_features, sample_scores.reshape(-1), prompt_ids, args.value_epochs, args.value_lr, args.seed
        )
        block = shard(len(train_prompts))
        ref_values = torch.tensor(run.all_gather_list(head(prompt_features(train_prompts[block]).cpu()).tolist()))
        setup_metrics["time/score_dataset"], setup_metrics["time/fit_value"] = t1 - t0, run.clock(device) - t1
    # ALGO LOGIC: advantages and the loss (and sampling) weights of each variant
    advantages, sampling_weights = advantages_and_weights(rewards, ref_values, args.variant)  # on the host: no sync
    priority = args.sampling == "priority" or (args.sampling == "auto" and args.variant != "nll")
    kept = sampling_weights > 0
    if not kept.any():
        run.fail(f"no training row has a positive {'reward' if args.variant in ('r-lol', 'wbc') else 'advantage'}")
    setup_metrics["train/kept_fraction"] = kept.float().mean().item()
    setup_metrics["train/advantage_mean"] = advantages.mean().item()
    row_counts = torch.ones(len(train_prompts))  # every example counts once in a batch's mean

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
        # the global batch is drawn the same way for any number of ranks; this rank trains on its share
        generator = torch.Generator().manual_seed(args.seed + 10_000 * iteration)
        batch_rows = sample_rows(sampling_weights, args.batch_size, priority, generator)
        policy_optimizer.zero_grad(set_to_none=True)
        step_stats_sum = {}  # each statistic's mean over this rank's examples of the batch
        # the loss is a mean over the global batch's examples: each micro-batch's is weighted by its share of them
        # (times the world size, as DDP averages over ranks: `loss_weight`)
        for micro_rows, loss_weight, sync in common.micro_batches(batch_rows, row_counts, args.micro_batch_size):
            rows = micro_rows.tolist()
            input_ids, attention_mask, context_length, responses, response_mask, lengths = common.pad_pairs(
                [train_prompts[i] for i in rows], [train_responses[i] for i in rows], tokenizer.pad_token_id, device
            )
            padding.count_padding("update", sum(lengths.prompt) + sum(lengths.response), attention_mask.numel())
            # the rows' loss weights, rewards and advantages (on the host) copied to the device in one go
            row_weights, row_rewards, row_advantages = padding.to_device(
                torch.stack([sampling_weights[micro_rows], rewards[micro_rows], advantages[micro_rows]]), device
            )
            # offline: T = 1; no grad, so DDP's module is not used here
            with models.reference_model(unwrapped_policy, ref_policy) as ref_model:
                ref_logprobs = common.chunked_logprobs(
                    ref_model, input_ids, attention_mask, responses, 1.0, chunk, dtype, lengths
                )
            with models.gradient_sync([policy], sync):
                with common.autocast(device, dtype):  # offline: T = 1
                    logits = common.response_logits(policy, input_ids, attention_mask, context_length, 1.0)
                logprobs = common.gather_logprobs(logits, responses)
                # ALGO LOGIC: the variant's loss
                loss, loss_stats = policy_loss(
                    logprobs, ref_logprobs, response_mask, row_weights, args.variant, args.clip_eps, args.kl_beta
                )
                (loss * loss_weight).backward()
            with torch.no_grad():
                step_stats = {
                    "loss/policy": loss,
                    **loss_stats,
                    "train/reward": row_rewards.mean(),
                    "train/advantage": row_advantages.mean(),
                    "train/kl": torch.where(response_mask, logprobs - ref_logprobs, 0.0).sum(1).mean(),
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
            state = {"iteration": iteration, "args": asdict(args), "rewards": rewards, "ref_values": ref_values}
            checkpoints.save_checkpoint(output_dir, trained, state)

    checkpoints.save_final_policy(policy, tokenizer, output_dir, args)
    logger.close()
    run.close_distributed()


if __name__ == "__main__":
    main()
