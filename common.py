"""Plumbing shared by the RLHF scripts: distributed reductions, flag checks, rollout tensors and generation,
log-probs and masked statistics, logging and checkpoint files. Loading models and datasets lives in `models.py` and
`data.py`. No algorithm logic lives in any of them: what each algorithm optimises is written out in its own script."""

import contextlib
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parent


def quiet_libraries():
    """Hide the libraries' load reports and progress bars; our own errors and logs stay. (Also: no tokenizer thread
    pools, which warn and can deadlock once torchrun or a data loader forks.)"""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def fail(message: str):
    """Stop with a one-line error naming the problem and the fix (exit status 1)."""
    raise SystemExit(f"error: {message}")


def resolve(path: str) -> str:
    """Defaults like `toy/policy` are relative to the repository, wherever the script runs from."""
    return str(REPO / path) if not os.path.exists(path) and (REPO / path).exists() else path


# ---------------------------------------------------------------- distributed
def setup_distributed(timeout_minutes: float = 60) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); under torchrun joins the process group (nccl on CUDA, gloo on CPU). A rank waits
    up to `timeout_minutes` in a collective (NCCL's default 10 would stop a run while rank 0 writes a 6.9B save)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    quiet_libraries()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world_size, device


def close_distributed():
    """Every rank has finished (rank 0's final save included); leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_list(items: list) -> list:
    if not dist.is_initialized():
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (e.g. a time-stamped output directory name)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def global_means(per_sequence: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over all ranks' sequences of each per-sequence statistic: one all-reduce, one sync."""
    count = next(iter(per_sequence.values())).new_tensor(len(next(iter(per_sequence.values()))), dtype=torch.float)
    sums = all_reduce_sum(torch.stack([v.float().sum() for v in per_sequence.values()] + [count])).tolist()
    return {key: total / sums[-1] for key, total in zip(per_sequence, sums)}


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- flags, dtype, timing
def check_batch_sizes(total_episodes: int, rollout_batch_size: int, mini_batch_size: int, world_size: int, args):
    """Every flag in range, batch sizes divide as the loops need them to (before anything loads or is written)."""
    check_flags(args, mini_batch_size // world_size, world_size)
    for flag, size in (("--rollout-batch-size", rollout_batch_size), ("--mini-batch-size", mini_batch_size)):
        if size % world_size:  # (positive: check_flags)
            fail(f"{flag} {size} is not divisible by the {world_size} ranks; make it a multiple of the world size")
    if rollout_batch_size % mini_batch_size:
        fail(f"--rollout-batch-size {rollout_batch_size} is not divisible by --mini-batch-size {mini_batch_size}")
    if total_episodes < rollout_batch_size:
        fail(f"--total-episodes {total_episodes} is less than one --rollout-batch-size ({rollout_batch_size})")


# The ranges of the flags the scripts share by name (a script checks those of its Args that appear here).
POSITIVE_COUNTS = """total_episodes rollout_batch_size mini_batch_size update_epochs total_steps batch_size
rollout_forward_batch_size max_new_tokens max_prompt_length eval_every eval_size lora_r kl_horizon value_samples
value_epochs log_every lr_warmup_steps""".split()
NON_NEGATIVE = """save_every micro_batch_size critic_warmup_steps missing_eos_penalty kl_coef kl_target vf_coef
max_weight kl_beta ptx_coef weight_decay""".split()
POSITIVE = "temperature lr value_lr max_grad_norm reward_clip clip_eps value_clip lam beta dist_timeout".split()
UNIT_INTERVAL = ["gamma", "gae_lambda"]


def check_flags(args, local_mini_batch: int, world_size: int):
    """Every shared flag in its range; --dtype float16 refused; --micro-batch-size divides a rank's minibatch;
    --fsdp has ranks to shard over; --num-layers-unfrozen >= -1."""
    for names, ok, wanted in (
        (POSITIVE_COUNTS, lambda v: v >= 1, "a positive integer"),
        (NON_NEGATIVE, lambda v: v >= 0, "0 or more"),
        (POSITIVE, lambda v: v > 0, "greater than 0"),
        (UNIT_INTERVAL, lambda v: 0 <= v <= 1, "in [0, 1]"),
    ):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not (ok(value) and value == value):  # value == value: not NaN
                fail(f"--{name.replace('_', '-')} {value} is out of range; it must be {wanted}")
    if not all(0 <= beta < 1 for beta in getattr(args, "adam_betas", ())):
        fail(f"--adam-betas {args.adam_betas} is out of range; both must be in [0, 1)")
    if args.dtype == "float16":
        fail("--dtype float16 needs a gradient scaler, which these scripts do not have; use --dtype bfloat16")
    if args.micro_batch_size and local_mini_batch % args.micro_batch_size:
        fail(
            f"--micro-batch-size {args.micro_batch_size} does not divide the {local_mini_batch} rows each rank gets "
            "per gradient step; pass a divisor of it (0 = no micro-batching)"
        )
    if args.fsdp and world_size == 1:
        fail("--fsdp shards the models over ranks; launch with torchrun --nproc_per_node N (N > 1) or drop --fsdp")
    if args.num_layers_unfrozen < -1:
        fail(f"--num-layers-unfrozen {args.num_layers_unfrozen} is out of range; pass -1 (train all) or N >= 0")
    if args.push_to_hub:
        import huggingface_hub

        if "/" not in args.push_to_hub:
            fail(f"--push-to-hub {args.push_to_hub}: pass a hub repository as <user or organisation>/<name>")
        if huggingface_hub.get_token() is None:  # found out now, not after the run
            fail("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    # a real --model on the toy's data, reward model or learning rate is almost always an omission: say so once
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    toy = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in ("dataset", "reward_model", "eval_reward")]
    toy = [flag for flag in toy if flag.split(" ")[1].startswith(("toy/", "toy."))]
    toy += [f"--lr {args.lr}"] * (args.lr == defaults["lr"])
    if not args.model.startswith("toy/") and toy and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"notice: --model {args.model} is not the toy policy, but {', '.join(toy)} are still the toy task's "
            "defaults; the papers' recipes for real models are in recipes/ (README: Real models)",
            flush=True,
        )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def now(device: torch.device) -> float:
    """Wall-clock time after the device has finished queued work (for the time split)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---------------------------------------------------------------- FSDP2 shards in no-grad passes, micro-batches
def fsdp_modules(model) -> list[nn.Module]:
    """The FSDP2 shard groups inside `model` (none when FSDP was never imported: it costs a second at startup)."""
    if "torch.distributed.fsdp" not in sys.modules or not isinstance(model, nn.Module):
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def gathered(model):
    """Under --fsdp, all-gather every shard once and keep the full weights until the block ends (generation, no-grad
    chunked passes): no collective per decode step or chunk, so ranks may run different numbers of them.
    A no-op for unsharded models (and for None)."""
    groups = fsdp_modules(model)
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# ---------------------------------------------------------------- padding: sorted rows, trimmed columns, a meter
PADDING = {"generate": [0, 0], "passes": [0, 0], "update": [0, 0]}  # (padding tokens, computed tokens) this iteration


def count_padding(kind: str, real_tokens, computed_tokens):
    PADDING[kind][0] += int(computed_tokens) - int(real_tokens)
    PADDING[kind][1] += int(computed_tokens)


def padding_fractions() -> dict[str, float]:
    """time/padding_fraction_{generate,passes,update} since the last call, over all ranks: padding / computed tokens
    (generate: prefill columns and the decode steps of rows that had stopped)."""
    totals = all_reduce_sum(torch.tensor([v for pair in PADDING.values() for v in pair], dtype=torch.float64))
    out = {f"time/padding_fraction_{k}": (totals[2 * i] / totals[2 * i + 1].clamp(min=1)).item()
           for i, k in enumerate(PADDING)}  # fmt: skip
    for pair in PADDING.values():
        pair[0] = pair[1] = 0
    return out


# a forward call costs its tokens plus about CALL_TOKENS more (launches, per-call work, a device less busy on a small
# call): rows are split into another call only where that saves more padding than this. (256, the previous value,
# made the plain toy 23% slower on CPU: 10 calls per pass instead of 1 for 24% less padding)
CALL_TOKENS = 1024


def length_groups(prompt_lengths: list[int], response_lengths: list[int], max_rows: int, max_tokens: int):
    """Rows grouped for passes with little padding: sorted by length (longest first), cut into consecutive groups,
    each padded to its own longest prompt and response, of at most `max_rows` rows and `max_tokens` padded tokens
    (the memory budget), so that the tokens computed, plus CALL_TOKENS per group, are fewest (dynamic
    programming over the cut points). Returns lists of row indices."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: -(prompt_lengths[i] + response_lengths[i]))
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        prompt_width = response_width = 0
        for start in range(end - 1, max(end - max_rows, 0) - 1, -1):  # the group order[start:end]
            prompt_width = max(prompt_width, prompt_lengths[order[start]])
            response_width = max(response_width, response_lengths[order[start]])
            tokens = (end - start) * (prompt_width + response_width)
            if tokens > max_tokens and end - start > 1:
                break
            cost = best[start] + tokens + CALL_TOKENS
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def sorted_chunks(attention_mask: torch.Tensor, context_length: int, chunk_size: int):
    """(rows, columns) per chunk of at most `chunk_size` rows of a (left-padded prompt, right-padded response) batch:
    rows of similar length together (`length_groups`), and only the columns some row of the chunk uses (at least
    one column before `context_length`, for the logit of the first response token)."""
    prompt_lengths = attention_mask[:, :context_length].sum(1).tolist()
    response_lengths = attention_mask[:, context_length:].sum(1).tolist()
    width = attention_mask.shape[1]
    for group in length_groups(prompt_lengths, response_lengths, chunk_size, chunk_size * width):
        rows = torch.tensor(group, device=attention_mask.device)
        p, r = max(max(prompt_lengths[i] for i in group), 1), max(response_lengths[i] for i in group)
        yield rows, slice(context_length - p, context_length + max(r, 1))


def micro_batches(minibatch: torch.Tensor, mask: torch.Tensor, micro_batch_size: int = 0, parts: int = 0):
    """(rows, share, sync) per micro-batch of a minibatch's rows (`micro_batch_size` rows each, or `parts` equal
    parts). A loss is a mean over the minibatch's tokens on all ranks (`mask`: the (B, R) tokens, or (B,) counts per
    row): each micro-batch's mean is weighted by its `share` of them, times the world size as DDP and FSDP average
    gradients over ranks, so any split into ranks and micro-batches gives the same update. Gradients are
    synchronised (`sync`) on the last micro-batch only."""
    total = all_reduce_sum(mask[minibatch].sum())  # of the minibatch on all ranks
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    groups = minibatch.tensor_split(parts) if parts else minibatch.split(micro_batch_size or len(minibatch))
    for i, rows in enumerate(groups):
        yield rows, mask[rows].sum() * world_size / total, i == len(groups) - 1


def token_micro_batches(minibatch: torch.Tensor, attention_mask: torch.Tensor, context_length: int, size: int):
    """The update's micro-batches of a minibatch's rows (B, P + R, left-padded prompts then responses): rows of
    similar length together (`length_groups`: at most `size` rows, --micro-batch-size, 0 = the whole minibatch, and
    as many tokens as `size` rows of the full width), and only the columns some row of it uses. The same number of
    them on every rank (FSDP2 reduce-scatters after each). Yields (mb, seq, context, share, sync):
    `mb` = (rows, response columns) indexes the (B, R) rollout tensors, `seq` = (rows, columns) input_ids and
    attention_mask, `context` = the prompt columns kept; `share` and `sync` as `micro_batches` gives them."""
    prompt_lengths = attention_mask[minibatch, :context_length].sum(1).tolist()
    response_lengths = attention_mask[minibatch, context_length:].sum(1).tolist()
    rows = size or len(minibatch)
    groups = length_groups(prompt_lengths, response_lengths, rows, rows * attention_mask.shape[1])
    parts = int(all_reduce_max(torch.tensor(len(groups), device=attention_mask.device)))
    while len(groups) < parts:  # another rank needs more: split the largest
        k = max(range(len(groups)), key=lambda g: len(groups[g]))
        groups[k : k + 1] = [groups[k][: len(groups[k]) // 2], groups[k][len(groups[k]) // 2 :]]
    response_mask = attention_mask[:, context_length:]
    total = all_reduce_sum(response_mask[minibatch].sum())
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    for n, group in enumerate(groups):
        rows = minibatch[group]
        p, r = max(prompt_lengths[i] for i in group), max(response_lengths[i] for i in group)
        mb, seq = (rows, slice(0, r)), (rows, slice(context_length - p, context_length + r))
        count_padding("update", attention_mask[seq].sum(), len(group) * (p + r))
        yield mb, seq, p, response_mask[mb].sum() * world_size / total, n == len(groups) - 1


# ---------------------------------------------------------------- rollout tensors and generation
def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def pad_pairs(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
    """Given (prompt, response) token ids, the rollout layout: left-padded prompts then right-padded
    responses. Returns input_ids, attention_mask, context_length, responses (B, R), response_mask (B, R)."""
    queries, query_mask = left_pad(prompts, pad_id, device)
    width = max(len(r) for r in responses)
    padded = torch.tensor([r + [pad_id] * (width - len(r)) for r in responses], device=device)
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses], device=device)
    input_ids, attention_mask = torch.cat([queries, padded], 1), torch.cat([query_mask, response_mask], 1)
    return input_ids, attention_mask, queries.shape[1], padded, response_mask.bool()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded and unpadded rows get the same positions, so padding never changes a log-prob."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def kv_cache(model, device: torch.device):
    """Under 16-bit autocast, a KV cache that stores keys and values in that dtype. (From float32 weights the rotary
    embedding's float32 cos/sin make them float32: twice the cache memory and decode bandwidth, for nothing, since
    attention casts them to 16 bits under autocast anyway: the samples are bit-identical.) None otherwise."""
    if not torch.is_autocast_enabled(device.type):
        return None
    from transformers import DynamicCache

    class AutocastCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            dtype = torch.get_autocast_dtype(device.type)
            return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)

    return AutocastCache(config=model.config)


@torch.no_grad()
def generate(model, queries, query_mask, generation_config, chunk_size: int, tokenizer=None):
    """Sample responses with the KV cache (16-bit under autocast: `kv_cache`) in chunks of `chunk_size` prompts of
    similar length, each left-padded only to its own longest (a row stops at a stop token, or at a stop string of the
    generation config, which needs the `tokenizer`). Returns responses (B, R) and response_mask (B, R): 1 on real
    tokens up to and including the first stop token."""
    lengths = query_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    stops = torch.tensor(generation_config.eos_token_id, device=queries.device)
    chunks = []
    with gathered(model):  # under --fsdp: one all-gather for the whole generation, none per decode step
        for start in range(0, len(order), chunk_size):
            rows = order[start : start + chunk_size]
            width = int(lengths[rows].max())
            out = model.generate(
                input_ids=queries[rows, -width:],
                attention_mask=query_mask[rows, -width:],
                generation_config=generation_config,
                tokenizer=tokenizer,
                past_key_values=kv_cache(model, queries.device),
            )[:, width:]
            chunks.append((rows, out))
            real = lengths[rows].sum() + response_mask_of(out, stops).sum()
            count_padding("generate", real, len(rows) * (width + out.shape[1]))
    responses = queries.new_full((len(queries), max(out.shape[1] for _, out in chunks)), generation_config.pad_token_id)
    for rows, out in chunks:
        responses[rows, : out.shape[1]] = out
    return responses, response_mask_of(responses, stops)


def response_mask_of(responses: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """1 on the tokens up to and including the first stop token of each row."""
    is_stop = torch.isin(responses, stops)
    return (is_stop.cumsum(1) - is_stop.long()) == 0


# ---------------------------------------------------------------- log-probs and masked statistics
def response_logits(model, input_ids, attention_mask, context_length: int, temperature: float) -> torch.Tensor:
    """Logits / T at the positions that predict the response tokens input_ids[:, context_length:].
    Logits at position t predict token t+1: this is the one place the shift happens."""
    response_length = input_ids.shape[1] - context_length
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_length + 1,
        use_cache=False,
    ).logits
    # from the end: right whether or not the model honoured logits_to_keep (a model may return every position)
    return logits[:, -(response_length + 1) : -1].float() / temperature  # (B, R, V)


def rows_per_forward(model, length: int, chunk_size: int, budget: int = 2**26) -> int:
    """Rows per no-grad forward that returns logits: `chunk_size`, or fewer where their float32 logits (rows x length
    x vocabulary) would pass `budget` elements (256 MB): a 152k-token vocabulary's logits are 240x a toy's."""
    config = getattr(model, "config", None)
    vocab = getattr(config.get_text_config(), "vocab_size", 1) if config is not None else 1
    return max(1, min(chunk_size, budget // (length * vocab)))


@torch.no_grad()
def chunked_logprobs(model, input_ids, attention_mask, responses, temperature: float, chunk_size: int, dtype):
    """log pi(response tokens) (B, R) of `responses` = input_ids[:, -R:]: no grad, `chunk_size` rows at a time (fewer
    for a large vocabulary: `rows_per_forward`), the weights gathered once for the whole pass under --fsdp."""
    context_length = input_ids.shape[1] - responses.shape[1]
    chunk_size = rows_per_forward(model, responses.shape[1] + 1, chunk_size)
    logprobs = torch.zeros(responses.shape, device=input_ids.device)  # padding stays 0
    with gathered(model), autocast(input_ids.device, dtype):
        for rows, columns in sorted_chunks(attention_mask, context_length, chunk_size):
            ids, mask = input_ids[rows, columns], attention_mask[rows, columns]
            context, width = context_length - columns.start, columns.stop - context_length
            count_padding("passes", mask.sum(), mask.numel())
            logits = response_logits(model, ids, mask, context, temperature)
            logprobs[rows, :width] = gather_logprobs(logits, responses[rows, :width])
    return logprobs


@torch.no_grad()
def chunked_values(value_model, input_ids, attention_mask, response_length: int, chunk_size: int, dtype):
    """V(s_t) (B, R) for each of the last R tokens, read at the token before it: no grad, in sorted, trimmed chunks
    (`sorted_chunks`), the weights gathered once."""
    context_length = input_ids.shape[1] - response_length
    values = torch.zeros((len(input_ids), response_length), device=input_ids.device)  # padding stays 0
    with gathered(value_model), autocast(input_ids.device, dtype):
        for rows, columns in sorted_chunks(attention_mask, context_length, chunk_size):
            mask = attention_mask[rows, columns]
            count_padding("passes", mask.sum(), mask.numel())
            width = columns.stop - context_length
            values[rows, :width] = value_model(input_ids[rows, columns], mask)[:, -width - 1 : -1]
    return values


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] as logit - logsumexp: no (B, R, V) log-softmax kept for the backward pass."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """Entropy of softmax(logits) per position, a few rows at a time (a large vocabulary's copies stay small)."""
    chunks = []
    for part in logits.split(rows):
        logp = torch.log_softmax(part, dim=-1)
        chunks.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(chunks)


def penalize_missing_eos(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """The scores less `penalty` where a response never emitted a stop token (cut at --max-new-tokens). NaN/inf
    scores on any rank stop the run, before anything is saved."""
    if not torch.isfinite(all_reduce_sum(scores.sum())):
        fail("the reward model returned NaN/inf scores; check --reward-model")
    return scores - penalty * (~ended).float()


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), values, 0.0).sum()  # where, not *, so NaN/inf in padding stay out


def masked_mean(values: torch.Tensor, mask: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
    """sum(m*v)/sum(m); with global_batch=True over every rank's tokens."""
    total = torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)])
    total = all_reduce_sum(total) if global_batch else total
    return total[0] / total[1].clamp(min=1)


