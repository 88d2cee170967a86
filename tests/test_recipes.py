"""The papers' experiments as recipes (recipes/*.sh) on local stand-ins with the real formats, the reward-checkpoint
converter against the authors' reward-model forward, and trlX's stop strings.
(`pytest -k "recipe or trlx or stop_string"` selects them.)"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, THREADS, read_metrics, run_script
from torch import nn
from transformers import AutoTokenizer

from plumbing.data import cut_at_stop_strings
from plumbing.scorers import ScoringOptions, load_scorer

EOS = 0  # the toy tokenizer's <|endoftext|>
HH_STOPS = ["Human:", "human:", "Assistant:", "assistant:"]


# ---------------------------------------------------------------- trlX reward checkpoints
class AuthorsRewardModel(nn.Module):
    """trlX's HH RewardModel as the APA authors' examples/ppo_hh.py defines it: a GPT-J transformer, v_head =
    Linear(n_embd, 1, bias=False), the score read at the FIRST EOS of each row."""

    def __init__(self, config, eos_token_id: int):
        from transformers import GPTJModel

        super().__init__()
        self.transformer = GPTJModel(config)
        self.v_head = nn.Linear(config.n_embd, 1, bias=False)
        self.eos_token_id = eos_token_id

    def forward(self, input_ids):  # no attention mask: right padding with EOS, the score at the first EOS
        rewards = self.v_head(self.transformer(input_ids)[0]).squeeze(-1)
        ends = torch.argmax((input_ids == self.eos_token_id).float(), dim=1).view(-1, 1)
        return torch.gather(rewards, 1, ends).squeeze(-1)


def authors_reward(model, tokenizer, samples: list[str]) -> torch.Tensor:
    """Their reward function: EOS appended to every sample, right-padded (pad = EOS), left-truncated."""
    samples = [s + tokenizer.eos_token for s in samples]
    inputs = tokenizer(samples, padding=True, truncation=True, max_length=tokenizer.max_len_single_sentence,
                       return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        return model(inputs.input_ids)


def make_trlx_checkpoint(path) -> tuple[nn.Module, object]:
    """A tiny random trlX-format GPT-J reward checkpoint (the authors' key names, and the causal-mask buffers older
    transformers saved with it), a GPT-J config directory and a GPT-2-like tokenizer (pad = EOS, 48 tokens)."""
    from transformers import GPTJConfig

    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer")
    tokenizer.pad_token, tokenizer.padding_side, tokenizer.truncation_side = tokenizer.eos_token, "right", "left"
    tokenizer.model_max_length = 48
    tokenizer.save_pretrained(path / "gpt2")
    config = GPTJConfig(vocab_size=640, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS)  # fmt: skip
    config.save_pretrained(path / "gpt-j")
    torch.manual_seed(0)
    model = AuthorsRewardModel(config, tokenizer.eos_token_id).eval()
    state = model.state_dict()
    state.pop("eos_token_id", None)
    state.update({f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 64, 64, dtype=torch.bool) for i in range(2)})
    (path / "gptj-rm-static").mkdir()
    torch.save(state, path / "gptj-rm-static" / "hf_ckpt.pt")
    return model, tokenizer


def convert(tmp_path, *flags) -> subprocess.CompletedProcess:
    return run_script("recipes/convert_reward_model.py", *flags, check=False, cwd=tmp_path)


def test_trlx_reward_checkpoint_converted_scores_as_the_authors_model(tmp_path):
    model, tokenizer = make_trlx_checkpoint(tmp_path)
    result = convert(tmp_path, "--format", "trlx", "--checkpoint", "gptj-rm-static", "--base", "gpt-j", "--tokenizer",
                     "gpt2", "--output-dir", "rm", "--max-length", "48")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    prompts = ["\n\nHuman: what matters most in chess?\n\nAssistant:", "\n\nHuman: hi<|endoftext|> about sleep?",
               "\n\nHuman: tell me more. " * 8 + "\n\nAssistant:", "\n\nHuman: rice?\n\nAssistant:"]  # fmt: skip
    responses = [" watch the bishop early.", " whatever.", " sure! keep the pawns early.", ""]
    samples = [p + r for p, r in zip(prompts, responses)]
    assert len(tokenizer(samples[2])["input_ids"]) > 48 and "<|endoftext|>" in samples[1]  # long, an EOS inside
    expected = authors_reward(model, tokenizer, samples)
    options = ScoringOptions(batch_size=8, append_eos="always", score_at="first-eos")
    score = load_scorer(str(tmp_path / "rm"), "--reward-model", torch.device("cpu"), torch.float32, options)
    ended = torch.tensor([True, False, True, False])  # the authors append EOS to every sample, ended or not
    got = score(prompts, responses, ended)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert score.num_truncated == 1 and expected.std() > 0
    # read naively (the last token, or pad = EOS skipping the EOS) the scores differ: the flags matter
    naive = load_scorer(
        str(tmp_path / "rm"), "--reward-model", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8)
    )(prompts, responses, ended)
    assert not torch.allclose(naive, expected, atol=1e-3)
    # a checkpoint of another layout is named in one line
    bad = convert(tmp_path, "--format", "moss", "--checkpoint", "gptj-rm-static", "--base", "gpt-j", "--tokenizer",
                  "gpt2", "--output-dir", "rm2")  # fmt: skip
    assert bad.returncode != 0 and "is not a moss reward checkpoint" in bad.stderr.strip().splitlines()[-1]


def oasst_checkpoint(path):
    """A tiny random OpenAssistant GPTNeoXRewardModel checkpoint at `path` (gpt_neox + out_proj with a bias of 3 more):
    (its backbone, its head, its config fields)."""
    from transformers import GPTNeoXConfig, GPTNeoXModel

    config = GPTNeoXConfig(vocab_size=640, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    backbone, out_proj = GPTNeoXModel(config).eval(), nn.Linear(32, 1)
    state = {**{f"gpt_neox.{k}": v for k, v in backbone.state_dict().items()}, "out_proj.weight": out_proj.weight,
             "out_proj.bias": out_proj.bias + 3.0}  # fmt: skip
    path.mkdir()
    torch.save(state, path / "pytorch_model.bin")
    fields = {**config.to_dict(), "model_type": "gpt_neox_reward_model", "architectures": ["GPTNeoXRewardModel"]}
    (path / "config.json").write_text(json.dumps(fields))
    AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer").save_pretrained(path)
    return backbone, out_proj, fields


def test_oasst_reward_head_bias_is_folded_into_the_final_norm(tmp_path):
    """OpenAssistant's GPTNeoXRewardModel (the A-LoL authors' reward model): gpt_neox + out_proj with a bias, the score
    at the last token; converted, the same scores from a head without a bias."""
    backbone, out_proj, fields = oasst_checkpoint(tmp_path / "oasst")
    result = convert(tmp_path, "--format", "oasst", "--checkpoint", "oasst", "--output-dir", "rm")
    assert result.returncode == 0, result.stderr[-2000:]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = out_proj(backbone(ids).last_hidden_state[:, -1])[0, 0] + 3.0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    score = load_scorer(
        str(tmp_path / "rm"), "rm", torch.device("cpu"), torch.float32, ScoringOptions(batch_size=8, append_eos="never")
    )
    text = tokenizer.decode([5, 6, 7, 8, 9])
    assert tokenizer(text)["input_ids"] == [5, 6, 7, 8, 9]
    assert torch.allclose(score([text], [""]), expected.unsqueeze(0), atol=1e-4)
    # a mean-pooled checkpoint (its config's `pooling`) would convert to a last-token classifier silently: refused
    (tmp_path / "oasst" / "config.json").write_text(json.dumps({**fields, "pooling": "mean"}))
    refused = convert(tmp_path, "--format", "oasst", "--checkpoint", "oasst", "--output-dir", "rm-mean")
    assert refused.returncode == 1 and "pools its hidden states by 'mean'" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "rm-mean").exists()


# ---------------------------------------------------------------- trlX's stop strings
def test_stop_strings_cut_at_the_first_one_strip_and_end_with_one_eos():
    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "policy")
    texts = [
        " sure! watch the bishop.  \n\nHuman: and more\n\nAssistant: ok",
        " whatever.",
        " a b Assistant: c Human: d",
    ]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows[1].append(EOS)  # ended by itself: kept as generated
    width = max(len(r) for r in rows)
    responses = torch.tensor([r + [1] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    cut, cut_mask = cut_at_stop_strings(tokenizer, responses, mask, HH_STOPS)
    expected = [
        tokenizer(" sure! watch the bishop.")["input_ids"] + [EOS],
        rows[1],
        tokenizer(" a b")["input_ids"] + [EOS],
    ]
    assert [r[m].tolist() for r, m in zip(cut, cut_mask)] == expected
    assert [(r[m] == EOS).sum().item() for r, m in zip(cut, cut_mask)] == [1, 1, 1]  # exactly one EOS, at the end
    assert cut.shape[1] == max(len(r) for r in expected)  # the columns shrink to the longest cut response


def test_stop_string_rollout_trains_on_the_cut_response(tmp_path):
    """ppo.py --stop-strings with a policy that writes the next turn: every later pass (log-probs, values, the
    reward) sees the cut response, ended with EOS, not the sampled one."""
    from test_invariants import FLAGS, record

    from plumbing.models import load_causal_lm

    out = tmp_path / "run"
    flags = [*FLAGS, "--stop-strings", *HH_STOPS, "--output-dir", str(out)]
    (events,) = record("ppo", [flags], rollouts="next-turn")
    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "policy")
    cut = tokenizer(" sure! watch the bishop.")["input_ids"] + [EOS]
    start = next(i for i, e in enumerate(events) if e[0] == "compute_rewards")
    (_, (_, input_ids, attention_mask, responses, *_), _, logprobs) = [
        e for e in events[:start] if e[0] == "chunked_logprobs"
    ][-2]
    mask = attention_mask[:, -responses.shape[1] :].bool()
    assert all(r[m].tolist() == cut for r, m in zip(responses, mask)) and responses.shape[1] == len(cut)
    (_, (prompts, texts, ended, _), _, _) = [e for e in events[:start] if e[0] == "score"][-1]
    assert texts == [" sure! watch the bishop."] * len(texts) and ended.all()
    policy = load_causal_lm(str(REPO / "toy" / "policy"), torch.float32)  # iteration 1: pi_old is the SFT policy
    prompt = input_ids[0][attention_mask[0].bool()].tolist()[: -len(cut)]
    with torch.no_grad():
        logits = policy(torch.tensor([prompt + cut])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cut)[:, None]).squeeze(-1)
    assert torch.allclose(logprobs[0], expected, atol=1e-5)
    assert read_metrics(out)[1]["train/missing_eos_rate"] == 0.0


# ---------------------------------------------------------------- the recipes, end to end on stand-ins
def run_recipe(recipe: str, args: list[str], variables: dict, dry_run: bool = False) -> subprocess.CompletedProcess:
    bin_dir = os.path.dirname(sys.executable)  # torchrun and python of this environment
    env = {**os.environ, **variables, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": THREADS,
           "NPROC": "1", **({"DRY_RUN": "1"} if dry_run else {})}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "recipes" / recipe), *args], capture_output=True, text=True, env=env,
                            cwd=variables.get("CWD", REPO), timeout=600)  # fmt: skip
    assert result.returncode == 0, f"{recipe} {args}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def check_dry_runs(recipe: str, choices: list[list[str]], variables: dict):
    """Every choice of the recipe prints a command whose flags the script's Args accept."""
    import importlib
    import shlex

    import tyro

    for choice in choices:
        lines = run_recipe(recipe, choice, variables, dry_run=True).stdout.strip().splitlines()
        command = shlex.split(next(line for line in lines if line.startswith("torchrun")))
        script = next(i for i, word in enumerate(command) if word.endswith(".py"))
        module = importlib.import_module(os.path.basename(command[script])[:-3])
        args = tyro.cli(module.Args, args=command[script + 1 :])
        assert args.model and args.reward_model, (recipe, choice)


