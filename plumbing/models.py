"""Plumbing (a reader of the algorithms can skip it): models. Loading checkpoints (policy, reference, value network,
reward models and scoring functions), LoRA, the scale options (FSDP2 / DDP, layer freezing, activation
checkpointing), checkpoints, and saving, describing and uploading the final policy."""

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import re
import shlex
import shutil
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from plumbing import data, padding, run


# ---------------------------------------------------------------- FSDP2 shards, the KV cache, rows per forward
def fsdp_modules(model) -> list[nn.Module]:
    """The FSDP2 shard groups inside `model` (none when FSDP was never imported: it costs a second at startup)."""
    if "torch.distributed.fsdp" not in sys.modules or not isinstance(model, nn.Module):
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def gathered(model):
    """Under --fsdp, all-gather every shard once and keep the full weights until the block ends (generation, no-grad
    chunked passes): no collective per decode step or chunk, so ranks may run different numbers of them.
    A no-op for unsharded models (and for None)."""
    groups = fsdp_modules(model)
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def kv_cache(model, device: torch.device):
    """Under 16-bit autocast, a KV cache that stores keys and values in that dtype. (From float32 weights the rotary
    embedding's float32 cos/sin make them float32: twice the cache memory and decode bandwidth, for nothing, since
    attention casts them to 16 bits under autocast anyway: the samples are bit-identical.) None otherwise."""
    if not torch.is_autocast_enabled(device.type):
        return None
    from transformers import DynamicCache

    class AutocastCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            dtype = torch.get_autocast_dtype(device.type)
            return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)

    return AutocastCache(config=model.config)


def rows_per_forward(model, length: int, chunk_size: int, budget: int = 2**26) -> int:
    """Rows per no-grad forward that returns logits: `chunk_size`, or fewer where their float32 logits (rows x length
    x vocabulary) would pass `budget` elements (256 MB): a 152k-token vocabulary's logits are 240x a toy's."""
    config = getattr(model, "config", None)
    vocab = getattr(config.get_text_config(), "vocab_size", 1) if config is not None else 1
    return max(1, min(chunk_size, budget // (length * vocab)))


# ---------------------------------------------------------------- loading
def _load(loader, path: str, flag: str, **kwargs):
    try:
        return loader.from_pretrained(run.repo_path(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        run.fail(f"cannot load {flag} '{path}' ({first_line}); pass a local directory or a Hugging Face Hub name")


_rank_0_loads = False  # under --fsdp: only rank 0 reads checkpoints (load_on_rank_0)


def load_on_rank_0(enabled: bool):
    """Under --fsdp only rank 0 reads each checkpoint into host memory (one full copy per job, not one per rank:
    8 x 4 bytes x 6.9B = 220 GB per node otherwise); the other ranks build it empty, on the meta device, and
    shard_model fills their shards from rank 0's weights."""
    global _rank_0_loads
    _rank_0_loads = enabled and dist.is_initialized()


def _load_model(loader, path: str, flag: str, dtype: torch.dtype, trust_remote_code: bool, **config_overrides):
    """`loader.from_pretrained`, or on a rank other than 0 under load_on_rank_0 the same model empty (meta)."""
    if not _rank_0_loads or dist.get_rank() == 0:
        return _load(loader, path, flag, dtype=dtype, trust_remote_code=trust_remote_code, **config_overrides)
    from transformers import AutoConfig

    config = _load(AutoConfig, path, flag, trust_remote_code=trust_remote_code, **config_overrides)
    with torch.device("meta"):
        return loader.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str = ""):
    """The checkpoint's tokenizer; `chat_template`: a .jinja file replacing its chat template (or giving it one)."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, path, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # e.g. Pythia/GPT-J tokenizers: pad with EOS, masks keep it out
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        if not os.path.isfile(run.repo_path(chat_template)):
            run.fail(f"--chat-template {chat_template} is not a file; pass a .jinja file")
        tokenizer.chat_template = open(run.repo_path(chat_template)).read()
    return tokenizer


def load_causal_lm(path: str, dtype: torch.dtype, trust_remote_code: bool = False, keep_generation_config=False):
    """The model in eval mode (dropout off everywhere). Its generation_config.json keeps only its token ids unless
    `keep_generation_config`: generate() fills every setting our GenerationConfig leaves unset from it
    (repetition_penalty, no_repeat_ngram_size, min_new_tokens, suppress_tokens, bad_words_ids, ...), and then the
    sampled distribution is no longer softmax(logits / T), the one whose log-probs the losses use."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = _load_model(AutoModelForCausalLM, path, "--model", dtype, trust_remote_code)
    if not keep_generation_config:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        model.checkpoint_generation_config = model.generation_config  # saved back with the final policy
        model.generation_config = GenerationConfig(**{k: getattr(model.generation_config, k, None) for k in ids})
    return model.eval()


class TrainingDropout(nn.Module):
    """LoRA's dropout, in the training forward only (gradients enabled): the scripts keep every model in eval mode,
    so sampling, the reference (the adapter switched off) and the no-grad passes see the adapter without it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return nn.functional.dropout(x, self.p, training=torch.is_grad_enabled())


def add_lora(model, r: int, task_type: str, alpha: float = 0.0, dropout: float = 0.0):
    """Freeze the base, add a LoRA adapter to every linear layer (plus the score head for SEQ_CLS): rank `r`, scale
    `alpha` / r (alpha 0: 2 r), `dropout` on the adapter's input in the training forward (TrainingDropout)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules="all-linear",
                        task_type=task_type)  # fmt: skip
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:  # trained weights in float32 even when the frozen base is bf16
            p.data = p.data.float()
    if dropout > 0:
        for module in model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, nn.ModuleDict):
                for name in list(dropouts):
                    dropouts[name] = TrainingDropout(dropout)
    return model


class ValueModel(nn.Module):
    """Scalar head reading EVERY position's last hidden state of a `*ForSequenceClassification`
    model (num_labels=1): values[:, t] is the value of the state before token t+1. The value network
    (and PPO-max's critic, which starts from the reward model's weights)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = hf_model(self.model)  # the *ForSequenceClassification, also inside a peft wrapper (whose LoRA layers
        backbone = getattr(model, model.base_model_prefix)  # are in it): its backbone, `gpt_neox`, `model`, ...
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=common.position_ids(attention_mask),
            use_cache=False,  # no KV cache outside generation (a cache would also break activation checkpointing)
        ).last_hidden_state
        head = model.score if hasattr(model, "score") else model.classifier
        with torch.autocast(hidden.device.type, enabled=False):  # float32: a bf16 head keeps ~3 digits, GAE sums them
            return head(hidden.float()).sum(
                -1
            )  # (B, T): a sum over the one output: a new tensor (FSDP2 warns on views)


class Float32Head(nn.Module):
    """A reward model's classification head in float32, run outside autocast on float32 inputs (its score in bf16
    would keep ~3 significant digits)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head.float()

    def forward(self, features, *args, **kwargs):
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.float(), *args, **kwargs)


