"""Shared plumbing for the RLHF scripts: loading, padding, log-prob gather, masked statistics,
distributed reductions, logging and checkpoints. No algorithm logic lives here: what each
algorithm optimises is written out in its own script."""

import contextlib
import functools
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = Path(__file__).resolve().parent


def quiet_libraries():
    """Hide the libraries' load reports and progress bars; our own errors and logs stay. (Also: no tokenizer thread
    pools, which warn and can deadlock once torchrun or a data loader forks.)"""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def fail(message: str):
    """Stop with a one-line error naming the problem and the fix (exit status 1)."""
    raise SystemExit(f"error: {message}")


def resolve(path: str) -> str:
    """Defaults like `toy/policy` are relative to the repository, wherever the script runs from."""
    return str(REPO / path) if not os.path.exists(path) and (REPO / path).exists() else path


# ---------------------------------------------------------------- distributed
def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); under torchrun joins the process group (nccl on CUDA, gloo on CPU)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    quiet_libraries()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_list(items: list) -> list:
    if not dist.is_initialized():
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (e.g. a time-stamped output directory name)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def max_replica_difference(model: nn.Module) -> float:
    """Largest difference between ranks of any parameter's checksum (0.0 when replicas agree)."""
    if not dist.is_initialized() or is_sharded(model):
        return 0.0  # under --fsdp each parameter exists once, as shards: there are no replicas to disagree
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return (hi - lo).abs().max().item()


