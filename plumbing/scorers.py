"""Plumbing (a reader of the algorithms can skip it): scorers. Reward models and `module:function` scoring
functions, each a sequence-level scorer (prompts, responses, ended, columns) -> one float per response."""

import dataclasses
import importlib
import inspect
import os
import re

import torch
from torch import nn

from plumbing import data, models, padding, run, tensors


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
    """A sequence-level scorer, (prompts, responses, ended=None, columns=None) -> (N,) float tensor on `device`: a
    Python function `module:function` (ScoringFunction) or a reward model (RewardModel). `flag` names it in errors."""
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


def import_scoring_function(spec: str, flag: str):
    """The function of a `module:function` spec; one line if it does not import or takes no (prompts, responses)."""
    module, name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        parameters = list(inspect.signature(fn).parameters.values())
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        run.fail(f"cannot import scoring function {flag} '{spec}' ({e}); expected module:function")
    kind = inspect.Parameter
    positional = [p.kind for p in parameters if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == kind.VAR_POSITIONAL for p in parameters):
        run.fail(f"scoring function {flag} '{spec}' takes {[p.name for p in parameters]}; it must take (prompts, "
                 "responses), then any dataset columns it reads by name")  # fmt: skip
    return fn


@dataclasses.dataclass
class Columns:
    """The dataset columns a scoring function reads: the parameters it names after (prompts, responses), those
    without a default `required`; `every` column if it takes **columns."""

    required: set
    optional: set
    every: bool

    @classmethod
    def of(cls, fn) -> "Columns":
        parameters, kind = list(inspect.signature(fn).parameters.values()), inspect.Parameter
        first_two = [p for p in parameters if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)][:2]
        named = [p for p in parameters if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)]
        named = [p for p in named if p not in first_two]  # after (prompts, responses)
        return cls({p.name for p in named if p.default is p.empty}, {p.name for p in named if p.default is not p.empty},
                   any(p.kind == kind.VAR_KEYWORD for p in parameters))  # fmt: skip


def dataset_columns(args, split: str, evaluation: bool = True) -> list[dict]:
    """Each row's values of the dataset columns the module:function scorers read (--reward-model's, and on an
    `evaluation` split --eval-reward's), in the dataset's row order ({} for each row when they read none, or are
    reward models): one line for a column the split lacks. Read before any model is loaded."""
    flags = (("--reward-model", args.reward_model), ("--eval-reward", args.eval_reward))[: 2 if evaluation else 1]
    needs = [(flag, spec, Columns.of(import_scoring_function(spec, flag)))
             for flag, spec in flags if spec and is_scoring_function(spec)]  # fmt: skip
    ds = data.load_dataset_split(args.dataset, split)
    present = [c for c in ds.column_names if c != "prompt"]
    for flag, spec, columns in needs:
        for name in sorted(columns.required - set(present)):
            run.fail(f"scoring function {flag} '{spec}' reads the column '{name}', which split '{split}' of "
                     f"--dataset '{args.dataset}' lacks (it has {ds.column_names}); add the column or give '{name}' a "
                     "default")  # fmt: skip
    read = [c for c in present if any(n.every or c in n.required | n.optional for *_, n in needs)]
    values = [ds[c] for c in read]
    return [dict(zip(read, row)) for row in zip(*values)] if read else [{} for _ in range(len(ds))]


class ScoringFunction:
    """A user's `module:function` scorer, `fn(prompts, responses, **columns)` -> one float per response: a prompt is
    the dataset's text (decoded as the policy saw it: left-truncated) or its list of {"role", "content"} messages
    (a conversational dataset), a response is the generated text; the dataset columns it names as parameters (or
    every column, if it takes **columns) are passed by name as lists, one value per row, as TRL's reward functions
    take them. Whatever else it does (an exception, another type or length) stops the run with one line naming it.
    `is_checker`: every score so far was 0 or 1 (a verifier: the evaluation then reports accuracy)."""

    def __init__(self, spec: str, flag: str, device):
        self.fn = import_scoring_function(spec, flag)
        self.columns = Columns.of(self.fn)
        self.name, self.device, self.is_checker = f"{flag} '{spec}'", device, True

    def __call__(self, prompts: list, responses: list[str], ended=None, columns: list[dict] | None = None):
        names = [c for c in (columns[0] if columns else {}) if self.columns.every or c in self.columns.required
                 | self.columns.optional]  # fmt: skip
        try:
            scores = self.fn(prompts, responses, **{c: [row[c] for row in columns] for c in names})
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
        self.is_checker = self.is_checker and bool(((tensor == 0) | (tensor == 1)).all())
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

        config = models.load_pretrained(AutoConfig, spec, flag, trust_remote_code=options.trust_remote_code)
        if getattr(config, "num_labels", 1) != 1:
            run.fail(
                f"{flag} '{spec}' has {config.num_labels} labels; a reward model must output one scalar (num_labels=1)"
            )
        tokenizer = models.load_tokenizer(spec, options.trust_remote_code)
        rank_0_loads = models.rank_0_loads(options.fsdp)
        model = models.load_model(
            AutoModelForSequenceClassification, spec, flag, dtype, options.trust_remote_code, rank_0_loads
        )
        name = "score" if isinstance(getattr(model, "score", None), nn.Module) else "classifier"
        setattr(model, name, models.Float32Head(getattr(model, name)))
        model = model.eval().requires_grad_(False)
        self.model = (
            models.shard_model(model, dtype, rank_0_loads) if options.fsdp else model.to(device)
        )  # --fsdp: gathered per call
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
    def __call__(self, prompts: list, responses: list[str], ended=None, columns=None) -> torch.Tensor:
        """One score per (prompt, response); `ended` as in append_eos (None: not known); `columns` unread."""
        ended = ended.tolist() if ended is not None else [None] * len(prompts)  # (None: not known)
        encoded = [self.encode(p, r, e) for p, r, e in zip(prompts, responses, ended)]
        lengths, width, batch_size = (
            [len(ids) for ids in encoded],
            max(len(ids) for ids in encoded),
            self.options.batch_size,
        )
        groups = padding.length_groups(lengths, [0] * len(encoded), batch_size, batch_size * width)
        chunk_scores = []
        with models.gathered(self.model):  # chunks of similar length (padding.length_groups): little padding
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
                mask = padding.to_device(mask, self.device)  # (prepared below: transformers reads none of it)
                inputs = dict(input_ids=padding.to_device(input_ids, self.device),
                              attention_mask=tensors.attention_mask_for(self.model, mask))  # fmt: skip
                with tensors.autocast(self.device, self.dtype):
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