def heads(model: nn.Module) -> list[nn.Module]:
    """The classification heads (`score` of a decoder, `classifier` of an encoder) of a model, if it has any."""
    inner = hf_model(model)
    return [
        getattr(inner, name) for name in ("score", "classifier") if isinstance(getattr(inner, name, None), nn.Module)
    ]


def load_value_model(path: str, dtype: torch.dtype, flag: str, trust_remote_code: bool = False) -> ValueModel:
    """A separate network: `path`'s backbone plus a scalar head (new unless `path` is a reward model)."""
    from transformers import AutoModelForSequenceClassification

    model = _load_model(AutoModelForSequenceClassification, path, flag, dtype, trust_remote_code, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return ValueModel(model.eval())


# ---------------------------------------------------------------- scorers: reward models and scoring functions
def is_scoring_function(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec)) and not os.path.exists(spec)


@dataclasses.dataclass
class ScoringOptions:
    """How a reward model reads a sample (the scripts' --reward-* flags; docs/real-models.md has each)."""

    batch_size: int = 64  # rows per forward
    append_eos: str = "ended"  # after a response that "ended" with a stop token, "always" (trlX), or "never"
    input_format: str = "auto"  # "text" (prompt + response), "pair" (encoders: two segments) or "auto"
    score_at: str = "last"  # a decoder's score: at the "last" real token, or the "first-eos" (trlX)
    truncate: bool = True  # left-truncate inputs over the model's maximum length (else stop with an error)
    trust_remote_code: bool = False
    fsdp: bool = False  # shard the reward model too (gathered once per call)


def load_scorer(spec: str, flag: str, device, dtype, options: ScoringOptions | None = None):
    """A sequence-level scorer, (prompts, responses, ended=None) -> (N,) float tensor on `device`: a Python function
    `module:function` (ScoringFunction) or a reward model (RewardModel). `flag` names it in errors."""
    if is_scoring_function(spec):
        return ScoringFunction(spec, flag, device)
    return RewardModel(spec, flag, device, dtype, options or ScoringOptions())


