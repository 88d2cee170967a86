"""Peak memory per GPU of every recipe (recipes/*.sh), predicted from the exact command its dry run prints.

    python bench/recipe_memory.py          # writes bench/results/recipe_memory.{md,json}

Each recipe's `DRY_RUN=1` command (torchrun, the script and every flag) goes through the memory model below at its
own GPU count, with the script's own defaults for the flags it does not give (read from its Args). The model
follows what the scripts keep (plumbing/models.py):
- a trained network: float32 weights, gradients and AdamW's two moments (16 bytes per trained parameter); its frozen
  part's Linear weights in the compute dtype (--dtype), the rest (embeddings, norms) in float32; under LoRA the base
  in the compute dtype and the adapter (rank r on every Linear layer) trained; under --fsdp everything sharded over
  the ranks, kept in its own dtype at rest (float32 for a trained network's base);
- the reference (unless LoRA, where it is the policy with its adapter off) and the reward models frozen, in the
  compute dtype (the reference's non-Linear weights in float32 outside --fsdp); PPO's, APA's and AWR's value network
  a copy of the policy, PPO-max's critic a copy of its reward model;
- transient, the largest of: generation (the KV cache of --rollout-forward-batch-size rows of prompt + response,
  the gathered policy under --fsdp, autocast's compute-dtype copies of the trained weights), the no-grad passes (a
  gathered model, at most 2^26 float32 logits at a time: models.rows_per_forward), and the update (activations of
  the trained networks for a micro-batch of full-length rows: the fitted activation bytes per token, layer and
  hidden unit of bench/results/memory_cpu.json, only each network's trained layers under --num-layers-unfrozen, one
  layer plus each layer's input under --activation-checkpointing; float32 logits; two layers gathered under
  --fsdp; autocast's copies);
- plus CUDA's own context and the allocator's slack, taken as 2 GiB.
The GPUs are the authors' kind: 80 GB cards (74.5 GiB); a recipe fits when its peak is at most 72 GiB (80 GiB less
a 10% margin: tests/test_recipes.py). Model shapes are the checkpoints' configs (SHAPES: hidden size, layers,
vocabulary, parameters per layer), looked up by the names the recipes use.
"""

import dataclasses
import importlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
LIMIT_GIB = 72.0  # 80 GiB per GPU less a 10% margin
RUNTIME = 2 * GiB  # CUDA context, allocator slack (an estimate; not measured here: no GPU)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    vocab: int
    per_layer: int  # parameters of one decoder layer
    lora_width: int  # sum of in + out features of one layer's Linear layers (a LoRA adapter of rank r: r x this)
    head: bool = True  # an untied LM head (a causal LM); reward models have a 1-output head instead

    @property
    def params(self) -> int:
        return self.vocab * self.hidden * (2 if self.head else 1) + self.layers * self.per_layer

    @property
    def linear(self) -> int:  # parameters in Linear layers (the LM head included)
        return self.layers * self.per_layer + (self.vocab * self.hidden if self.head else 0)


def pythia(hidden: int, layers: int, vocab: int = 50304, head: bool = True) -> Shape:
    # GPT-NeoX: QKV (h -> 3h), dense (h -> h), MLP h -> 4h -> h: 12 h^2 + 13 h; LoRA on 4h + 2h + 5h + 5h
    return Shape(hidden, layers, vocab, 12 * hidden**2 + 13 * hidden, 16 * hidden, head)


def llama_7b(vocab: int = 32000, head: bool = True) -> Shape:
    h, i = 4096, 11008  # q, k, v, o (h -> h), gate, up (h -> i), down (i -> h), two RMSNorms
    return Shape(h, 32, vocab, 4 * h * h + 3 * h * i + 2 * h, 8 * h + 3 * (h + i), head)


def qwen2_5_0_5b() -> Shape:
    h, i, kv = 896, 4864, 128  # q, o (h -> h, q with a bias), k, v (h -> 128: 2 KV heads, with biases), the MLP
    per_layer = 2 * h * h + h + 2 * (h * kv + kv) + 3 * h * i + 2 * h
    # its LM head is tied to the embeddings: counted as a separate head here (over by 136M parameters: conservative)
    return Shape(h, 24, 151936, per_layer, 2 * (h + h) + 2 * (h + kv) + 3 * (h + i))


