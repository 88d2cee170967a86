"""The model families users bring (tiny random models of each architecture, built here, with the toy tokenizer):
the policy's response log-probs under left padding equal each row alone, the value network reads every position,
LoRA on policy and value net trains (the reference is the policy with its adapter off), and the scale options find
the decoder layers. One end-to-end run: ppo.py with LoRA on a LLaMA-shaped model."""

import pytest
import torch
from conftest import FAST, REPO, assert_adapter_merges_to_the_policy, read_metrics, run_script

import common
from plumbing import models

TOY_VOCAB, EOS, PAD = 635, 0, 1
SHAPE = dict(vocab_size=TOY_VOCAB, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)


def configs():
    import transformers as tf

    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=128, **SHAPE)  # fmt: skip
    return {
        "llama": lambda: tf.LlamaConfig(**decoder, num_key_value_heads=2),
        "qwen2": lambda: tf.Qwen2Config(**decoder, num_key_value_heads=2),
        "mistral": lambda: tf.MistralConfig(**decoder, num_key_value_heads=2, sliding_window=None),
        "gemma": lambda: tf.GemmaConfig(**decoder, num_key_value_heads=2, head_dim=8),
        "gpt2": lambda: tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SHAPE
        ),  # fmt: skip
        "opt": lambda: tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            dropout=0.0,
            **SHAPE,
        ),  # fmt: skip
        "gpt-neox": lambda: tf.GPTNeoXConfig(**decoder, rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0),
    }