def global_means(per_sequence: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over all ranks' sequences of each per-sequence statistic: one all-reduce, one sync."""
    count = next(iter(per_sequence.values())).new_tensor(len(next(iter(per_sequence.values()))), dtype=torch.float)
    sums = all_reduce_sum(torch.stack([v.float().sum() for v in per_sequence.values()] + [count])).tolist()
    return {key: total / sums[-1] for key, total in zip(per_sequence, sums)}


def barrier():
    if dist.is_initialized():
        dist.barrier()


def check_batch_sizes(total_episodes: int, rollout_batch_size: int, mini_batch_size: int, world_size: int, args):
    """Every flag in range, batch sizes divide as the loops need them to (before anything loads or is written)."""
    check_flags(args, mini_batch_size // world_size, world_size)
    for flag, size in (("--rollout-batch-size", rollout_batch_size), ("--mini-batch-size", mini_batch_size)):
        if size % world_size:  # (positive: check_flags)
            fail(f"{flag} {size} is not divisible by the {world_size} ranks; make it a multiple of the world size")
    if rollout_batch_size % mini_batch_size:
        fail(f"--rollout-batch-size {rollout_batch_size} is not divisible by --mini-batch-size {mini_batch_size}")
    if total_episodes < rollout_batch_size:
        fail(f"--total-episodes {total_episodes} is less than one --rollout-batch-size ({rollout_batch_size})")


# The ranges of the flags the scripts share by name (a script checks those of its Args that appear here).
POSITIVE_COUNTS = ["total_episodes", "rollout_batch_size", "mini_batch_size", "update_epochs", "total_steps",
                   "batch_size", "rollout_forward_batch_size", "max_new_tokens", "max_prompt_length", "eval_every",
                   "eval_size", "lora_r", "kl_horizon", "value_samples", "value_epochs", "log_every",
                   "lr_warmup_steps"]  # fmt: skip
NON_NEGATIVE = ["save_every", "micro_batch_size", "critic_warmup_steps", "missing_eos_penalty", "kl_coef", "kl_target",
                "vf_coef", "max_weight", "kl_beta", "ptx_coef"]  # fmt: skip
POSITIVE = ["temperature", "lr", "value_lr", "max_grad_norm", "reward_clip", "clip_eps", "value_clip", "lam", "beta"]
UNIT_INTERVAL = ["gamma", "gae_lambda"]


def check_flags(args, local_mini_batch: int, world_size: int):
    """Every shared flag in its range; --dtype float16 refused; --micro-batch-size divides a rank's minibatch;
    --fsdp has ranks to shard over; --num-layers-unfrozen >= -1."""
    for names, ok, wanted in (
        (POSITIVE_COUNTS, lambda v: v >= 1, "a positive integer"),
        (NON_NEGATIVE, lambda v: v >= 0, "0 or more"),
        (POSITIVE, lambda v: v > 0, "greater than 0"),
        (UNIT_INTERVAL, lambda v: 0 <= v <= 1, "in [0, 1]"),
    ):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not (ok(value) and value == value):  # value == value: not NaN
                fail(f"--{name.replace('_', '-')} {value} is out of range; it must be {wanted}")
    if not all(0 <= beta < 1 for beta in getattr(args, "adam_betas", ())):
        fail(f"--adam-betas {args.adam_betas} is out of range; both must be in [0, 1)")
    if args.dtype == "float16":
        fail("--dtype float16 needs a gradient scaler, which these scripts do not have; use --dtype bfloat16")
    if args.micro_batch_size and local_mini_batch % args.micro_batch_size:
        fail(
            f"--micro-batch-size {args.micro_batch_size} does not divide the {local_mini_batch} rows each rank gets "
            "per gradient step; pass a divisor of it (0 = no micro-batching)"
        )
    if args.fsdp and world_size == 1:
        fail("--fsdp shards the models over ranks; launch with torchrun --nproc_per_node N (N > 1) or drop --fsdp")
    if args.num_layers_unfrozen < -1:
        fail(f"--num-layers-unfrozen {args.num_layers_unfrozen} is out of range; pass -1 (train all) or N >= 0")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def now(device: torch.device) -> float:
    """Wall-clock time after the device has finished queued work (for the time split)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---------------------------------------------------------------- loading
def _load(loader, path: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(resolve(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load {what} '{path}' ({first_line}); pass a local directory or a Hugging Face Hub name")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, path, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # e.g. Pythia/GPT-J tokenizers: pad with EOS, masks keep it out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: torch.dtype, trust_remote_code: bool = False, keep_generation_config=False):
    """The model in eval mode (dropout off everywhere). Its generation_config.json keeps only its token ids unless
    `keep_generation_config`: generate() fills every setting our GenerationConfig leaves unset from it
    (repetition_penalty, no_repeat_ngram_size, min_new_tokens, suppress_tokens, bad_words_ids, ...), and then the
    sampled distribution is no longer softmax(logits / T), the one whose log-probs the losses use."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = _load(AutoModelForCausalLM, path, "--model", dtype=dtype, trust_remote_code=trust_remote_code)
    if not keep_generation_config:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        model.checkpoint_generation_config = model.generation_config  # saved back with the final policy
        model.generation_config = GenerationConfig(**{k: getattr(model.generation_config, k, None) for k in ids})
    return model.eval()


def add_lora(model, r: int, task_type: str):
    """Freeze the base, add a LoRA adapter to every linear layer (plus the score head for SEQ_CLS)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type=task_type)
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:  # trained weights in float32 even when the frozen base is bf16
            p.data = p.data.float()
    return model


class ValueModel(nn.Module):
    """Scalar head reading EVERY position's last hidden state of a `*ForSequenceClassification`
    model (num_labels=1): values[:, t] is the value of the state before token t+1. The value network
    (and PPO-max's critic, which starts from the reward model's weights)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,  # no KV cache outside generation (a cache would also break activation checkpointing)
        ).last_hidden_state
        head = self.model.score if hasattr(self.model, "score") else self.model.classifier
        return head(hidden).float().sum(-1)  # (B, T): a sum over the one output, so a new tensor (FSDP2 warns on views)


def load_value_model(path: str, dtype: torch.dtype, what: str, trust_remote_code: bool = False) -> ValueModel:
    """A separate network: `path`'s backbone plus a scalar head (new unless `path` is a reward model)."""
    from transformers import AutoModelForSequenceClassification

    model = _load(
        AutoModelForSequenceClassification, path, what, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return ValueModel(model.eval())


def is_scoring_function(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec)) and not os.path.exists(spec)


def load_scorer(
    spec: str, device, dtype, batch_size: int, flag: str, trust_remote_code: bool = False, fsdp: bool = False,
    append_eos: bool = True, truncate: bool = True,
):  # fmt: skip
    """Sequence-level scorer (prompts, responses, ended_with_eos=None) -> (N,) float tensor on `device`: either a
    Python function `module:function` (given prompts and responses), or a reward model scoring the decoded text
    re-tokenized with its own tokenizer, through its own forward (`.logits[:, 0]`: decoder, BERT-style pooler or
    RoBERTa head alike). The reward model sees what it was trained on: a response that ended with EOS gets the
    reward tokenizer's EOS appended (as TRL's RewardTrainer tokenizes; `append_eos`), and an input longer than the
    model's maximum length is truncated from the left, after any leading BOS/CLS (`truncate`, counted in
    `score.num_truncated`). A conversational prompt (a list of messages) is rendered with the reward tokenizer's
    chat template, the response as the assistant's turn, or as HH text when it has none."""
    if is_scoring_function(spec):
        module, name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            fail(f"cannot import scoring function {flag} '{spec}' ({e}); expected module:function")
        return functools.partial(_call_scoring_function, fn, f"{flag} '{spec}'", device)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = _load(AutoConfig, spec, flag, trust_remote_code=trust_remote_code)
    if getattr(config, "num_labels", 1) != 1:
        fail(f"{flag} '{spec}' has {config.num_labels} labels; a reward model must output one scalar (num_labels=1)")
    tokenizer = load_tokenizer(spec, trust_remote_code)
    model = _load(AutoModelForSequenceClassification, spec, flag, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id  # a decoder reads the last token that is not this padding
    model = model.eval().requires_grad_(False)
    model = shard_model(model, dtype) if fsdp else model.to(device)  # --fsdp: sharded, gathered once per call
    positions = getattr(config, "max_position_embeddings", None) or 2**31
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 2**31 else positions
    eos, leading = tokenizer.eos_token_id, {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}

    def encode(prompt, response: str, ended: bool) -> list[int]:
        if not is_conversation(prompt):
            ids = tokenizer(prompt + response)["input_ids"]
        elif tokenizer.chat_template:  # the conversation as the reward model was trained on it, special tokens once
            turns = prompt + [{"role": "assistant", "content": response}]
            text = render_chat(tokenizer, turns, flag)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(render_plain(prompt) + response)["input_ids"]
        if append_eos and ended and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if len(ids) > max_length:
            if not truncate:
                fail(f"a {flag} input has {len(ids)} tokens, more than its {max_length}; drop --no-reward-truncate")
            head = 1 if ids[0] in leading else 0  # keep BOS/CLS, cut the start of the dialogue
            ids = ids[:head] + ids[len(ids) - max_length + head :]
            score.num_truncated += 1
        return ids

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str], ended_with_eos: torch.Tensor | None = None) -> torch.Tensor:
        ended = ended_with_eos.tolist() if ended_with_eos is not None else [False] * len(prompts)
        encoded = [encode(p, r, e) for p, r, e in zip(prompts, responses, ended)]
        scores = []
        with gathered(model):
            for i in range(0, len(encoded), batch_size):
                chunk = encoded[i : i + batch_size]
                width = max(len(ids) for ids in chunk)  # right padding: every model type reads positions from 0
                input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in chunk])
                mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk])
                with autocast(device, dtype):
                    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                scores.append(logits[:, 0].float())
        return torch.cat(scores)

    score.num_truncated = 0
    return score


