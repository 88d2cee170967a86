"""Regenerate the toy's verifiable task deterministically: `python toy/arith/build.py` (minutes on 2 CPUs).

Writes, next to this file:
  data/{train,test}.jsonl  prompt (HH text), answer (the integer), chosen (one response of the SFT mix)
  policy/                  SFT policy: GPT-NeoX causal LM with its own byte-level BPE tokenizer and the toy's chat
                           template, trained on the SFT mix
  build_report.json        sizes, the SFT mix's accuracy, and the policy's accuracy on the test prompts (sampled at
                           T = 1, and greedy)

Problems are one- and two-step word problems (addition, subtraction, multiplication of small numbers):

    \n\nHuman: ann has 7 shells and finds 5 more. how many shells does ann have now?\n\nAssistant:

and a response shows its work, then the final answer after "####", as GSM8K's reference solutions do:

    7 + 5 = 12. #### 12

The SFT mix works right a minority of the time (METHODS: 30%); else it swaps an operator, slips by one on a step or
stops after the first of two steps, so the SFT policy samples right answers a minority of the time while the right
work is its single most likely one: RL has room, and the checker (toy.arith:score) says exactly what is right.
"""

import json
import random
import sys
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from toy.arith import score  # noqa: E402
from toy.build import CHAT_TEMPLATE, build_tokenizer, sft_step  # noqa: E402

OUT = Path(__file__).resolve().parent
SEED = 0
NAMES = ["ann", "ben", "cara", "dev", "eli", "fay", "gus", "hana"]
THINGS = ["apples", "books", "coins", "shells", "cards", "stamps", "marbles", "pens"]
SPLITS = {"train": 10000, "test": 500}


def make_problem(rng: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    """(question, steps): each step (left, operator, right) works on the previous step's result when left is None."""
    name, thing, kind = rng.choice(NAMES), rng.choice(THINGS), rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        return f"{name} has {a} {thing} and finds {b} more. how many {thing} does {name} have now?", [(a, "+", b)]
    if kind == 1:
        a = rng.randint(3, 20)
        b = rng.randint(1, min(12, a - 1))
        return f"{name} has {a} {thing} and gives {b} away. how many {thing} are left?", [(a, "-", b)]
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{name} has {a} bags with {b} {thing} in each. how many {thing} are there?", [(a, "*", b)]
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    c = rng.randint(1, min(12, a + b - 1))
    question = f"{name} has {a} {thing}, finds {b} more and gives {c} away. how many {thing} are left?"
    return question, [(a, "+", b), (None, "-", c)]


def apply(left: int, op: str, right: int) -> int:
    return left + right if op == "+" else left - right if op == "-" else left * right


WRONG_OPERATION = {"+": "-", "-": "+", "*": "+"}
METHODS = {"right": 0.3, "wrong operation": 0.35, "slip": 0.25, "skipped step": 0.1}  # the SFT mix


def work(steps, method: str = "right", rng: random.Random | None = None) -> tuple[str, int]:
    """The response's work and its final answer by `method`: "right"; "wrong operation" (one step's operator
    swapped, + for -, - for +, + for *, the larger number first; computed right); "slip" (one step's result off by
    1); "skipped step" (a two-step problem answered after its first step; a slip on one step)."""
    if method == "skipped step" and len(steps) == 1:
        method = "slip"
    wrong = rng.randrange(len(steps)) if method in ("wrong operation", "slip") else -1
    text, value = [], None
    for i, (left, op, right) in enumerate(steps[:1] if method == "skipped step" else steps):
        left = value if left is None else left
        if i == wrong and method == "wrong operation":
            op = WRONG_OPERATION[op]
            if apply(left, op, right) < 0:  # the larger number first, as a child would
                left, right = right, left
        value = apply(left, op, right)
        if i == wrong and method == "slip":
            value = value + 1 if value == 0 or rng.random() < 0.5 else value - 1
        text.append(f"{left} {op} {right} = {value}.")
    return " ".join(text), value


def make_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        question, steps = make_problem(rng)
        shown, final = work(steps, rng.choices(list(METHODS), list(METHODS.values()))[0], rng)
        rows.append(dict(prompt=f"\n\nHuman: {question}\n\nAssistant:", answer=work(steps)[1],
                         chosen=f" {shown} #### {final}"))  # fmt: skip
    return rows


def train_sft(tokenizer, rows: list[dict], steps: int = 1500, batch: int = 64) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=128, rotary_pct=0.25, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = GPTNeoXForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = random.Random(SEED + 1)
    for step in range(steps):
        sample = [rng.choice(rows) for _ in range(batch)]
        sft_step(model, opt, tokenizer, [r["prompt"] for r in sample], [r["chosen"] for r in sample], step, steps)
    return model.eval()


@torch.no_grad()
def accuracy(policy, tokenizer, rows: list[dict], sample: bool) -> float:
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    out = policy.generate(**enc, **kwargs, max_new_tokens=32, pad_token_id=tokenizer.pad_token_id)
    responses = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = score([r["prompt"] for r in rows], responses, [r["answer"] for r in rows])
    return sum(scores) / len(scores)


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    rng = random.Random(SEED)
    splits = {name: make_rows(rng, n) for name, n in SPLITS.items()}
    (OUT / "data").mkdir(exist_ok=True)
    for name, rows in splits.items():
        with open(OUT / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tokenizer = build_tokenizer([r["prompt"] + r["chosen"] for r in splits["train"]])
    tokenizer.chat_template = CHAT_TEMPLATE
    policy = train_sft(tokenizer, splits["train"])
    policy.half().save_pretrained(OUT / "policy")
    tokenizer.save_pretrained(OUT / "policy")
    policy = GPTNeoXForCausalLM.from_pretrained(OUT / "policy", dtype=torch.float32).eval()  # what was saved
    test = splits["test"]
    torch.manual_seed(SEED + 2)
    report = {
        "policy_parameters": sum(p.numel() for p in policy.parameters()),
        "vocab_size": len(tokenizer),
        "sft_mix_accuracy_test": sum(score([], [r["chosen"]], [r["answer"]])[0] for r in test) / len(test),
        "sft_accuracy_sampled_test": accuracy(policy, tokenizer, test, sample=True),
        "sft_accuracy_greedy_test": accuracy(policy, tokenizer, test, sample=False),
    }
    (OUT / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