def masked_whiten(values, mask):
    """Whiten over real tokens only, with statistics over the whole rollout batch on all ranks (per-rank statistics
    would scale each rank's advantages differently)."""
    mean = masked_mean(values, mask, global_batch=True)
    var = masked_mean((values - mean) ** 2, mask, global_batch=True)
    return torch.where(mask.bool(), (values - mean) * torch.rsqrt(var + 1e-8), 0.0)


class RunningMoments:
    """Running mean/std of a scalar stream (Chan et al. parallel update), reduced across ranks."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0  # the first batch sets mean and var exactly

    def update(self, x: torch.Tensor):
        # float64 sums of x shifted by the running mean: scores around 1e6 keep their variance (float32 sums do not)
        shifted = x.double() - self.mean
        stats = all_reduce_sum(torch.stack([shifted.sum(), (shifted**2).sum(), shifted.new_tensor(x.numel())]))
        n = stats[2].item()
        batch_mean = self.mean + stats[0].item() / n
        batch_var = max(stats[1].item() / n - (stats[0].item() / n) ** 2, 0.0)
        delta, total = batch_mean - self.mean, self.count + n
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict):
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all responses (word level)."""
    ngrams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(ngrams)) / max(len(ngrams), 1)


def evaluation_metrics(score_fn, eval_score_fn, prompt_texts, response_texts, ended, kl, response_mask, ns=(1, 2)):
    """The evaluation of held-out samples, every rank's together: eval/reward (--reward-model), eval/gold_reward
    (--eval-reward, when given), eval/kl (k1 summed over the response), eval/response_length, eval/eos_rate, and
    eval/distinct_n for n in `ns` over all ranks' responses; under "samples" the samples themselves, in prompt order
    (rank r holds the held-out prompts r, r + world size, ...), which the Logger writes to samples.jsonl."""
    per_sequence = {
        "eval/reward": score_fn(prompt_texts, response_texts, ended),
        "eval/kl": kl.sum(1),
        "eval/response_length": response_mask.sum(1),
        "eval/eos_rate": ended,
    }
    if eval_score_fn:
        per_sequence["eval/gold_reward"] = eval_score_fn(prompt_texts, response_texts, ended)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    columns = {key.removeprefix("eval/"): values.tolist() for key, values in per_sequence.items()}
    samples = [
        {"index": rank + i * world_size, "prompt": prompt, "response": response}
        | {"reward": columns["reward"][i], "gold_reward": columns.get("gold_reward", [None] * len(prompt_texts))[i]}
        | {"kl": columns["kl"][i], "length": columns["response_length"][i], "ended": columns["eos_rate"][i]}
        for i, (prompt, response) in enumerate(zip(prompt_texts, response_texts))
    ]
    samples = sorted(all_gather_list(samples), key=lambda sample: sample["index"])
    texts = [sample["response"] for sample in samples]
    return {
        **global_means(per_sequence),
        **{f"eval/distinct_{n}": distinct_n(texts, n) for n in ns},
        "samples": samples,
    }


