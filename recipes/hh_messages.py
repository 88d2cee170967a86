"""Anthropic HH dialogues as TRL conversational rows: `{"prompt": [messages], "chosen": [assistant message]}`, and
`"rejected"` where the dataset has it (preference pairs for dpo.py).

The A-LoL and MOSS-RLHF policies read HH dialogues in their own prompt formats; given as conversations, the scripts
render them with the policy's chat template (`--chat-template`) and the reward model's (set by
recipes/convert_reward_model.py). Writes OUTPUT/{train,test}.jsonl (a dataset directory for `--dataset`).

    python recipes/hh_messages.py --dataset Anthropic/hh-rlhf --output-dir data/hh-messages
"""

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plumbing import data, run  # noqa: E402


@dataclass
class Args:
    dataset: str = "Anthropic/hh-rlhf"  # HH dialogues: `chosen` texts (Anthropic/hh-rlhf) or prompt/chosen columns
    output_dir: str = "data/hh-messages"  # train.jsonl and test.jsonl are written here
    splits: tuple[str, ...] = ("train", "test")  # dataset splits to convert
    limit: int = 0  # rows per split (0 = all)
    drop_equal_pairs: bool = False  # drop rows whose rejected response is the chosen one (dpo.py refuses them)


def hh_messages(prompt: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user a, assistant b, user c."""
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + prompt.lstrip("\n"))[1:]
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[name], "content": text.strip()} for name, text in zip(parts[::2], parts[1::2])]
    return turns[:-1] if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"] else turns


def main():
    args = tyro.cli(Args)
    run.quiet_libraries()
    os.makedirs(args.output_dir, exist_ok=True)
    for split in args.splits:
        prompts, responses = data.load_rows(args.dataset, split)
        if responses is None:
            run.fail(f"--dataset '{args.dataset}' has no responses ('chosen'); pass HH dialogues")
        rows = [{"prompt": hh_messages(p), "chosen": [{"role": "assistant", "content": r.strip()}]}
                for p, r in zip(prompts, responses)]  # fmt: skip
        other_prompts, rejected = data.load_rows(args.dataset, split, "rejected")
        if rejected is not None:  # the pair's other response, where it continues the same prompt
            for row, p, o, r in zip(rows, prompts, other_prompts, rejected):
                row["rejected"] = [{"role": "assistant", "content": r.strip()}] if p == o and r is not None else None
            rows = [r for r in rows if r["rejected"] is not None]
            if args.drop_equal_pairs:
                rows = [r for r in rows if r["rejected"] != r["chosen"]]
        rows = [r for r in rows if r["prompt"] and r["prompt"][-1]["role"] == "user"][: args.limit or None]
        with open(os.path.join(args.output_dir, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} rows to {args.output_dir}/{split}.jsonl")


if __name__ == "__main__":
    main()
