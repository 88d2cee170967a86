"""Checkpoints that differ from the toy: encoder reward models, long inputs, EOS conventions, large scores, models
that ignore logits_to_keep, and the one-line errors for bad flags, data and scoring functions."""

import json

import pytest
import torch
from conftest import FAST, REPO, main_error

from common import RunningMoments, response_logits
from plumbing.scorers import ScoringOptions, load_scorer

TEXTS = [
    ("\n\nHuman: what matters most in chess?\n\nAssistant:", " watch the bishop early, and castle before move ten."),
    ("\n\nHuman: hi about sleep?\n\nAssistant:", " whatever."),
    ("\n\nHuman: how do I cook rice?\n\nAssistant:", " rinse it, then one part rice to two parts water, simmer."),
]


def save_classifier(kind: str, path, padding_side: str, tokenizer=None):
    """A small randomly initialised DeBERTa-v2 / BERT / RoBERTa / GPT-NeoX classifier (num_labels=1) with the toy
    tokenizer (a tokenizer only maps text to ids; the model type does not care which one made them)."""
    import transformers as tf

    tokenizer = tokenizer or tf.AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer")
    tokenizer.padding_side = padding_side
    common = dict(vocab_size=640, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  num_labels=1, pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, max_position_embeddings=128)  # fmt: skip
    config = {
        "deberta-v2": lambda: tf.DebertaV2Config(**common, position_biased_input=False, relative_attention=True),
        "bert": lambda: tf.BertConfig(**common),
        "roberta": lambda: tf.RobertaConfig(**{**common, "max_position_embeddings": 130}),
        "gpt-neox": lambda: tf.GPTNeoXConfig(**common),
    }[kind]()
    torch.manual_seed(0)
    tf.AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("kind", ["deberta-v2", "bert", "roberta", "gpt-neox"])