def save_tiny(kind: str, path) -> str:
    """A randomly initialised causal LM of `kind`, saved with the toy tokenizer: a checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(configs()[kind]()).save_pretrained(path)
    AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer").save_pretrained(path)
    return str(path)


def batch():
    """Left-padded prompts of different lengths and right-padded responses: (input_ids, attention_mask, P, rows)."""
    prompts, responses = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], [[20, 21, 22], [23, 24], [25, EOS]]
    input_ids, attention_mask, context, response_ids, *_ = common.pad_pairs(prompts, responses, PAD, "cpu")
    return input_ids, attention_mask, context, response_ids, list(zip(prompts, responses))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", list(configs()))
def test_policy_value_net_lora_and_layers_on_each_architecture(kind, use_lora, tmp_path):
    path = save_tiny(kind, tmp_path / kind)
    policy = models.load_causal_lm(path, torch.float32)
    value_model = models.load_value_model(path, torch.float32, "--model")
    if use_lora:
        policy = models.add_lora(policy, 4, "CAUSAL_LM")
        value_model.model = models.add_lora(value_model.model, 4, "SEQ_CLS")
        for name, p in [*policy.named_parameters(), *value_model.named_parameters()]:
            if "lora_B" in name:  # a trained adapter: the policy differs from its reference
                torch.nn.init.normal_(p, std=0.5)
    input_ids, attention_mask, context, responses, rows = batch()
    with torch.no_grad():  # the padded batch's log-probs and values equal each row's alone
        logprobs = common.gather_logprobs(common.response_logits(policy, input_ids, attention_mask, context, 0.7),
                                          responses)  # fmt: skip
        values = value_model(input_ids, attention_mask)
        for b, (prompt, response) in enumerate(rows):
            alone = torch.tensor([prompt + response])
            logits = policy(input_ids=alone).logits[0, len(prompt) - 1 : -1] / 0.7
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            assert torch.allclose(logprobs[b, : len(response)], expected, atol=1e-4), (kind, b)
            real = slice(context - len(prompt), context + len(response))  # this row's tokens in the batch
            assert torch.allclose(values[b, real], value_model(alone, torch.ones_like(alone))[0], atol=1e-4), kind
    assert values.shape == input_ids.shape
    with torch.no_grad(), models.reference_model(policy, None if use_lora else policy) as reference:
        ref_logprobs = common.gather_logprobs(
            common.response_logits(reference, input_ids, attention_mask, context, 0.7), responses
        )
    base = models.load_causal_lm(path, torch.float32)
    with torch.no_grad():
        base_logprobs = common.gather_logprobs(common.response_logits(base, input_ids, attention_mask, context, 0.7),
                                               responses)  # fmt: skip
    assert torch.allclose(ref_logprobs, base_logprobs, atol=1e-5)  # pi_ref is the initial model
    if use_lora:
        assert not torch.allclose(logprobs, base_logprobs, atol=1e-3)  # (and the adapter changes the policy)
    # gradients reach what trains: LoRA adapters and the value head, or every parameter
    new_logprobs = common.gather_logprobs(common.response_logits(policy, input_ids, attention_mask, context, 1.0),
                                          responses)  # fmt: skip
    loss = -new_logprobs.mean() + value_model(input_ids, attention_mask).pow(2).mean()
    loss.backward()
    trained = [n for n, p in [*policy.named_parameters(), *value_model.named_parameters()] if p.requires_grad]
    parameters = [p for p in [*policy.parameters(), *value_model.parameters()] if p.requires_grad]
    assert trained and all(p.grad is not None for p in parameters)
    if use_lora:
        assert all("lora_" in n or "score" in n or "classifier" in n for n in trained), kind
    # the scale options find the two decoder layers and freeze the rest
    assert len(models.decoder_layers(policy)) == 2
    if not use_lora:
        models.freeze_bottom_layers(policy, 1)
        frozen_layer, top_layer = models.decoder_layers(policy)
        assert not any(p.requires_grad for p in frozen_layer.parameters())
        assert all(p.requires_grad for p in top_layer.parameters())


def test_ppo_with_lora_on_a_llama_shaped_model(tmp_path):
    """The value network's LoRA wrapper on a LLaMA-family model used to crash (no last_hidden_state); the adapter,
    merged into the base, is the saved policy (ppo.py's LoRA lines, which apa.py and awr.py share)."""
    path = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "run"
    run_script("ppo.py", *FAST, "--total-episodes", "16", "--model", path, "--use-lora", "--lora-r", "4", "--lr",
               "1e-3", "--output-dir", str(out))  # fmt: skip
    sft, first = read_metrics(out)
    assert sft["eval/kl"] == 0.0 and first["policy/abs_log_ratio_first_mb"] < 1e-5
    assert_adapter_merges_to_the_policy(out, path)


def test_lora_alpha_and_dropout_reach_peft_and_dropout_acts_in_the_training_forward_only(tiny_lm):
    """--lora-alpha / --lora-dropout (A-LoL's QLoRA adapter: r 64, alpha 16, dropout 0.1) reach peft's config; the
    dropout acts in the training forward (gradients on) and never in sampling or the no-grad passes."""
    model = models.add_lora(tiny_lm, 4, "CAUSAL_LM", alpha=16, dropout=0.5)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.5)
    assert {
        layer.scaling["default"] for layer in model.modules() if isinstance(getattr(layer, "scaling", None), dict)
    } == {4.0}
    for name, p in model.named_parameters():
        if "lora_B" in name:  # (a new adapter is a no-op: B = 0)
            p.data.normal_(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    training = [model(ids).logits.detach() for _ in range(2)]
    assert torch.equal(first, second) and not torch.allclose(training[0], training[1])
    assert models.add_lora(models.load_causal_lm(str(REPO / "toy" / "policy"), torch.float32), 8,
                           "CAUSAL_LM").peft_config["default"].lora_alpha == 16  # alpha 0: 2 r  # fmt: skip


PREPARED = {"llama": True, "qwen2": True, "mistral": True, "gpt2": True, "gpt-neox": True, "gemma": False, "opt": False}


@pytest.mark.parametrize("kind", list(configs()))
def test_the_prepared_mask_only_where_it_means_what_the_2d_mask_does(kind):
    """The forwards outside generation pass a prepared 4-D boolean mask (no host read of it in transformers) to SDPA
    on the architectures known to be plainly causal (tensors.PLAIN_CAUSAL), with the same logits as the 2-D mask at
    every real position; any other model (here Gemma, not on the list, and OPT, whose learned positions are counted
    from the mask), eager attention or a sliding window keeps the 2-D one."""
    from transformers import AutoModelForCausalLM

    from plumbing.tensors import attention_mask_for

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()[kind](), attn_implementation="sdpa").eval()
    input_ids, attention_mask, *_ = batch()
    prepared = attention_mask_for(model, attention_mask)
    assert (prepared.dim() == 4) == PREPARED[kind], kind
    with torch.no_grad():
        positions = common.position_ids(attention_mask)
        two_d = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
        four_d = model(input_ids=input_ids, attention_mask=prepared, position_ids=positions).logits
    real = attention_mask.bool()
    assert torch.allclose(two_d[real], four_d[real], atol=1e-5), kind
    eager = AutoModelForCausalLM.from_config(configs()[kind](), attn_implementation="eager")
    assert attention_mask_for(eager, attention_mask) is attention_mask
    if kind == "mistral":  # with its sliding window on
        windowed = AutoModelForCausalLM.from_config(type(configs()[kind]())(**{**configs()[kind]().to_dict(),
                                                                               "sliding_window": 4}))  # fmt: skip
        assert attention_mask_for(windowed, attention_mask) is attention_mask