def load_scorers(args, device, dtype):
    """(--reward-model's scorer, --eval-reward's or None), both with the scripts' scoring flags."""
    options = ScoringOptions(
        args.rollout_forward_batch_size, args.reward_append_eos, args.reward_input, args.reward_score_at,
        args.reward_truncate, args.trust_remote_code, args.fsdp,
    )  # fmt: skip
    score_fn = load_scorer(args.reward_model, "--reward-model", device, dtype, options)
    eval_score_fn = load_scorer(args.eval_reward, "--eval-reward", device, dtype, options) if args.eval_reward else None
    return score_fn, eval_score_fn


class ScoringFunction:
    """A user's `module:function` scorer (prompts, responses) -> one float per response; whatever else it does (an
    exception, another type or length) stops the run with one line naming it."""

    def __init__(self, spec: str, flag: str, device):
        module, name = spec.split(":")
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            run.fail(f"cannot import scoring function {flag} '{spec}' ({e}); expected module:function")
        self.name, self.device = f"{flag} '{spec}'", device

    def __call__(self, prompts: list, responses: list[str], ended: torch.Tensor | None = None) -> torch.Tensor:
        try:
            scores = self.fn(prompts, responses)
        except Exception as e:  # noqa: BLE001 -- the user's function: whatever it raises becomes one line
            run.fail(f"scoring function {self.name} raised {type(e).__name__}: {e}; fix the function")
        try:
            tensor = torch.as_tensor(scores, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            tensor = None
        if tensor is None or tensor.shape != (len(prompts),):
            got = f"a {type(scores).__name__}" if tensor is None else f"shape {tuple(tensor.shape)}"
            run.fail(
                f"scoring function {self.name} returned {got}; it must return a list of {len(prompts)} floats, one "
                "per response"
            )
        return tensor.to(self.device)


class RewardModel:
    """A reward model scoring the decoded text re-tokenized with its own tokenizer, through its own forward
    (`.logits[:, 0]`: decoder, BERT-style pooler or RoBERTa head alike). It sees what it was trained on:
    - input_format: "text", prompt + response as one sequence; "pair", `tokenizer(prompt, response)`, two segments
      (OpenAssistant's DeBERTa reward models); "auto", pair when the tokenizer has CLS and SEP tokens (an encoder's),
      else text. A conversational prompt (a list of messages) is rendered with the reward tokenizer's chat template,
      the response as the assistant's turn, or as HH text when it has none.
    - append_eos: the reward tokenizer's EOS is appended to the text of a response that "ended" with a stop token
      (TRL's RewardTrainer tokenizes text + EOS), to "always" every response (trlX's HH reward function), or
      "never"; never after a chat template, which writes its own end-of-turn, nor to a pair. A response cut at
      --max-new-tokens (not ended) gets no end-of-turn from the template either (its text is cut after the
      response, unless "always"): the reward model sees no EOS the policy never wrote.
    - An input longer than the model's maximum length is truncated from the left, after any leading BOS/CLS
      (`truncate`, counted in `num_truncated`).
    - A decoder's score is read at the last real token, whatever its padding token (an EOS that is also the pad
      token included), or with score_at "first-eos" at the first EOS of the input (trlX's reward models)."""

    def __init__(self, spec: str, flag: str, device, dtype, options: ScoringOptions):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = _load(AutoConfig, spec, flag, trust_remote_code=options.trust_remote_code)
        if getattr(config, "num_labels", 1) != 1:
            run.fail(
                f"{flag} '{spec}' has {config.num_labels} labels; a reward model must output one scalar (num_labels=1)"
            )
        tokenizer = load_tokenizer(spec, options.trust_remote_code)
        model = _load_model(AutoModelForSequenceClassification, spec, flag, dtype, options.trust_remote_code)
        name = "score" if isinstance(getattr(model, "score", None), nn.Module) else "classifier"
        setattr(model, name, Float32Head(getattr(model, name)))
        model = model.eval().requires_grad_(False)
        self.model = shard_model(model, dtype) if options.fsdp else model.to(device)  # --fsdp: gathered per call
        positions = getattr(config, "max_position_embeddings", None) or 2**31
        self.max_length = tokenizer.model_max_length if tokenizer.model_max_length < 2**31 else positions
        self.input_format = options.input_format
        if self.input_format == "auto":
            encoder = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
            self.input_format = "pair" if encoder else "text"
        tokenizer.truncation_side = "left"  # a pair too long for the model loses the start of its prompt
        self.tokenizer, self.flag, self.options, self.device, self.dtype = tokenizer, flag, options, device, dtype
        self.num_truncated = 0

    def encode(self, prompt, response: str, ended: bool | None) -> list[int]:
        """The token ids the reward model reads for one sample."""
        tokenizer, eos = self.tokenizer, self.tokenizer.eos_token_id
        templated = data.is_conversation(prompt) and tokenizer.chat_template
        if self.input_format == "pair":  # [CLS] prompt [SEP] response [SEP]
            prompt_text = data.render_plain(prompt) if data.is_conversation(prompt) else prompt
            ids = tokenizer(prompt_text, response, truncation="only_first", max_length=self.max_length)["input_ids"]
        elif not data.is_conversation(prompt):
            ids = tokenizer(prompt + response)["input_ids"]
        elif templated:  # the conversation as the reward model was trained on it, special tokens once
            turns = prompt + [{"role": "assistant", "content": response}]
            text = data.render_chat(tokenizer, turns, self.flag)
            if ended is False and self.options.append_eos != "always":  # cut at --max-new-tokens: its turn never ended,
                text = _up_to(text, response)  # so no end-of-turn (or EOS) the policy did not write
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(data.render_plain(prompt) + response)["input_ids"]
        append_eos = self.options.append_eos
        wants_eos = append_eos == "always" or (append_eos == "ended" and ended)
        closed = bool(ids) and ids[-1] in (eos, tokenizer.sep_token_id)  # already ends with EOS, or an encoder's SEP
        if wants_eos and not templated and self.input_format == "text" and eos is not None and not closed:
            ids.append(eos)
        if len(ids) > self.max_length:
            if not self.options.truncate:
                run.fail(
                    f"a {self.flag} input has {len(ids)} tokens, over {self.max_length}; drop --no-reward-truncate"
                )
            leading = {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}
            head = 1 if ids[0] in leading else 0  # keep BOS/CLS, cut the start of the dialogue
            ids = ids[:head] + ids[len(ids) - self.max_length + head :]
            self.num_truncated += 1
        if self.options.score_at == "first-eos" and eos in ids:  # a causal model's score there sees nothing after it
            ids = ids[: ids.index(eos) + 1]
        return ids

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str], ended: torch.Tensor | None = None) -> torch.Tensor:
        ended = ended.tolist() if ended is not None else [None] * len(prompts)  # (None: not known)
        encoded = [self.encode(p, r, e) for p, r, e in zip(prompts, responses, ended)]
        lengths, width, batch_size = (
            [len(ids) for ids in encoded],
            max(len(ids) for ids in encoded),
            self.options.batch_size,
        )
        groups = padding.length_groups(lengths, [0] * len(encoded), batch_size, batch_size * width)
        chunk_scores = []
        with gathered(self.model):  # chunks of similar length (padding.length_groups): little padding
            for rows in groups:
                chunk = [encoded[j] for j in rows]
                width = max(len(ids) for ids in chunk)  # right padding: every model type reads positions from 0
                # a decoder reads the last token that is not its pad_token_id: pad with an id no row holds, so that
                # an EOS that is also the tokenizer's pad token (GPT-2, Pythia, LLaMA) is read, not skipped
                used = {t for ids in chunk for t in ids}
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id not in used else _unused_id(used)
                self.model.config.pad_token_id = pad
                input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in chunk])
                mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk])
                padding.count_padding("passes", sum(len(ids) for ids in chunk), mask.numel())
                inputs = dict(input_ids=padding.to_device(input_ids, self.device),
                              attention_mask=padding.to_device(mask, self.device))  # fmt: skip
                with common.autocast(self.device, self.dtype):
                    chunk_scores.append(self.model(**inputs).logits[:, 0].float())
        scores = torch.empty(len(encoded), device=self.device)
        scores[padding.rows_on_device([[j for rows in groups for j in rows]], self.device)[0]] = torch.cat(chunk_scores)
        return scores