def load_scorers(args, device, dtype):
    """(--reward-model's scorer, --eval-reward's or None), both with the scripts' scoring flags."""
    options = dict(
        trust_remote_code=args.trust_remote_code,
        fsdp=args.fsdp,
        append_eos=args.reward_append_eos,
        truncate=args.reward_truncate,
    )
    chunk = args.rollout_forward_batch_size
    score_fn = load_scorer(args.reward_model, device, dtype, chunk, "--reward-model", **options)
    eval_score_fn = (
        load_scorer(args.eval_reward, device, dtype, chunk, "--eval-reward", **options) if args.eval_reward else None
    )
    return score_fn, eval_score_fn


def _call_scoring_function(fn, name: str, device, prompts: list[str], responses: list[str], ended_with_eos=None):
    """A `module:function` scorer's floats as a tensor; anything else it does becomes one line naming it."""
    try:
        scores = fn(prompts, responses)
    except Exception as e:  # noqa: BLE001 -- the user's function: whatever it raises becomes one line
        fail(f"scoring function {name} raised {type(e).__name__}: {e}; fix the function")
    try:
        tensor = torch.as_tensor(scores, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        tensor = None
    if tensor is None or tensor.shape != (len(prompts),):
        got = f"a {type(scores).__name__}" if tensor is None else f"shape {tuple(tensor.shape)}"
        fail(
            f"scoring function {name} returned {got}; it must return a list of {len(prompts)} floats, one per response"
        )
    return tensor.to(device)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ---------------------------------------------------------------- scale: sharding, micro-batches, checkpointing
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
        fail(f"cannot find the decoder layers of {type(hf_model(model)).__name__}; drop the scale flags for it")
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

    # every group, the root too, frees its gathered weights after forward (gathered() restores this setting)
    kwargs = {"reshard_after_forward": True}
    if dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    # the root is the module whose forward every call enters: a peft model's generate() enters the HF model
    fully_shard(model if isinstance(model, ValueModel) else hf_model(model), **kwargs)
    return model


def fsdp_modules(model) -> list[nn.Module]:
    """The FSDP2 shard groups inside `model` (none when FSDP was never imported: it costs a second at startup)."""
    if "torch.distributed.fsdp" not in sys.modules or not isinstance(model, nn.Module):
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def prepare_model(model: nn.Module, args, dtype: torch.dtype, device, world_size: int, train: bool) -> nn.Module:
    """For a trained model --num-layers-unfrozen and --activation-checkpointing; then --fsdp shards it (frozen ones
    too), moving one layer at a time to the device, or it is moved whole and, with several ranks, DDP wraps a
    trained one."""
    if train:
        freeze_bottom_layers(model, args.num_layers_unfrozen)
        if args.activation_checkpointing:
            checkpoint_layers(model)
    else:
        model.requires_grad_(False)
    if args.fsdp:
        return shard_model(model, dtype)
    model = model.to(device)
    if train and world_size > 1:
        return DDP(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


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


def micro_batches(minibatch: torch.Tensor, micro_batch_size: int):
    """(rows, sync) per micro-batch of a minibatch's rows: gradients are synchronised on the last one only."""
    size = micro_batch_size or len(minibatch)
    for start in range(0, len(minibatch), size):
        yield minibatch[start : start + size], start + size >= len(minibatch)


@contextlib.contextmanager
def gradient_sync(models: list[nn.Module], sync: bool):
    """Accumulate gradients locally (no all-reduce) unless `sync`: DDP's no_sync, FSDP2's requires_gradient_sync."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if isinstance(model, DDP) and not sync:
                stack.enter_context(model.no_sync())
            for module in fsdp_modules(model):
                module.set_requires_gradient_sync(sync, recurse=False)
        yield


# ---------------------------------------------------------------- data
def load_rows(name: str, split: str, response_column: str = "chosen") -> tuple[list, list[str] | None]:
    """(prompts, responses of `response_column` or None) from a hub dataset, a local data dir, a jsonl/json/parquet
    file or a `save_to_disk` dir. Plain text: Dahoas/rm-static (`prompt`, `chosen`), Anthropic/hh-rlhf (full
    `chosen` dialogues) or plain `prompt`. Conversational (TRL's formats): a prompt is a list of
    {"role", "content"} messages: `prompt` as messages, `messages` (the prompt is everything before the last
    assistant turn, whose content is the response) or `chosen` given as messages (explicit `prompt` column, or the
    whole conversation like `messages`); a response is then the assistant turn's content."""
    import datasets

    path = resolve(name)
    try:
        if os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
        ):
            ds = datasets.load_from_disk(path)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        elif os.path.isfile(path):
            builder = "parquet" if path.endswith(".parquet") else "json"
            ds = datasets.load_dataset(builder, data_files={split: path}, split=split)
        else:
            ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001 -- any loader failure becomes one line naming the dataset
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load split '{split}' of --dataset '{name}' ({reason}); check its name/path and split")
    if len(ds) == 0:
        fail(f"split '{split}' of --dataset '{name}' is empty; pass a dataset with rows")
    where = f"split '{split}' of --dataset '{name}'"
    columns = ds.column_names
    if "prompt" not in columns and ("messages" in columns or response_column in columns):
        column = "messages" if "messages" in columns else response_column
        prompts, responses = zip(*(_split_dialogue(d, f"row {i} of {where}") for i, d in enumerate(ds[column])))
        prompts, responses = list(prompts), None if all(r is None for r in responses) else list(responses)
    elif "prompt" in columns:
        prompts = list(ds["prompt"])
        responses = list(ds[response_column]) if response_column in columns else None
        if responses is not None:  # conversational `chosen`: the content of its (last) assistant message
            responses = [_last_assistant(r) if isinstance(r, list) else r for r in responses]
    else:
        fail(
            f"--dataset '{name}' has columns {columns}; expected 'prompt' (Dahoas/rm-static, plain or "
            "conversational prompts), 'messages' (conversations) or 'chosen' dialogues (Anthropic/hh-rlhf)"
        )
    conversational = is_conversation(prompts[0])
    for i, prompt in enumerate(prompts):
        if conversational and not is_conversation(prompt):
            fail(f"row {i} of {where} has a prompt that is not a list of {{'role', 'content'}} messages like row 0")
        if not conversational and (not isinstance(prompt, str) or not prompt.strip()):
            what = "an empty string" if isinstance(prompt, str) else f"a {type(prompt).__name__}, not a string"
            fail(f"row {i} of {where} has a prompt that is {what}; fix or drop that row")
    return prompts, responses


def is_conversation(x) -> bool:
    """A non-empty list of {"role": str, "content": str} messages (TRL's conversational format)."""
    return (
        isinstance(x, list)
        and len(x) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)
    )


def _last_assistant(messages: list):
    contents = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    return contents[-1] if contents else None


def _split_dialogue(dialogue, where: str):
    """(prompt, response) of one dialogue: hh-rlhf text splits at its last "\n\nAssistant:"; a message list at its
    last assistant turn (the response is that turn's content)."""
    if isinstance(dialogue, str):
        marker = "\n\nAssistant:"
        prompt = dialogue[: dialogue.rfind(marker) + len(marker)]
        return prompt, dialogue[len(prompt) :]
    if not is_conversation(dialogue):  # reported by the prompt check of load_rows
        return dialogue, None
    turns = [i for i, m in enumerate(dialogue) if m["role"] == "assistant"]
    if not turns:
        return dialogue, None
    if turns[-1] == 0:
        fail(f"{where} starts with its only assistant turn, so it has no prompt; put the user turn before it")
    return dialogue[: turns[-1]], dialogue[turns[-1]]["content"]


def render_plain(messages: list[dict]) -> str:
    """A conversation as Anthropic HH text (for a tokenizer without a chat template, e.g. a plain-text reward model):
    "\n\nHuman: ...\n\nAssistant: ..." ending with "\n\nAssistant:", the point where a response continues it."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = "".join(f"\n\n{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int) -> list[list[int]]:
    """Token ids per prompt, left-truncated so the end of the dialogue (the last turn) is kept, after a leading BOS.
    A conversation is rendered once with the tokenizer's chat template and the generation prompt, and tokenized
    without adding special tokens again (the template writes any BOS itself)."""
    if prompts and is_conversation(prompts[0]):
        check_chat_template(tokenizer, "--model")
        texts = [render_chat(tokenizer, p, "--model", add_generation_prompt=True) for p in prompts]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        encoded = tokenizer(prompts)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    truncated = []
    for ids in encoded:
        if len(ids) > max_prompt_length:
            keep_bos = bos is not None and ids[0] == bos and max_prompt_length > 1
            ids = ids[:1] + ids[1 - max_prompt_length :] if keep_bos else ids[-max_prompt_length:]
        truncated.append(ids)
    return truncated


def render_chat(tokenizer, messages: list[dict], flag: str, add_generation_prompt: bool = False) -> str:
    """The conversation as text by the tokenizer's chat template; a template that rejects it (roles out of order, a
    system turn it does not support, ...) stops the run with its own message."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # noqa: BLE001 -- jinja's TemplateError or the template's raise_exception: one line
        roles = [m["role"] for m in messages]
        fail(f"the {flag} chat template rejects a conversation with roles {roles} ({e}); fix the data or the template")