def hh_dataset(path, rows: int = 48):
    """Anthropic/hh-rlhf-format rows (`chosen` / `rejected` dialogues) made from the toy task."""
    path.mkdir()
    for split, n in (("train", rows), ("test", rows)):
        lines = [json.loads(line) for line in open(REPO / "toy" / "data" / f"{split}.jsonl")][:n]
        out = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in lines]
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    return str(path)


SHRINK = ["--max-new-tokens", "8", "--max-prompt-length", "64", "--eval-size", "8", "--eval-every", "1",
          "--save-every", "0", "--rollout-forward-batch-size", "8"]  # fmt: skip


def test_apa_recipe_runs_on_stand_ins(tmp_path, small_toy_data):
    """recipes/apa_hh.sh: a GPT-NeoX policy (the toy's), rm-static-format prompts, a tiny trlX-format GPT-J reward
    checkpoint converted by the recipe; PPO, APA and AWR at every size print commands their scripts accept."""
    make_trlx_checkpoint(tmp_path)
    variables = {"POLICY": str(REPO / "toy" / "policy"), "DATASET": small_toy_data,
                 "REWARD_CHECKPOINT": str(tmp_path / "gptj-rm-static"), "REWARD_BASE": str(tmp_path / "gpt-j"),
                 "REWARD_TOKENIZER": str(tmp_path / "gpt2"), "REWARD_DIR": str(tmp_path / "rm"),
                 "OUT": str(tmp_path / "run")}  # fmt: skip
    run_recipe("apa_hh.sh", ["apa", "125m", "--total-episodes", "16", "--rollout-batch-size", "8",
                             "--mini-batch-size", "4", *SHRINK], variables)  # fmt: skip
    sft, first, second = read_metrics(tmp_path / "run")
    assert first["policy/abs_log_ratio_first_mb"] < 1e-5 and "eval/gold_reward" not in second  # no gold scorer
    assert (tmp_path / "rm" / "config.json").exists() and (tmp_path / "run" / "policy" / "config.json").exists()
    check_dry_runs("apa_hh.sh", [[a, s] for a in ("ppo", "apa", "awr") for s in ("125m", "1b", "6.9b")], variables)


