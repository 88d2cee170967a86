"""Plumbing (a reader of the algorithms can skip it): datasets and prompt formats. Plain-text and conversational rows
(TRL's formats), chat templates, tokenized prompts and responses, stop tokens, and the order prompts are drawn in."""

import functools
import os

import torch

from plumbing import run


def load_rows(name: str, split: str, response_column: str = "chosen") -> tuple[list, list[str] | None]:
    """(prompts, responses of `response_column` or None) from a hub dataset, a local data dir, a jsonl/json/parquet
    file or a `save_to_disk` dir. Plain text: Dahoas/rm-static (`prompt`, `chosen`), Anthropic/hh-rlhf (full
    `chosen` dialogues) or plain `prompt`. Conversational (TRL's formats): a prompt is a list of
    {"role", "content"} messages: `prompt` as messages, `messages` (the prompt is everything before the last
    assistant turn, whose content is the response) or `chosen` given as messages (explicit `prompt` column, or the
    whole conversation like `messages`); a response is then the assistant turn's content."""
    ds = load_dataset_split(name, split)
    where = f"split '{split}' of --dataset '{name}'"
    columns = ds.column_names
    for column in (c for c in ("prompt", "messages", response_column) if c in columns):
        for i, row in enumerate(ds[column]):
            problem = conversation_problem(row)
            if problem:
                run.fail(f"row {i} of {where} ('{column}') {problem}")
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
        run.fail(
            f"--dataset '{name}' has columns {columns}; expected 'prompt' (Dahoas/rm-static, plain or "
            "conversational prompts), 'messages' (conversations) or 'chosen' dialogues (Anthropic/hh-rlhf)"
        )
    conversational = is_conversation(prompts[0])
    for i, prompt in enumerate(prompts):
        if conversational and not is_conversation(prompt):
            run.fail(f"row {i} of {where} has a prompt that is not a list of {{'role', 'content'}} messages like row 0")
        if not conversational and (not isinstance(prompt, str) or not prompt.strip()):
            what = "an empty string" if isinstance(prompt, str) else f"a {type(prompt).__name__}, not a string"
            run.fail(f"row {i} of {where} has a prompt that is {what}; fix or drop that row")
    return prompts, responses


def load_dataset_split(name: str, split: str):
    """The `datasets.Dataset` of a split (a hub dataset, a local data dir, a jsonl/json/parquet file or a
    `save_to_disk` dir): one line if it does not load or is empty. Loaded once while its files are unchanged (the
    prompts and the columns a scorer reads come from one load)."""
    path = run.repo_path(name)
    files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    return _load_dataset_split(name, split, max((os.path.getmtime(f) for f in files if os.path.exists(f)), default=0))


@functools.lru_cache(maxsize=4)
def _load_dataset_split(name: str, split: str, modified: float):
    import datasets

    path = run.repo_path(name)
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
        run.fail(f"cannot load split '{split}' of --dataset '{name}' ({reason}); check its name/path and split")
    if len(ds) == 0:
        run.fail(f"split '{split}' of --dataset '{name}' is empty; pass a dataset with rows")
    return ds