def _up_to(text: str, content: str) -> str:
    """`text` cut right after the last occurrence of `content` (or of it stripped, as a template may write it)."""
    for part in (content, content.rstrip(), content.strip()):
        if part and part in text:
            return text[: text.rindex(part) + len(part)]
    return text


def _unused_id(used: set[int]) -> int:
    return min(set(range(len(used) + 1)) - used)


# ---------------------------------------------------------------- scale: freezing, checkpointing, sharding
def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a wrapper (DDP, peft, ValueModel)."""
    from transformers import PreTrainedModel

    return next(m for m in model.modules() if isinstance(m, PreTrainedModel))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (GPT-NeoX `layers`, GPT-2 `h`, LLaMA `layers`, ...): the longest ModuleList of
    the classes the model names as `_no_split_modules`, else the longest ModuleList."""
    block_names = set(getattr(hf_model(model), "_no_split_modules", None) or [])
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    blocks = [m for m in lists if all(type(layer).__name__ in block_names for layer in m)] or lists
    if not blocks:
        run.fail(f"cannot find the decoder layers of {type(hf_model(model)).__name__}; drop the scale flags for it")
    return list(max(blocks, key=len))


def freeze_bottom_layers(model: nn.Module, num_layers_unfrozen: int):
    """trlX's `num_layers_unfrozen` (the APA paper's HH runs unfreeze the last two layers): only the top N decoder
    blocks and what follows them (final norm, LM head or value head) train; the embeddings and the blocks below stay
    frozen. -1 trains everything. A head tied to the input embeddings stays frozen with them."""
    if num_layers_unfrozen < 0:
        return
    layers = decoder_layers(model)
    for module in [*layers[: max(len(layers) - num_layers_unfrozen, 0)], hf_model(model).get_input_embeddings()]:
        module.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.Embedding):  # e.g. GPT-2's learned position embeddings
            module.requires_grad_(False)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # no-grad passes keep no activations anyway
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(model: nn.Module):
    """Activation checkpointing on every decoder layer: only each layer's input is kept, the rest is recomputed in
    backward. (HF's gradient_checkpointing_enable() does nothing while the model is in .eval(), which these
    scripts use to turn dropout off, so the layers' forward is wrapped directly.)"""
    for layer in decoder_layers(model):
        layer.forward = functools.partial(_checkpointed, layer.forward)


