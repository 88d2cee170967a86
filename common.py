"""What the training loops compute with (a reader of the algorithms reads it once), shared by the five scripts:
reductions over ranks, padding, generation, the log-prob gather and the chunked no-grad passes, micro-batches,
masked statistics, whitening and running moments. The rest the scripts share is plumbing, in `plumbing/` (loading,
flags, logging, checkpoints). No algorithm logic lives here: what each algorithm optimises is in its own script."""

from typing import NamedTuple

import torch
import torch.distributed as dist

from plumbing import models, padding, run


class Rollout(NamedTuple):
    """One sampled response per prompt: (B, P + R) sequences, left-padded prompts then right-padded responses."""

    input_ids: torch.Tensor  # (B, P + R): what every later pass reads
    attention_mask: torch.Tensor  # (B, P + R)
    responses: torch.Tensor  # (B, R) = input_ids[:, P:]
    response_mask: torch.Tensor  # (B, R), bool: 1 up to and including the first stop token
    ended: torch.Tensor  # (B,), bool: stopped by itself, not cut at --max-new-tokens
    prompt_texts: list  # what the scorers read: strings, or message lists (conversational)
    response_texts: list[str]


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


def global_means(per_sequence: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over all ranks' sequences of each per-sequence statistic: one all-reduce, one sync."""
    count = next(iter(per_sequence.values())).new_tensor(len(next(iter(per_sequence.values()))), dtype=torch.float)
    sums = all_reduce_sum(torch.stack([v.float().sum() for v in per_sequence.values()] + [count])).tolist()
    return {key: total / sums[-1] for key, total in zip(per_sequence, sums)}


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def micro_batches(minibatch: torch.Tensor, mask: torch.Tensor, micro_batch_size: int = 0, parts: int = 0):
    """(rows, share, sync) per micro-batch of a minibatch's rows (`micro_batch_size` rows, or `parts` parts). A loss
    is a mean over the minibatch's tokens on all ranks (`mask`: (B, R) tokens, or (B,) counts): each micro-batch's
    is weighted by its `share` of them, times the world size (DDP and FSDP average gradients over ranks), so any split
    gives the same update. Gradients are synchronised (`sync`) on the last micro-batch only."""
    total = all_reduce_sum(mask[minibatch].sum())  # of the minibatch on all ranks
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    groups = minibatch.tensor_split(parts) if parts else minibatch.split(micro_batch_size or len(minibatch))
    for i, rows in enumerate(groups):
        yield rows, mask[rows].sum() * world_size / total, i == len(groups) - 1


def token_micro_batches(minibatch: torch.Tensor, attention_mask: torch.Tensor, context_length: int, size: int):
    """The update's micro-batches of a minibatch's rows: rows of similar length together (at most `size` rows,
    --micro-batch-size, 0 = all, or their tokens at full width), each with only the columns its rows use, as many on
    every rank. Yields (mb, seq, context, share, sync): `mb` (rows, response columns) indexes the (B, R) tensors, `seq`
    (rows, columns) the (B, P + R) ones, of which the first `context` columns are prompt; `share`, `sync` as below."""
    prompt_lengths = attention_mask[minibatch, :context_length].sum(1).tolist()
    response_lengths = attention_mask[minibatch, context_length:].sum(1).tolist()
    rows = size or len(minibatch)
    groups = padding.length_groups(prompt_lengths, response_lengths, rows, rows * attention_mask.shape[1])
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
        padding.count_padding("update", attention_mask[seq].sum(), len(group) * (p + r))
        yield mb, seq, p, response_mask[mb].sum() * world_size / total, n == len(groups) - 1


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


@torch.no_grad()
def generate(model, queries, query_mask, config, chunk_size: int, tokenizer=None):
    """Sample responses with the KV cache, `chunk_size` prompts of similar length at a time, each left-padded only to
    its own longest (a row stops at a stop token, or at a stop string of the generation `config`, which needs the
    `tokenizer`). Returns responses (B, R) and response_mask (B, R): 1 up to and including the first stop token."""
    lengths = query_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    stops = torch.tensor(config.eos_token_id, device=queries.device)
    chunks = []
    with models.gathered(model):  # under --fsdp: one all-gather for the whole generation, none per decode step
        for start in range(0, len(order), chunk_size):
            rows = order[start : start + chunk_size]
            width = int(lengths[rows].max())
            inputs = dict(input_ids=queries[rows, -width:], attention_mask=query_mask[rows, -width:])
            cache = models.kv_cache(model, queries.device)  # 16-bit under autocast
            out = model.generate(**inputs, generation_config=config, tokenizer=tokenizer, past_key_values=cache)
            out = out[:, width:]
            chunks.append((rows, out))
            real = lengths[rows].sum() + response_mask_of(out, stops).sum()
            padding.count_padding("generate", real, len(rows) * (width + out.shape[1]))
    responses = queries.new_full((len(queries), max(out.shape[1] for _, out in chunks)), config.pad_token_id)
    for rows, out in chunks:
        responses[rows, : out.shape[1]] = out
    return responses, response_mask_of(responses, stops)


def response_mask_of(responses: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """1 on the tokens up to and including the first stop token of each row."""
    is_stop = torch.isin(responses, stops)
    return (is_stop.cumsum(1) - is_stop.long()) == 0


def response_logits(model, input_ids, attention_mask, context_length: int, temperature: float) -> torch.Tensor:
    """Logits / T at the positions that predict the response tokens input_ids[:, context_length:].
    Logits at position t predict token t+1: this is the one place the shift happens."""
    response_length = input_ids.shape[1] - context_length
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    logits = model(**inputs, logits_to_keep=response_length + 1, use_cache=False).logits
    # from the end: right whether or not the model honoured logits_to_keep (a model may return every position)
    return logits[:, -(response_length + 1) : -1].float() / temperature  # (B, R, V)


@torch.no_grad()
def chunked_logprobs(model, input_ids, attention_mask, responses, temperature: float, chunk_size: int, dtype):
    """log pi of `responses` = input_ids[:, -R:] (B, R): no grad, in sorted, trimmed chunks, gathered once."""
    context_length = input_ids.shape[1] - responses.shape[1]
    chunk_size = models.rows_per_forward(model, responses.shape[1] + 1, chunk_size)
    logprobs = torch.zeros(responses.shape, device=input_ids.device)  # padding stays 0
    with models.gathered(model), autocast(input_ids.device, dtype):
        for rows, columns in padding.sorted_chunks(attention_mask, context_length, chunk_size):
            ids, mask = input_ids[rows, columns], attention_mask[rows, columns]
            context, width = context_length - columns.start, columns.stop - context_length
            padding.count_padding("passes", mask.sum(), mask.numel())
            logits = response_logits(model, ids, mask, context, temperature)
            logprobs[rows, :width] = gather_logprobs(logits, responses[rows, :width])
    return logprobs


@torch.no_grad()
def chunked_values(value_model, input_ids, attention_mask, response_length: int, chunk_size: int, dtype):
    """V(s_t) (B, R) of each of the last R tokens, read at the token before it: no grad, in sorted, trimmed chunks."""
    context_length = input_ids.shape[1] - response_length
    values = torch.zeros((len(input_ids), response_length), device=input_ids.device)  # padding stays 0
    with models.gathered(value_model), autocast(input_ids.device, dtype):
        for rows, columns in padding.sorted_chunks(attention_mask, context_length, chunk_size):
            mask = attention_mask[rows, columns]
            padding.count_padding("passes", mask.sum(), mask.numel())
            width = columns.stop - context_length
            values[rows, :width] = value_model(input_ids[rows, columns], mask)[:, -width - 1 : -1]
    return values


@torch.no_grad()
def chunked_prompt_features(model, prompts: list[list[int]], pad_id: int, chunk_size: int, dtype) -> torch.Tensor:
    """The masked mean of `model`'s last hidden states over each prompt (P, hidden): no grad, in chunks."""
    features, device = [], next(model.parameters()).device
    with models.gathered(model):
        for i in range(0, len(prompts), chunk_size):
            ids, mask = left_pad(prompts[i : i + chunk_size], pad_id, device)
            inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
            with autocast(device, dtype):
                hidden = model(**inputs, output_hidden_states=True).hidden_states[-1].float()
            features.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(features)


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
        run.fail("the reward model returned NaN/inf scores; check --reward-model")
    return scores - penalty * (~ended).float()


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), values, 0.0).sum()  # where, not *, so NaN/inf in padding stay out


def masked_mean(values: torch.Tensor, mask: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
    """sum(m*v)/sum(m); with global_batch=True over every rank's tokens."""
    total = torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)])
    total = all_reduce_sum(total) if global_batch else total
    return total[0] / total[1].clamp(min=1)


def masked_whiten(values, mask):
    """Whiten over real tokens, with the statistics of the whole batch on all ranks (not each rank's own)."""
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
