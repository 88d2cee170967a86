"""What the training loops compute with (a reader of the algorithms reads it once), shared by the scripts:
reductions over ranks, padding, generation, the log-prob gather and the chunked no-grad passes, micro-batches,
masked statistics, whitening and running moments. The rest the scripts share is plumbing, in `plumbing/` (loading,
flags, logging, checkpoints). No algorithm logic lives here: what each algorithm optimises is in its own script."""

from typing import NamedTuple

import torch
import torch.distributed as dist

from plumbing import data, models, padding, run, tensors
from plumbing.tensors import all_reduce_max as all_reduce_max  # (the floor below: also the scripts' common.X)
from plumbing.tensors import all_reduce_sum as all_reduce_sum
from plumbing.tensors import autocast as autocast
from plumbing.tensors import global_means as global_means
from plumbing.tensors import position_ids as position_ids


class Rollout(NamedTuple):
    """One sampled response per prompt: (B, P + R) sequences, left-padded prompts then right-padded responses."""

    input_ids: torch.Tensor  # (B, P + R): what every later pass reads
    attention_mask: torch.Tensor  # (B, P + R)
    responses: torch.Tensor  # (B, R) = input_ids[:, P:]
    response_mask: torch.Tensor  # (B, R), bool: 1 up to and including the first stop token
    ended: torch.Tensor  # (B,), bool: stopped by itself, not cut at --max-new-tokens
    lengths: padding.RowLengths  # each row's prompt and response lengths, on the host (read from the device once)
    prompt_texts: list  # what the scorers read: strings, or message lists (conversational)
    response_texts: list[str]
    columns: list[dict]  # each row's dataset columns that a scoring function reads by name (an answer to check)