# the recipes' model names (their defaults: variables in recipes/*.sh) and their shapes
SHAPES = {
    "Dahoas/pythia-125M-static-sft": pythia(768, 12),
    "Dahoas/pythia-1B-static-sft": pythia(2048, 16),
    "Dahoas/pythia-6B-static-sft": pythia(4096, 32, 50432),  # (Pythia-6.9B)
    "models/gptj-rm-static": Shape(4096, 28, 50400, 12 * 4096**2 + 10 * 4096, 16 * 4096, head=False),  # GPT-J 6B
    "models/moss-rlhf-sft-model-7B-en/recover": llama_7b(),
    "models/moss-rlhf-reward-model-7B-en-converted": llama_7b(head=False),
    "models/llama-7b-qlora-hh": llama_7b(),
    "models/oasst-rm-2.1-pythia-1.4b": pythia(2048, 24, 50288, head=False),
    "models/oasst-rm-2-pythia-6.9b": pythia(4096, 32, 50288, head=False),
    "Qwen/Qwen2.5-0.5B-Instruct": qwen2_5_0_5b(),
}
# what each recipe is run with: (recipe, its arguments)
RECIPES = [
    *[("apa_hh.sh", f"{algorithm} {size}") for algorithm in ("ppo", "apa", "awr") for size in ("125m", "1b", "6.9b")],
    ("ppo_max_hh.sh", "paper"),
    ("ppo_max_hh.sh", "released"),
    *[
        ("alol_hh.sh", variant)
        for variant in (
            "a-lol",
            "a-lol-ref-free",
            "a-lol-seq",
            "a-lol-kl",
            "r-lol",
            "wbc",
            "nll",
            "dpo",
            "dpo-ref-free",
            "pro",
        )
    ],  # fmt: skip
    ("grpo_gsm8k.sh", "grpo"),
    ("grpo_gsm8k.sh", "rloo"),
]
CRITIC = ("ppo.py", "apa.py", "awr.py", "ppo_max.py")  # scripts with a value network


def dry_run(recipe: str, arguments: str) -> list[str]:
    """The torchrun command the recipe's dry run prints (its last `torchrun` line), as argv."""
    env = {**os.environ, "DRY_RUN": "1"}
    out = subprocess.run([str(REPO / "recipes" / recipe), *arguments.split()], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    line = [line for line in out.splitlines() if line.startswith("torchrun")][-1]
    return shlex.split(line)


def parse(argv: list[str]) -> tuple[int, str, dict]:
    """(processes, script name, the run's flags with the script's defaults for the others) of a torchrun command."""
    nproc = int(argv[argv.index("--nproc_per_node") + 1])
    at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    script = Path(argv[at]).name
    sys.path.insert(0, str(REPO))
    defaults = {f.name: f.default for f in dataclasses.fields(importlib.import_module(script[:-3]).Args)}
    flags, name = dict(defaults), None
    for token in argv[at + 1 :]:
        if token.startswith("--"):
            name = token[2:].replace("-", "_")
            if name.startswith("no_") and name[3:] in defaults:
                flags[name[3:]], name = False, None
            elif isinstance(defaults.get(name), bool):
                flags[name], name = True, None
            else:
                flags[name] = []
        elif name is not None:
            flags[name] = [*flags[name], token] if isinstance(flags[name], list) else token
    flags = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in flags.items()}
    return nproc, script, flags


def shape_of(name: str) -> Shape | None:
    if not name or ":" in name:  # none, or a module:function scorer
        return None
    if name not in SHAPES:
        raise SystemExit(f"error: no shape for model '{name}'; add it to SHAPES in bench/recipe_memory.py")
    return SHAPES[name]


def trained_fraction(shape: Shape, unfrozen: int) -> int:
    """Parameters that train under --num-layers-unfrozen (-1: all): the top layers, the final norm and the head."""
    if unfrozen < 0:
        return shape.params
    return min(unfrozen, shape.layers) * shape.per_layer + (shape.vocab * shape.hidden if shape.head else 0)