def test_reward_model_scored_through_its_own_forward(kind, padding_side, tmp_path):
    """Our batched score equals the model's own logits[:, 0] on each text alone (no padding), whatever the
    tokenizer's padding side: encoders are read through their pooler/head, not at the last token."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = save_classifier(kind, tmp_path / kind, padding_side)
    score = load_scorer(
        str(tmp_path / kind), "--reward-model", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8)
    )
    prompts, responses = zip(*TEXTS)
    ours = score(list(prompts), list(responses))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / kind).eval()
    with torch.no_grad():
        alone = [model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0] for p, r in TEXTS]
    assert torch.allclose(ours, torch.stack(alone), atol=1e-5), (ours, alone)
    assert ours.std() > 0  # the texts get different scores


def test_reward_model_input_gets_eos_and_is_left_truncated(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tokenizer = save_classifier("gpt-neox", tmp_path / "rm", "right")
    score = load_scorer(
        str(tmp_path / "rm"), "rm", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8, append_eos="ended")
    )
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    (prompt, response), eos = TEXTS[0], tokenizer.eos_token_id
    ids = tokenizer(prompt + response)["input_ids"]
    with torch.no_grad():
        with_eos = model(torch.tensor([ids + [eos]])).logits[0, 0]
        without = model(torch.tensor([ids])).logits[0, 0]
    ended = score([prompt, prompt], [response, response], torch.tensor([True, False]))
    assert torch.allclose(ended, torch.stack([with_eos, without]), atol=1e-5) and with_eos != without
    # longer than the model's 128 positions: the start of the dialogue is cut, the end (and the response) kept
    long_prompt = "\n\nHuman: tell me more." * 40 + prompt
    long_ids = tokenizer(long_prompt + response)["input_ids"]
    assert len(long_ids) > 128
    with torch.no_grad():
        kept = model(torch.tensor([long_ids[-128:]])).logits[0, 0]
    assert torch.allclose(score([long_prompt], [response]), kept.unsqueeze(0), atol=1e-5)
    assert score.num_truncated == 1
    no_truncation = load_scorer(
        str(tmp_path / "rm"), "rm", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8, truncate=False)
    )
    with pytest.raises(SystemExit, match="over 128"):
        no_truncation([long_prompt], [response])


def encoder_tokenizer(path):
    """The toy tokenizer made BERT-like: [CLS] a [SEP], and for a pair [CLS] a [SEP] b [SEP] (DeBERTa's layout)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer")
    tokenizer.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    special = [("[CLS]", tokenizer.cls_token_id), ("[SEP]", tokenizer.sep_token_id)]
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=special
    )
    tokenizer.model_max_length = 40
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_encoder_reward_model_reads_prompt_and_response_as_a_pair(tmp_path):
    """OpenAssistant's DeBERTa reward models were trained on tokenizer(question, answer): an encoder's tokenizer (CLS
    and SEP) gets the pair by default, truncated from the start of the prompt; --reward-input text keeps one segment."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = save_classifier("deberta-v2", tmp_path / "rm", "right", encoder_tokenizer(tmp_path / "rm"))
    score = load_scorer(str(tmp_path / "rm"), "rm", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    (prompt, response), ended = TEXTS[1], torch.tensor([True])
    pair = tokenizer(prompt, response)["input_ids"]
    assert score.encode(prompt, response, True) == pair and pair.count(tokenizer.sep_token_id) == 2
    with torch.no_grad():
        expected = model(**tokenizer(prompt, response, return_tensors="pt")).logits[0, 0]
    assert torch.allclose(score([prompt], [response], ended), expected.unsqueeze(0), atol=1e-5)
    long_prompt = "\n\nHuman: tell me more." * 10 + prompt  # over the 40 tokens: the prompt's start is cut
    ids = score.encode(long_prompt, response, True)
    assert (
        len(ids) == 40
        and ids[-len(pair) + pair.index(tokenizer.sep_token_id) :] == pair[pair.index(tokenizer.sep_token_id) :]
    )
    text = load_scorer(
        str(tmp_path / "rm"),
        "rm",
        torch.device("cpu"),
        torch.float32,
        ScoringOptions(batch_size=8, input_format="text"),
    )
    assert text.encode(prompt, response, True) == tokenizer(prompt + response)["input_ids"]


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_running_moments_keep_the_variance_of_large_scores(offset):
    generator = torch.Generator().manual_seed(0)
    batches = [offset + torch.randn(64, generator=generator) for _ in range(5)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).double()
    assert moments.mean == pytest.approx(everything.mean().item(), rel=1e-12)
    assert moments.std == pytest.approx(everything.std(unbiased=False).item(), rel=1e-4)


def test_response_logits_right_when_the_model_returns_every_position(tiny_lm):
    """A model that ignores logits_to_keep returns (B, T, V); the response positions are still the ones used."""

    class FullLength(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, logits_to_keep=None, **kwargs):
            return self.model(**kwargs)  # every position, whatever logits_to_keep says

    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        honoured = response_logits(tiny_lm, ids, mask, 7, 1.0)
        ignored = response_logits(FullLength(tiny_lm), ids, mask, 7, 1.0)
    assert honoured.shape == ignored.shape == (2, 5, 64)
    assert torch.allclose(honoured, ignored, atol=1e-6)


def ppo_args(**overrides):
    """ppo.py's defaults with some flags changed, as tyro would build them."""
    import dataclasses

    import ppo

    return dataclasses.replace(ppo.Args(), **overrides)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"lr": 0.0}, "--lr 0.0 is out of range; it must be greater than 0"),
        ({"temperature": -1.0}, "--temperature -1.0 is out of range"),
        ({"gamma": 1.5}, "--gamma 1.5 is out of range; it must be in [0, 1]"),
        ({"update_epochs": 0}, "--update-epochs 0 is out of range; it must be a positive integer"),
        ({"missing_eos_penalty": -1.0}, "it must be 0 or more"),
        ({"kl_coef": float("nan")}, "--kl-coef nan is out of range"),
        ({"adam_betas": (0.9, 1.0)}, "--adam-betas"),
        ({"micro_batch_size": 3}, "--micro-batch-size 3 does not divide the 16 rows"),
        ({"fsdp": True}, "launch with torchrun"),
        ({"num_layers_unfrozen": -2}, "--num-layers-unfrozen -2 is out of range"),
    ],
)
def test_out_of_range_flags_are_one_line_errors(overrides, expected):
    import ppo
    from plumbing.run import check_flags

    with pytest.raises(SystemExit, match=r"^error: ") as info:
        check_flags(ppo_args(**overrides), 1, 16, ppo.POSITIVE_FLAGS, ppo.NON_NEGATIVE_FLAGS)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("script", ["ppo", "apa", "awr", "ppo_max", "alol"])
def test_each_script_checks_the_ranges_of_its_own_flags(script):
    """A script names its algorithm's flags (POSITIVE_FLAGS, NON_NEGATIVE_FLAGS); the shared check refuses a value
    out of range for each of them, and the defaults pass."""
    import dataclasses
    import importlib

    from plumbing.run import check_flags

    module = importlib.import_module(script)
    ranges = module.POSITIVE_FLAGS, module.NON_NEGATIVE_FLAGS
    check_flags(module.Args(), 1, 16, *ranges)
    cases = [(name, 0) for name in ranges[0].split()] + [(name, -1) for name in ranges[1].split()]
    assert len(cases) >= 3
    for name, value in cases:
        with pytest.raises(SystemExit, match=f"--{name.replace('_', '-')} {value} is out of range"):
            check_flags(dataclasses.replace(module.Args(), **{name: value}), 1, 16, *ranges)


