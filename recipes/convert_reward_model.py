"""Convert the papers' reward checkpoints into standard `AutoModelForSequenceClassification` directories.

The reward models the papers used are not Hugging Face sequence classifiers, so `--reward-model` cannot load them
as they are. Each is a backbone plus a linear head on a token's last hidden state; this writes the same weights as
the backbone's `*ForSequenceClassification` (`score.weight` = the head) with the right tokenizer:
- trlx: trlX's HH reward model (the APA authors': `Dahoas/gptj-rm-static`), a raw `.pt` state dict of GPT-J-6B's
  `transformer.*` plus `v_head.weight` (`Linear(n_embd, 1, bias=False)`), read with the GPT-2 tokenizer (pad = EOS),
  an EOS appended to every sample, inputs left-truncated to 1,024 tokens and the score read at the FIRST EOS
  (`argmax(input_ids == eos)`). The scripts score it exactly so with `--reward-append-eos always
  --reward-score-at first-eos` (recipes/apa_hh.sh; tests/test_recipes.py checks it against their forward).
- moss: MOSS-RLHF's `LlamaRewardModel` (`model.*` + `reward_head.weight`, the score at the last token, an EOS).
- oasst: OpenAssistant's `GPTNeoXRewardModel` (`gpt_neox.*` + `out_proj`, last-token pooling; the A-LoL authors').
  Its head has a bias, which a `GPTNeoXForSequenceClassification` head lacks: it is folded into the final layer
  norm's bias (b w / |w|^2 added, so w . (norm + that) = w . norm + b: the same scores).

    python recipes/convert_reward_model.py --format trlx --checkpoint Dahoas/gptj-rm-static --revision 676bfd4d \\
        --base EleutherAI/gpt-j-6B --tokenizer gpt2 --output-dir models/gptj-rm-static

--checkpoint is a hub repository or a local directory (every .safetensors/.bin/.pt file in it is read) or file;
--base gives the architecture's config.json only (default: the checkpoint's own); --chat-template sets the
tokenizer's chat template (a conversation is then scored as the reward model was trained on it).
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plumbing import models, run  # noqa: E402

# format -> (the backbone's key prefix, the head's module name)
FORMATS = {"trlx": ("transformer", "v_head"), "moss": ("model", "reward_head"), "oasst": ("gpt_neox", "out_proj")}
# buffers that older transformers versions saved with GPT-J / GPT-2 attention layers (causal masks, not weights)
STALE_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
FINAL_NORM_BIASES = ("final_layer_norm.bias", "ln_f.bias", "norm.bias")


@dataclass
class Args:
    format: Literal["trlx", "moss", "oasst"]  # the checkpoint's layout (see the module docstring)
    checkpoint: str  # a hub repository, a local directory or a .pt/.bin/.safetensors file
    output_dir: str  # where the AutoModelForSequenceClassification directory is written (must not exist)
    base: str = ""  # the backbone's config.json (e.g. EleutherAI/gpt-j-6B for trlx); default: --checkpoint's own
    tokenizer: str = ""  # the reward model's tokenizer (trlx: gpt2); default: --checkpoint's own
    revision: str | None = None  # hub revision of --checkpoint (the APA authors': 676bfd4d)
    max_length: int = 0  # inputs are left-truncated to this many tokens (trlx: 1024); 0 = the tokenizer's own
    chat_template: str = ""  # a .jinja file: the tokenizer's chat template (how the reward model saw conversations)


def local_files(name: str, revision: str | None) -> list[str]:
    """The weight files of a local file or directory, or of a hub repository's snapshot."""
    if os.path.isfile(name):
        return [name]
    directory = name
    if not os.path.isdir(name):
        from huggingface_hub import snapshot_download

        try:
            directory = snapshot_download(name, revision=revision)
        except Exception as e:  # noqa: BLE001 -- any hub failure becomes one line naming the checkpoint
            run.fail(f"cannot download --checkpoint '{name}' ({str(e).strip().splitlines()[0]}); pass a local path")
    skip = ("training_args", "optimizer", "scheduler", "rng_state")  # a trainer's other files
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.endswith((".pt", ".bin", ".safetensors")) and not f.startswith(skip))  # fmt: skip
    if not files:
        run.fail(f"--checkpoint '{name}' holds no .pt, .bin or .safetensors file")
    return files


