"""Plumbing (a reader of the algorithms can skip it): padding is compute too. Which rows share a forward call (sorted
by length, grouped so that padding plus a per-call cost is least) and which columns each call keeps, and the meter
behind time/padding_fraction_* (padding / computed tokens)."""

from typing import NamedTuple

import torch

from plumbing import tensors

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


class RowLengths(NamedTuple):
    """Each row's prompt and response lengths in a (left-padded prompt, right-padded response) batch, on the host:
    read from the device once per batch, then every pass and micro-batch plan groups rows by them without reading the
    device again. Lengths are extents: the columns from a row's first real token to the end of the prompt part, and
    from there to its last real token (the token counts in that layout; with other layouts, every real token)."""

    context_length: int  # columns of the prompt part
    width: int  # columns in all
    prompt: list[int]
    response: list[int]
    device: torch.device


def row_lengths(attention_mask: torch.Tensor, context_length: int) -> RowLengths:
    """RowLengths of a batch: one device-to-host transfer."""
    real, columns = attention_mask.bool(), torch.arange(attention_mask.shape[1], device=attention_mask.device)
    first = torch.where(real, columns, attention_mask.shape[1]).min(1).values
    last = torch.where(real, columns, -1).max(1).values
    extents = torch.stack([(context_length - first).clamp(min=0), (last + 1 - context_length).clamp(min=0)])
    prompt, response = extents.tolist()
    return RowLengths(context_length, attention_mask.shape[1], prompt, response, attention_mask.device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` without waiting for the device's queue (from pinned memory on CUDA)."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def rows_on_device(groups: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Each group's row indices as a device tensor: one host-to-device copy for all of them."""
    flat = to_device(torch.tensor([i for group in groups for i in group], dtype=torch.long), device)
    return list(flat.split([len(group) for group in groups]))


def sorted_chunks(lengths: RowLengths, chunk_size: int):
    """(rows, columns) per chunk of at most `chunk_size` rows of a (left-padded prompt, right-padded response) batch:
    rows of similar length together (`length_groups`), and only the columns some row of the chunk uses (at least
    one column before the prompt's end, for the logit of the first response token)."""
    prompt, response, context = lengths.prompt, lengths.response, lengths.context_length
    groups = length_groups(prompt, response, chunk_size, chunk_size * lengths.width)
    for group, rows in zip(groups, rows_on_device(groups, lengths.device)):
        p, r = max(max(prompt[i] for i in group), 1), max(response[i] for i in group)
        yield rows, slice(context - p, context + max(r, 1))


def micro_batch_plans(schedule: list[torch.Tensor], lengths: RowLengths, size: int):
    """For each minibatch of `schedule` (host tensors of row indices): its micro-batches as lists of rows of similar
    length (`length_groups`: at most `size` rows, 0 = all, or their tokens at full width), as many on every rank
    (a rank with fewer splits its largest), and its response tokens on all ranks. One all-reduce for the update."""
    plans, tokens = [], []
    for minibatch in schedule:
        rows = minibatch.tolist()
        n = size or len(rows)
        groups = length_groups([lengths.prompt[i] for i in rows], [lengths.response[i] for i in rows], n,
                               n * lengths.width)  # fmt: skip
        plans.append([[rows[i] for i in group] for group in groups])
        tokens.append(sum(lengths.response[i] for i in rows))
    counts = to_device(torch.tensor([len(groups) for groups in plans] + tokens), lengths.device)
    counts = torch.cat([tensors.all_reduce_max(counts[: len(plans)]), tensors.all_reduce_sum(counts[len(plans) :])])
    counts = counts.tolist()
    for groups, n in zip(plans, counts[: len(plans)]):
        while len(groups) < n:  # another rank needs more: split the largest
            k = max(range(len(groups)), key=lambda g: len(groups[g]))
            groups[k : k + 1] = [groups[k][: len(groups[k]) // 2], groups[k][len(groups[k]) // 2 :]]
    return plans, counts[len(plans) :]


# (padding tokens, computed tokens) this iteration: padding counted where it is computed (a device tensor: no read
# of the device per call), read once per iteration by padding_fractions
PADDING = {"generate": [0, 0], "passes": [0, 0], "update": [0, 0]}


def count_padding(kind: str, real_tokens, computed_tokens: int):
    """Add a call's tokens to the meter: `real_tokens` an int or a tensor (added up where it lives), `computed_tokens`
    the padded shape's size (an int)."""
    PADDING[kind][0] = PADDING[kind][0] + (computed_tokens - real_tokens)
    PADDING[kind][1] += computed_tokens


def padding_fractions() -> dict[str, float]:
    """time/padding_fraction_{generate,passes,update} since the last call, over all ranks: padding / computed tokens
    (generate: prefill columns and the decode steps of rows that had stopped). One read of the device."""
    counted = [pad for pad, _ in PADDING.values() if isinstance(pad, torch.Tensor)]
    device = next((t.device for t in counted if t.device.type != "cpu"), torch.device("cpu"))
    values = [torch.as_tensor(v, dtype=torch.float64, device=device) for pair in PADDING.values() for v in pair]
    totals = tensors.all_reduce_sum(torch.stack(values)).tolist()
    out = {f"time/padding_fraction_{k}": totals[2 * i] / max(totals[2 * i + 1], 1) for i, k in enumerate(PADDING)}
    for pair in PADDING.values():
        pair[0] = pair[1] = 0
    return out
