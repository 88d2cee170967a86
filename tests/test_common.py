import json

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from common import RunningMoments, gather_logprobs, generate, left_pad, masked_mean, masked_whiten, response_logits
from plumbing.data import load_rows, prompt_indices, tokenize_prompts
from plumbing.run import distinct_n


@pytest.mark.parametrize("architecture", ["gpt-neox", "gpt2"])
def test_logprob_gather_matches_slow_loop_on_unpadded_rows(tiny_lm, architecture):
    """Left-padded batch + position ids + the one shift == each row alone, token by token. (GPT-NeoX's rotary
    positions are relative, so only GPT-2's learned absolute positions show missing position ids.)"""
    if architecture == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0)  # fmt: skip
        tiny_lm = GPT2LMHeadModel(config).eval()
    torch.manual_seed(1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    responses = torch.randint(2, 64, (3, 4))
    queries, query_mask = left_pad(prompts, 0, "cpu")
    input_ids = torch.cat([queries, responses], 1)
    attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
    with torch.no_grad():
        fast = gather_logprobs(response_logits(tiny_lm, input_ids, attention_mask, queries.shape[1], 0.7), responses)
        for b, prompt in enumerate(prompts):
            row = torch.tensor([prompt + responses[b].tolist()])
            logits = tiny_lm(row).logits[0] / 0.7
            for t in range(4):
                expected = torch.log_softmax(logits[len(prompt) - 1 + t], -1)[responses[b, t]]
                assert torch.allclose(fast[b, t], expected, atol=1e-5), (b, t)


def test_generate_samples_from_the_distribution_our_logprobs_describe(tiny_lm):
    """generate() under left padding uses the same positions as our forward: its sampling scores
    (logits / T) equal our log-probs, so pi_old is the distribution that was actually sampled."""
    queries, query_mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12]], 0, "cpu")
    config = GenerationConfig(
        max_new_tokens=5,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    torch.manual_seed(0)
    out = tiny_lm.generate(input_ids=queries, attention_mask=query_mask, generation_config=config)
    responses = out.sequences[:, queries.shape[1] :]
    sampled = (
        torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    )
    input_ids = torch.cat([queries, responses], 1)
    attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
    with torch.no_grad():
        ours = gather_logprobs(response_logits(tiny_lm, input_ids, attention_mask, queries.shape[1], 0.7), responses)
    assert torch.allclose(ours, sampled, atol=1e-4)


def test_generate_response_mask_covers_up_to_first_eos():
    class Fake:
        def generate(self, input_ids, attention_mask, generation_config, **kwargs):
            table = {3: [4, 1, 0, 0], 4: [4, 5, 6, 7], 5: [1, 1]}  # chunks may come back shorter
            responses = torch.tensor([table[q] for q in input_ids[:, -1].tolist()])
            return torch.cat([input_ids, responses], 1)

    config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    queries, mask = left_pad([[3], [9, 9, 4], [5]], 0, "cpu")  # generated longest prompt first, returned in order
    responses, response_mask = generate(Fake(), queries, mask, config, chunk_size=2)
    assert responses.shape == (3, 4)
    assert response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_masked_mean_and_whiten_ignore_padding_even_when_nan():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]]).bool()
    assert masked_mean(values, mask).item() == pytest.approx(11 / 4)
    whitened = masked_whiten(values, mask)
    real = np.array([1.0, 2.0, 3.0, 5.0])
    assert torch.isfinite(whitened).all()
    assert whitened[mask].numpy() == pytest.approx((real - real.mean()) / real.std(), rel=1e-4)
    assert whitened[~mask].abs().sum() == 0


def test_running_moments_match_numpy_over_a_stream():
    rng = np.random.default_rng(0)
    stream = [rng.normal(3, 2, size=n) for n in (5, 17, 1, 64)]
    moments = RunningMoments()
    for batch in stream:
        moments.update(torch.tensor(batch, dtype=torch.float32))
    seen = np.concatenate(stream)
    assert moments.mean == pytest.approx(seen.mean(), rel=1e-4)
    assert moments.std == pytest.approx(seen.std(), rel=1e-3)


