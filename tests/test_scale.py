"""Scale features: one update for any rank count / FSDP / micro-batch split, FSDP + LoRA checkpoints and resume,
activation checkpointing, --num-layers-unfrozen, and the reference computing exactly what the policy computes."""

import sys

import pytest
import torch
from conftest import FAST, REPO, read_metrics, run_script, shared_runs

# one minibatch per update epoch (the whole rollout): its composition cannot depend on how the ranks shuffle
EQUIVALENCE = [
    "--total-episodes", "32", "--rollout-batch-size", "16", "--mini-batch-size", "16", "--max-new-tokens", "24",
    "--eval-size", "16", "--eval-every", "2", "--save-every", "0", "--lr", "5e-5", "--value-lr", "5e-5",
]  # fmt: skip


def run_fixed(script: str, args: list[str], nproc: int = 1):
    """The script with rollouts that depend only on the prompt (tests/wrap.py --rollouts fixed)."""
    return run_script("tests/wrap.py", "--rollouts", "fixed", script, *args, nproc=nproc)


def final_params(path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


# One rank against two (DDP or FSDP2, micro-batches) for every script: tests/test_configurations.py.


def test_activation_checkpointing_same_gradients_less_memory():
    """Gradients are bit-identical; the peak of tracked tensor memory (activations kept for backward) drops."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from common import gather_logprobs, response_logits
    from plumbing.models import ValueModel, checkpoint_layers

    config = GPTNeoXConfig(vocab_size=640, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=512, pad_token_id=1)  # fmt: skip
    ids = torch.randint(2, 600, (4, 256), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def gradients_and_peak(checkpointed: bool):
        from transformers import GPTNeoXForSequenceClassification

        torch.manual_seed(0)
        policy = GPTNeoXForCausalLM(config).eval()
        value_model = ValueModel(GPTNeoXForSequenceClassification(config).eval())
        if checkpointed:
            checkpoint_layers(policy), checkpoint_layers(value_model)
        tracker = MemTracker()
        tracker.track_external(policy, value_model)
        with tracker:
            logprobs = gather_logprobs(response_logits(policy, ids, mask, 128, 1.0), ids[:, 128:])
            loss = -logprobs.mean() + value_model(ids, mask).pow(2).mean()
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        return [p.grad for p in [*policy.parameters(), *value_model.parameters()]], peak

    plain_grads, plain_peak = gradients_and_peak(False)
    checkpointed_grads, checkpointed_peak = gradients_and_peak(True)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, checkpointed_grads))
    assert checkpointed_peak < 0.6 * plain_peak, (checkpointed_peak / 2**20, plain_peak / 2**20)


def test_freeze_bottom_layers_leaves_top_layers_norm_and_head():
    from transformers import AutoModelForCausalLM

    from plumbing.models import freeze_bottom_layers

    policy = AutoModelForCausalLM.from_pretrained(REPO / "toy" / "policy")
    n = policy.config.num_hidden_layers
    freeze_bottom_layers(policy, 2)
    trained = {name.split(".")[1] if name.startswith("gpt_neox.") else name.split(".")[0]
               for name, p in policy.named_parameters() if p.requires_grad}  # fmt: skip
    assert trained == {"layers", "final_layer_norm", "lm_head"}
    trained_layers = [name for name, p in policy.named_parameters() if p.requires_grad and ".layers." in name]
    layers = {int(name.split(".")[2]) for name in trained_layers}
    assert layers == {n - 2, n - 1}


def test_value_network_with_its_own_frozen_layers_and_an_mlp_head():
    """The APA authors' value network (--value-head mlp --value-num-layers-unfrozen -1): a fully trainable copy with
    trlX's MLP head (h -> 2h -> ReLU -> 1, float32), while --num-layers-unfrozen freezes the policy's bottom layers;
    by default the value network is frozen like the policy and keeps its linear head."""
    import dataclasses

    import ppo
    from plumbing import models

    device = torch.device("cpu")
    base = dict(model=str(REPO / "toy" / "policy"), num_layers_unfrozen=1)
    authors = models.value_network(base["model"], "--model", ppo.Args(**base, value_head="mlp",
                                   value_num_layers_unfrozen=-1), device, torch.float32)  # fmt: skip
    head = models.hf_model(authors).score
    hidden = models.hf_model(authors).config.hidden_size
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (hidden, 2 * hidden, 1)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in authors.parameters())
    values = authors(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert values.shape == (1, 3)
    default = models.value_network(
        base["model"], "--model", dataclasses.replace(ppo.Args(**base)), device, torch.float32
    )
    assert isinstance(models.hf_model(default).score, torch.nn.Linear)
    frozen = {n.split(".layers.")[1].split(".")[0] for n, p in default.named_parameters() if ".layers." in n
              and not p.requires_grad}  # fmt: skip
    assert frozen == {str(i) for i in range(models.hf_model(default).config.num_hidden_layers - 1)}


def test_num_layers_unfrozen_trains_only_those_parameters(shared):
    out = shared_runs(shared, "ppo", PPO_RUNS)["unfrozen-2"]
    trained, initial = final_params(out / "policy"), final_params(REPO / "toy" / "policy")
    n = int(__import__("json").load(open(REPO / "toy" / "policy" / "config.json"))["num_hidden_layers"])
    top = tuple(f"gpt_neox.layers.{i}." for i in (n - 2, n - 1)) + ("gpt_neox.final_layer_norm.", "lm_head.")
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert changed and all(k.startswith(top) for k in changed), sorted(changed)
    assert any(k.startswith("lm_head.") for k in changed) and any(".layers." in k for k in changed)


# ppo.py runs of the two tests below, made in one process (conftest.shared_runs)
PPO_RUNS = {"bf16": [*FAST, "--total-episodes", "16", "--dtype", "bfloat16"],
            "bf16-unfrozen-2": [*FAST, "--total-episodes", "16", "--dtype", "bfloat16", "--num-layers-unfrozen", "2"],
            "unfrozen-2": [*FAST, "--num-layers-unfrozen", "2"]}  # fmt: skip


def test_bf16_reference_computes_what_the_policy_computes(shared):
    """Under bf16 autocast the fp32 policy and its reference (whose Linear weights are stored in bf16, as are the
    policy's frozen ones) give KL exactly 0 before the first update: fully trained, and with 2 layers unfrozen."""
    runs = shared_runs(shared, "ppo", PPO_RUNS)
    for name in ("bf16", "bf16-unfrozen-2"):
        sft, first = read_metrics(runs[name])
        assert sft["eval/kl"] == 0.0 and first["train/kl"] == 0.0, name
        assert first["policy/abs_log_ratio_first_mb"] == 0.0, name


def test_frozen_linear_weights_are_stored_in_the_compute_dtype():
    """autocast re-casts a float32 weight that does not train at every call: frozen Linear layers are kept in bf16;
    trained ones, norms, embeddings and a head tied to the embeddings stay float32."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXForCausalLM

    from plumbing.models import freeze_bottom_layers, frozen_linears_to

    policy = GPTNeoXForCausalLM.from_pretrained(REPO / "toy" / "policy", dtype=torch.float32)
    freeze_bottom_layers(policy, 2)
    frozen_linears_to(policy, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in policy.named_parameters()}
    assert dtypes["gpt_neox.layers.0.attention.dense.weight"] == torch.bfloat16
    assert dtypes["gpt_neox.layers.4.attention.dense.weight"] == torch.float32  # trains
    assert dtypes["gpt_neox.layers.0.input_layernorm.weight"] == dtypes["gpt_neox.embed_in.weight"] == torch.float32
    tied = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).requires_grad_(False)
    frozen_linears_to(tied, torch.bfloat16)
    assert tied.lm_head.weight.dtype == tied.transformer.wte.weight.dtype == torch.float32


def test_fsdp_keeps_gradients_sharded_through_micro_batches(tmp_path):
    """2 ranks, a 70m-shaped model, 4 micro-batches (tests/dist_fsdp_grads.py): the gradients each rank holds after
    every micro-batch are half of the full float32 gradients, as the scripts accumulate them; with FSDP2's sync off
    until the last micro-batch (the old way) a rank held the full unsharded gradients. The final gradients agree."""
    run_script("tests/dist_fsdp_grads.py", str(tmp_path), nproc=2, env={"PYTHONPATH": str(REPO)})
    for rank in range(2):
        out = __import__("json").loads((tmp_path / f"rank{rank}.json").read_text())
        full = out["full_gradient_bytes"]
        print(rank, [round(b / full, 3) for b in out["scripts"]], [round(b / full, 3) for b in out["sync_off"]])
        assert all(abs(b / full - 0.5) < 0.05 for b in out["scripts"])
        assert max(out["sync_off"]) / full > 0.95  # what the measure catches
        assert out["scripts_checksum"] == pytest.approx(out["sync_off_checksum"], rel=1e-5)


def test_large_vocabulary_pass_memory_does_not_grow_with_the_rows(tmp_path):
    """A 151,936-token vocabulary: the no-grad pass over every position of 8 rows x 512 tokens (--kl-control
    apa-authors) would hold 2.5 GB of float32 logits at once; chunked by rows_per_forward its peak grows < 1.5 GiB."""
    sys.path.insert(0, str(REPO / "bench"))
    import vocab_memory

    model = vocab_memory.make_model(tmp_path / "vocab_152k")
    assert vocab_memory.passes_peak(model, 8, 512, passes=(True,))["apa-authors pass (every position)"] < 1.5


def nested_tensors(state, prefix=""):
    """{path: tensor} of every tensor in a nested state (dicts and lists), other leaves as they are."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in nested_tensors(value, f"{prefix}{key}/").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in nested_tensors(value, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): state}


def test_fsdp_checkpoint_is_sharded_and_resumes_on_another_number_of_ranks(tmp_path):
    """Under --fsdp each rank writes its own shards (torch.distributed.checkpoint; no full copy on rank 0), and a run
    written by 2 ranks resumes on 3: what it restores (the policy's and the value network's trainable weights, both
    AdamW states: moments and steps) equals, tensor by tensor, what was saved, and the run re-scores its rollout
    exactly (its first rollout already differs from pi_ref)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    args = [*FAST, "--rollout-batch-size", "12", "--mini-batch-size", "6", "--eval-size", "6", "--fsdp"]
    args += ["--max-new-tokens", "12", "--eval-every", "2"]
    out = tmp_path / "run"
    run_script("ppo.py", *args, "--total-episodes", "12", "--output-dir", str(out), nproc=2)
    shards = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards and "state.pt" in shards
    assert not (out / "checkpoint.pt").exists()
    first_kl = read_metrics(out)[1]["train/kl"]
    dcp_to_torch_save(out / "checkpoint", tmp_path / "saved.pt")  # the shards as one full state
    saved = nested_tensors(torch.load(tmp_path / "saved.pt", weights_only=False))
    resume = [*args, "--total-episodes", "24", "--output-dir", str(out), "--resume"]
    run_script("tests/restored_state.py", "ppo", *resume, nproc=3, env={"RESTORED_STATE": str(tmp_path / "got.pt")})
    restored = nested_tensors(torch.load(tmp_path / "got.pt", weights_only=False))
    weights = [k for k in saved if k.startswith(("policy/", "value_model/"))]
    moments = [k for k in saved if k.endswith(("exp_avg", "exp_avg_sq", "step"))]
    assert len(weights) > 20 and len(moments) == 3 * len(weights) and set(saved) <= set(restored)
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored[key].to(value.dtype), value), key
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and first_kl == 0.0
    assert rows[2]["train/kl"] != 0.0 and rows[2]["policy/abs_log_ratio_first_mb"] < 1e-5


def test_on_cuda_the_process_group_serves_host_and_device_tensors(monkeypatch):
    """A plain "nccl" group takes CUDA tensors only: a host tensor in any collective (an object collective, a CPU
    statistic) would stop every multi-GPU run. With CUDA availability faked, setup_distributed must start a group
    whose backends (torch's own parsing of the backend string) serve both; and `python X.py` starts none."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import BackendConfig

    from plumbing import run

    started = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: started.append(backend))
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # torchrun --nproc_per_node 1
        monkeypatch.setenv(name, value)
    rank, world_size, device = run.setup_distributed()
    assert (rank, world_size, device) == (0, 1, torch.device("cuda:0")) and len(started) == 1
    backends = BackendConfig(started[0]).get_device_backend_map()
    assert backends.get("cpu") == "gloo" and backends.get("cuda") == "nccl"
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # python X.py
        monkeypatch.delenv(name)
    run.setup_distributed()
    assert len(started) == 1


def test_one_process_torchrun_joins_a_process_group_and_runs_its_collectives(tmp_path):
    """`torchrun --nproc_per_node 1` runs every collective path an 8-GPU run does (DDP, the replica check, the
    reductions over ranks), so one GPU can check them; the same run as `python` joins none. Both train the same."""
    args = [*EQUIVALENCE, "--total-episodes", "16"]
    run_fixed("ppo", [*args, "--output-dir", str(tmp_path / "python")])
    fixed = ["tests/wrap.py", "--rollouts", "fixed", "ppo"]
    run_script(*fixed, *args, "--output-dir", str(tmp_path / "torchrun"), torchrun=True)
    alone, joined = read_metrics(tmp_path / "python")[-1], read_metrics(tmp_path / "torchrun")[-1]
    assert "dist/max_param_difference" not in alone and joined["dist/max_param_difference"] == 0.0
    card = (tmp_path / "torchrun" / "policy" / "training_args.json").read_text()
    assert '"command": "torchrun --nproc_per_node 1' in card and '"world_size": 1' in card
    for key in ("loss/policy", "loss/value", "train/kl"):
        assert alone[key] == pytest.approx(joined[key], rel=1e-6, abs=1e-6), key