def tiny_moss_reward_checkpoint(path):
    """MOSS-RLHF's LlamaRewardModel layout (model.* + reward_head.weight), tiny and random, with the toy tokenizer
    (the critic starts from it and must read the policy's token ids)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=EOS,
                         eos_token_id=EOS, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in LlamaModel(config).state_dict().items()}
    state["reward_head.weight"] = torch.randn(1, 32)
    path.mkdir()
    config.save_pretrained(path)
    torch.save(state, path / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(REPO / "toy" / "tokenizer").save_pretrained(path)
    return str(path)


def test_ppo_max_recipe_runs_on_stand_ins(tmp_path):
    """recipes/ppo_max_hh.sh released: the toy policy, a tiny MOSS-format reward model (converted, then the critic's
    initial weights), HH dialogues turned into conversations in MOSS's prompt format."""
    variables = {"POLICY": str(REPO / "toy" / "policy"), "DATASET": hh_dataset(tmp_path / "hh"),
                 "DATA_DIR": str(tmp_path / "hh-messages"), "REWARD_DIR": str(tmp_path / "rm"),
                 "REWARD_CHECKPOINT": tiny_moss_reward_checkpoint(tmp_path / "moss-rm"),
                 "OUT": str(tmp_path / "run")}  # fmt: skip
    run_recipe("ppo_max_hh.sh", ["released", "--total-episodes", "16", "--rollout-batch-size", "8",
                                 "--mini-batch-size", "8", "--micro-batch-size", "4", "--lr-warmup-steps", "2",
                                 *SHRINK], variables)  # fmt: skip
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 3 and rows[1]["train/kl_coef"] == 0.01
    row = json.loads((tmp_path / "hh-messages" / "test.jsonl").read_text().splitlines()[0])
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    rendered = AutoTokenizer.from_pretrained(tmp_path / "rm").apply_chat_template([*row["prompt"], *row["chosen"]],
                                                                                  tokenize=False)  # fmt: skip
    assert rendered.startswith("<|endoftext|>Human:") and rendered.endswith("<|endoftext|>")  # (BOS = EOS here)
    check_dry_runs("ppo_max_hh.sh", [["paper"], ["released"]], variables)


