"""Side by side with Hugging Face TRL's GRPOTrainer: the same GRPO run on the toy task, timed in both.

    bench/trl_venv.sh /tmp/trl-venv            # TRL in its own pinned environment (bench/trl_requirements.txt)
    python bench/trl_grpo.py --trl-python /tmp/trl-venv/bin/python

Both sides train the toy SFT policy with the toy reward model on the toy prompts: 10 rollouts of 16 prompts x 4
responses (64 completions, at most 48 new tokens, sampled from the full softmax at T = 1), each used for 2 epochs of
4 minibatches of 16 completions (80 optimizer steps), GRPO's sequence-mean loss (TRL's loss_type "grpo"), group
std scaling, beta 0.04 (k3, TRL without its bias correction), clip 0.2, AdamW at lr 3e-4, betas (0.9, 0.95),
weight decay 0.01, a constant schedule, gradient clipping at 1, float32 on the CPU, no gradient checkpointing.
Reported, for each: the whole process (start to exit: imports, loading, and this project's two evaluations of 16
prompts) and the training loop (TRL: `trainer.train()`; here: the sum of the iterations' time, whose split into
generate / score / update is in metrics.jsonl). TRL is not a dependency of this project: its side runs under
--trl-python, an interpreter of the environment bench/trl_venv.sh makes. Writes bench/results/trl_grpo.{md,json}.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS, RESPONSES, ROLLOUTS, MINIBATCH, EPOCHS, NEW_TOKENS = 16, 4, 10, 16, 2, 48


@dataclass
class Args:
    trl_python: str = ""
    """the python of the TRL environment (bench/trl_venv.sh); required unless --side is given"""
    side: str = ""
    """internal: 'trl' runs TRL's side in this interpreter and prints its timings as JSON"""
    seeds: tuple[int, ...] = (1, 2)
    """one run per seed on each side"""
    output: str = "bench/results/trl_grpo"
    """where .md and .json go"""


def trl_side(seed: int, out: str) -> dict:
    """TRL's GRPOTrainer on the toy task (run in the TRL environment)."""
    start = time.perf_counter()
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    dataset = load_dataset("json", data_files=str(REPO / "toy" / "data" / "train.jsonl"), split="train")
    dataset = dataset.select_columns(["prompt"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(REPO / "toy" / "reward_model", num_labels=1)
    reward_tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "reward_model")
    config = GRPOConfig(
        output_dir=out, seed=seed, per_device_train_batch_size=MINIBATCH, gradient_accumulation_steps=1,
        num_generations=RESPONSES, generation_batch_size=PROMPTS * RESPONSES, num_iterations=EPOCHS,
        max_steps=ROLLOUTS * PROMPTS * RESPONSES // MINIBATCH * EPOCHS, max_completion_length=NEW_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, loss_type="grpo", scale_rewards="group", beta=0.04, epsilon=0.2,
        use_bias_correction_kl=False, learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.01,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, bf16=False, use_cpu=True,
        gradient_checkpointing=False, logging_steps=8, report_to="none", save_strategy="no", disable_dropout=True,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=str(REPO / "toy" / "policy"), reward_funcs=reward_model, args=config, train_dataset=dataset,
        reward_processing_classes=reward_tokenizer,
    )  # fmt: skip
    loop_start = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - loop_start
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return {"loop_s": loop, "setup_s": loop_start - start, "threads": torch.get_num_threads(),
            "first_reward": rewards[0], "last_reward": rewards[-1]}  # fmt: skip


def ours(seed: int, out: Path) -> dict:
    flags = ["--seed", str(seed), "--output-dir", str(out), "--total-episodes", str(ROLLOUTS * PROMPTS * RESPONSES),
             "--rollout-batch-size", str(PROMPTS * RESPONSES), "--group-size", str(RESPONSES),
             "--mini-batch-size", str(MINIBATCH), "--update-epochs", str(EPOCHS), "--max-new-tokens", str(NEW_TOKENS),
             "--loss-agg", "seq-mean", "--scale-rewards", "group", "--kl-coef", "0.04", "--kl-term", "k3",
             "--clip-eps", "0.2", "--lr", "3e-4", "--eval-size", "16", "--eval-every", "1000",
             "--save-every", "0"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "grpo.py"), *flags], check=True, cwd=REPO, capture_output=True)
    process = time.perf_counter() - start
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")][1:]
    split = {k: sum(r[f"time/{k}"] for r in rows) for k in ("generate", "score", "update")}
    loop = sum(r["time/iteration"] for r in rows)
    rewards = {"first_reward": rows[0]["train/reward"], "last_reward": rows[-1]["train/reward"]}
    return {"process_s": process, "loop_s": loop, **{f"{k}_s": v for k, v in split.items()}, **rewards}


def main():
    import tyro

    args = tyro.cli(Args)
    if args.side == "trl":
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(trl_side(args.seeds[0], tmp)))
        return
    if not args.trl_python or not os.path.exists(args.trl_python):
        raise SystemExit("error: pass --trl-python, the python of an environment made by bench/trl_venv.sh")
    results = {"trl": [], "ours": []}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            cmd = [args.trl_python, __file__, "--side", "trl", "--seeds", str(seed)]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: TRL's side failed:\n{done.stderr[-3000:]}")
            trl = json.loads(done.stdout.strip().splitlines()[-1])
            results["trl"].append({"process_s": time.perf_counter() - start, **trl})
            results["ours"].append(ours(seed, Path(tmp) / "run"))
        print(json.dumps({k: v[-1] for k, v in results.items()}), flush=True)
    mean = {side: {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]} for side, runs in results.items()}
    probe = "import trl, transformers, torch; print(trl.__version__, transformers.__version__, torch.__version__)"
    version = subprocess.run([args.trl_python, "-c", probe], capture_output=True, text=True)
    lines = [
        f"# GRPO on the toy task: this project's grpo.py against TRL's GRPOTrainer (TRL, transformers, torch: "
        f"{version.stdout.strip()}), mean of seeds {', '.join(map(str, args.seeds))}",
        "",
        "| | whole process (s) | training loop (s) | generate (s) | score (s) | update (s) "
        "| train reward first -> last |",
        "|---|---|---|---|---|---|---|",
    ]
    t, o = mean["trl"], mean["ours"]
    lines.append(f"| TRL GRPOTrainer | {t['process_s']:.1f} | {t['loop_s']:.1f} | | | | "
                 f"{t['first_reward']:.2f} -> {t['last_reward']:.2f} |")  # fmt: skip
    lines.append(f"| grpo.py | {o['process_s']:.1f} | {o['loop_s']:.1f} | {o['generate_s']:.1f} | {o['score_s']:.1f} | "
                 f"{o['update_s']:.1f} | {o['first_reward']:.2f} -> {o['last_reward']:.2f} |")  # fmt: skip
    lines += ["", f"Speed-up: {t['process_s'] / o['process_s']:.2f}x the whole process, "
              f"{t['loop_s'] / o['loop_s']:.2f}x the training loop."]  # fmt: skip
    Path(args.output + ".md").write_text("\n".join(lines) + "\n")
    Path(args.output + ".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