def check_chat_template(tokenizer, flag: str):
    if not getattr(tokenizer, "chat_template", None):
        fail(
            f"the dataset is conversational but the {flag} tokenizer has no chat template; use a chat model's "
            "tokenizer (or set its chat_template), or a dataset with plain-text prompts"
        )


def tokenize_responses(tokenizer, prompts: list, responses: list[str], stop_ids: list[int]) -> list[list[int]]:
    """Token ids of each dataset response as the policy would generate it after its tokenized prompt, ending with
    a stop token. Plain text: the response's own tokens (no special tokens: a LLaMA tokenizer would put a BOS
    between prompt and response) + EOS. Conversational: what the chat template writes after the generation prompt
    for the assistant turn, up to and including its first stop token (the end-of-turn token)."""
    if not (prompts and is_conversation(prompts[0])):
        return [ids + [tokenizer.eos_token_id] for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]
    out = []
    for prompt, response in zip(prompts, responses):
        head = render_chat(tokenizer, prompt, "--model", add_generation_prompt=True)
        full = render_chat(tokenizer, prompt + [{"role": "assistant", "content": response}], "--model")
        if not full.startswith(head):
            fail("the --model chat template renders an assistant turn that does not continue its generation prompt")
        ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
        stops = [i for i, t in enumerate(ids) if t in stop_ids]
        out.append(ids[: stops[0] + 1] if stops else ids + [tokenizer.eos_token_id])
    return out