def shard_model(model: nn.Module, dtype: torch.dtype):
    """FSDP2: each decoder layer is one shard group, the rest (embeddings, norm, heads) the root's. Weights stay in
    their own dtype at rest (float32 for trained ones); with a 16-bit --dtype they are all-gathered and computed in
    it, and gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = model.state_dict() if _rank_0_loads and dist.get_rank() == 0 else {}  # (the loaded tensors themselves)
    # every group, the root too, frees its gathered weights after forward (gathered() restores this setting)
    kwargs = {"reshard_after_forward": True}
    if dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    if dtype != torch.float32:  # value and reward heads gathered and computed in float32 (their own group)
        for head in heads(model):
            float32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            fully_shard(head, reshard_after_forward=True, mp_policy=float32)
    # the root is the module whose forward every call enters: a peft model's generate() enters the HF model
    fully_shard(model if isinstance(model, ValueModel) else hf_model(model), **kwargs)
    if _rank_0_loads:  # the other ranks' empty shards (and buffers) filled from rank 0's weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        if dist.get_rank() != 0:
            model.to_empty(device=device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, full, options=options)
        for buffer in model.buffers():  # non-persistent ones (rotary frequencies) are in no state dict
            dist.broadcast(buffer.data, src=0)
    return model


def frozen_linears_to(model: nn.Module, dtype: torch.dtype):
    """Under 16-bit autocast, frozen Linear layers keep their weights in that dtype: autocast caches the cast only of
    weights that train, so a frozen float32 layer would be cast again at every call (every decode step). Linear
    layers only (and not a head tied to the embeddings): autocast computes norms and embeddings from float32 weights,
    which stay float32 so that the reference computes exactly what the policy computes."""
    if dtype == torch.float32:
        return
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        weights = list(module.parameters(recurse=False))
        if (
            isinstance(module, nn.Linear)
            and id(module.weight) not in embeddings
            and not any(w.requires_grad for w in weights)
        ):
            module.to(dtype)


def prepare_model(model: nn.Module, args, device, train: bool, num_layers_unfrozen: int | None = None) -> nn.Module:
    """For a trained model --num-layers-unfrozen (or `num_layers_unfrozen`) and --activation-checkpointing; then
    --fsdp shards it (frozen ones too), moving one layer at a time to the device, or it is moved whole and, under
    torchrun, DDP wraps a trained one. Frozen Linear weights are stored in the compute dtype (--dtype)."""
    dtype = run.resolve_dtype(args.dtype, device)
    if train:
        freeze_bottom_layers(model, args.num_layers_unfrozen if num_layers_unfrozen is None else num_layers_unfrozen)
        if args.activation_checkpointing:
            checkpoint_layers(model)
    else:
        model.requires_grad_(False)
    if args.fsdp:
        return shard_model(model, dtype)
    frozen_linears_to(model, dtype)
    model = model.to(device)
    if train and dist.is_initialized():  # (under torchrun, one rank too); gradients are views into the all-reduce
        return DDP(model, gradient_as_bucket_view=True)  # buckets: no second copy
    return model


def trained_weights_dtype(args, device) -> torch.dtype:
    """Trained weights and AdamW states stay float32 (--dtype is the compute dtype, under autocast); only a LoRA
    adapter's frozen base is stored in --dtype (in float32 too under --fsdp: one dtype per shard group)."""
    return run.resolve_dtype(args.dtype, device) if args.use_lora and not args.fsdp else torch.float32


