#!/usr/bin/env bash
# PPO-max ("Secrets of RLHF in Large Language Models Part I: PPO", Zheng et al. 2023, arXiv 2307.04964) on the
# models and data of its English release (github.com/OpenLMLab/MOSS-RLHF: train_ppo_en.sh): the MOSS-RLHF LLaMA-7B
# SFT policy, its reward model (also the critic's initial weights), HH dialogues in MOSS's prompt format.
#
#   recipes/ppo_max_hh.sh paper|released [more flags...]     paper: the paper's PPO-max (Section 5);
#                                                            released: train_ppo_en.sh as released
#   NPROC=8 OUT=runs/my_ppo_max recipes/ppo_max_hh.sh released --seed 1    # flags after RECIPE are added last
#
# The release distributes its models as weight diffs against LLaMA-7B: recover them first with MOSS-RLHF's
# merge_weight_en.py into POLICY and REWARD_CHECKPOINT (the defaults are its paths). The reward model is converted
# once into REWARD_DIR and the dialogues written as conversations into DATA_DIR. DRY_RUN=1 prints the commands.
# Four 7B models (policy and critic trained, reference and reward model frozen) do not fit one GPU: every model is
# sharded over the ranks with FSDP2 (the release: DeepSpeed ZeRO-2 for the trained pair, ZeRO-3 with parameters offloaded
# to CPU for the frozen pair, accelerate_config.yaml and ppo_trainer.py), with activation checkpointing as theirs.
# docs/recipes.md lists what still differs from the authors' runs, and why.
set -euo pipefail
usage="usage: recipes/ppo_max_hh.sh paper|released [flags...]"
recipe=${1:?$usage}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
run() { if [ -n "${DRY_RUN:-}" ]; then printf "%q " "$@"; echo; else "$@"; fi; }
case $recipe in
  # the paper: normalised and clipped scores (delta 0.8), KL 0.05, critic warm-up, 128 rollouts / 32 per step
  # (GAE lambda 0.9: the paper's Appendix C.3; the release's 0.95)
  paper) nproc=8 algo=(--recipe paper --kl-coef 0.05 --reward-clip 0.8 --value-lr 1.65e-6 --critic-warmup-steps 4
                       --gae-lambda 0.9 --total-episodes 128000 --rollout-batch-size 128 --mini-batch-size 32 --micro-batch-size 2) ;;
  # train_ppo_en.sh: 7 processes x 2 rollouts, one step each; score / running std, KL 0.01, 100 LR warm-up steps
  released) nproc=7 algo=(--recipe released --kl-coef 0.01 --value-lr 1.5e-6 --lr-warmup-steps 100
                          --gae-lambda 0.95 --total-episodes 14000 --rollout-batch-size 14 --mini-batch-size 14 --micro-batch-size 2) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

POLICY=${POLICY:-models/moss-rlhf-sft-model-7B-en/recover}
REWARD_CHECKPOINT=${REWARD_CHECKPOINT:-models/moss-rlhf-reward-model-7B-en/recover}
REWARD_DIR=${REWARD_DIR:-models/moss-rlhf-reward-model-7B-en-converted}
DATASET=${DATASET:-Anthropic/hh-rlhf}
DATA_DIR=${DATA_DIR:-data/hh-messages}
NPROC=${NPROC:-$nproc}
OUT=${OUT:-runs/ppo_max_hh__${recipe}}

if [ ! -d "$POLICY" ] && [ -z "${DRY_RUN:-}" ]; then
  echo "error: no policy at $POLICY; recover MOSS-RLHF's SFT model there with its merge_weight_en.py, or set POLICY" >&2
  exit 1
fi
[ -d "$DATA_DIR" ] || run python "$repo/recipes/hh_messages.py" --dataset "$DATASET" --output-dir "$DATA_DIR"
[ -d "$REWARD_DIR" ] || run python "$repo/recipes/convert_reward_model.py" --format moss \
  --checkpoint "$REWARD_CHECKPOINT" --chat-template "$repo/recipes/templates/moss.jinja" --output-dir "$REWARD_DIR"
run torchrun --nproc_per_node "$NPROC" "$repo/ppo_max.py" \
  --model "$POLICY" --chat-template "$repo/recipes/templates/moss.jinja" --dataset "$DATA_DIR" \
  --train-split train --eval-split test --eval-size 128 --reward-model "$REWARD_DIR" --eval-reward "" \
  --missing-eos-penalty 0 --max-prompt-length 1536 --max-new-tokens 512 --temperature 0.8 \
  --lr 5e-7 --update-epochs 1 --gamma 1 --clip-eps 0.2 --value-clip 0.2 --max-grad-norm 1.0 \
  --dtype bfloat16 --fsdp --activation-checkpointing --eval-every 100 --save-every 100 --seed 42 --output-dir "$OUT" \
  "${algo[@]}" "$@"
