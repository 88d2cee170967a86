"""GSM8K as conversational prompts for the online scripts: each question as a user turn that asks for the final answer
after "####", and the row's `answer` (GSM8K's solution, ending "#### N") kept for the reward function
(recipes/gsm8k_reward.py) to read.

    python recipes/gsm8k_data.py --output-dir data/gsm8k                 # openai/gsm8k, config main
    python recipes/gsm8k_data.py --dataset path/to/dir_or.jsonl --output-dir data/gsm8k   # local files, same columns

Writes OUTPUT_DIR/{train,test}.jsonl: {"prompt": [{"role": "user", "content": question + INSTRUCTION}], "answer"}.
"""

import argparse
import json
import os
import sys

# verl's GSM8K preprocessing (examples/data_preprocess/gsm8k.py), whose GRPO runs the recipe's settings come from
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def load(dataset: str, config: str, split: str):
    import datasets

    if os.path.isdir(dataset):
        return datasets.load_dataset("json", data_files={split: os.path.join(dataset, f"{split}.jsonl")}, split=split)
    if os.path.isfile(dataset):
        return datasets.load_dataset("json", data_files={split: dataset}, split=split)
    return datasets.load_dataset(dataset, config, split=split)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="openai/gsm8k")
    parser.add_argument("--config", default="main")
    parser.add_argument("--splits", nargs="+", default=["train", "test"])
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    for split in args.splits:
        try:
            rows = load(args.dataset, args.config, split)
        except Exception as e:  # noqa: BLE001 -- any loader failure: one line naming the dataset
            sys.exit(f"error: cannot load split '{split}' of --dataset '{args.dataset}' ({e}); check its name or path")
        missing = {"question", "answer"} - set(rows.column_names)
        if missing:
            sys.exit(f"error: --dataset '{args.dataset}' lacks {sorted(missing)}; expected GSM8K's question and answer")
        with open(os.path.join(args.output_dir, f"{split}.jsonl"), "w") as f:
            for row in rows:
                prompt = [{"role": "user", "content": f"{row['question'].strip()} {INSTRUCTION}"}]
                f.write(json.dumps({"prompt": prompt, "answer": row["answer"]}) + "\n")
        print(f"wrote {len(rows)} rows to {os.path.join(args.output_dir, split + '.jsonl')}")


if __name__ == "__main__":
    main()
