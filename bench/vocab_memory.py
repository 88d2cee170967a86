"""Peak memory of a 152k-token vocabulary (Qwen's 151,936): the logits of a no-grad pass or an update grow with the
vocabulary, so a chunk of rows that is harmless for a toy vocabulary can need tens of GB.

    python bench/vocab_memory.py          # about 5 minutes on 2 CPU cores

Builds a tiny random GPT-NeoX policy with that vocabulary (and a word-level tokenizer of the same size; no
download), then measures on CPU:
- a ppo.py iteration, 64 prompts x 128 new tokens, --micro-batch-size 4: time/peak_memory_gb (peak RSS, rank 0);
- the no-grad log-prob pass (common.chunked_logprobs) over 64 rows x 512 tokens, and the --kl-control apa-authors
  pass (every position of those rows): how much the peak resident memory grows during the pass.
Writes <output_dir>/vocab_memory.md and .json.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

REPO = Path(__file__).resolve().parent.parent
VOCAB = 151_936


@dataclass
class Args:
    output_dir: str = "bench/results"  # vocab_memory.md/.json go here; the model under <output_dir>/runs/
    rows: int = 64  # rows of the no-grad passes
    length: int = 512  # tokens per row of the no-grad passes


def make_model(path: Path) -> str:
    """A tiny random GPT-NeoX with a 151,936-token vocabulary and a word-level tokenizer of that size."""
    if (path / "config.json").exists():
        return str(path)
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "[UNK]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   unk_token="[UNK]")  # fmt: skip
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                           pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


PASS = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
import common
from plumbing.models import load_causal_lm
model = load_causal_lm({model!r}, torch.float32)
ids = torch.randint(3, {vocab}, ({rows}, {length}), generator=torch.Generator().manual_seed(0))
responses = ids[:, 1:] if {every} else ids[:, -128:]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
common.chunked_logprobs(model, ids, torch.ones_like(ids), responses, 1.0, 64, torch.float32)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""


def passes_peak(model_dir: str, rows: int, length: int, passes: tuple[bool, ...] = (False, True)) -> dict:
    """Growth of the peak resident memory (GiB) during the no-grad log-prob pass over the last 128 tokens, and over
    every position (--kl-control apa-authors), each in a fresh process after the model and the inputs are loaded."""
    out = {}
    names = {False: "no-grad pass (last 128 tokens)", True: "apa-authors pass (every position)"}
    for name, every in ((names[every], every) for every in passes):
        code = PASS.format(repo=str(REPO), model=model_dir, vocab=VOCAB, rows=rows, length=length, every=every)
        result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        out[name] = float(result.stdout.strip().splitlines()[-1])
    return out


def main():
    args = tyro.cli(Args)
    out = Path(args.output_dir)
    model_dir = make_model(out / "runs" / "vocab_152k")
    run_dir = out / "runs" / "vocab_152k_ppo"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    flags = ["--model", model_dir, "--total-episodes", "64", "--rollout-batch-size", "64", "--mini-batch-size", "16",
             "--micro-batch-size", "4", "--max-new-tokens", "128", "--eval-size", "16", "--save-every", "0",
             "--output-dir", str(run_dir)]  # fmt: skip
    subprocess.run([sys.executable, str(REPO / "ppo.py"), *flags], check=True, cwd=REPO, capture_output=True)
    row = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1]
    results = {"ppo.py iteration, 64 x 128 new tokens, micro-batch 4 (peak RSS)": row["time/peak_memory_gb"],
               **{f"{k}, {args.rows} x {args.length} (peak RSS growth)": v
                  for k, v in passes_peak(model_dir, args.rows, args.length).items()}}  # fmt: skip
    lines = ["| measurement (vocabulary 151,936, CPU) | peak GiB |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in results.items()]
    (out / "vocab_memory.md").write_text("\n".join(lines) + "\n")
    (out / "vocab_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