def stop_token_ids(path: str, tokenizer) -> list[int]:
    """Generation stops at EOS and at every id the checkpoint's generation_config.json lists as eos_token_id (a chat
    model's end-of-turn token, such as <|im_end|> or <|eot_id|>)."""
    from transformers import GenerationConfig

    try:
        listed = GenerationConfig.from_pretrained(resolve(path)).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: EOS only
        listed = None
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([tokenizer.eos_token_id, *listed]))


def scoring_prompts(tokenizer, queries: torch.Tensor, rows: list) -> list:
    """The prompts scorers get: a conversational dataset's messages, else the prompt text the policy saw (decoded,
    so left-truncated like the policy's input)."""
    if rows and is_conversation(rows[0]):
        return list(rows)
    return tokenizer.batch_decode(queries, skip_special_tokens=True)


def prompt_indices(n: int, batch_size: int, iteration: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's disjoint share of the global batch for `iteration`, from a stream of seeded
    epoch permutations (stateless, so a resumed run sees the same prompts)."""
    indices, start = [], iteration * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        indices += perm[offset : offset + batch_size - len(indices)].tolist()
    return indices[rank::world_size]


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def pad_pairs(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
    """Given (prompt, response) token ids, the rollout layout: left-padded prompts then right-padded
    responses. Returns input_ids, attention_mask, context_length, responses (B, R), response_mask (B, R)."""
    queries, query_mask = left_pad(prompts, pad_id, device)
    width = max(len(r) for r in responses)
    padded = torch.tensor([r + [pad_id] * (width - len(r)) for r in responses], device=device)
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses], device=device)
    input_ids, attention_mask = torch.cat([queries, padded], 1), torch.cat([query_mask, response_mask], 1)
    return input_ids, attention_mask, queries.shape[1], padded, response_mask.bool()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded and unpadded rows get the same positions, so padding never changes a log-prob."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(model, queries, query_mask, generation_config, chunk_size: int):
    """Sample responses with the KV cache in chunks of `chunk_size` prompts. Returns responses
    (B, R) and response_mask (B, R): 1 on real tokens up to and including the first stop token."""
    context_length = queries.shape[1]
    with gathered(model):  # under --fsdp: one all-gather for the whole generation, none per decode step
        chunks = [
            model.generate(
                input_ids=queries[i : i + chunk_size],
                attention_mask=query_mask[i : i + chunk_size],
                generation_config=generation_config,
            )[:, context_length:]
            for i in range(0, len(queries), chunk_size)
        ]
    width = max(c.shape[1] for c in chunks)
    responses = torch.cat([F.pad(c, (0, width - c.shape[1]), value=generation_config.pad_token_id) for c in chunks])
    is_eos = torch.isin(responses, torch.tensor(generation_config.eos_token_id, device=responses.device))
    after_first_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return responses, ~after_first_eos


# ---------------------------------------------------------------- log-probs and masked statistics
def response_logits(model, input_ids, attention_mask, context_length: int, temperature: float) -> torch.Tensor:
    """Logits / T at the positions that predict the response tokens input_ids[:, context_length:].
    Logits at position t predict token t+1: this is the one place the shift happens."""
    response_length = input_ids.shape[1] - context_length
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_length + 1,
        use_cache=False,
    ).logits
    # from the end: right whether or not the model honoured logits_to_keep (a model may return every position)
    return logits[:, -(response_length + 1) : -1].float() / temperature  # (B, R, V)


@contextlib.contextmanager
def reference_model(policy, ref_policy):
    """The frozen pi_ref: its own copy, or (under LoRA, where `ref_policy` is None) the policy with its adapter off."""
    if ref_policy is not None:
        yield ref_policy
    else:
        with policy.disable_adapter():
            yield policy


@torch.no_grad()
def chunked_logprobs(model, input_ids, attention_mask, responses, temperature: float, chunk_size: int, dtype):
    """log pi(response tokens) (B, R) of `responses` = input_ids[:, -R:]: no grad, `chunk_size` rows at a time, the
    weights gathered once for the whole pass under --fsdp."""
    context_length = input_ids.shape[1] - responses.shape[1]
    logprobs = []
    with gathered(model), autocast(input_ids.device, dtype):
        for i in range(0, len(input_ids), chunk_size):
            rows = slice(i, i + chunk_size)
            logits = response_logits(model, input_ids[rows], attention_mask[rows], context_length, temperature)
            logprobs.append(gather_logprobs(logits, responses[rows]))
    return torch.cat(logprobs)


@torch.no_grad()
def chunked_values(value_model, input_ids, attention_mask, response_length: int, chunk_size: int, dtype):
    """V(s_t) (B, R) for each of the last R tokens, read at the token before it: no grad, in chunks, gathered once."""
    values = []
    with gathered(value_model), autocast(input_ids.device, dtype):
        for i in range(0, len(input_ids), chunk_size):
            rows = slice(i, i + chunk_size)
            values.append(value_model(input_ids[rows], attention_mask[rows])[:, -response_length - 1 : -1])
    return torch.cat(values)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), values, 0.0).sum()  # where, not *, so NaN/inf in padding stay out


def masked_mean(values: torch.Tensor, mask: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
    """sum(m*v)/sum(m); with global_batch=True over every rank's tokens."""
    total = torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)])
    total = all_reduce_sum(total) if global_batch else total
    return total[0] / total[1].clamp(min=1)


