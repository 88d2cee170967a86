"""Merge a LoRA / QLoRA adapter into its base model: a plain checkpoint directory for `--model`.

The A-LoL authors' SFT policy is huggyllama/llama-7b plus the QLoRA adapter timdettmers/qlora-hh-rlhf-7b (they
trained that adapter further, in 4 bits); here it is merged once into a bfloat16 model, and `--use-lora` trains a
new adapter on it (docs/recipes.md lists the difference).

    python recipes/merge_adapter.py --base huggyllama/llama-7b --adapter timdettmers/qlora-hh-rlhf-7b \\
        --output-dir models/llama-7b-qlora-hh
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plumbing import models, run  # noqa: E402


@dataclass
class Args:
    base: str  # the base model (hub name or path)
    adapter: str  # the peft adapter (hub name or path)
    output_dir: str  # the merged model and the base's tokenizer are written here (must not exist)
    dtype: str = "bfloat16"  # dtype of the merged weights


def main():
    args = tyro.cli(Args)
    run.quiet_libraries()
    if os.path.exists(args.output_dir):
        run.fail(f"--output-dir {args.output_dir} exists; choose a new directory")
    from peft import PeftModel

    model = models.load_causal_lm(args.base, getattr(torch, args.dtype))
    model.generation_config = model.checkpoint_generation_config
    try:
        model = PeftModel.from_pretrained(model, run.repo_path(args.adapter)).merge_and_unload()
    except (OSError, ValueError) as e:
        run.fail(f"cannot load --adapter '{args.adapter}' ({str(e).strip().splitlines()[0]}); pass a peft adapter")
    tmp = args.output_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    models.load_tokenizer(args.base).save_pretrained(tmp)
    os.replace(tmp, args.output_dir)
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