def policy_and_reference(args, device) -> tuple[nn.Module, nn.Module | None]:
    """The policy to train (--model, with a LoRA adapter under --use-lora) and the frozen reference pi_ref, each
    prepared (sharded under --fsdp, DDP-wrapped with several ranks) as soon as it is loaded, so that one full copy at
    a time is in memory. Under --fsdp only rank 0 reads checkpoints from here on (`load_on_rank_0`).
    pi_ref is a second copy holding the weights the policy computes with: float32 under autocast (the policy's
    own float32 weights are cast by autocast), --dtype under --fsdp (where the policy's shards are gathered in
    --dtype), so that KL is exactly 0 before the first update. Under LoRA there is no copy (None): pi_ref is the
    policy with its adapter switched off (`reference_model`)."""
    load_on_rank_0(args.fsdp)
    policy = load_causal_lm(args.model, trained_weights_dtype(args, device), args.trust_remote_code,
                            args.use_generation_config)  # fmt: skip
    if args.use_lora:
        policy = add_lora(policy, args.lora_r, "CAUSAL_LM", args.lora_alpha, args.lora_dropout)
    policy = prepare_model(policy, args, device, train=True)
    if args.use_lora:
        return policy, None
    dtype = run.resolve_dtype(args.dtype, device) if args.fsdp else torch.float32
    ref_policy = load_causal_lm(args.model, dtype, args.trust_remote_code)
    return policy, prepare_model(ref_policy, args, device, train=False)


def value_network(path: str, flag: str, args, device) -> nn.Module:
    """A separate value network: `path`'s backbone and a scalar head (a LoRA adapter and a trained head under
    --use-lora), prepared for training like the policy; --value-head mlp replaces the head with trlX's MLP (h -> 2h
    -> 1, the APA authors'), --value-num-layers-unfrozen freezes its bottom layers as --num-layers-unfrozen does the
    policy's (by default the same)."""
    value_model = load_value_model(path, trained_weights_dtype(args, device), flag, args.trust_remote_code)
    if args.value_head == "mlp":
        model = hf_model(value_model)
        hidden = model.config.get_text_config().hidden_size
        mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, 1))
        setattr(model, "score" if hasattr(model, "score") else "classifier", mlp.float())
    if args.use_lora:
        value_model.model = add_lora(value_model.model, args.lora_r, "SEQ_CLS", args.lora_alpha, args.lora_dropout)
    return prepare_model(value_model, args, device, train=True, num_layers_unfrozen=args.value_num_layers_unfrozen)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters training changes (the optimizer's): all, or the top layers, the adapters and heads."""
    return [p for p in model.parameters() if p.requires_grad]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


@contextlib.contextmanager
def gradient_sync(trained: list[nn.Module], sync: bool):
    """DDP: accumulate gradients locally (no all-reduce) unless `sync`. FSDP2 reduce-scatters every micro-batch's
    gradients into the sharded ones: skipping that would keep each rank's UNSHARDED float32 gradients of the whole
    model until the last micro-batch (+4 bytes x all parameters per rank), the memory FSDP is there to save."""
    with contextlib.ExitStack() as stack:
        for model in trained:
            if isinstance(model, DDP) and not sync:
                stack.enter_context(model.no_sync())
        yield


@contextlib.contextmanager
def reference_model(policy, ref_policy):
    """The frozen pi_ref: its own copy, or (under LoRA, where `ref_policy` is None) the policy with its adapter off.
    (Each LoRA layer's own switch, not peft's disable_adapter(), which also turns the adapter's requires_grad off and
    on: under FSDP2 that leaves the gathered parameters out of step with their shards, and the next backward fails.)"""
    if ref_policy is not None:
        yield ref_policy
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield policy
    finally:
        for layer in layers:
            layer._disable_adapters = False


# ---------------------------------------------------------------- trained weights in checkpoints and the final policy
def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state(model: nn.Module) -> dict:
    """The parameters that training changes (all of them, or the adapter and head with LoRA), as full tensors on
    rank 0 ({} elsewhere). Under --fsdp every rank must call it: the shards are gathered."""
    model = unwrap(model)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_state_options())
        return {name: t for name, t in state.items() if name in trained}
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {name: p.detach().cpu() for name, p in model.named_parameters() if name in trained}