@pytest.mark.parametrize("prompt, expected", [("  ", "is an empty string"), (3, "is a int, not a string")])
def test_empty_or_non_string_prompts_are_one_line_errors(prompt, expected, tmp_path):
    from plumbing.data import load_rows

    rows = [{"prompt": "\n\nHuman: hi\n\nAssistant:"}, {"prompt": prompt}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="row 1 of split 'train'") as info:
        load_rows(str(tmp_path / "data.jsonl"), "train")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "name, expected",
    [("raises", "raised ZeroDivisionError: division by zero"), ("one_too_few", "returned shape (1,)"),
     ("words", "returned a list")],
)  # fmt: skip
def test_misbehaving_scoring_functions_are_named_in_one_line(name, expected):
    score = load_scorer(
        f"tests.bad_scorers:{name}", "--reward-model", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8)
    )
    with pytest.raises(SystemExit, match=f"scoring function --reward-model 'tests.bad_scorers:{name}'") as info:
        score(["a", "b"], ["c", "d"])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_dataset_stops_the_script_before_loading_models(tmp_path):
    """Through main(): one line, no traceback, nothing written, no model loaded."""
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": ""}) + "\n")
    out = tmp_path / "out"
    error = main_error("ppo.py", *FAST, "--dataset", str(tmp_path / "data.jsonl"), "--output-dir", str(out))
    assert "is an empty string" in error and not out.exists()


def test_apa_lambda_zero_is_refused():
    """apa.py --lam 0 used to end in 'NaN loss, lower --lr'."""
    import dataclasses

    import apa
    from plumbing.run import check_flags

    with pytest.raises(SystemExit, match="--lam 0.0 is out of range; it must be greater than 0"):
        check_flags(dataclasses.replace(apa.Args(), lam=0.0), 1, 16, apa.POSITIVE_FLAGS, apa.NON_NEGATIVE_FLAGS)


