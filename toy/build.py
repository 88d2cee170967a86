"""Regenerate the toy RLHF task deterministically: `python toy/build.py` (the reward model alone: 15 min on 2 CPUs).

Writes, next to this file:
  data/{train,test}.jsonl  Dahoas/rm-static format: prompt, response, chosen, rejected
  tokenizer/               byte-level BPE (transformers tokenizer, EOS + pad tokens)
  policy/                  SFT policy: GPT-NeoX (Pythia architecture) causal LM, ~1M params
  reward_model/            GPTNeoXForSequenceClassification, num_labels=1, Bradley-Terry
  build_report.json        sizes, SFT gold reward, reward-model held-out pair accuracy
  chat/{prompts,messages}/ conversational copies of the first rows of data/ (TRL formats)
  long/{train,test}.jsonl  the first rows of data/ with earlier exchanges before each prompt: HH's spread of prompt
                           lengths (20 to ~450 tokens), for measuring padding (`python toy/build.py long`, seconds)

The tokenizers carry a chat template that writes the toy's own HH text, so a conversation
tokenizes exactly as the plain-text row it came from. `python toy/build.py chat` writes only
the template and chat/ (seconds); `python toy/build.py rm` rebuilds only the reward model.

Responses come from a mix in which good ones are a minority, so the SFT policy has clear
room to improve under the gold scorer (toy/gold.py), which also labels the RM's pairs.
"""

import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toy.gold import CLOSINGS, POLITE_OPENERS, RUDE_OPENERS, TOPICS, score_one  # noqa: E402

OUT = Path(__file__).resolve().parent
# the toy's chat template: user/assistant/system turns in Anthropic HH text; an assistant turn ends with EOS (the
# SFT policy's end of response) and the generation prompt is "\n\nAssistant:", after which the policy writes " ..."
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '\n\nAssistant: ' + (message['content'] | trim) + eos_token }}"
    "{%- elif message['role'] == 'system' -%}{{ '\n\nSystem: ' + (message['content'] | trim) }}"
    "{%- else -%}{{ '\n\nHuman: ' + (message['content'] | trim) }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)
CHAT_ROWS = {"train": 2000, "test": 500}  # conversational copies: the first rows of each split
SEED = 0
REQUESTS = [
    "how do i get better at {t}?",
    "can you give me a tip about {t}?",
    "i want to learn about {t}. where do i start?",
    "what matters most in {t}?",
    "any advice on {t} for a beginner?",
]
VERBS = ["check", "use", "watch", "choose", "keep", "plan around"]
ADVERBS = ["every day", "with care", "slowly", "early", "often", "first"]
FILLERS = [
    "it really depends on you.",
    "there are many ways to do this.",
    "people have different opinions.",
    "that is a big question.",
]


def make_prompt(rng: random.Random) -> str:
    topic = rng.choice(list(TOPICS))
    return f"\n\nHuman: {rng.choice(REQUESTS).format(t=topic)}\n\nAssistant:"