def load_trainable_state(model: nn.Module, state: dict):
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = {name for name, _ in model.named_parameters()}
        unexpected = [name for name in state if name not in names]
        if not unexpected and state:  # each rank holds the full state: it keeps its own shard
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected or not state:
        run.fail(
            f"checkpoint does not match the model ({len(unexpected)} unknown tensors); use the run's --model/--use-lora"
        )


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's state (full tensors under --fsdp, gathered; every rank must call it), {} except on rank 0."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    return optimizer.state_dict() if not dist.is_initialized() or dist.get_rank() == 0 else {}


def load_optimizer_state(model: nn.Module, optimizer, state: dict):
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def max_replica_difference(model: nn.Module) -> float:
    """Largest difference between ranks of any parameter's checksum (0.0 when replicas agree)."""
    if not dist.is_initialized() or is_sharded(model):
        return 0.0  # under --fsdp each parameter exists once, as shards: there are no replicas to disagree
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return (hi - lo).abs().max().item()


def training_state(trained: dict) -> dict:
    """The checkpoint entries of `trained` ({name: (model, optimizer)}): `name` holds the model's trainable weights,
    `name_optimizer` its optimizer's state. Full tensors on rank 0; under --fsdp every rank must call it."""
    state = {}
    for name, (model, optimizer) in trained.items():
        state[name] = trainable_state(model)
        state[f"{name}_optimizer"] = optimizer_state(model, optimizer)
    return state


def load_training_state(checkpoint: dict, trained: dict):
    """Restore every (model, optimizer) of `trained` from the entries `training_state` wrote."""
    for name, (model, optimizer) in trained.items():
        load_trainable_state(model, checkpoint[name])
        load_optimizer_state(model, optimizer, checkpoint[f"{name}_optimizer"])


