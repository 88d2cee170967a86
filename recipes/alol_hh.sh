#!/usr/bin/env bash
# A-LoL's HH experiments (Baheti et al. 2023, arXiv 2305.14718, Section 4) as the authors ran them
# (github.com/abaheti95/LoL-RL: lolrl_qlora_llama_hh.py): LLaMA-7B with the QLoRA HH SFT adapter, trained offline on
# HH dialogues' responses, rewarded by OpenAssistant's Pythia-1.4B reward model through a sigmoid, evaluated by its
# 6.9B one; and their preference baselines (dpo_qlora_llama_hh.py, pro_qlora_llama_hh.py) with dpo.py, on HH's pairs.
#
#   recipes/alol_hh.sh VARIANT [more flags...]   VARIANT: a-lol | a-lol-ref-free | a-lol-seq | a-lol-kl | r-lol |
#                                                         wbc | nll   (the variants and baselines the paper reports)
#                                                         | dpo | dpo-ref-free | pro   (its preference baselines)
#   NPROC=2 OUT=runs/my_alol recipes/alol_hh.sh a-lol-seq --seed 2     # flags after VARIANT are added last (they win)
#
# Hub names are variables (BASE_MODEL, SFT_ADAPTER, DATASET, REWARD_CHECKPOINT, EVAL_REWARD_CHECKPOINT); the SFT
# policy is merged once into POLICY, the reward models converted into REWARD_DIR / EVAL_REWARD_DIR and the dialogues
# written as conversations into DATA_DIR. DRY_RUN=1 prints the commands. docs/recipes.md lists what still differs.
set -euo pipefail
usage="usage: recipes/alol_hh.sh a-lol|a-lol-ref-free|a-lol-seq|a-lol-kl|r-lol|wbc|nll|dpo|dpo-ref-free|pro [flags...]"
variant=${1:?$usage}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
run() { if [ -n "${DRY_RUN:-}" ]; then printf "%q " "$@"; echo; else "$@"; fi; }
case $variant in
  a-lol|a-lol-ref-free|a-lol-seq|r-lol|wbc|nll) algo=(--variant "$variant") ;;
  # their HH script has no a_lol_kl branch; its README runs A-LoL KL as a_lol with the clip off and a KL weight
  a-lol-kl) algo=(--variant a-lol-kl --kl-beta 0.1) ;;
  # dpo_qlora_llama_hh.py (reference_free for dpo-ref-free): beta 0.1; pro_qlora_llama_hh.py: two candidates, the
  # reward model's raw scores as the ranking's temperature, SFT weight 0.05 (no sigmoid, no reference)
  dpo|dpo-ref-free) algo=(--variant "$variant" --beta 0.1) ;;
  pro) algo=(--variant pro --sft-weight 0.05) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

BASE_MODEL=${BASE_MODEL:-huggyllama/llama-7b}
SFT_ADAPTER=${SFT_ADAPTER:-timdettmers/qlora-hh-rlhf-7b}
POLICY=${POLICY:-models/llama-7b-qlora-hh}
DATASET=${DATASET:-Anthropic/hh-rlhf}
DATA_DIR=${DATA_DIR:-data/hh-messages}
REWARD_CHECKPOINT=${REWARD_CHECKPOINT:-OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5}
REWARD_DIR=${REWARD_DIR:-models/oasst-rm-2.1-pythia-1.4b}
EVAL_REWARD_CHECKPOINT=${EVAL_REWARD_CHECKPOINT:-OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1}
EVAL_REWARD_DIR=${EVAL_REWARD_DIR:-models/oasst-rm-2-pythia-6.9b}
NPROC=${NPROC:-1}
OUT=${OUT:-runs/alol_hh__${variant}}

[ -d "$POLICY" ] || run python "$repo/recipes/merge_adapter.py" --base "$BASE_MODEL" --adapter "$SFT_ADAPTER" \
  --output-dir "$POLICY"
[ -d "$DATA_DIR" ] || run python "$repo/recipes/hh_messages.py" --dataset "$DATASET" --output-dir "$DATA_DIR"
PAIRS_DIR=${PAIRS_DIR:-data/hh-pairs}  # (the same dialogues, as pairs; HH's pairs with equal responses dropped)
case $variant in dpo|dpo-ref-free|pro)
  [ -d "$PAIRS_DIR" ] || run python "$repo/recipes/hh_messages.py" --dataset "$DATASET" --output-dir "$PAIRS_DIR" \
    --drop-equal-pairs ;;
esac
for pair in "$REWARD_CHECKPOINT|$REWARD_DIR" "$EVAL_REWARD_CHECKPOINT|$EVAL_REWARD_DIR"; do
  [ -d "${pair#*|}" ] || run python "$repo/recipes/convert_reward_model.py" --format oasst --checkpoint "${pair%|*}" \
    --max-length 1024 --chat-template "$repo/recipes/templates/oasst_rm.jinja" --output-dir "${pair#*|}"
done
case $variant in
dpo|dpo-ref-free|pro)
  # 9000 optimizer steps of 2 pairs x 8 accumulation steps, lr 2e-4 constant, no warm-up, seed 901 (their scripts)
  run torchrun --nproc_per_node "$NPROC" "$repo/dpo.py" \
    --model "$POLICY" --chat-template "$repo/recipes/templates/alol_policy.jinja" --dataset "$PAIRS_DIR" \
    --train-split train --eval-split test --eval-size 280 \
    --reward-model "$REWARD_DIR" --eval-reward "$EVAL_REWARD_DIR" --missing-eos-penalty 0 \
    --max-prompt-length 640 --max-new-tokens 128 --stop-strings "###" \
    --use-lora --lora-r 64 --lora-alpha 16 --lora-dropout 0.1 --dtype bfloat16 \
    --total-steps 9000 --batch-size 16 --micro-batch-size 2 \
    --lr 2e-4 --adam-betas 0.9 0.999 --weight-decay 0.01 --max-grad-norm 0.3 \
    --eval-every 900 --save-every 900 --log-every 10 --seed 901 --output-dir "$OUT" "${algo[@]}" "$@" ;;
*)
  # 9000 optimizer steps of 4 rows x 4 accumulation steps (they scale A-LoL's by the fraction of positive advantages)
  run torchrun --nproc_per_node "$NPROC" "$repo/alol.py" \
    --model "$POLICY" --chat-template "$repo/recipes/templates/alol_policy.jinja" --dataset "$DATA_DIR" \
    --train-split train --eval-split test --eval-size 280 \
    --reward-model "$REWARD_DIR" --eval-reward "$EVAL_REWARD_DIR" --reward-transform sigmoid --missing-eos-penalty 0 \
    --max-prompt-length 640 --max-new-tokens 128 --stop-strings "###" \
    --use-lora --lora-r 64 --lora-alpha 16 --lora-dropout 0.1 --dtype bfloat16 \
    --total-steps 9000 --batch-size 16 --micro-batch-size 4 \
    --lr 2e-4 --adam-betas 0.9 0.999 --weight-decay 0.01 --max-grad-norm 0.3 --clip-eps 0.9 --sampling auto \
    --value-greedy --value-samples 1 --value-size 280 --value-epochs 10 --value-lr 1e-5 \
    --eval-every 900 --save-every 900 --log-every 10 --seed 42 --output-dir "$OUT" "${algo[@]}" "$@" ;;
esac
