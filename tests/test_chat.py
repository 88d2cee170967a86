"""Conversational datasets (TRL's formats) and chat templates: the template is applied once, generation stops at
the end-of-turn token, the reward model sees its own rendering, responses carry no special tokens of their own,
and the scripts train on conversational toy data exactly as on the plain text it was made from."""

import json
import shutil

import pytest
import torch
from conftest import FAST, REPO, main_error, read_metrics, run_script, toy_rows
from test_real_checkpoints import save_classifier
from transformers import AutoTokenizer, GenerationConfig

from common import generate, left_pad
from plumbing.data import load_rows, render_plain, stop_token_ids, tokenize_prompts, tokenize_responses
from plumbing.scorers import ScoringOptions, load_scorer

USER = {"role": "user", "content": "how do i get better at chess?"}
ANSWER = {"role": "assistant", "content": "sure! watch the endgame first."}
HH_PROMPT = "\n\nHuman: how do i get better at chess?\n\nAssistant:"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_rows_reads_the_conversational_formats(tmp_path):
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}, USER]
    prompt_only = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [USER]}])
    assert load_rows(prompt_only, "train") == ([[USER]], None)
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [*earlier, ANSWER]}])
    assert load_rows(messages, "train") == ([earlier], [ANSWER["content"]])  # prompt: up to the last assistant turn
    explicit = write_jsonl(tmp_path / "e.jsonl", [{"prompt": [USER], "chosen": [ANSWER], "rejected": [ANSWER]}])
    assert load_rows(explicit, "train") == ([[USER]], [ANSWER["content"]])
    implicit = write_jsonl(tmp_path / "i.jsonl", [{"chosen": [*earlier, ANSWER], "rejected": [*earlier, ANSWER]}])
    assert load_rows(implicit, "train") == ([earlier], [ANSWER["content"]])


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": [USER]}, {"prompt": "plain"}], "row 1 of split 'train'"),
        ([{"prompt": [{"role": "user"}]}], "row 0 of split 'train' of --dataset"),
        ([{"prompt": [{"role": "user"}]}], "has a message with keys ['role'], not 'role' and 'content' strings"),
        ([{"messages": [ANSWER]}], "has no prompt"),
        # ShareGPT: its from / value keys, or its human / gpt roles under role / content: the row, what and the roles
        (
            [
                {"messages": [USER, ANSWER]},
                {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "o"}]},
            ],
            "row 1 of split 'train' of --dataset",
        ),
        (
            [{"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "o"}]}],
            "has ShareGPT messages ({'from': 'human', 'value': ...}); expected messages of {'role', 'content'} with "
            "roles system, user, assistant, tool (ShareGPT's human and gpt are user and assistant)",
        ),
        (
            [{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "o"}]}],
            "has a message with role 'human'; expected messages of {'role', 'content'} with roles system, user, "
            "assistant, tool (ShareGPT's human and gpt are user and assistant)",
        ),
        ([{"prompt": [{"role": "narrator", "content": "once"}]}], "('prompt') has a message with role 'narrator'"),
    ],
)
def test_malformed_conversations_are_one_line_errors(rows, expected, tmp_path):
    with pytest.raises(SystemExit) as info:
        load_rows(write_jsonl(tmp_path / "d.jsonl", rows), "train")
    assert expected in str(info.value) and "\n" not in str(info.value)