def test_prompt_indices_are_disjoint_shards_of_epoch_permutations():
    shards = [prompt_indices(10, 4, 1, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2 and not set(shards[0]) & set(shards[1])
    epoch = [i for it in range(4) for i in prompt_indices(10, 5, it, 3, 0, 1)]
    assert sorted(epoch[:10]) == list(range(10)) and sorted(epoch[10:]) == list(range(10))
    assert prompt_indices(10, 4, 1, 3, 0, 2) == shards[0]  # stateless: a resumed run sees the same prompts


def test_distinct_n_hand_computed():
    assert distinct_n(["a b a b", "a c"], 1) == pytest.approx(3 / 6)
    assert distinct_n(["a b a b", "a c"], 2) == pytest.approx(3 / 4)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_rows_reads_the_three_formats(tmp_path):
    rm_static = _write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " yo", "rejected": " no"}]
    )
    assert load_rows(rm_static, "train") == (["\n\nHuman: hi\n\nAssistant:"], [" yo"])
    dialogue = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    hh = _write_jsonl(tmp_path / "b.jsonl", [{"chosen": dialogue, "rejected": dialogue + "!"}])
    assert load_rows(hh, "train") == (["\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"], [" d"])
    plain = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}])
    assert load_rows(plain, "train") == (["p1", "p2"], None)
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"prompt": ["q"]})}).save_to_disk(str(tmp_path / "disk"))
    assert load_rows(str(tmp_path / "disk"), "test")[0] == ["q"]


def test_load_rows_errors_are_one_line(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
    with pytest.raises(SystemExit, match="expected 'prompt'"):
        load_rows(bad, "train")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="error: "):
        load_rows(str(tmp_path / "empty.jsonl"), "train")


def test_prompts_are_left_truncated():
    class Tok:
        def __call__(self, texts):
            return {"input_ids": [list(range(len(t))) for t in texts]}

    assert tokenize_prompts(Tok(), ["abcdef", "ab"], 3) == [[3, 4, 5], [0, 1]]


def test_pad_pairs_builds_the_rollout_layout():
    from common import pad_pairs

    input_ids, attention_mask, context_length, responses, response_mask, lengths = pad_pairs(
        [[5, 6], [7]], [[8], [9, 1]], 0, "cpu"
    )
    assert context_length == 2 and (lengths.prompt, lengths.response, lengths.context_length) == ([2, 1], [1, 2], 2)
    assert input_ids.tolist() == [[5, 6, 8, 0], [0, 7, 9, 1]]
    assert attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert responses.tolist() == [[8, 0], [9, 1]] and response_mask.tolist() == [[True, False], [True, True]]


