"""Plumbing (a reader of the algorithms can skip it): models. Loading checkpoints (policy, reference, value network),
LoRA, FSDP2 shards and the KV cache, the scale options (FSDP2 / DDP, layer freezing, activation checkpointing) and
the models' roles (trained, frozen, the reference). Reward models and scoring functions are in scorers.py,
checkpoints and the final policy in checkpoints.py."""

import contextlib
import functools
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import run, tensors


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
def load_pretrained(loader, path: str, flag: str, **kwargs):
    try:
        return loader.from_pretrained(run.repo_path(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        run.fail(f"cannot load {flag} '{path}' ({first_line}); pass a local directory or a Hugging Face Hub name")


def rank_0_loads(fsdp: bool) -> bool:
    """Whether only rank 0 reads checkpoints: under --fsdp with several processes each checkpoint is read into host
    memory once per job, not once per rank (8 x 4 bytes x 6.9B = 220 GB per node otherwise); the other ranks build
    the model empty, on the meta device, and shard_model(..., rank_0_loads=True) fills their shards from rank 0's
    weights. A model loaded so must be sharded so."""
    return fsdp and dist.is_initialized()


def load_model(loader, path: str, flag: str, dtype, trust_remote_code: bool, rank_0_loads: bool, **config_overrides):
    """`loader.from_pretrained`, or on a rank other than 0 when `rank_0_loads` the same model empty (meta)."""
    if not rank_0_loads or dist.get_rank() == 0:
        return load_pretrained(loader, path, flag, dtype=dtype, trust_remote_code=trust_remote_code, **config_overrides)
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, path, flag, trust_remote_code=trust_remote_code, **config_overrides)
    with torch.device("meta"):
        return loader.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str = ""):
    """The checkpoint's tokenizer; `chat_template`: a .jinja file replacing its chat template (or giving it one)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, path, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # e.g. Pythia/GPT-J tokenizers: pad with EOS, masks keep it out
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        if not os.path.isfile(run.repo_path(chat_template)):
            run.fail(f"--chat-template {chat_template} is not a file; pass a .jinja file")
        tokenizer.chat_template = open(run.repo_path(chat_template)).read()
    return tokenizer


def load_causal_lm(
    path: str, dtype: torch.dtype, trust_remote_code=False, keep_generation_config=False, rank_0_loads=False
):
    """The model in eval mode (dropout off everywhere). Its generation_config.json keeps only its token ids unless
    `keep_generation_config`: generate() fills every setting our GenerationConfig leaves unset from it
    (repetition_penalty, no_repeat_ngram_size, min_new_tokens, suppress_tokens, bad_words_ids, ...), and then the
    sampled distribution is no longer softmax(logits / T), the one whose log-probs the losses use."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = load_model(AutoModelForCausalLM, path, "--model", dtype, trust_remote_code, rank_0_loads)
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
            attention_mask=tensors.attention_mask_for(backbone, attention_mask),  # (prepared: no host read of it)
            position_ids=tensors.position_ids(attention_mask),
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