def masked_whiten(values, mask):
    """Whiten over real tokens only, with statistics over the whole rollout batch on all ranks (per-rank statistics
    would scale each rank's advantages differently)."""
    mean = masked_mean(values, mask, global_batch=True)
    var = masked_mean((values - mean) ** 2, mask, global_batch=True)
    return torch.where(mask.bool(), (values - mean) * torch.rsqrt(var + 1e-8), 0.0)


class RunningMoments:
    """Running mean/std of a scalar stream (Chan et al. parallel update), reduced across ranks."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0  # the first batch sets mean and var exactly

    def update(self, x: torch.Tensor):
        # float64 sums of x shifted by the running mean: scores around 1e6 keep their variance (float32 sums do not)
        shifted = x.double() - self.mean
        stats = all_reduce_sum(torch.stack([shifted.sum(), (shifted**2).sum(), shifted.new_tensor(x.numel())]))
        n = stats[2].item()
        batch_mean = self.mean + stats[0].item() / n
        batch_var = max(stats[1].item() / n - (stats[0].item() / n) ** 2, 0.0)
        delta, total = batch_mean - self.mean, self.count + n
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all responses (word level)."""
    ngrams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(ngrams)) / max(len(ngrams), 1)


# ---------------------------------------------------------------- output directory, logging, checkpoints
def check_output_dir(output_dir: str, resume: bool):
    checkpoint = os.path.join(output_dir, "checkpoint.pt")
    if resume and not os.path.exists(checkpoint):
        fail(f"--resume: no checkpoint at {checkpoint}; pass the --output-dir of the run to continue")
    if not resume and os.path.isdir(output_dir) and os.listdir(output_dir):
        fail(f"--output-dir {output_dir} already holds a run; pass --resume to continue it or choose a new directory")