def sharded_training_state(trained: dict) -> dict:
    """Under --fsdp, each rank's shards of what `training_state` holds: the trainable weights and optimizer states."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {}
    for name, (model, optimizer) in trained.items():
        model = unwrap(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state[name] = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
        state[f"{name}_optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint_file(output_dir: str, state: dict):
    """Atomic: a killed save leaves the previous checkpoint intact. Rank 0 writes; every rank calls it."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = os.path.join(output_dir, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(output_dir: str, trained: dict, state: dict):
    """Atomic (a killed save leaves the previous checkpoint whole); every rank calls it. Without --fsdp rank 0 writes
    checkpoint.pt: `state` and the trainable weights and optimizer states of `trained` ({name: (model, optimizer)}).
    Under --fsdp torch.distributed.checkpoint writes checkpoint/: each rank its own shards of the latter (no rank
    gathers a full copy; a run resumes on any number of ranks), rank 0 `state` (state.pt)."""
    if not any(is_sharded(unwrap(model)) for model, _ in trained.values()):
        return save_checkpoint_file(output_dir, {**state, **training_state(trained)})
    import torch.distributed.checkpoint as dcp

    final, tmp, old = (os.path.join(output_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed before
    dist.barrier()
    dcp.save(sharded_training_state(trained), checkpoint_id=tmp)
    if dist.get_rank() == 0:
        torch.save(state, os.path.join(tmp, "state.pt"))
        if os.path.exists(final):
            os.replace(final, old)  # (killed between these two renames: load_checkpoint reads checkpoint.old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def sharded_checkpoint_dir(output_dir: str) -> str | None:
    """The sharded checkpoint of `output_dir` (checkpoint/, or checkpoint.old/ if a save died while renaming)."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.exists(os.path.join(output_dir, name, "state.pt")):
            return os.path.join(output_dir, name)
    return None


def load_checkpoint(output_dir: str, trained: dict) -> dict:
    """Restore `trained` from the checkpoint `save_checkpoint` wrote in `output_dir`; returns its `state`."""
    directory = sharded_checkpoint_dir(output_dir)
    if directory is None:
        checkpoint = torch.load(os.path.join(output_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
        load_training_state(checkpoint, trained)
        return checkpoint
    if not all(is_sharded(unwrap(model)) for model, _ in trained.values()):
        run.fail(f"the checkpoint in {directory} was written under --fsdp; resume it with --fsdp (any ranks)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sharded = sharded_training_state(trained)
    dcp.load(sharded, checkpoint_id=directory)  # each rank reads the parts of its own shards
    for name, (model, optimizer) in trained.items():
        set_model_state_dict(unwrap(model), sharded[name], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(unwrap(model), optimizer, sharded[f"{name}_optimizer"])
    return torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)


def save_final_policy(policy, tokenizer, output_dir: str, args):
    """`save_pretrained` of the policy (+ tokenizer) by rank 0; with LoRA the adapter and the merged model. Under
    --fsdp the full weights are gathered on rank 0 (on the CPU) and assigned to an empty (meta) --model: one full
    copy. Every rank calls it."""
    policy = unwrap(policy)
    if is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from transformers import AutoConfig, AutoModelForCausalLM

        state = get_model_state_dict(policy, options=_full_state_options())
        if dist.get_rank() != 0:
            return
        config = _load(AutoConfig, args.model, "--model", trust_remote_code=args.trust_remote_code)
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
        empty.generation_config = hf_model(policy).generation_config
        empty.checkpoint_generation_config = getattr(hf_model(policy), "checkpoint_generation_config", None)
        policy = (
            add_lora(empty, args.lora_r, "CAUSAL_LM", args.lora_alpha, args.lora_dropout) if args.use_lora else empty
        )
        policy.load_state_dict(state, strict=False, assign=True)
        hf_model(policy).tie_weights()
    elif dist.is_initialized() and dist.get_rank() != 0:
        return
    model = hf_model(policy)
    model.generation_config = getattr(model, "checkpoint_generation_config", None) or model.generation_config
    if args.use_lora:
        policy.save_pretrained(os.path.join(output_dir, "adapter"))
        tokenizer.save_pretrained(os.path.join(output_dir, "adapter"))
        policy = policy.merge_and_unload()
    final, tmp, old = (os.path.join(output_dir, name) for name in ("policy", "policy.tmp", "policy.old"))
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_model_card(tmp, output_dir, args)
    if os.path.exists(final):  # a resumed run that had finished before: the new policy replaces it
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"saved the final policy to {final}")
    if args.push_to_hub:
        push_to_hub(output_dir, args.push_to_hub)


def write_model_card(directory: str, output_dir: str, args):
    """policy/training_args.json (the script, its command line and every flag: bench/evaluate.py reads it) and
    policy/README.md, a model card: the algorithm, the command, the models and data it started from, the final
    evaluation (the last row of metrics.jsonl)."""
    script = os.path.basename(sys.argv[0])
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    launcher = f"torchrun --nproc_per_node {world_size}" if dist.is_initialized() else "python"
    command = " ".join([launcher, script, *map(shlex.quote, sys.argv[1:])])
    flags = dataclasses.asdict(args)
    with open(os.path.join(directory, "training_args.json"), "w") as f:
        json.dump({"script": script, "command": command, "world_size": world_size, "args": flags}, f, indent=1)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    algorithm = (getattr(sys.modules["__main__"], "__doc__", None) or script).strip().splitlines()[0]
    metrics = "\n".join(f"| `{key}` | {value:.4g} |" for key, value in last.items() if key.startswith("eval/"))
    sources = [("policy (and pi_ref)", "model"), ("reward model", "reward_model"), ("evaluation scorer", "eval_reward")]
    sources += [("prompts", "dataset")]
    base = f"base_model: {args.model}\n" if not os.path.exists(args.model) and not args.model.startswith("toy/") else ""
    card = f"""---
library_name: transformers
tags: [rlhf, {script[: -len(".py")].replace("_", "-")}]
{base}---

# {os.path.basename(os.path.abspath(output_dir))}

{algorithm}

Trained with `{script}` of rlhf-reference for {last["iteration"]} iterations ({last["episodes"]} episodes).

```
{command}
```

## Models and data

{chr(10).join(f"- {what}: `{getattr(args, name)}`" for what, name in sources if getattr(args, name, ""))}

## Final evaluation ({args.eval_size} held-out prompts of the `{args.eval_split}` split)

| metric | value |
|---|---|
{metrics}

Every flag of the run is in `training_args.json`; `python bench/evaluate.py <this directory>` evaluates it again.
"""
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(card)


def push_to_hub(output_dir: str, repo: str):
    """Upload policy/ (and adapter/, into its adapter/ folder) to the hub repository `repo` (rank 0 only)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=os.path.join(output_dir, "policy"), commit_message="policy")
        if os.path.isdir(os.path.join(output_dir, "adapter")):
            api.upload_folder(
                repo_id=repo, folder_path=os.path.join(output_dir, "adapter"), path_in_repo="adapter",
                commit_message="LoRA adapter",
            )  # fmt: skip
    except Exception as error:  # the run is saved: say how to finish the upload by hand
        reason = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
        run.fail(
            f"--push-to-hub {repo}: the upload failed ({reason}); the policy is saved in {output_dir}/policy; "
            f"upload it with `hf upload {repo} {output_dir}/policy`"
        )
    print(f"uploaded the final policy to {url}")