# ---------------------------------------------------------------- output directory, logging, checkpoint files
def check_output_dir(output_dir: str, resume: bool):
    checkpoints = [
        os.path.join(output_dir, f) for f in ("checkpoint.pt", "checkpoint/state.pt", "checkpoint.old/state.pt")
    ]
    if resume and not any(os.path.exists(path) for path in checkpoints):
        fail(f"--resume: no checkpoint in {output_dir}; pass the --output-dir of the run to continue")
    if not resume and os.path.isdir(output_dir) and os.listdir(output_dir):
        fail(f"--output-dir {output_dir} already holds a run; pass --resume to continue it or choose a new directory")


def hours(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


class Logger:
    """metrics.jsonl + TensorBoard (+ wandb with --track) + one printed progress line per row, all on rank 0. A row's
    "samples" (an evaluation's, when it was made at this row's iteration) go to samples.jsonl, one row per held-out
    prompt, and to TensorBoard (text) and wandb (a table)."""

    def __init__(self, output_dir: str, args, rank: int, total: int, start: int):
        self.rank, self.total, self.start, self.started = rank, total, start, time.time()
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.samples_path = (os.path.join(output_dir, name) for name in ("metrics.jsonl", "samples.jsonl"))
        for path in (self.path, self.samples_path):  # on resume, drop rows logged after the checkpoint: they are redone
            if os.path.exists(path):
                rows = [line for line in open(path) if json.loads(line)["iteration"] <= start]
                with open(path + ".tmp", "w") as f:
                    f.writelines(rows)
                os.replace(path + ".tmp", path)
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.wandb = None
        if args.track:
            try:
                import wandb
            except ImportError:
                fail("--track needs wandb: pip install wandb")
            self.wandb = wandb.init(project=args.wandb_project, config=vars(args), name=os.path.basename(output_dir))

    def log(self, row: dict):
        if self.rank != 0:
            return
        samples = row.get("samples") if row.get("eval/iteration") == row["iteration"] else None
        row = {key: value for key, value in row.items() if key != "samples"}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if "/" in key and (not key.startswith("eval/") or row.get("eval/iteration") == row["iteration"]):
                self.writer.add_scalar(key, value, row["episodes"])
        if self.wandb:
            self.wandb.log(row, step=row["episodes"])
        if samples:
            self.log_samples(row, samples)
        keys = ("train/reward", "train/kl", "eval/gold_reward", "time/samples_per_s")
        progress = [f"{key} {row[key]:.3f}" for key in keys if key in row]
        elapsed, done = time.time() - self.started, row["iteration"] - self.start
        clock = f"elapsed {hours(elapsed)}"  # remaining: at the pace of this session's iterations so far
        clock += f", remaining {hours(elapsed / done * (self.total - row['iteration']))}" if done > 0 else ""
        print(f"iteration {row['iteration']}/{self.total}", *progress, clock, sep="  ", flush=True)

    def log_samples(self, row: dict, samples: list[dict]):
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"iteration": row["iteration"], **sample}) + "\n" for sample in samples)
        columns = [key for key in samples[0] if key != "index"]
        cell = lambda value: str(value).replace("|", "\\|").replace("\n", " ")  # noqa: E731 (a Markdown table cell)
        table = [" | ".join(columns), " | ".join("---" for _ in columns)]
        table += [" | ".join(cell(sample[key]) for key in columns) for sample in samples[:8]]
        self.writer.add_text("eval/samples", "\n".join(table), row["episodes"])
        if self.wandb:
            import wandb

            data = [[sample[key] for key in columns] for sample in samples]
            self.wandb.log({"eval/samples": wandb.Table(columns=columns, data=data)}, step=row["episodes"])

    def close(self):
        if self.rank == 0:
            self.writer.close()
            if self.wandb:
                self.wandb.finish()


def save_checkpoint(output_dir: str, state: dict):
    """Atomic: a killed save leaves the previous checkpoint intact. Rank 0 writes; every rank calls it."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = os.path.join(output_dir, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(output_dir: str) -> dict:
    return torch.load(os.path.join(output_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