def read_state(files: list[str]) -> dict:
    state = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def base_config(path: str, fmt: str):
    """The backbone's config; OpenAssistant's names its own model type (gpt_neox_reward_model): read as GPT-NeoX."""
    from transformers import AutoConfig, GPTNeoXConfig

    if fmt == "oasst":
        local = path if os.path.isdir(path) else os.path.dirname(local_files(path, None)[0])
        fields = json.loads(Path(local, "config.json").read_text())
        if fields.get("pooling", "last") != "last":  # (GPTNeoXRewardModel's `pooling`: "last" or "mean")
            run.fail(
                f"--checkpoint '{path}' pools its hidden states by '{fields['pooling']}' (config.json 'pooling'); "
                "only last-token pooling converts to a sequence classifier: use a checkpoint trained with 'last'"
            )
        return GPTNeoXConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "architectures")})
    return models.load_pretrained(AutoConfig, path, "--base")


def convert(state: dict, config, fmt: str, what: str):
    """The sequence-classification model of `config` (num_labels=1) holding the checkpoint's weights."""
    from transformers import AutoModelForSequenceClassification

    prefix, head = FORMATS[fmt]
    if f"{head}.weight" not in state or not any(k.startswith(prefix + ".") for k in state):
        run.fail(f"{what} is not a {fmt} reward checkpoint (expected {prefix}.* and {head}.weight tensors)")
    config.num_labels = 1
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    weights = {model.base_model_prefix + k[len(prefix) :]: v for k, v in state.items()
               if k.startswith(prefix + ".") and not k.endswith(STALE_BUFFERS)}  # fmt: skip
    weights["score.weight"] = state[f"{head}.weight"]
    if f"{head}.bias" in state:  # fold b into the final norm's bias: w . (x + b w / |w|^2) = w . x + b
        norm = next((k for k in weights if k.endswith(FINAL_NORM_BIASES) and ".layers." not in k), None)
        if norm is None:
            run.fail(f"{what}: its head has a bias and the backbone no final norm bias to fold it into")
        w = state[f"{head}.weight"][0].double()
        weights[norm] = (weights[norm].double() + state[f"{head}.bias"].double() * w / (w @ w)).to(weights[norm].dtype)
    expected = set(model.state_dict())
    if set(weights) != expected:
        missing, unknown = sorted(expected - set(weights)), sorted(set(weights) - expected)
        run.fail(f"{what} does not match the architecture (missing {missing[:3]}, unknown {unknown[:3]})")
    model.load_state_dict(weights, assign=True)
    model.config.dtype = state[f"{head}.weight"].dtype
    return model.eval()


def main():
    args = tyro.cli(Args)
    run.quiet_libraries()
    if os.path.exists(args.output_dir):
        run.fail(f"--output-dir {args.output_dir} exists; choose a new directory")
    tokenizer = models.load_tokenizer(args.tokenizer or args.checkpoint)  # pad = EOS when it has none (GPT-2)
    tokenizer.truncation_side = "left"
    if args.max_length:
        tokenizer.model_max_length = args.max_length
    if args.chat_template:
        tokenizer.chat_template = Path(args.chat_template).read_text()
    files = local_files(args.checkpoint, args.revision)
    model = convert(read_state(files), base_config(args.base or args.checkpoint, args.format), args.format,
                    f"--checkpoint '{args.checkpoint}'")  # fmt: skip
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    tmp = args.output_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, args.output_dir)
    print(f"wrote {args.output_dir}: {type(model).__name__}")


if __name__ == "__main__":
    main()