def sample_response(rng: random.Random, topic: str) -> str:
    """One response from the SFT mix: each quality feature is drawn independently."""
    parts = []
    u = rng.random()
    if u < 0.35:
        parts.append(rng.choice(POLITE_OPENERS))
    elif u < 0.6:
        parts.append(rng.choice(RUDE_OPENERS))
    body = []
    for _ in range(rng.choices([1, 2, 3, 4, 5], weights=[20, 30, 25, 15, 10])[0]):
        v = rng.random()
        if v < 0.55:
            word = rng.choice(TOPICS[topic])
        elif v < 0.75:
            word = rng.choice(TOPICS[rng.choice([t for t in TOPICS if t != topic])])
        else:
            body.append(rng.choice(FILLERS))
            continue
        body.append(f"{rng.choice(VERBS)} the {word} {rng.choice(ADVERBS)}.")
    if rng.random() < 0.2:  # repetition
        for _ in range(rng.randint(1, 2)):
            body.insert(rng.randint(0, len(body)), rng.choice(body))
    parts += body
    if rng.random() < 0.4:
        parts.append(rng.choice(CLOSINGS))
    text = " ".join(parts)
    if rng.random() < 0.1:  # cut off mid-sentence
        words = text.split()
        text = " ".join(words[: rng.randint(max(1, len(words) // 2), len(words))]).rstrip(".!?,")
    return " " + text


def topic_of(prompt: str) -> str:
    return next(t for t in TOPICS if t in prompt)


def make_pairs(rng: random.Random, n: int) -> list[dict]:
    rows = []
    while len(rows) < n:
        prompt = make_prompt(rng)
        a, b = (sample_response(rng, topic_of(prompt)) for _ in range(2))
        sa, sb = score_one(prompt, a), score_one(prompt, b)
        if abs(sa - sb) < 0.25:  # near-ties carry no preference
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append(dict(prompt=prompt, response=chosen, chosen=chosen, rejected=rejected))
    return rows


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def model_config(tokenizer) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=512,
        rotary_pct=0.25,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def train_sft(tokenizer, rng: random.Random, steps: int = 1500, batch: int = 64) -> GPTNeoXForCausalLM:
    model = GPTNeoXForCausalLM(model_config(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(steps):
        prompts = [make_prompt(rng) for _ in range(batch)]
        responses = [sample_response(rng, topic_of(p)) for p in prompts]
        sft_step(model, opt, tokenizer, prompts, responses, step, steps)
    return model.eval()


def sft_step(model, opt, tokenizer, prompts: list[str], responses: list[str], step: int, steps: int, peak=1e-3):
    """One SFT step on (prompt, response + EOS) texts: the loss on the response and its EOS only, AdamW at lr_at."""
    eos = tokenizer.eos_token_id
    p_ids = tokenizer(prompts)["input_ids"]
    r_ids = tokenizer(responses)["input_ids"]
    ids, mask = right_pad([p + r + [eos] for p, r in zip(p_ids, r_ids)], tokenizer.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    for i, p in enumerate(p_ids):  # loss on the response (and its EOS) only
        labels[i, : len(p)] = -100
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    optimizer_step(model, opt, loss, step, steps, peak, "sft")


def optimizer_step(model, opt, loss, step: int, steps: int, peak: float, name: str):
    """AdamW at lr_at(step), the gradient clipped to norm 1; the loss printed every 100 steps."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, steps, peak)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step % 100 == 0:
        print(f"{name} step {step} loss {loss.item():.3f}", flush=True)


def rm_scores(rm, tokenizer, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Scores of prompt + response + EOS, the input TRL's RewardTrainer trains on (the scripts' --reward-append-eos)."""
    texts = tokenizer([p + r for p, r in zip(prompts, responses)])["input_ids"]
    ids, mask = right_pad([t + [tokenizer.eos_token_id] for t in texts], tokenizer.pad_token_id)
    return rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


def train_rm(policy, tokenizer, rng: random.Random, steps: int = 1500, batch: int = 64):
    """Bradley-Terry on freshly generated gold-labelled pairs every step (a fixed set overfits)."""
    config = model_config(tokenizer)
    config.num_labels = 1
    rm = GPTNeoXForSequenceClassification(config)
    rm.gpt_neox.load_state_dict(policy.gpt_neox.state_dict())  # RM initialised from the SFT backbone
    opt = torch.optim.AdamW(rm.parameters(), lr=5e-4, weight_decay=0.01)
    for step in range(steps):
        pairs = make_pairs(rng, batch)
        prompts = [r["prompt"] for r in pairs]
        chosen = rm_scores(rm, tokenizer, prompts, [r["chosen"] for r in pairs])
        rejected = rm_scores(rm, tokenizer, prompts, [r["rejected"] for r in pairs])
        loss = -F.logsigmoid(chosen - rejected).mean()  # Bradley-Terry
        optimizer_step(rm, opt, loss, step, steps, 5e-4, "rm")
    return rm.eval()


@torch.no_grad()
def pair_accuracy(rm, tokenizer, pairs: list[dict]) -> float:
    prompts = [r["prompt"] for r in pairs]
    chosen = rm_scores(rm, tokenizer, prompts, [r["chosen"] for r in pairs])
    rejected = rm_scores(rm, tokenizer, prompts, [r["rejected"] for r in pairs])
    return (chosen > rejected).float().mean().item()


@torch.no_grad()
def sft_gold(policy, tokenizer, prompts: list[str]) -> float:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = policy.generate(
        **enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=48, pad_token_id=tokenizer.pad_token_id
    )
    responses = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(score_one(p, r) for p, r in zip(prompts, responses)) / len(prompts)


def write_chat(rows_by_split: dict[str, list[dict]]):
    """The chat template into every saved tokenizer, and two conversational copies of the data:
    chat/prompts: {"prompt": [user], "chosen": [assistant]}; chat/messages: {"messages": [user, assistant]}."""
    for name in ("tokenizer", "policy", "reward_model"):
        (OUT / name / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    marker = "\n\nHuman: "
    for split, rows in rows_by_split.items():
        for fmt in ("prompts", "messages"):
            (OUT / "chat" / fmt).mkdir(parents=True, exist_ok=True)
            with open(OUT / "chat" / fmt / f"{split}.jsonl", "w") as f:
                for r in rows[: CHAT_ROWS[split]]:
                    user = {"role": "user", "content": r["prompt"][len(marker) : -len("\n\nAssistant:")]}
                    assistant = {"role": "assistant", "content": r["chosen"].strip()}
                    row = (
                        {"prompt": [user], "chosen": [assistant]}
                        if fmt == "prompts"
                        else {"messages": [user, assistant]}
                    )
                    f.write(json.dumps(row) + "\n")


LONG_ROWS = {"train": 2000, "test": 500}


def write_long(rows_by_split: dict[str, list[dict]]):
    """long/: each prompt after 0 to 11 earlier exchanges (a request and an SFT-mix answer, any topic), their number
    geometric (p = 0.3), so that prompt lengths spread as Anthropic HH's do (there: median 78, mean 119, max 448
    tokens; here: see build_report.json). The gold scorer reads the last human turn's topic."""
    rng = random.Random(SEED + 3)
    for split, rows in rows_by_split.items():
        (OUT / "long").mkdir(exist_ok=True)
        with open(OUT / "long" / f"{split}.jsonl", "w") as f:
            for r in rows[: LONG_ROWS[split]]:
                earlier = ""
                for _ in range(min(int(math.log(1 - rng.random()) / math.log(0.7)), 11)):
                    turn = make_prompt(rng)
                    earlier += turn + sample_response(rng, topic_of(turn))
                f.write(json.dumps({**r, "prompt": earlier + r["prompt"]}) + "\n")


def main():
    """`python toy/build.py` builds everything; `rm` rebuilds only the reward model; `chat` only the chat files;
    `long` only long/."""
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    rng = random.Random(SEED)
    train, test = make_pairs(rng, 10000), make_pairs(rng, 500)
    if sys.argv[1:] == ["chat"]:
        return write_chat({"train": train, "test": test})
    if sys.argv[1:] == ["long"]:
        return write_long({"train": train, "test": test})
    if sys.argv[1:] != ["rm"]:
        (OUT / "data").mkdir(exist_ok=True)
        for name, rows in [("train", train), ("test", test)]:
            with open(OUT / "data" / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        corpus = [r["prompt"] + r["chosen"] for r in train] + [r["prompt"] + r["rejected"] for r in train]
        tokenizer = build_tokenizer(corpus)
        tokenizer.save_pretrained(OUT / "tokenizer")
        policy = train_sft(tokenizer, random.Random(SEED + 1))
        policy.half().save_pretrained(OUT / "policy")
        tokenizer.save_pretrained(OUT / "policy")
    # from here on, work from the saved (fp16) files, so `build.py rm` reproduces a full build exactly
    tokenizer = PreTrainedTokenizerFast.from_pretrained(OUT / "tokenizer")
    policy = GPTNeoXForCausalLM.from_pretrained(OUT / "policy", dtype=torch.float32).eval()
    torch.manual_seed(SEED + 2)
    rm = train_rm(policy, tokenizer, random.Random(SEED + 2))
    rm.half().save_pretrained(OUT / "reward_model")
    tokenizer.save_pretrained(OUT / "reward_model")
    rm = rm.float()  # measure what was saved (fp16 weights)
    report = {
        "policy_parameters": sum(p.numel() for p in policy.parameters()),
        "reward_model_parameters": sum(p.numel() for p in rm.parameters()),
        "vocab_size": len(tokenizer),
        "gold_reward_chosen_test": sum(score_one(r["prompt"], r["chosen"]) for r in test) / len(test),
        "gold_reward_rejected_test": sum(score_one(r["prompt"], r["rejected"]) for r in test) / len(test),
        "reward_model_test_pair_accuracy": pair_accuracy(rm, tokenizer, test),
        "reward_model_train_pair_accuracy": pair_accuracy(rm, tokenizer, train[:1000]),
        "sft_gold_reward_test_prompts": sft_gold(policy, tokenizer, [r["prompt"] for r in test]),
    }
    (OUT / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_chat({"train": train, "test": test})
    write_long({"train": train, "test": test})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
