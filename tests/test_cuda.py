"""What only holds on CUDA, on a GPU only (skipped elsewhere; bench/device_check.sh runs them): --dtype auto is bf16
autocast there, with KL exactly 0 before training and ratio 1 on the first minibatch; the logged peak memory is the
device's; generation keeps a bf16 KV cache and casts each trained weight once; a 1B-shaped iteration's peak memory
is what bench/memory.py's memory model predicts."""

import json
import sys

import pytest
import torch
from conftest import FAST, REPO, read_metrics, run_script

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_dtype_is_bf16_autocast_on_cuda():
    """--dtype auto computes in bf16 on CUDA: the policy's float32 weights give bf16 logits under common.autocast
    (on a CPU, auto is float32 and autocast is off)."""
    import common
    from plumbing import models, run

    device = torch.device("cuda")
    dtype = run.resolve_dtype("auto", device)
    policy = models.load_causal_lm(str(REPO / "toy" / "policy"), torch.float32).to(device)
    ids = torch.randint(3, 600, (2, 8), device=device)
    with torch.no_grad(), common.autocast(device, dtype):
        logits = policy(input_ids=ids).logits
    assert dtype == torch.bfloat16 and logits.dtype == torch.bfloat16 and policy.gpt_neox.embed_in.weight.is_cuda


def test_bf16_run_starts_at_kl_0_and_ratio_1_and_logs_device_memory(tmp_path):
    run_script("ppo.py", *FAST, "--total-episodes", "32", "--output-dir", str(tmp_path))  # --dtype auto: bf16
    sft, first, second = read_metrics(tmp_path)
    assert sft["eval/kl"] == 0.0 and first["train/kl"] == 0.0
    assert first["policy/abs_log_ratio_first_mb"] < 1e-3 and second["policy/abs_log_ratio_first_mb"] < 1e-3
    # the device's allocated memory (toy models: tens of MB), not the host's resident set (over 1 GiB with CUDA)
    assert 0 < first["time/peak_memory_gb"] < 0.5


def test_generation_keeps_a_bf16_kv_cache():
    from transformers import GenerationConfig

    import common
    from plumbing import models

    device = torch.device("cuda")
    policy = models.load_causal_lm(str(REPO / "toy" / "policy"), torch.float32).to(device)
    queries = torch.randint(3, 600, (4, 12), device=device)
    config = GenerationConfig(max_new_tokens=4, do_sample=True, top_k=0, eos_token_id=None, pad_token_id=1,
                              return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad(), common.autocast(device, torch.bfloat16):
        out = policy.generate(input_ids=queries, attention_mask=torch.ones_like(queries), generation_config=config,
                              past_key_values=models.kv_cache(policy, device))  # fmt: skip
    assert out.past_key_values.layers[0].keys.dtype == torch.bfloat16


def test_generation_casts_each_trained_weight_once_on_cuda():
    """common.generate under CUDA bf16 autocast from the trained float32 policy: each Linear weight cast to bf16 once
    (autocast's cache), however many decode steps."""
    from test_common import weight_casts
    from transformers import GenerationConfig

    import common
    from plumbing import models

    device = torch.device("cuda")
    policy = models.load_causal_lm(str(REPO / "toy" / "policy"), torch.float32).to(device)
    linears = sum(isinstance(m, torch.nn.Linear) for m in policy.modules())
    queries = torch.randint(3, 600, (6, 10), device=device)

    def rollout(steps: int):
        config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=True, top_k=0, top_p=1.0,
                                  eos_token_id=[0], pad_token_id=1)  # fmt: skip
        with common.autocast(device, torch.bfloat16):
            return common.generate(policy, queries, torch.ones_like(queries), config, chunk_size=3)

    assert [weight_casts(policy, lambda n=n: rollout(n)) for n in (4, 12)] == [linears, linears]


def test_1b_iteration_memory_matches_the_memory_model(tmp_path):
    """One ppo.py iteration of a random 1B-shaped policy (toy vocabulary) on one GPU: the peak of allocated memory
    within 25% of memory_model's prediction (float32 policy and value net with AdamW, the reference, a bf16 RM)."""
    sys.path.insert(0, str(REPO / "bench"))
    import memory
    import throughput

    policy, reward_model = throughput.make_models("1b", tmp_path, torch.device("cuda"))
    rows, response, prompt = 8, 64, 20  # (the toy's prompts: ~17 tokens)
    flags = ["--model", policy, "--reward-model", reward_model, "--eval-reward", "", "--total-episodes", str(rows),
             "--rollout-batch-size", str(rows), "--mini-batch-size", str(rows), "--max-new-tokens", str(response),
             "--eval-size", "8", "--save-every", "0", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    run_script("ppo.py", *flags)
    measured = read_metrics(tmp_path / "run")[-1]["time/peak_memory_gb"]
    fitted = json.loads((REPO / "bench" / "results" / "memory_cpu.json").read_text())
    hidden, layers, _ = throughput.SIZES["1b"]
    shape, params = (hidden, layers, memory.TOY_VOCAB), memory.parameters(hidden, layers, memory.TOY_VOCAB)
    predicted = memory.memory_model(shape, params, "ddp", 1, 2, rows, prompt + response, rows, response,
                                    fitted["k_act"], 0.0)  # fmt: skip
    print(f"1B-shaped iteration: measured {measured:.1f} GiB, predicted {predicted['total'] / 2**30:.1f} GiB")
    assert measured == pytest.approx(predicted["total"] / 2**30, rel=0.25)