def load_value_model(
    path: str, dtype: torch.dtype, flag: str, trust_remote_code=False, rank_0_loads=False
) -> ValueModel:
    """A separate network: `path`'s backbone plus a scalar head (new unless `path` is a reward model)."""
    from transformers import AutoModelForSequenceClassification

    model = load_model(
        AutoModelForSequenceClassification, path, flag, dtype, trust_remote_code, rank_0_loads, num_labels=1
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return ValueModel(model.eval())


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


def shard_model(model: nn.Module, dtype: torch.dtype, rank_0_loads: bool = False):
    """FSDP2: each decoder layer is one shard group, the rest (embeddings, norm, heads) the root's. Weights stay in
    their own dtype at rest (float32 for trained ones); with a 16-bit --dtype they are all-gathered and computed in
    it, and gradients are reduced in float32. `rank_0_loads`: the model was loaded by rank 0 only (rank_0_loads()), the
    other ranks' shards are filled from its weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = model.state_dict() if rank_0_loads and dist.get_rank() == 0 else {}  # (the loaded tensors themselves)
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
    if rank_0_loads:  # the other ranks' empty shards (and buffers) filled from rank 0's weights
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


def prepare_model(
    model: nn.Module, args, device, dtype: torch.dtype, train: bool, num_layers_unfrozen: int | None = None
) -> nn.Module:
    """For a trained model --num-layers-unfrozen (or `num_layers_unfrozen`) and --activation-checkpointing; then
    --fsdp shards it (frozen ones too), moving one layer at a time to the device, or it is moved whole and, under
    torchrun, DDP wraps a trained one. Frozen Linear weights are stored in `dtype`, the compute dtype (--dtype)."""
    if train:
        freeze_bottom_layers(model, args.num_layers_unfrozen if num_layers_unfrozen is None else num_layers_unfrozen)
        if args.activation_checkpointing:
            checkpoint_layers(model)
    else:
        model.requires_grad_(False)
    if args.fsdp:
        return shard_model(model, dtype, rank_0_loads(args.fsdp))
    frozen_linears_to(model, dtype)
    model = model.to(device)
    if train and dist.is_initialized():  # (under torchrun, one rank too); gradients are views into the all-reduce
        return DDP(model, gradient_as_bucket_view=True)  # buckets: no second copy
    return model


def trained_weights_dtype(args, dtype: torch.dtype) -> torch.dtype:
    """Trained weights and AdamW states stay float32 (--dtype is the compute dtype, under autocast); only a LoRA
    adapter's frozen base is stored in `dtype`, --dtype (in float32 too under --fsdp: one dtype per shard group)."""
    return dtype if args.use_lora and not args.fsdp else torch.float32


def policy_and_reference(args, device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module | None]:
    """The policy to train (--model, with a LoRA adapter under --use-lora) and the frozen reference pi_ref, each
    prepared (sharded under --fsdp, DDP-wrapped with several ranks) as soon as it is loaded, so that one full copy at
    a time is in memory. Under --fsdp only rank 0 reads the checkpoints (`rank_0_loads`).
    pi_ref is a second copy holding the weights the policy computes with: float32 under autocast (the policy's
    own float32 weights are cast by autocast), --dtype under --fsdp (where the policy's shards are gathered in
    --dtype), so that KL is exactly 0 before the first update. Under LoRA there is no copy (None): pi_ref is the
    policy with its adapter switched off (`reference_model`)."""
    policy = load_causal_lm(args.model, trained_weights_dtype(args, dtype), args.trust_remote_code,
                            args.use_generation_config, rank_0_loads(args.fsdp))  # fmt: skip
    if args.use_lora:
        policy = add_lora(policy, args.lora_r, "CAUSAL_LM", args.lora_alpha, args.lora_dropout)
    policy = prepare_model(policy, args, device, dtype, train=True)
    if args.use_lora:
        return policy, None
    ref_dtype = dtype if args.fsdp else torch.float32
    ref_policy = load_causal_lm(args.model, ref_dtype, args.trust_remote_code, rank_0_loads=rank_0_loads(args.fsdp))
    return policy, prepare_model(ref_policy, args, device, dtype, train=False)


def value_network(path: str, flag: str, args, device, dtype: torch.dtype) -> nn.Module:
    """A separate value network: `path`'s backbone and a scalar head (a LoRA adapter and a trained head under
    --use-lora), prepared for training like the policy; --value-head mlp replaces the head with trlX's MLP (h -> 2h
    -> 1, the APA authors'), --value-num-layers-unfrozen freezes its bottom layers as --num-layers-unfrozen does the
    policy's (by default the same)."""
    weights_dtype = trained_weights_dtype(args, dtype)
    value_model = load_value_model(path, weights_dtype, flag, args.trust_remote_code, rank_0_loads(args.fsdp))
    if args.value_head == "mlp":
        model = hf_model(value_model)
        hidden = model.config.get_text_config().hidden_size
        mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, 1))
        setattr(model, "score" if hasattr(model, "score") else "classifier", mlp.float())
    if args.use_lora:
        value_model.model = add_lora(value_model.model, args.lora_r, "SEQ_CLS", args.lora_alpha, args.lora_dropout)
    unfrozen = args.value_num_layers_unfrozen  # (None: as many as the policy)
    return prepare_model(value_model, args, device, dtype, train=True, num_layers_unfrozen=unfrozen)


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
