"""Run an algorithm script with rollouts that depend only on the prompt, not on the rank or the batch that sampled
it, so that runs with 1 rank, 2 ranks, DDP, FSDP and micro-batches train on the same data and must reach the same
parameters. Usage: python tests/fixed_rollouts.py ppo [script flags...] (or under torchrun)."""

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
GROUPED = False  # grpo.py / rloo.py: the K copies of a prompt (consecutive rows) get K different responses


def fixed_generate(model, queries, query_mask, generation_config, chunk_size, tokenizer=None):
    """Random response tokens seeded by the prompt's ids (and, GROUPED, the row's place in its group): lengths
    1..max_new_tokens, half of them ending in EOS."""
    eos, pad, width = generation_config.eos_token_id, generation_config.pad_token_id, generation_config.max_new_tokens
    eos = eos[0] if isinstance(eos, list) else eos  # the scripts pass every stop id
    rows, previous, k = [], None, 0
    for ids, mask in zip(queries.tolist(), query_mask.tolist()):
        prompt = [t for t, m in zip(ids, mask) if m]
        k, previous = (k + 1 if GROUPED and prompt == previous else 0), prompt
        seed = (sum((i + 1) * t for i, t in enumerate(prompt)) + 7919 * k) % (2**31)
        generator = torch.Generator().manual_seed(seed)
        ends_with_eos = bool(torch.randint(2, (1,), generator=generator))
        length = int(torch.randint(1, width + 1, (1,), generator=generator)) if ends_with_eos else width
        tokens = torch.randint(2, 600, (length,), generator=generator).tolist()
        rows.append(tokens[:-1] + [eos] if ends_with_eos else tokens)
    longest = max(len(r) for r in rows)
    responses = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=queries.device)
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=queries.device)
    return responses, mask.bool()


def next_turn_generate(model, queries, query_mask, generation_config, chunk_size, tokenizer=None):
    """Every row writes its answer and then the next turn itself (no EOS): what --stop-strings cuts."""
    from transformers import AutoTokenizer

    toy = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "toy" / "policy")
    ids = toy(" sure! watch the bishop.\n\nHuman: and more", add_special_tokens=False)["input_ids"]
    ids = ids[: generation_config.max_new_tokens]
    responses = torch.tensor([ids] * len(queries), device=queries.device)
    return responses, torch.ones_like(responses, dtype=torch.bool)


if __name__ == "__main__":
    script = importlib.import_module(sys.argv[1])
    GROUPED = sys.argv[1] in ("grpo", "rloo")
    script.common.generate = fixed_generate
    sys.argv = [sys.argv[1] + ".py", *sys.argv[2:]]
    script.main()