class Logger:
    """metrics.jsonl + TensorBoard (+ wandb with --track) + one printed progress line per row, all on rank 0."""

    def __init__(self, output_dir: str, args, rank: int, total: int, start: int):
        self.rank, self.total = rank, total
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(self.path):  # on resume, drop rows logged after the checkpoint: they are redone
            rows = [line for line in open(self.path) if json.loads(line)["iteration"] <= start]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(rows)
            os.replace(self.path + ".tmp", self.path)
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.wandb = None
        if args.track:
            try:
                import wandb
            except ImportError:
                fail("--track needs wandb: pip install wandb")
            self.wandb = wandb.init(project=args.wandb_project, config=vars(args), name=os.path.basename(output_dir))

    def log(self, row: dict):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if "/" in key and (not key.startswith("eval/") or row.get("eval/iteration") == row["iteration"]):
                self.writer.add_scalar(key, value, row["episodes"])
        if self.wandb:
            self.wandb.log(row, step=row["episodes"])
        keys = ("train/reward", "train/kl", "eval/gold_reward", "time/samples_per_s")
        progress = [f"{key} {row[key]:.3f}" for key in keys if key in row]
        print(f"iteration {row['iteration']}/{self.total}", *progress, sep="  ", flush=True)

    def close(self):
        if self.rank == 0:
            self.writer.close()
            if self.wandb:
                self.wandb.finish()


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
        fail(
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


def save_checkpoint(output_dir: str, state: dict):
    """Atomic: a killed save leaves the previous checkpoint intact. Rank 0 writes; every rank calls it."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = os.path.join(output_dir, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(output_dir: str) -> dict:
    return torch.load(os.path.join(output_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)


def save_final_policy(policy, tokenizer, output_dir: str, args):
    """`save_pretrained` of the policy (+ tokenizer) by rank 0; with LoRA the adapter and the merged model. Under
    --fsdp the full weights are gathered on rank 0 into a fresh CPU copy of --model first. Every rank calls it."""
    policy = unwrap(policy)
    if is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(policy, options=_full_state_options())
        if dist.get_rank() != 0:
            return
        policy = load_causal_lm(args.model, torch.float32, args.trust_remote_code)
        if args.use_lora:
            policy = add_lora(policy, args.lora_r, "CAUSAL_LM")
        policy.load_state_dict(state)
    elif dist.is_initialized() and dist.get_rank() != 0:
        return
    model = hf_model(policy)
    model.generation_config = getattr(model, "checkpoint_generation_config", model.generation_config)
    if args.use_lora:
        policy.save_pretrained(os.path.join(output_dir, "adapter"))
        tokenizer.save_pretrained(os.path.join(output_dir, "adapter"))
        policy = policy.merge_and_unload()
    final, tmp = os.path.join(output_dir, "policy"), os.path.join(output_dir, "policy.tmp")
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, final)
    print(f"saved the final policy to {final}")
