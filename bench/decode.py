"""Decoding under bf16 autocast from float32 weights: what the KV cache holds and what the weight casts cost.

    python bench/decode.py            # a 160m-shaped policy, 16 prompts x 64 new tokens, about 2 minutes on 2 cores

Under autocast a matmul casts its float32 weight to bf16 on every call, except that it caches the cast, until the
autocast block ends, for weights that train (leaves that require grad, also under no_grad); the rotary embedding's
float32 cos/sin make the cached keys and values float32. Measured here, one generate() each (the same samples every
time), with the number of float32-to-bf16 weight casts it made:
- frozen float32 weights, float32 cache: what transformers does by default (models.kv_cache not passed);
- frozen float32 weights, bf16 cache (models.kv_cache, what the scripts do): a cast per weight per decode step;
- trained float32 weights (requires grad: the policy the scripts sample from), bf16 cache: each weight cast once
  per generate(), as if the policy had been cast to bf16 before the rollout;
- frozen Linear weights in bf16 (models.frozen_linears_to: the reference and the layers --num-layers-unfrozen
  freezes), bf16 cache: no cast at all.
Writes <output_dir>/decode_<device>.md and .json (time per decode step, weight casts, KV cache MiB).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from throughput import pythia_config  # noqa: E402

from plumbing import models, run  # noqa: E402


@dataclass
class Args:
    size: str = "160m"  # Pythia shape (toy vocabulary)
    prompts: int = 16  # rows generated at once
    prompt_length: int = 128  # tokens per prompt
    new_tokens: int = 64  # decode steps
    output_dir: str = "bench/results"  # decode_<device>.md/.json go here


def weight_casts(model, fn):
    """(fn's result, how many times it cast one of `model`'s float32 matrices to bf16)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = {p.shape for p in model.parameters() if p.dim() == 2}

    class Count(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                Count.casts += args[0].dtype == torch.float32 and args[0].shape in shapes
            return func(*args, **kwargs)

    with Count():
        out = fn()
    return out, Count.casts


def main():
    args = tyro.cli(Args)
    from transformers import AutoConfig, GenerationConfig, GPTNeoXForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = pythia_config(args.size, AutoConfig.from_pretrained(REPO / "toy" / "policy"))
    torch.manual_seed(0)
    policy = GPTNeoXForCausalLM(config).eval().to(device)
    queries = torch.randint(3, 600, (args.prompts, args.prompt_length), device=device)
    generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True,
                                  top_k=0, top_p=1.0, eos_token_id=0, pad_token_id=1,
                                  return_dict_in_generate=True)  # fmt: skip
    results, samples = {}, []
    for name, cache, trained, frozen_bf16 in (
        ("frozen float32 weights, float32 KV cache (transformers' default)", False, False, False),
        ("frozen float32 weights, bf16 KV cache (models.kv_cache)", True, False, False),
        ("trained float32 weights (the sampled policy), bf16 KV cache", True, True, False),
        ("frozen Linear weights in bf16 (the reference), bf16 KV cache", True, False, True),
    ):
        policy.requires_grad_(trained)
        if frozen_bf16:
            models.frozen_linears_to(policy, torch.bfloat16)

        def generate(cache=cache):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                torch.manual_seed(0)
                kwargs = {"past_key_values": models.kv_cache(policy, device)} if cache else {}
                return policy.generate(input_ids=queries, attention_mask=torch.ones_like(queries),
                                       generation_config=generation, **kwargs)  # fmt: skip

        casts = weight_casts(policy, generate)[1]
        times = []
        for _ in range(2):  # the second is timed
            start = run.clock(device)
            out = generate()
            times.append(run.clock(device) - start)
        layers = out.past_key_values.layers
        cache_mib = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)) / 2**20
        results[name] = {"ms_per_decode_step": 1000 * times[-1] / args.new_tokens, "weight_casts": casts,
                         "kv_cache_mib": cache_mib, "cache_dtype": str(layers[0].keys.dtype)}  # fmt: skip
        samples.append(out.sequences)
        print(name, results[name], flush=True)
    same = all(torch.equal(samples[0], s) for s in samples[1:])
    lines = [f"# Decoding under bf16 autocast ({args.size}-shaped, {args.prompts} x {args.prompt_length} prompt tokens "
             f"+ {args.new_tokens} new, {device.type}); same samples in all four: {same}; "
             f"{sum(isinstance(m, torch.nn.Linear) for m in policy.modules())} Linear weights", "",
             "| | ms per decode step | weight casts per generate() | KV cache MiB | cache dtype |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['ms_per_decode_step']:.1f} | {v['weight_casts']} | {v['kv_cache_mib']:.0f} "
              f"| {v['cache_dtype']} |" for k, v in results.items()]  # fmt: skip
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"decode_{device.type}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"decode_{device.type}.json").write_text(json.dumps({"same_samples": same, **results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
