"""Does passing the attention mask differently remove transformers' host reads of it, without changing a number?

    python bench/attention_mask.py        # seconds, CPU; writes bench/results/attention_mask.{md,json}

Every forward the scripts make passes a 2-D padding mask; transformers' mask code reads it on the host (whether it
holds padding, to let SDPA skip the mask), a device sync per forward on a GPU. Two alternatives, each measured on
the toy policy (GPT-NeoX) and on a tiny random Llama, for a chunk with padding (left-padded prompts, right-padded
responses) and one without: the forward's Python reads of tensor values (bench/instrument.py's CPU proxy for host
syncs) and the largest difference of its logits from the 2-D mask's.
- no mask (None) where the chunk holds no padding (known on the host from the rollout's row lengths);
- a prepared 4-D mask (causal and padding, boolean, (B, 1, T, T): plumbing/tensors.py's causal_padding_mask, what
  the scripts now pass where it is safe), which transformers passes through unread.
"""

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from instrument import Counter  # noqa: E402

from plumbing.tensors import causal_padding_mask, position_ids  # noqa: E402


def models():
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    yield "GPT-NeoX (toy policy)", AutoModelForCausalLM.from_pretrained(REPO / "toy" / "policy")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=635, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=1)  # fmt: skip
    yield "Llama (tiny random)", LlamaForCausalLM(config)


def batches():
    torch.manual_seed(1)
    ids = torch.randint(2, 600, (4, 24))
    padded = torch.ones_like(ids, dtype=torch.long)
    padded[0, :5] = 0  # a left-padded prompt
    padded[1, -3:] = 0  # a response that stopped early
    yield "with padding", ids, padded
    yield "without padding", ids, torch.ones_like(ids, dtype=torch.long)


COUNTER = None


def forward(model, ids, mask, how: str):
    attention = {"2-D": mask, "none": None, "4-D": causal_padding_mask(mask)}[how]
    positions = position_ids(mask)
    COUNTER.take()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    counts = COUNTER.take()
    return logits, counts["other"] + counts["generate"]


def main():
    global COUNTER
    COUNTER = Counter(cuda=False)  # counts every Python read of a tensor's value from here on
    rows = []
    for name, model in models():
        model.eval()
        for kind, ids, mask in batches():
            reference, reads = forward(model, ids, mask, "2-D")
            real = mask.bool()
            for how in ["2-D", "4-D"] + (["none"] if bool(real.all()) else []):
                logits, count = forward(model, ids, mask, how)
                difference = (logits - reference)[real].abs().max().item()  # real positions only
                rows.append({"model": name, "chunk": kind, "mask": how, "reads": count, "max_difference": difference})
    lines = [
        "# Host reads of the attention mask per forward, and the logits' largest difference from the 2-D mask",
        "",
        "| model | chunk | mask passed | reads per forward | largest logit difference |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['chunk']} | {r['mask']} | {r['reads']} | {r['max_difference']:.1e} |" for r in rows]
    out = REPO / "bench" / "results"
    (out / "attention_mask.md").write_text("\n".join(lines) + "\n")
    (out / "attention_mask.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