def micro_batches(rows: torch.Tensor, counts: torch.Tensor, micro_batch_size: int = 0, parts: int = 0):
    """This rank's (rows, loss_weight, sync) per micro-batch of a step whose rows on all ranks are `rows` (on the
    host: the same draw on every rank, rank r taking rows r, r + world size, ...), `micro_batch_size` rows at a time
    or in `parts` parts. A loss is a mean over the step's units on all ranks (`counts`, per row of the data, on the
    host: 1 per example, or its tokens): each micro-batch's is weighted by its share of them times the world size
    (DDP and FSDP average gradients over ranks): its `loss_weight`, so any split gives the same update, with no
    collective and no read of the device. Gradients are synchronised (`sync`) on the last micro-batch only."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    total = counts[rows].sum().item()
    local = rows[rank::world_size]
    groups = local.tensor_split(parts) if parts else local.split(micro_batch_size or len(local))
    for i, group in enumerate(groups):
        yield group, counts[group].sum().item() * world_size / total, i == len(groups) - 1


def token_micro_batches(schedule: list[torch.Tensor], lengths: padding.RowLengths, size: int) -> list[list[tuple]]:
    """The update's micro-batches of every minibatch of `schedule` (host tensors of row indices), planned once per
    update from the host `lengths`: rows of similar length together (at most `size` rows, --micro-batch-size, 0 =
    all, or their tokens at full width), each with only the columns its rows use, as many on every rank (one
    all-reduce for the whole update, no read of the device per minibatch). Per minibatch a list of (mb, seq, context,
    loss_weight, sync): `mb` (rows, response columns) indexes the (B, R) tensors, `seq` (rows, columns) the (B, P + R)
    ones, of which the first `context` columns are prompt; `loss_weight` (the micro-batch's share of the minibatch's
    response tokens on all ranks, times the world size) and `sync` as in `micro_batches`."""
    prompt, response, context_length = lengths.prompt, lengths.response, lengths.context_length
    plans, totals = padding.micro_batch_plans(schedule, lengths, size)  # (rows of similar length; one all-reduce)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device_rows = padding.rows_on_device([group for groups in plans for group in groups], lengths.device)
    out = []
    for groups, total in zip(plans, totals):
        micro = []
        for n, group in enumerate(groups):
            rows = device_rows.pop(0)
            p, r = max(prompt[i] for i in group), max(response[i] for i in group)
            mb, seq = (rows, slice(0, r)), (rows, slice(context_length - p, context_length + r))
            real = sum(prompt[i] + response[i] for i in group)
            padding.count_padding("update", real, len(group) * (p + r))
            loss_weight = sum(response[i] for i in group) * world_size / total
            micro.append((mb, seq, p, loss_weight, n == len(groups) - 1))
        out.append(micro)
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return padding.to_device(ids, device), padding.to_device(mask, device)


def pad_pairs(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
    """Given (prompt, response) token ids, the rollout layout: left-padded prompts then right-padded responses.
    Returns input_ids, attention_mask, context_length, responses (B, R), response_mask (B, R) and the row lengths
    (padding.RowLengths: known on the host, so no pass reads them from the device)."""
    width = max(len(r) for r in responses)
    queries, query_mask = left_pad(prompts, pad_id, device)
    padded = padding.to_device(torch.tensor([r + [pad_id] * (width - len(r)) for r in responses]), device)
    response_mask = padding.to_device(torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses]), device)
    input_ids, attention_mask = torch.cat([queries, padded], 1), torch.cat([query_mask, response_mask], 1)
    context_length = queries.shape[1]
    lengths = padding.RowLengths(context_length, input_ids.shape[1], [len(p) for p in prompts],
                                 [len(r) for r in responses], input_ids.device)  # fmt: skip
    return input_ids, attention_mask, context_length, padded, response_mask.bool(), lengths


@torch.no_grad()
def generate(model, queries, query_mask, config, chunk_size: int, tokenizer=None):
    """Sample responses with the KV cache, `chunk_size` prompts of similar length at a time, each left-padded only to
    its own longest (a row stops at a stop token, or at a stop string of the generation `config`, which needs the
    `tokenizer`). Returns responses (B, R) and response_mask (B, R): 1 up to and including the first stop token."""
    lengths = query_mask.sum(1).tolist()  # (one read of the device)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # longest prompts first
    chunks = [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]
    stops = torch.tensor(config.eos_token_id, device=queries.device)
    outputs = []
    # under --fsdp one all-gather, none per decode step; under autocast each trained float32 weight is cast once per
    # autocast block, not per step (autocast caches the casts of weights that train; frozen ones are stored in the
    # compute dtype: models.frozen_linears_to)
    with models.gathered(model):
        for chunk, rows in zip(chunks, padding.rows_on_device(chunks, queries.device)):
            width = max(lengths[i] for i in chunk)
            inputs = dict(input_ids=queries[rows, -width:], attention_mask=query_mask[rows, -width:])
            cache = models.kv_cache(model, queries.device)  # 16-bit under autocast
            out = model.generate(**inputs, generation_config=config, tokenizer=tokenizer, past_key_values=cache)
            out = out[:, width:]
            outputs.append((rows, out))
            real = sum(lengths[i] for i in chunk) + response_mask_of(out, stops).sum()
            padding.count_padding("generate", real, len(chunk) * (width + out.shape[1]))
    responses = queries.new_full((len(queries), max(out.shape[1] for _, out in outputs)), config.pad_token_id)
    for rows, out in outputs:
        responses[rows, : out.shape[1]] = out
    return responses, response_mask_of(responses, stops)


@torch.no_grad()
def greedy_texts(model, prompts: list[list[int]], tokenizer, config, chunk_size: int, dtype, stop_strings=None):
    """The greedy response (sampling off) to each prompt, as text: what a checker's pass@1 greedy reads."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    queries, query_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    greedy = GenerationConfig(**{**config.to_dict(), "do_sample": False, "temperature": None, "top_k": None,
                                 "top_p": None})  # fmt: skip
    with autocast(device, dtype):
        responses, response_mask = generate(model, queries, query_mask, greedy, chunk_size, tokenizer)
    if stop_strings:
        responses, response_mask = data.cut_at_stop_strings(tokenizer, responses, response_mask, stop_strings)
    return data.response_texts(tokenizer, queries, responses)