def test_alol_recipe_runs_on_stand_ins(tmp_path):
    """recipes/alol_hh.sh: a tiny LLaMA-shaped base with a LoRA SFT adapter (merged by the recipe), OpenAssistant-
    format reward models (converted, their head bias folded), HH dialogues as conversations in the authors' prompt
    format; every variant prints a command alol.py accepts."""
    from peft import LoraConfig, get_peft_model
    from test_architectures import save_tiny
    from transformers import AutoModelForCausalLM

    base = save_tiny("llama", tmp_path / "llama")
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
    adapter.save_pretrained(tmp_path / "sft-adapter")
    oasst_checkpoint(tmp_path / "oasst")  # (its conversion: the test above)
    variables = {"BASE_MODEL": base, "SFT_ADAPTER": str(tmp_path / "sft-adapter"), "POLICY": str(tmp_path / "sft"),
                 "DATASET": hh_dataset(tmp_path / "hh", rows=32), "DATA_DIR": str(tmp_path / "hh-messages"),
                 "REWARD_CHECKPOINT": str(tmp_path / "oasst"), "REWARD_DIR": str(tmp_path / "rm-small"),
                 "EVAL_REWARD_CHECKPOINT": str(tmp_path / "oasst"), "EVAL_REWARD_DIR": str(tmp_path / "rm-small"),
                 "OUT": str(tmp_path / "run")}  # fmt: skip
    flags = ["--total-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--log-every", "1",
             "--value-epochs", "1", "--value-size", "16", "--lora-r", "4"]  # fmt: skip
    run_recipe("alol_hh.sh", ["a-lol", *flags, *SHRINK], variables)
    setup, *rows = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2] and 0 <= setup["train/kept_fraction"] <= 1
    assert (tmp_path / "sft" / "config.json").exists() and (tmp_path / "run" / "adapter").exists()
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 16, 0.1)  # QLoRA's alpha and dropout
    check_dry_runs("alol_hh.sh", [[v] for v in ("a-lol", "a-lol-ref-free", "a-lol-seq", "a-lol-kl", "r-lol", "wbc",
                                                "nll")], variables)  # fmt: skip