def is_conversation(x) -> bool:
    """A non-empty list of {"role": str, "content": str} messages (TRL's conversational format)."""
    return (
        isinstance(x, list)
        and len(x) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)
    )


ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know (TRL's conversational format)


def conversation_problem(x) -> str | None:
    """Why a row that is a list of messages is not one this project reads, as words that follow "row i of ...":
    ShareGPT's `from` / `value` keys, a message without role and content strings, or a role chat templates do not
    know (ShareGPT's human / gpt). None for anything else (a valid conversation, or not a list of messages)."""
    if not isinstance(x, list) or not x or not all(isinstance(m, dict) for m in x):
        return None
    expected = "expected messages of {'role', 'content'} with roles " + ", ".join(ROLES)
    for m in x:
        m = {k: v for k, v in m.items() if v is not None}  # (a dataset gives every message every row's keys)
        if "from" in m and "value" in m and "role" not in m:
            return (f"has ShareGPT messages ({{'from': {m['from']!r}, 'value': ...}}); {expected} (ShareGPT's human "
                    "and gpt are user and assistant)")  # fmt: skip
        if not (isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"has a message with keys {sorted(m)}, not 'role' and 'content' strings; {expected}"
        if m["role"] not in ROLES:
            hint = " (ShareGPT's human and gpt are user and assistant)" if m["role"] in ("human", "gpt") else ""
            return f"has a message with role {m['role']!r}; {expected}{hint}"
    return None


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
        run.fail(f"{where} starts with its only assistant turn, so it has no prompt; put the user turn before it")
    return dialogue[: turns[-1]], dialogue[turns[-1]]["content"]


def render_plain(messages: list[dict]) -> str:
    """A conversation as Anthropic HH text (for a tokenizer without a chat template, e.g. a plain-text reward model):
    "\n\nHuman: ...\n\nAssistant: ..." ending with "\n\nAssistant:", the point where a response continues it."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = "".join(f"\n\n{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


def render_chat(tokenizer, messages: list[dict], flag: str, add_generation_prompt: bool = False) -> str:
    """The conversation as text by the tokenizer's chat template; a template that rejects it (roles out of order, a
    system turn it does not support, ...) stops the run with its own message."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # noqa: BLE001 -- jinja's TemplateError or the template's raise_exception: one line
        roles = [m["role"] for m in messages]
        run.fail(
            f"the {flag} chat template rejects a conversation with roles {roles} ({e}); fix the data or the template"
        )


def check_chat_template(tokenizer, flag: str):
    if not getattr(tokenizer, "chat_template", None):
        run.fail(
            f"the dataset is conversational but the {flag} tokenizer has no chat template; use a chat model's "
            "tokenizer (or set its chat_template), or a dataset with plain-text prompts"
        )


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
    for i, ids in enumerate(encoded):
        if not ids:
            run.fail(f"prompt {i} tokenizes to no tokens with the --model tokenizer; check the tokenizer or data")
        if len(ids) > max_prompt_length:
            keep_bos = bos is not None and ids[0] == bos and max_prompt_length > 1
            ids = ids[:1] + ids[1 - max_prompt_length :] if keep_bos else ids[-max_prompt_length:]
        truncated.append(ids)
    return truncated


def tokenize_responses(tokenizer, prompts: list, responses: list[str], stop_ids: list[int]) -> list[list[int]]:
    """Token ids of each dataset response as the policy would generate it after its tokenized prompt, ending with
    a stop token: the ids that follow the prompt's in the tokenization of prompt and response together, so that
    prompt ids + response ids are the ids of the whole text (a legacy SentencePiece tokenizer, LLaMA's, would give
    " Sure" tokenized alone an extra leading "▁"). Plain text: prompt + response, + EOS. Conversational: what the
    chat template writes after the generation prompt for the assistant turn, up to and including its first stop
    token (the end-of-turn token). Where the prompt's ids are not a prefix of the whole's (a merge across the
    boundary), the response's text is tokenized on its own, without special tokens."""
    conversational = bool(prompts) and is_conversation(prompts[0])
    out = []
    for prompt, response in zip(prompts, responses):
        if conversational:
            head = render_chat(tokenizer, prompt, "--model", add_generation_prompt=True)
            full = render_chat(tokenizer, prompt + [{"role": "assistant", "content": response}], "--model")
            if not full.startswith(head):
                run.fail("the --model chat template renders an assistant turn that does not continue its generation "
                         "prompt")  # fmt: skip
            encode = dict(add_special_tokens=False)  # (the template writes any BOS itself)
        else:
            head, full, encode = prompt, prompt + response, {}
        head_ids, full_ids = (tokenizer(text, **encode)["input_ids"] for text in (head, full))
        if full_ids[: len(head_ids)] == head_ids:
            ids = full_ids[len(head_ids) :]
        else:
            ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
        stops = [i for i, t in enumerate(ids) if t in stop_ids] if conversational else []
        out.append(ids[: stops[0] + 1] if stops else ids + [tokenizer.eos_token_id])
    return out


def preference_pairs(tokenizer, name: str, split: str, columns: tuple[str, str], stop_ids: list[int],
                     max_prompt_length: int, max_new_tokens: int) -> tuple[list, list[tuple]]:  # fmt: skip
    """(rows, pairs) of a preference dataset: each pair (prompt ids, chosen ids, rejected ids), the responses as the
    policy would write them (`tokenize_responses`) cut to `max_new_tokens`; `rows` the prompts as scorers get them.
    Formats: TRL's `prompt` / `chosen` / `rejected` (plain or conversational), Anthropic/hh-rlhf's `chosen` /
    `rejected` dialogues (the prompt: everything before the last assistant turn, which both must share),
    Dahoas/rm-static's. One line for a missing column, a row whose chosen equals its rejected, and a pair that the
    length limit cuts to the same tokens (an empty prompt: `conversation_problem`, as for every script)."""
    where = f"split '{split}' of --dataset '{name}'"
    rows, chosen = load_rows(name, split, columns[0])
    other_rows, rejected = load_rows(name, split, columns[1])
    for column, texts in zip(columns, (chosen, rejected)):
        if texts is None or None in texts:
            run.fail(f"{where} has no '{column}' column (or assistant turn); pass preference pairs (prompt, chosen, "
                     "rejected) or name the columns with --chosen-column / --rejected-column")  # fmt: skip
    for i, (prompt, other, a, b) in enumerate(zip(rows, other_rows, chosen, rejected)):
        if prompt != other:
            run.fail(f"row {i} of {where}: its chosen and rejected dialogues do not share a prompt; fix the row")
        if a == b:
            run.fail(f"row {i} of {where}: its chosen response equals its rejected one; drop the row")
    prompts = tokenize_prompts(tokenizer, rows, max_prompt_length)
    pairs = []
    for i, (prompt, a, b) in enumerate(zip(prompts, *(tokenize_responses(tokenizer, rows, texts, stop_ids)
                                                       for texts in (chosen, rejected)))):  # fmt: skip
        a, b = a[:max_new_tokens], b[:max_new_tokens]
        if a == b:
            run.fail(f"row {i} of {where}: cut to --max-new-tokens {max_new_tokens}, its chosen and rejected "
                     "responses are the same tokens; raise --max-new-tokens or drop the row")  # fmt: skip
        pairs.append((prompt, a, b))
    return rows, pairs


def stop_token_ids(path: str, tokenizer) -> list[int]:
    """Generation stops at EOS and at every id the checkpoint's generation_config.json lists as eos_token_id (a chat
    model's end-of-turn token, such as <|im_end|> or <|eot_id|>)."""
    from transformers import GenerationConfig

    try:
        listed = GenerationConfig.from_pretrained(run.repo_path(path)).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: EOS only
        listed = None
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([tokenizer.eos_token_id, *listed]))