def response_mask_of(responses: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """1 on the tokens up to and including the first stop token of each row."""
    is_stop = torch.isin(responses, stops)
    return (is_stop.cumsum(1) - is_stop.long()) == 0


def response_logits(model, input_ids, attention_mask, context_length: int, temperature: float) -> torch.Tensor:
    """Logits / T at the positions that predict the response tokens input_ids[:, context_length:].
    Logits at position t predict token t+1: this is the one place the shift happens."""
    response_length = input_ids.shape[1] - context_length
    mask = tensors.attention_mask_for(model, attention_mask)  # (prepared: no host read of it inside transformers)
    inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(attention_mask))
    logits = model(**inputs, logits_to_keep=response_length + 1, use_cache=False).logits
    # from the end: right whether or not the model honoured logits_to_keep (a model may return every position)
    return logits[:, -(response_length + 1) : -1].float() / temperature  # (B, R, V)


@torch.no_grad()
def chunked_logprobs(
    model, input_ids, attention_mask, responses, temperature: float, chunk_size: int, dtype, lengths=None
):
    """log pi of `responses` = input_ids[:, -R:] (B, R): no grad, in sorted, trimmed chunks, gathered once.
    `lengths`: the batch's padding.RowLengths, if the caller has them (else read from the device here)."""
    context_length = input_ids.shape[1] - responses.shape[1]
    lengths = _lengths(lengths, attention_mask, context_length)
    chunk_size = models.rows_per_forward(model, responses.shape[1] + 1, chunk_size)
    logprobs = torch.zeros(responses.shape, device=input_ids.device)  # padding stays 0
    with models.gathered(model), autocast(input_ids.device, dtype):
        for rows, columns in padding.sorted_chunks(lengths, chunk_size):
            ids, mask = input_ids[rows, columns], attention_mask[rows, columns]
            context, width = context_length - columns.start, columns.stop - context_length
            padding.count_padding("passes", mask.sum(), mask.numel())
            logits = response_logits(model, ids, mask, context, temperature)
            logprobs[rows, :width] = gather_logprobs(logits, responses[rows, :width])
    return logprobs


@torch.no_grad()
def chunked_values(value_model, input_ids, attention_mask, response_length: int, chunk_size: int, dtype, lengths=None):
    """V(s_t) (B, R) of each of the last R tokens, read at the token before it: no grad, in sorted, trimmed chunks."""
    context_length = input_ids.shape[1] - response_length
    lengths = _lengths(lengths, attention_mask, context_length)
    values = torch.zeros((len(input_ids), response_length), device=input_ids.device)  # padding stays 0
    with models.gathered(value_model), autocast(input_ids.device, dtype):
        for rows, columns in padding.sorted_chunks(lengths, chunk_size):
            mask = attention_mask[rows, columns]
            padding.count_padding("passes", mask.sum(), mask.numel())
            width = columns.stop - context_length
            values[rows, :width] = value_model(input_ids[rows, columns], mask)[:, -width - 1 : -1]
    return values


def _lengths(lengths, attention_mask, context_length: int) -> padding.RowLengths:
    """The caller's RowLengths of this batch and split, or the batch's read from the device."""
    if lengths is not None and (lengths.context_length, lengths.width) == (context_length, attention_mask.shape[1]):
        return lengths
    return padding.row_lengths(attention_mask, context_length)


@torch.no_grad()
def chunked_prompt_features(model, prompts: list[list[int]], pad_id: int, chunk_size: int, dtype) -> torch.Tensor:
    """The masked mean of `model`'s last hidden states over each prompt (P, hidden): no grad, in chunks."""
    features, device = [], next(model.parameters()).device
    with models.gathered(model):
        for i in range(0, len(prompts), chunk_size):
            ids, mask = left_pad(prompts[i : i + chunk_size], pad_id, device)
            inputs = dict(input_ids=ids, attention_mask=tensors.attention_mask_for(model, mask),
                          position_ids=position_ids(mask))  # fmt: skip
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
        total, squares, n = all_reduce_sum(
            torch.stack([shifted.sum(), (shifted**2).sum(), shifted.new_tensor(x.numel())])
        ).tolist()  # (one read of the device)
        batch_mean = self.mean + total / n
        batch_var = max(squares / n - (total / n) ** 2, 0.0)
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