@pytest.mark.parametrize(
    "recipe, choice, expected",
    [
        ("apa_hh.sh", ["ppo", "125m"], ["--kl-control apa-authors", "--value-head mlp", "--mini-batch-size 8"]),
        ("apa_hh.sh", ["apa", "1b"], ["--value-head mlp --value-num-layers-unfrozen -1", "--lam 0.1"]),
        ("apa_hh.sh", ["awr", "125m"], ["--value-head mlp --value-num-layers-unfrozen -1", "--max-weight 0"]),
        ("ppo_max_hh.sh", ["paper"], ["--gae-lambda 0.9", "--critic-warmup-steps 4"]),
        ("ppo_max_hh.sh", ["released"], ["--gae-lambda 0.95", "--lr-warmup-steps 100"]),
        ("alol_hh.sh", ["a-lol"], ["--lora-r 64 --lora-alpha 16 --lora-dropout 0.1", "--weight-decay 0.01",
                                   "--value-size 280"]),
    ],
)  # fmt: skip
def test_recipes_print_the_authors_settings(recipe, choice, expected, tmp_path):
    """DRY_RUN=1 prints the settings read from the authors' code (docs/recipes.md): the APA authors' MLP value head
    (a fully trainable copy for APA/AWR), PPO-max's paper GAE lambda, A-LoL's QLoRA adapter scale, its optimizer's
    weight decay and its 280 V_ref prompts."""
    variables = {"POLICY": str(tmp_path), "REWARD_DIR": str(tmp_path), "DATA_DIR": str(tmp_path)}
    command = next(line for line in run_recipe(recipe, choice, variables, dry_run=True).stdout.splitlines()
                   if line.startswith("torchrun"))  # fmt: skip
    assert all(flags in command for flags in expected), command


