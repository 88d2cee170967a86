"""Plumbing (a reader of the algorithms can skip it): padding is compute too. Which rows share a forward call (sorted
by length, grouped so that padding plus a per-call cost is least) and which columns each call keeps, and the meter
behind time/padding_fraction_* (padding / computed tokens)."""

import torch

import common

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


PADDING = {"generate": [0, 0], "passes": [0, 0], "update": [0, 0]}  # (padding tokens, computed tokens) this iteration


def count_padding(kind: str, real_tokens, computed_tokens):
    PADDING[kind][0] += int(computed_tokens) - int(real_tokens)
    PADDING[kind][1] += int(computed_tokens)


def padding_fractions() -> dict[str, float]:
    """time/padding_fraction_{generate,passes,update} since the last call, over all ranks: padding / computed tokens
    (generate: prefill columns and the decode steps of rows that had stopped)."""
    totals = common.all_reduce_sum(torch.tensor([v for pair in PADDING.values() for v in pair], dtype=torch.float64))
    out = {f"time/padding_fraction_{k}": (totals[2 * i] / totals[2 * i + 1].clamp(min=1)).item()
           for i, k in enumerate(PADDING)}  # fmt: skip
    for pair in PADDING.values():
        pair[0] = pair[1] = 0
    return out
