#!/usr/bin/env bash
# GRPO (or RLOO) on GSM8K with a small instruct model and a verifiable reward: the field's first exercise.
# Settings from verl's published GRPO-LoRA run of Qwen2.5-0.5B-Instruct on GSM8K (54.3% test accuracy; verl
# docs/algo/baseline.md, its log gsm8k/Qwen2.5-0.5B-bsz64_2-prompt512-resp1024-lorarank32-score0.543.log): 64 prompts
# per step, 5 samples each, 116 steps (one epoch of the 7,473 training questions), lr 3e-5, LoRA rank 32 alpha 32
# on every linear layer, weight decay 0.01, gradient clip 1.0, KL loss 0.001 with k3 (their low_var_kl), the
# token-mean loss, clip 0.2, one epoch over each batch, the group's std normalisation, prompts up to 512 tokens,
# responses up to 1024, T = 1, greedy validation; the instruction asking for the answer after "####" is theirs.
#
#   recipes/grpo_gsm8k.sh [grpo|rloo] [more flags...]
#   NPROC=2 OUT=runs/my_gsm8k recipes/grpo_gsm8k.sh grpo --seed 2    # flags after the algorithm are added last
#
# Hub names are variables (MODEL, DATASET, CONFIG); the questions are written once as chat prompts into DATA_DIR
# (recipes/gsm8k_data.py). The reward, recipes/gsm8k_reward.py, reads each row's `answer` column: 1 for the right
# final number, else 0 (math-verify used when installed). DRY_RUN=1 prints the commands.
# What differs from verl's run: their entropy bonus (0.001) is not here; their mini-batch split of each step's 320
# samples is not in the log we read, so one gradient step per batch (on-policy, as their single PPO epoch is).
set -euo pipefail
usage="usage: recipes/grpo_gsm8k.sh [grpo|rloo] [flags...]"
algorithm=${1:-grpo}
[ $# -gt 0 ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
run() { if [ -n "${DRY_RUN:-}" ]; then printf "%q " "$@"; echo; else "$@"; fi; }
case $algorithm in
  # GRPO: DeepSeekMath's loss with verl's settings: k3 KL term at 0.001, token-mean, std-normalised groups
  grpo) algo=(--kl-coef 0.001 --kl-term k3 --loss-agg token-mean --scale-rewards group --clip-eps 0.2) ;;
  # RLOO: the same samples and budget, the leave-one-out baseline, the KL in the reward at the same coefficient
  rloo) algo=(--kl-coef 0.001) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATASET=${DATASET:-openai/gsm8k}
CONFIG=${CONFIG:-main}
DATA_DIR=${DATA_DIR:-data/gsm8k}
NPROC=${NPROC:-1}
OUT=${OUT:-runs/gsm8k__${algorithm}}

[ -d "$DATA_DIR" ] || run python "$repo/recipes/gsm8k_data.py" --dataset "$DATASET" --config "$CONFIG" \
  --output-dir "$DATA_DIR"
# 116 steps x 64 prompts x 5 samples = 37,120 episodes; evaluation on 256 test questions every 10 steps (greedy
# accuracy is logged beside the sampled one: the reward is a checker)
run torchrun --nproc_per_node "$NPROC" "$repo/$algorithm.py" \
  --model "$MODEL" --dataset "$DATA_DIR" --train-split train --eval-split test --eval-size 256 \
  --reward-model recipes.gsm8k_reward:score --eval-reward recipes.gsm8k_reward:score --missing-eos-penalty 0 \
  --max-prompt-length 512 --max-new-tokens 1024 --temperature 1.0 \
  --use-lora --lora-r 32 --lora-alpha 32 --dtype bfloat16 \
  --total-episodes 37120 --rollout-batch-size 320 --mini-batch-size 320 --group-size 5 --update-epochs 1 \
  --micro-batch-size 8 --lr 3e-5 --weight-decay 0.01 --max-grad-norm 1.0 \
  --eval-every 10 --save-every 20 --output-dir "$OUT" "${algo[@]}" "$@"