# ---------------------------------------------------------------- every recipe fits its GPUs (bench/recipe_memory.py)
sys.path.insert(0, str(REPO / "bench"))
import recipe_memory  # noqa: E402


def test_every_recipe_fits_80_gb_gpus_by_the_memory_model():
    """Each recipe's dry-run command (GPU count, script, every flag) through the memory model: at most 72 GiB per
    80 GB GPU (a 10% margin); the committed table docs/recipes.md renders is this prediction."""
    rows = recipe_memory.predictions()
    assert [r["recipe"] for r in rows] == [f"recipes/{recipe} {args}" for recipe, args in recipe_memory.RECIPES]
    over = {r["recipe"]: round(r["total"], 1) for r in rows if r["total"] > recipe_memory.LIMIT_GIB}
    assert not over, f"over {recipe_memory.LIMIT_GIB} GiB per GPU: {over}"
    committed = json.loads((REPO / "bench" / "results" / "recipe_memory.json").read_text())
    assert json.loads(json.dumps(rows)) == committed, "run python bench/recipe_memory.py"
    # without --fsdp PPO-max's 7 ranks would each hold both trained 7B networks in full: the model says no
    argv = [a for a in recipe_memory.dry_run("ppo_max_hh.sh", "released") if a != "--fsdp"]
    assert recipe_memory.predict(*recipe_memory.parse(argv), recipe_memory.k_act())["total"] / 2**30 > 200


def test_memory_model_terms_by_hand():
    """The model's bytes per GPU for a Pythia-1B PPO run, term by term, against the arithmetic of what it keeps."""
    base = ["torchrun", "--nproc_per_node", "2", "ppo.py", "--model", "Dahoas/pythia-1B-static-sft", "--reward-model",
            "models/gptj-rm-static", "--eval-reward", "", "--dtype", "bfloat16", "--num-layers-unfrozen", "2",
            "--max-prompt-length", "100", "--max-new-tokens", "28", "--mini-batch-size", "4"]  # fmt: skip
    s, rm = recipe_memory.SHAPES["Dahoas/pythia-1B-static-sft"], recipe_memory.SHAPES["models/gptj-rm-static"]
    trained = 2 * s.per_layer + s.vocab * s.hidden  # the top 2 layers and the LM head (the final norm: negligible)
    frozen_linear = s.linear - trained
    ddp = recipe_memory.predict(*recipe_memory.parse(base), 10.0)
    assert ddp["policy"] == 16 * trained + 2 * frozen_linear + 4 * (s.params - trained - frozen_linear)
    assert ddp["reference"] == 2 * s.linear + 4 * (s.params - s.linear) and ddp["reward models"] == 2 * rm.params
    # the value network (no LM head): the top 2 layers trained, the others' Linear weights bf16, the embedding float32
    assert ddp["value network"] == 16 * 2 * s.per_layer + 2 * (s.layers - 2) * s.per_layer + 4 * s.vocab * s.hidden
    rows = 2  # the minibatch's share of a rank; each of the two networks keeps 2 layers of activations
    assert ddp["phase/update"] >= 2 * rows * 128 * s.hidden * 2 * (2 * 10.0)
    fsdp = recipe_memory.predict(*recipe_memory.parse([*base, "--fsdp"]), 10.0)  # float32 at rest, sharded over 2
    assert fsdp["policy"] == (4 * s.params + 12 * trained) / 2 and fsdp["reference"] == 2 * s.params / 2
    lora = recipe_memory.predict(*recipe_memory.parse([*base, "--use-lora", "--lora-r", "8"]), 10.0)
    assert lora["policy"] == 2 * s.params + 16 * 8 * s.layers * 16 * s.hidden and "reference" not in lora