@pytest.mark.parametrize("keep", [False, True])
def test_sampling_ignores_the_checkpoints_generation_config(tiny_lm, tmp_path, keep):
    """A policy whose generation_config.json sets repetition_penalty / no_repeat_ngram_size: generate()'s own scores
    (the distribution it sampled from) equal softmax(logits / T), the log-probs the losses use; the flag that keeps
    the checkpoint's settings makes them differ (which is why it is off by default)."""
    from transformers import GenerationConfig

    from common import gather_logprobs
    from plumbing.models import load_causal_lm

    tiny_lm.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=2, min_new_tokens=12, do_sample=True)
    tiny_lm.save_pretrained(tmp_path / "policy")
    policy = load_causal_lm(str(tmp_path / "policy"), torch.float32, keep_generation_config=keep)
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                              eos_token_id=1, pad_token_id=0)  # fmt: skip
    queries = torch.randint(2, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.generate(queries, attention_mask=torch.ones_like(queries), generation_config=config,
                              output_scores=True, return_dict_in_generate=True)  # fmt: skip
        responses = out.sequences[:, queries.shape[1] :]
        sampled = gather_logprobs(torch.stack(out.scores, 1).float(), responses)
        ours = gather_logprobs(
            response_logits(policy, out.sequences, torch.ones_like(out.sequences), 6, 0.7), responses
        )
    alive = responses != 0  # after EOS generate pads (score -inf in the processed distribution)
    gap = (sampled - ours)[alive].abs().max().item()
    assert (gap > 1e-3) if keep else (gap < 1e-5), gap


def test_hh_dialogue_that_is_not_a_string_is_named(tmp_path):
    from plumbing.data import load_rows

    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello"}, {"chosen": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="row 1 of split 'train' .* is a list, not a string"):
        load_rows(str(tmp_path / "data.jsonl"), "train")


def sentencepiece_tokenizer():
    """A LLaMA-like tokenizer (Metaspace: a word's leading space is part of its token, and the first token of a
    decoded text loses it), trained here on a few toy lines."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    texts = [p + r for p, r in TEXTS] * 20
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_response_text_keeps_its_space_with_sentencepiece():
    from plumbing.data import response_texts

    tokenizer = sentencepiece_tokenizer()
    prompt, response = TEXTS[0]
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(prompt + response)["input_ids"][len(prompt_ids) :]
    assert tokenizer.decode(prompt_ids + response_ids) == prompt + response
    assert tokenizer.decode(response_ids) == response.lstrip()  # the premise: decoded alone, the space is lost
    (text,) = response_texts(tokenizer, [prompt_ids], [response_ids + [tokenizer.eos_token_id]])
    assert text == response  # so the reward model reads "Assistant: watch", not "Assistant:watch"
    padded = torch.tensor([[tokenizer.eos_token_id] * 2 + prompt_ids]), torch.tensor([response_ids])
    assert response_texts(tokenizer, *padded) == [response]  # left-padded tensors too


def legacy_sentencepiece_tokenizer():
    """A tokenizer that works as LLaMA's legacy SentencePiece one does in transformers: every text gets a "▁"
    prepended and its spaces become "▁" (so " watch" tokenized alone is "▁", "▁watch"; in a sentence, "▁watch"), and
    "<s>" written as text is its BOS."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # pieces never span words
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    texts = [p + r for p, r in TEXTS] * 20
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_prompt_and_response_ids_are_the_ids_of_the_whole_text_with_sentencepiece():
    """On a legacy SentencePiece tokenizer (LLaMA's), a response tokenized alone gets an extra leading "▁": the
    rollout layout (prompt ids, then response ids) must be the tokenization of the whole text, as the authors' code
    and the reward model see it, for plain prompts and for the A-LoL authors' chat template (which writes <s>)."""
    from plumbing.data import tokenize_prompts, tokenize_responses

    tokenizer = legacy_sentencepiece_tokenizer()
    eos = tokenizer.eos_token_id
    assert tokenizer(" watch", add_special_tokens=False).tokens()[:2] == ["▁", "▁watch"]  # the premise
    prompts, responses = [p for p, _ in TEXTS], [r for _, r in TEXTS]
    for prompt, prompt_ids, response_ids in zip(
        prompts, tokenize_prompts(tokenizer, prompts, 1000), tokenize_responses(tokenizer, prompts, responses, [eos])
    ):
        whole = tokenizer(prompt + responses[prompts.index(prompt)])["input_ids"]
        assert prompt_ids + response_ids == whole + [eos]
    tokenizer.chat_template = (REPO / "recipes" / "templates" / "alol_policy.jinja").read_text()
    conversations = [[{"role": "user", "content": p.split("Human: ")[1].split("\n")[0]}] for p in prompts]
    answers = [r.strip() for r in responses]
    for messages, answer, prompt_ids, response_ids in zip(
        conversations, answers, tokenize_prompts(tokenizer, conversations, 1000),
        tokenize_responses(tokenizer, conversations, answers, [eos]),
    ):  # fmt: skip
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert prompt_ids + response_ids == whole + [eos]
        assert whole[0] == tokenizer.bos_token_id and whole.count(tokenizer.bos_token_id) == 1  # "<s>" as text: BOS


def test_value_and_reward_heads_compute_in_float32_under_bf16_autocast():
    """Under bf16 autocast the backbones run in bf16 but the scalar heads in float32: a bf16 head would keep ~3
    significant digits of every value GAE sums."""
    from common import position_ids
    from plumbing.models import load_value_model

    ids = torch.randint(3, 600, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    value_model = load_value_model(str(REPO / "toy" / "policy"), torch.float32, "--model")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values = value_model(ids, mask)
        hidden = value_model.model.gpt_neox(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        bf16_head = value_model.model.score(hidden.last_hidden_state).float()[..., 0]
    expected = torch.nn.functional.linear(hidden.last_hidden_state.float(), value_model.model.score.weight)[..., 0]
    assert values.dtype == torch.float32 and torch.allclose(values, expected, atol=1e-6)
    assert (values - bf16_head).abs().max() > 1e-4  # what a bf16 head would have given
    score = load_scorer(
        str(REPO / "toy" / "reward_model"), "rm", torch.device("cpu"), torch.bfloat16, ScoringOptions(batch_size=8)
    )
    prompt, response = TEXTS[0]
    ids = torch.tensor([score.encode(prompt, response, True)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 reward model's last hidden state
        last = score.model.gpt_neox(input_ids=ids).last_hidden_state[:, -1]
    head = score.model.score.head
    assert head.weight.dtype == torch.float32
    assert torch.allclose(
        score([prompt], [response], torch.tensor([True])), last.float() @ head.weight.T[:, 0], atol=1e-6
    )