def predict(nproc: int, script: str, flags: dict, k_act: float) -> dict:
    """Bytes per GPU, by term (see the module docstring)."""
    world, fsdp, lora = nproc, bool(flags["fsdp"]), bool(flags["use_lora"])
    nbytes = 4 if flags["dtype"] == "float32" else 2
    shard = world if fsdp else 1
    policy = shape_of(flags["model"])
    unfrozen = int(flags.get("num_layers_unfrozen", -1))
    terms, copies = {}, 0

    def trained_net(shape: Shape, unfrozen: int, name: str) -> tuple[int, int]:
        """Its bytes at rest; (trained Linear parameters that autocast copies, layers that keep activations)."""
        if lora:
            adapter = int(flags["lora_r"]) * shape.layers * shape.lora_width
            terms[name] = ((4 if fsdp else nbytes) * shape.params + 16 * adapter) / shard
            return 0, shape.layers
        trained = trained_fraction(shape, unfrozen)
        if fsdp:
            terms[name] = (4 * shape.params + 12 * trained) / shard
        else:
            frozen_linear = shape.linear - min(trained, shape.linear)
            terms[name] = 16 * trained + nbytes * frozen_linear + 4 * (shape.params - trained - frozen_linear)
        return (trained if not fsdp else 0), (shape.layers if unfrozen < 0 else min(unfrozen, shape.layers))

    policy_copies, policy_layers = trained_net(policy, unfrozen, "policy")
    copies += nbytes * min(policy_copies, policy.linear) if nbytes < 4 else 0
    nets = [(policy, policy_layers)]
    if script in CRITIC:
        critic = shape_of(flags.get("critic_model") or flags["reward_model"]) if script == "ppo_max.py" else policy
        value_unfrozen = flags.get("value_num_layers_unfrozen")
        value_unfrozen = unfrozen if value_unfrozen in (None, "None") else int(value_unfrozen)
        critic = dataclasses.replace(critic, head=False)
        value_copies, value_layers = trained_net(critic, value_unfrozen, "value network")
        if flags.get("value_head") == "mlp":  # trlX's MLP head h -> 2h -> 1, trained
            terms["value network"] += 16 * 2 * critic.hidden**2 / shard
        copies += nbytes * value_copies if nbytes < 4 else 0
        nets.append((critic, value_layers))
    if not lora:
        rest = policy.params - policy.linear  # embeddings and norms: float32 outside FSDP
        terms["reference"] = nbytes * policy.params / world if fsdp else nbytes * policy.linear + 4 * rest
    scorers = [shape_of(flags["reward_model"]), shape_of(flags.get("eval_reward", ""))]
    terms["reward models"] = sum(nbytes * s.params for s in scorers if s) / shard
    static = sum(terms.values())

    # ---- transient phases, per rank
    prompt, response = int(flags["max_prompt_length"]), int(flags["max_new_tokens"])
    seq = prompt + response
    if script in ("alol.py", "dpo.py"):  # (dpo.py: a pair's chosen and rejected response in one forward)
        rows = (int(flags["micro_batch_size"]) or int(flags["batch_size"]) // world) * (2 if script == "dpo.py" else 1)
    else:
        rows = int(flags["micro_batch_size"]) or int(flags["mini_batch_size"]) // world
    chunk = int(flags["rollout_forward_batch_size"])
    offline = script in ("alol.py", "dpo.py")
    gen_rows = chunk if offline else min(chunk, int(flags.get("rollout_batch_size", chunk)) // world)
    largest = max([policy.params] + [s.params for s in scorers if s] + [n.params for n, _ in nets])
    gathered = nbytes * largest if fsdp else 0
    policy_cast = nbytes * min(policy_copies, policy.linear) if nbytes < 4 else 0
    kv_cache = 2 * policy.layers * policy.hidden * nbytes * gen_rows * seq
    logits_rows = max(1, min(chunk, 2**26 // ((response + 1) * policy.vocab)))
    activations = 0.0
    for shape, layers in nets:
        kept = (layers + k_act) if flags["activation_checkpointing"] else layers * k_act
        activations += rows * seq * shape.hidden * nbytes * kept
    transient = {
        "generation": gathered + kv_cache + policy_cast,
        "no-grad passes": gathered + 2 * 4 * logits_rows * (response + 1) * policy.vocab + policy_cast,
        "update": activations + 3 * 4 * rows * response * policy.vocab + copies
        + (2 * nbytes * max(n.per_layer for n, _ in nets) if fsdp else 0),
    }  # fmt: skip
    phase = max(transient, key=transient.get)
    total = static + RUNTIME + transient[phase]
    return {**terms, "runtime": RUNTIME, "peak phase": phase, "phase bytes": transient[phase], "total": total,
            **{f"phase/{k}": v for k, v in transient.items()}}  # fmt: skip


def k_act() -> float:
    return json.loads((REPO / "bench" / "results" / "memory_cpu.json").read_text())["k_act"]


def predictions() -> list[dict]:
    rows = []
    for recipe, arguments in RECIPES:
        argv = dry_run(recipe, arguments)
        nproc, script, flags = parse(argv)
        p = predict(nproc, script, flags, k_act())
        rows.append({"recipe": f"recipes/{recipe} {arguments}", "script": script, "gpus": nproc,
                     "fsdp": bool(flags["fsdp"]), "lora": bool(flags["use_lora"]),
                     **{k: (v / GiB if isinstance(v, float | int) else v) for k, v in p.items()}})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| recipe | GPUs | mode | trained nets | reference | reward models | peak phase | predicted peak GiB | "
             "fits (<= 72 GiB) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        mode = ("FSDP" if r["fsdp"] else "DDP") + (" + LoRA" if r["lora"] else "")
        trained = r["policy"] + r.get("value network", 0.0)
        lines.append(f"| `{r['recipe']}` | {r['gpus']} | {mode} | {trained:.1f} | {r.get('reference', 0.0):.1f} | "
                     f"{r['reward models']:.1f} | {r['peak phase']} {r['phase bytes']:.1f} | {r['total']:.1f} | "
                     f"{'yes' if r['total'] <= LIMIT_GIB else 'NO'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    rows = predictions()
    out = REPO / "bench" / "results" / "recipe_memory"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    text = ("# Predicted peak memory per GPU of every recipe (`python bench/recipe_memory.py`)\n\n"
            "Each recipe's dry-run command through the memory model of bench/recipe_memory.py, at its GPU count; "
            "80 GB cards, fitting at 72 GiB (a 10% margin). GiB per GPU.\n\n" + table(rows))  # fmt: skip
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
