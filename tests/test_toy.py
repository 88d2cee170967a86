"""The committed toy task: its files load with the standard classes, and its labels agree with the gold scorer."""

import json

import torch
from conftest import REPO

from plumbing.data import load_rows
from plumbing.models import load_causal_lm, load_tokenizer
from plumbing.scorers import ScoringOptions, load_scorer
from toy.gold import score, score_one


def test_committed_assets_load_and_gold_ranks_chosen_above_rejected():
    tokenizer = load_tokenizer(str(REPO / "toy" / "policy"))
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    policy = load_causal_lm(str(REPO / "toy" / "policy"), torch.float32)
    assert 1_000_000 < sum(p.numel() for p in policy.parameters()) < 3_000_000
    rows = [json.loads(line) for line in open(REPO / "toy" / "data" / "test.jsonl")]
    assert set(rows[0]) == {"prompt", "response", "chosen", "rejected"}
    assert all(score_one(r["prompt"], r["chosen"]) > score_one(r["prompt"], r["rejected"]) for r in rows)
    prompts, chosen = load_rows(str(REPO / "toy" / "data"), "test")
    assert len(prompts) == len(chosen) == 500 and load_rows(str(REPO / "toy" / "data"), "train")[0]
    # the reward model is a good but imperfect proxy of the gold scorer (build_report.json: 88.4%) on complete responses
    reward = load_scorer(
        str(REPO / "toy" / "reward_model"), "rm", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=256)
    )
    rejected, ended = [r["rejected"] for r in rows], torch.ones(len(rows), dtype=torch.bool)
    accuracy = (reward(prompts, chosen, ended) > reward(prompts, rejected, ended)).float().mean().item()
    assert accuracy >= 0.88


def test_gold_scorer_hand_computed():
    prompt = "\n\nHuman: any advice on chess for a beginner?\n\nAssistant:"
    # polite (+0.5), three chess words (+3), closing (+0.5)
    assert (
        score_one(prompt, " sure! watch the bishop first. keep the pawns early. use the knight often. good luck!")
        == 4.0
    )
    # rude (-1.5 for 'whatever'), one off-topic word (-1), cut off (-1)
    assert score_one(prompt, " whatever. check the oven") == -3.5
    # a repeated sentence costs 1
    assert score([prompt], [" watch the bishop first. watch the bishop first."]) == [0.0]
    # a conversational prompt (a list of messages) is read the same way
    messages = [{"role": "user", "content": "any advice on chess for a beginner?"}]
    assert score([messages, messages], [" whatever. check the oven", " sure! keep the pawns early."]) == [-3.5, 1.5]