def bos_tokenizer(tmp_path):
    """The toy tokenizer made LLaMA-like: it adds a BOS to every text, and its chat template writes one too."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer")
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    tokenizer.save_pretrained(tmp_path / "bos")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bos")
    assert tokenizer("hi")["input_ids"][0] == bos  # the premise: plain tokenization adds a BOS
    return tokenizer


def test_chat_template_applied_once_with_one_bos(tmp_path):
    toy = AutoTokenizer.from_pretrained(REPO / "toy" / "policy")
    # the toy template writes the toy's own HH text: the conversation tokenizes as the plain prompt it came from
    assert tokenize_prompts(toy, [[USER]], 128) == tokenize_prompts(toy, [HH_PROMPT], 128)
    tokenizer = bos_tokenizer(tmp_path)
    bos = tokenizer.bos_token_id
    (ids,) = tokenize_prompts(tokenizer, [[USER]], 128)
    assert ids == [bos] + toy(HH_PROMPT)["input_ids"]  # one BOS (the template's), the template's text once
    assert tokenizer.decode(ids).count("Human:") == 1
    # left truncation keeps the BOS and the end of the dialogue
    (cut,) = tokenize_prompts(tokenizer, [[USER]], 5)
    assert cut == [bos] + ids[-4:]
    (plain,) = tokenize_prompts(tokenizer, [HH_PROMPT], 128)
    assert plain == ids  # plain text: the tokenizer's own BOS, once


def test_responses_continue_the_prompt_without_special_tokens_of_their_own(tmp_path):
    tokenizer = bos_tokenizer(tmp_path)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    response = " sure! watch the endgame first."
    (plain,) = tokenize_responses(tokenizer, [HH_PROMPT], [response], [eos])
    assert bos not in plain and plain[-1] == eos
    (prompt,) = tokenize_prompts(tokenizer, [HH_PROMPT], 128)
    assert prompt + plain == tokenizer(HH_PROMPT + response)["input_ids"] + [eos]
    # conversational: what the template writes for the assistant turn after the generation prompt, to its stop token
    (chat,) = tokenize_responses(tokenizer, [[USER]], [ANSWER["content"]], [eos])
    assert chat == plain
    (chat_prompt,) = tokenize_prompts(tokenizer, [[USER]], 128)
    rendered = tokenizer.apply_chat_template([USER, ANSWER], tokenize=False)
    assert chat_prompt + chat == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_generation_stops_at_the_end_of_turn_token(tiny_lm, tmp_path):
    end_of_turn = 7
    with torch.no_grad():  # every position's hidden state is all-ones, and only the end-of-turn token scores
        tiny_lm.gpt_neox.final_layer_norm.weight.zero_()
        tiny_lm.gpt_neox.final_layer_norm.bias.fill_(1.0)
        tiny_lm.lm_head.weight.zero_()
        tiny_lm.lm_head.weight[end_of_turn] = 10.0
    queries, mask = left_pad([[5, 6], [8, 9, 10]], 0, "cpu")
    config = GenerationConfig(max_new_tokens=4, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              eos_token_id=[1, end_of_turn], pad_token_id=0)  # fmt: skip
    responses, response_mask = generate(tiny_lm, queries, mask, config, chunk_size=2)
    assert responses[:, 0].tolist() == [end_of_turn] * 2 and response_mask.sum(1).tolist() == [1, 1]
    # the stop ids come from the checkpoint's generation_config.json (eos_token_id may be a list)
    toy = AutoTokenizer.from_pretrained(REPO / "toy" / "policy")
    assert stop_token_ids(str(REPO / "toy" / "policy"), toy) == [toy.eos_token_id]
    GenerationConfig(eos_token_id=[toy.eos_token_id, 5]).save_pretrained(tmp_path)
    assert stop_token_ids(str(tmp_path), toy) == [toy.eos_token_id, 5]


def test_reward_model_sees_its_own_chat_template_or_plain_text(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tokenizer = save_classifier("gpt-neox", tmp_path / "rm", "right")
    template = "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
    tokenizer.chat_template = template  # a template other than the policy's: the RM must use its own
    tokenizer.save_pretrained(tmp_path / "rm")
    score = load_scorer(str(tmp_path / "rm"), "rm", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    response = ANSWER["content"]
    # exactly the template's rendering of the conversation with the response as the assistant's turn: the template
    # ends the turn its own way, so no EOS is added after it (TRL's RewardTrainer adds one to plain text only)
    expected = tokenizer.apply_chat_template([USER, {"role": "assistant", "content": response}], tokenize=False)
    expected = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert expected == tokenizer(f"<user>{USER['content']}<assistant>{response}")["input_ids"]
    assert score.encode([USER], response, True) == score.encode([USER], response, False) == expected
    with torch.no_grad():
        alone = model(torch.tensor([expected])).logits[0, 0]
    got = score([[USER], [USER]], [response, response], torch.tensor([True, False]))
    assert torch.allclose(got, alone.expand(2), atol=1e-5)
    # a reward model without a template reads the conversation as HH text
    (tmp_path / "rm" / "chat_template.jinja").unlink()
    plain = load_scorer(str(tmp_path / "rm"), "rm", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8))
    assert render_plain([USER]) == HH_PROMPT
    with torch.no_grad():
        hh = model(torch.tensor([tokenizer(HH_PROMPT + " " + response)["input_ids"]])).logits[0, 0]
    assert torch.allclose(plain([[USER]], [" " + response]), hh.unsqueeze(0), atol=1e-5)


def test_a_cut_response_gets_no_end_of_turn_from_the_reward_models_template(tmp_path):
    """A template that ends every assistant turn with EOS (MOSS-RLHF's `</s>`): a response that ended is scored with
    it, one cut at --max-new-tokens without it (the release scores the cut ids as they are); --reward-append-eos
    always keeps it for both."""
    tokenizer = save_classifier("gpt-neox", tmp_path / "rm", "right")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    tokenizer.save_pretrained(tmp_path / "rm")
    eos, response = tokenizer.eos_token_id, ANSWER["content"]
    score = load_scorer(str(tmp_path / "rm"), "rm", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8))
    ended, cut = score.encode([USER], response, True), score.encode([USER], response, False)
    assert ended[-1] == eos and cut == ended[:-1] and eos not in cut
    assert cut == tokenizer(f"<user>{USER['content']}<assistant>{response}")["input_ids"]
    always = load_scorer(str(tmp_path / "rm"), "rm", torch.device("cpu"), torch.float32,
                         ScoringOptions(batch_size=8, append_eos="always"))  # fmt: skip
    assert always.encode([USER], response, False) == ended


def test_a_template_that_rejects_a_conversation_is_one_line(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer")
    tokenizer.chat_template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    with pytest.raises(SystemExit) as info:
        tokenize_prompts(tokenizer, [[USER]], 128)
    assert "chat template rejects a conversation with roles ['user'] (system first)" in str(info.value)
    assert "\n" not in str(info.value)


def test_conversational_data_needs_a_chat_template(tmp_path):
    """Through main(): one line naming the fix, nothing written, before any model is loaded."""
    shutil.copytree(REPO / "toy" / "policy", tmp_path / "policy")
    (tmp_path / "policy" / "chat_template.jinja").unlink()
    out = tmp_path / "out"
    error = main_error("ppo.py", *FAST, "--model", str(tmp_path / "policy"), "--dataset",
                       str(REPO / "toy" / "chat" / "prompts"), "--output-dir", str(out))  # fmt: skip
    assert "has no chat template" in error and not out.exists()


def test_ppo_on_conversational_prompts_matches_the_plain_text_run(tmp_path):
    """The toy template renders a conversation as the plain prompt it came from, so the evaluation of the initial
    policy (same held-out prompts, same seed) is identical, gold scorer included; then training runs."""
    datasets = {"plain": REPO / "toy" / "data", "chat": REPO / "toy" / "chat" / "prompts"}
    flags = [[*FAST, "--dataset", str(d), "--output-dir", str(tmp_path / name)] for name, d in datasets.items()]
    run_script("tests/wrap.py", "--runs", json.dumps(flags), "ppo")  # (both runs in one process)
    runs = {name: read_metrics(tmp_path / name) for name in datasets}
    keys = ["eval/gold_reward", "eval/kl", "eval/response_length", "eval/eos_rate", "eval/distinct_2"]
    assert {k: runs["chat"][0][k] for k in keys} == {k: runs["plain"][0][k] for k in keys}
    assert runs["chat"][-1]["eval/kl"] != 0.0  # the policy trained


def test_alol_trains_on_a_messages_dataset(tmp_path):
    messages = toy_rows(REPO / "toy" / "chat" / "messages", tmp_path / "messages", 256, 80)
    out = tmp_path / "run"
    run_script("alol.py", "--dataset", messages, "--total-steps", "4",
               "--batch-size", "8", "--eval-size", "16", "--value-samples", "1", "--value-epochs", "1",
               "--max-new-tokens", "24", "--eval-every", "4", "--output-dir", str(out))  # fmt: skip
    rows = read_metrics(out)
    assert rows[-1]["eval/kl"] != 0.0 and all(r == r for row in rows for r in row.values() if isinstance(r, float))