def test_training_state_round_trip_restores_weights_optimizer_and_running_moments(tiny_lm):
    """What a checkpoint saves of each trained (model, optimizer) and of RunningMoments, --resume restores exactly."""
    from plumbing.checkpoints import load_training_state, training_state

    def one_step(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
        optimizer.step()
        return optimizer

    torch.manual_seed(0)
    saved_optimizer = one_step(tiny_lm)
    stats = RunningMoments()
    stats.update(torch.tensor([1.0, 5.0, 9.0]))
    checkpoint = {**training_state({"policy": (tiny_lm, saved_optimizer)}), "stats": stats.state_dict()}
    assert set(checkpoint) == {"policy", "policy_optimizer", "stats"}

    fresh = type(tiny_lm)(tiny_lm.config)  # other random weights
    fresh_optimizer = one_step(fresh)
    load_training_state(checkpoint, {"policy": (fresh, fresh_optimizer)})
    for (name, a), b in zip(tiny_lm.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(saved_optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    restored = RunningMoments()
    restored.load_state_dict(checkpoint["stats"])
    assert (restored.mean, restored.std, restored.count) == pytest.approx((5.0, np.std([1.0, 5.0, 9.0]), 3))


def test_evaluation_metrics_average_per_sequence_and_count_distinct_ngrams():
    from plumbing.run import evaluation_metrics

    kl = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    ended = torch.tensor([True, False])
    metrics = evaluation_metrics(
        lambda p, r, e, c: torch.tensor([1.0, 3.0]), None, ["p", "q"], ["a b a", "a b"], ended, kl, mask, ns=(1, 2)
    )
    assert metrics.pop("samples") == [  # what samples.jsonl gets, in prompt order
        {"index": 0, "prompt": "p", "response": "a b a", "reward": 1.0, "gold_reward": None, "kl": 1.0, "length": 2,
         "ended": True},
        {"index": 1, "prompt": "q", "response": "a b", "reward": 3.0, "gold_reward": None, "kl": 1.0, "length": 1,
         "ended": False},
    ]  # fmt: skip
    assert metrics == pytest.approx(
        {
            "eval/reward": 2.0,
            "eval/kl": 1.0,
            "eval/response_length": 1.5,
            "eval/eos_rate": 0.5,
            "eval/distinct_1": 2 / 5,  # {a, b} of 5 words
            "eval/distinct_2": 2 / 3,  # {(a, b), (b, a)} of 3 bigrams
        }
    )
    with_gold = evaluation_metrics(
        lambda p, r, e, c: torch.zeros(2), lambda p, r, e, c: torch.ones(2), ["p", "q"], ["x", "y"], ended, kl, mask
    )
    assert with_gold["eval/gold_reward"] == 1.0


def test_statistics_over_the_whole_batch_on_two_ranks(tmp_path):
    """tests/dist_checks.py under torchrun: each rank holds other data; the running score statistics, each
    micro-batch's share of the minibatch's tokens and the whitening statistics are over both ranks' data."""
    from conftest import REPO, run_script

    run_script("tests/dist_checks.py", str(tmp_path), nproc=2, env={"PYTHONPATH": str(REPO)})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    scores = np.concatenate([np.arange(4.0) * (r + 1) + s * 10 - r for s in range(3) for r in range(2)])
    for out in ranks:
        assert out["moments"]["mean"] == pytest.approx(scores.mean(), rel=1e-5)
        assert out["moments"]["std"] == pytest.approx(scores.std(), rel=1e-4)
    # a step's rows [0, 3, 1, 5, 6, 2] (13 tokens): rank 0 takes 0, 1, 6 (3 + 1, then 2 tokens), rank 1 3, 5, 2
    # (2 + 1, then 4); shares of all 13, x world size 2
    for out, rows, tokens in zip(ranks, [([0, 1], [6]), ([3, 5], [2])], [(4, 2), (3, 4)]):
        assert out["micro_batches"] == [[rows[0], pytest.approx(tokens[0] * 2 / 13), False],
                                        [rows[1], pytest.approx(tokens[1] * 2 / 13), True]]  # fmt: skip
    # the update's micro-batches (a budget of one full row: 8 tokens, 5 of them response): rows of similar length
    # together, only the columns they use, the same number on both ranks, each weighted by its share of both ranks'
    # response tokens (x 2 ranks)
    total = sum(sum(row) for out in ranks for row in out["mask"])
    assert len(ranks[0]["token_micro_batches"]) == len(ranks[1]["token_micro_batches"]) >= 3
    for out in ranks:
        lengths, seen = [sum(row) for row in out["mask"]], []
        for rows, width, start, stop, context, share, _ in out["token_micro_batches"]:
            assert width == max(lengths[i] for i in rows) and context == max(out["prompt_lengths"][i] for i in rows)
            assert (start, stop) == (3 - context, 3 + width)
            assert len(rows) == 1 or len(rows) * (context + width) <= 8
            assert share == pytest.approx(sum(lengths[i] for i in rows) * 2 / total)
            seen += rows
        assert sorted(seen) == [0, 1, 2, 3] and [m[-1] for m in out["token_micro_batches"]][-1]
    masks = [np.array(out["mask"]) for out in ranks]
    real = np.concatenate([np.array(out["values"])[m] for out, m in zip(ranks, masks)])
    for out, m in zip(ranks, masks):
        expected = np.where(m, (np.array(out["values"]) - real.mean()) / real.std(), 0.0)
        assert np.array(out["whitened"]) == pytest.approx(expected, abs=1e-4)


def test_generation_keeps_a_16_bit_kv_cache_under_autocast_with_the_same_samples():
    """From float32 weights under bf16 autocast the KV cache would hold float32 keys and values (twice the memory);
    models.kv_cache stores bf16, and the samples are bit-identical (attention casts to bf16 anyway)."""
    from plumbing.models import kv_cache, load_causal_lm

    policy = load_causal_lm("toy/policy", torch.float32)
    queries = torch.randint(3, 600, (4, 10), generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, eos_token_id=None,
                              pad_token_id=1, return_dict_in_generate=True)  # fmt: skip
    outputs = []
    for cache in (True, False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            kwargs = {"past_key_values": kv_cache(policy, queries.device)} if cache else {}
            outputs.append(policy.generate(input_ids=queries, attention_mask=torch.ones_like(queries),
                                           generation_config=config, **kwargs))  # fmt: skip
    assert outputs[0].past_key_values.layers[0].keys.dtype == torch.bfloat16
    assert outputs[1].past_key_values.layers[0].keys.dtype == torch.float32  # what it would hold otherwise
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert kv_cache(policy, queries.device) is None  # no autocast: the model's own cache


def test_length_groups_split_rows_only_where_padding_costs_more_than_a_call(monkeypatch):
    from plumbing import padding

    # 64 rows of the plain toy (16-token prompts, responses of 12 to 48): splitting saves less than a call costs
    responses = [12 + i % 37 for i in range(64)]
    groups = padding.length_groups([16] * 64, responses, 64, 64 * 64)
    assert groups == [sorted(range(64), key=lambda i: -responses[i])]
    # one 496-token prompt among 14-token ones: one call would compute 8 x 544 = 4,352 tokens (+ 1,024 for the call),
    # two compute 544 + 7 x 62 = 978 (+ 2,048)
    assert padding.length_groups([14, 14, 496, 14, 14, 14, 14, 14], [48] * 8, 8, 8 * 544) == [
        [2],
        [0, 1, 3, 4, 5, 6, 7],
    ]
    # the memory budget: at most 3 rows or 3 x 64 tokens per call, even where one call would cost less
    assert sorted(len(g) for g in padding.length_groups([16] * 8, [48] * 8, 3, 3 * 64)) == [2, 3, 3]
    monkeypatch.setattr(padding, "CALL_TOKENS", 0)  # free calls: no padding at all
    responses = [5, 9, 5, 9, 7, 7]
    groups = padding.length_groups([16] * 6, responses, 6, 6 * 25)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len({responses[i] for i in g}) == 1 for g in groups)


def test_sorted_trimmed_passes_and_micro_batches_compute_the_full_width_update(monkeypatch):
    """Rows of different lengths: the no-grad pass in sorted, trimmed chunks and the update in sorted, trimmed,
    token-budget micro-batches give the log-probs, loss and gradients of one pass over the full padded batch."""
    from common import chunked_logprobs, pad_pairs, token_micro_batches
    from plumbing import padding
    from plumbing.models import load_causal_lm

    monkeypatch.setattr(padding, "CALL_TOKENS", 32)  # split these short rows as it would split long ones

    policy = load_causal_lm("toy/policy", torch.float32)
    generator = torch.Generator().manual_seed(0)
    prompt_lengths, response_lengths = [120, 9, 75, 24, 99, 15, 51, 6], [60, 3, 18, 45, 9, 36, 27, 54]
    prompts = [torch.randint(3, 600, (n,), generator=generator).tolist() for n in prompt_lengths]
    responses = [torch.randint(3, 600, (n,), generator=generator).tolist() for n in response_lengths]
    input_ids, attention_mask, context, response_ids, response_mask, lengths = pad_pairs(prompts, responses, 1, "cpu")
    assert padding.row_lengths(attention_mask, context) == lengths  # what the device holds, read once
    advantages = torch.randn(response_ids.shape, generator=generator)
    with torch.no_grad():
        full = gather_logprobs(response_logits(policy, input_ids, attention_mask, context, 1.0), response_ids)
        chunked = chunked_logprobs(policy, input_ids, attention_mask, response_ids, 1.0, 3, torch.float32)
    assert torch.allclose(torch.where(response_mask, chunked, 0.0), torch.where(response_mask, full, 0.0), atol=1e-5)
    full_loss = masked_mean(
        -full.new_tensor(0)
        - gather_logprobs(response_logits(policy, input_ids, attention_mask, context, 1.0), response_ids) * advantages,
        response_mask,
    )
    full_loss.backward()
    full_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    parts, widths, loss = 0, [], 0.0
    for mb, seq, prompt_width, share, _ in token_micro_batches([torch.arange(8)], lengths, 0)[0]:
        logits = response_logits(policy, input_ids[seq], attention_mask[seq], prompt_width, 1.0)
        part = masked_mean(-gather_logprobs(logits, response_ids[mb]) * advantages[mb], response_mask[mb]) * share
        part.backward()
        parts, widths, loss = parts + 1, [*widths, seq[1].stop - seq[1].start], loss + part.item()
    assert parts > 1 and min(widths) < input_ids.shape[1]  # split by length, columns trimmed
    assert loss == pytest.approx(full_loss.item(), abs=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(policy.parameters(), full_grads))


def weight_casts(model, fn) -> int:
    """How many times `fn()` casts one of `model`'s float32 matrices to bf16 (autocast's weight casts)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes = {p.shape for p in model.parameters() if p.dim() == 2}

    class Count(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            source = args[0] if args else None
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                Count.casts += source.dtype == torch.float32 and source.shape in sizes
            return func(*args, **kwargs)

    with Count():
        fn()
    return Count.casts


def test_generation_under_autocast_casts_each_trained_weight_once_not_per_decode_step():
    """The rollout's generate() under bf16 autocast samples from the trained float32 policy with each Linear weight
    cast to bf16 once per autocast block, not once per decode step: autocast caches the casts of weights that train
    (for 4 and for 12 decode steps alike). Frozen float32 weights would be cast again at every step, which is why the
    reference's Linear weights are stored in bf16 (models.frozen_linears_to)."""
    import common
    from plumbing.models import load_causal_lm

    policy = load_causal_lm("toy/policy", torch.float32)
    linears = sum(isinstance(m, torch.nn.Linear) for m in policy.modules())
    queries = torch.randint(3, 600, (6, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(queries)

    def rollout(steps: int):
        config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=True, top_k=0, top_p=1.0,
                                  eos_token_id=[0], pad_token_id=1)  # fmt: skip
        with common.autocast(queries.device, torch.bfloat16):
            return common.generate(policy, queries, mask, config, chunk_size=3)

    assert [weight_casts(policy, lambda n=n: rollout(n)) for n in (4, 12)] == [linears, linears]
    policy.requires_grad_(False)  # frozen float32 weights: a cast per weight, per decode step and chunk
    assert weight_casts(policy, lambda: rollout(4)) >= 4 * linears
