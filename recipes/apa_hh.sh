#!/usr/bin/env bash
# The APA paper's HH experiments (Zhu et al. 2023, arXiv 2306.02231, Section 5) as the authors ran them
# (github.com/microsoft/RLHF-APA: examples/ppo_hh.py for PPO, examples/apa_hh.py for APA and AWR): a Pythia SFT
# policy on Dahoas/rm-static prompts, scored by trlX's GPT-J reward model Dahoas/gptj-rm-static.
#
#   recipes/apa_hh.sh ALGORITHM SIZE [more flags...]      ALGORITHM: ppo | apa | awr   SIZE: 125m | 1b | 6.9b
#   recipes/apa_hh.sh apa 1b
#   NPROC=4 OUT=runs/my_apa recipes/apa_hh.sh apa 125m --seed 1    # flags after SIZE are added last (they win)
#
# Every hub name is a variable (POLICY, DATASET, REWARD_CHECKPOINT, REWARD_REVISION, REWARD_BASE, REWARD_TOKENIZER);
# the reward checkpoint is converted once into REWARD_DIR (recipes/convert_reward_model.py). DRY_RUN=1 prints
# the commands instead of running them. docs/recipes.md lists what still differs from the authors' runs, and why.
set -euo pipefail
usage="usage: recipes/apa_hh.sh ppo|apa|awr 125m|1b|6.9b [flags...]"
algorithm=${1:?$usage}
size=${2:?$usage}
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
run() { if [ -n "${DRY_RUN:-}" ]; then printf "%q " "$@"; echo; else "$@"; fi; }

# ---- the authors' per-size settings (apa_hh.py / ppo_hh.py): model, rollouts per iteration, minibatch, chunk
case $size in
  125m) policy=Dahoas/pythia-125M-static-sft rollouts=128 minibatch=8 chunk=16 nproc=8 scale=() ;;
  1b)   policy=Dahoas/pythia-1B-static-sft   rollouts=64  minibatch=2 chunk=4  nproc=2 scale=() ;;
  # 6.9B: the policy, its reference and the value network do not fit one 80 GB GPU: sharded (FSDP2) over 2 for PPO
  # (its value head is on a copy trained from the top 2 layers, like the policy); APA's and AWR's below
  6.9b) policy=Dahoas/pythia-6B-static-sft   rollouts=64  minibatch=2 chunk=1  nproc=2 scale=(--fsdp) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
# ---- the authors' per-algorithm settings
case $algorithm in
  ppo) script=ppo.py seed=100 prompt_length=896 reward_clip=10  # seq_length 1024 - 128 new tokens
       lr=$([ "$size" = 1b ] && echo 1e-6 || echo 8e-6)
       # their trlX fork's controller: k3 over prompt + response, fed after every minibatch, epochs per minibatch
       algo=(--kl-coef 0.05 --kl-target 6 --kl-horizon 10000 --kl-control apa-authors --clip-eps 0.2 --value-clip 0.2)
       value=() ;;  # their value head: an MLP on the policy's own trunk, frozen below the top 2 layers like it
  apa) script=apa.py seed=0 prompt_length=872 reward_clip=100 lr=1e-6  # seq_length 1000 - 128
       algo=(--lam 0.1)                                                  # their advantage coefficient 10 = 1 / lambda
       value=(--value-num-layers-unfrozen -1) ;;  # their value net: a fully trainable copy with an MLP head
  awr) script=awr.py seed=0 prompt_length=872 reward_clip=100 lr=1e-6
       algo=(--beta 2 --max-weight 0)                                    # exp(0.5 A), weights not clipped
       value=(--value-num-layers-unfrozen -1) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
# total_steps 20000 optimizer steps of one minibatch, 2 epochs per rollout batch: episodes = 20000 x minibatch / 2
authors_minibatch=$minibatch
if [ "$size" = 6.9b ] && [ "$algorithm" != ppo ]; then
  # their APA/AWR 6B: minibatch 1, one process driving 4 GPUs (README: "4 MI200 for 6B models"). Here data parallel:
  # a fully trained value-net copy (110 GB of weights, gradients and AdamW) needs 4 GPUs under FSDP2, one row per GPU
  # per step: minibatch 4, over the same number of samples as theirs (a quarter of their optimizer steps)
  authors_minibatch=1 minibatch=4 nproc=4
fi
episodes=$((20000 * authors_minibatch / 2))
every=$((1000 * authors_minibatch / rollouts / 2 > 0 ? 1000 * authors_minibatch / rollouts / 2 : 1))  # eval/save every 1000 of their steps

POLICY=${POLICY:-$policy}
DATASET=${DATASET:-Dahoas/rm-static}
REWARD_CHECKPOINT=${REWARD_CHECKPOINT:-Dahoas/gptj-rm-static}
REWARD_REVISION=${REWARD_REVISION:-676bfd4d}
REWARD_BASE=${REWARD_BASE:-EleutherAI/gpt-j-6B}
REWARD_TOKENIZER=${REWARD_TOKENIZER:-gpt2}
REWARD_DIR=${REWARD_DIR:-models/gptj-rm-static}
NPROC=${NPROC:-$nproc}
OUT=${OUT:-runs/apa_hh__${algorithm}__${size}}

if [ ! -d "$REWARD_DIR" ]; then
  run python "$repo/recipes/convert_reward_model.py" --format trlx --checkpoint "$REWARD_CHECKPOINT" \
    --revision "$REWARD_REVISION" --base "$REWARD_BASE" --tokenizer "$REWARD_TOKENIZER" --output-dir "$REWARD_DIR"
fi
run torchrun --nproc_per_node "$NPROC" "$repo/$script" \
  --model "$POLICY" --dataset "$DATASET" --train-split train --eval-split test --eval-size 280 \
  --reward-model "$REWARD_DIR" --reward-append-eos always --reward-score-at first-eos --missing-eos-penalty 0 \
  --eval-reward "" --stop-strings "Human:" "human:" "Assistant:" "assistant:" \
  --max-new-tokens 128 --max-prompt-length "$prompt_length" --temperature 1.0 \
  --total-episodes "$episodes" --rollout-batch-size "$rollouts" --mini-batch-size "$minibatch" --update-epochs 2 \
  --rollout-forward-batch-size "$chunk" --num-layers-unfrozen 2 --value-head mlp "${value[@]}" \
  --dtype bfloat16 "${scale[@]}" \
  --lr "$lr" --value-lr "$lr" --adam-betas 0.9 0.95 --weight-decay 1e-6 --max-grad-norm 1.0 \
  --gamma 1 --gae-lambda 0.95 --reward-clip "$reward_clip" --vf-coef 1 "${algo[@]}" \
  --eval-every "$every" --save-every "$every" --seed "$seed" --output-dir "$OUT" "$@"
