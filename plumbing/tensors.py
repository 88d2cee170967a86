"""The floor under common.py and plumbing/: reductions over ranks, autocast and position ids. It imports nothing of
the project, so common.py (which the scripts read) and plumbing/ (which they need not) both stand on it and
neither imports the other's internals in a circle; common.py re-exports these names (`common.all_reduce_sum`)."""

import torch
import torch.distributed as dist


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


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded and unpadded rows get the same positions, so padding never changes a log-prob."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# architectures whose attention is causal over every layer (no sliding window, prefix or bidirectional part) and
# whose positions come from the position ids the scripts pass: a prepared mask means for them what the 2-D one does
PLAIN_CAUSAL = ("gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gpt2")


def attention_mask_for(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask a forward is given: for a model of PLAIN_CAUSAL attending with SDPA, the causal and padding
    mask prepared as SDPA takes it (boolean, (B, 1, T, T)), which transformers passes through without reading it
    (its own mask code reads a 2-D mask on the host, once or twice per forward: a device sync each on a GPU;
    bench/attention_mask.py: 2 reads per forward before, 0 after, the logits identical); the 2-D mask otherwise
    (eager attention wants an additive mask, FlashAttention-2 the 2-D one, sliding windows their own)."""
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if config is None or config.model_type not in PLAIN_CAUSAL:
        return attention_mask
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return attention_mask
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return attention_mask  # (Mistral's window; Qwen2's is off unless use_sliding_window)
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return attention_mask
    return causal_padding_mask(attention_mask)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: query i attends key j <= i where key j is a real token (a padding query attends to
    itself, so that no row is empty: SDPA would return NaN for it, and padding positions are never read)."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask[:, None, :].bool()
    allowed |= torch.eye(length, dtype=torch.bool, device=attention_mask.device)[None]
    return allowed[:, None]