def cut_at_stop_strings(tokenizer, responses: torch.Tensor, response_mask: torch.Tensor, stop_strings: list[str]):
    """trlX's stop sequences: a response whose text holds one of `stop_strings` is cut at the first occurrence of any,
    its trailing white space stripped, and re-tokenized with the EOS appended (every later pass, the reward and the
    loss see that response); the others stay as generated. Returns (responses, response_mask), right-padded."""
    rows, eos = [], tokenizer.eos_token_id
    for ids, mask in zip(responses.tolist(), response_mask.tolist()):
        ids = [t for t, m in zip(ids, mask) if m]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
        if cuts:
            ids = tokenizer(text[: min(cuts)].rstrip(), add_special_tokens=False)["input_ids"] + [eos]
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    padded = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in rows])
    mask = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in rows])
    return padded.to(responses.device), mask.to(responses.device)


def response_texts(tokenizer, queries, responses) -> list[str]:
    """Each response's text as it continues its prompt (token ids, padded tensors or lists): decoded with the prompt,
    less the prompt's text. (A SentencePiece tokenizer, LLaMA's, drops the leading space of a text's first word:
    decoded alone, " Sure" would reach the reward model as "Assistant:Sure".)"""
    queries, responses = (x.tolist() if isinstance(x, torch.Tensor) else x for x in (queries, responses))
    prompts = tokenizer.batch_decode(queries, skip_special_tokens=True)
    full = tokenizer.batch_decode([q + r for q, r in zip(queries, responses)], skip_special_tokens=True)
    alone = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [f[len(p) :] if f.startswith(p) else a for p, f, a in zip(prompts, full, alone)]


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
