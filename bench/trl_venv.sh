#!/usr/bin/env bash
# A separate environment with Hugging Face TRL, for bench/trl_grpo.py and bench/conformance.py (TRL is not a
# dependency of this project): torch==2.13.0 (the CPU build on this machine's disk) first, then
# bench/trl_requirements.txt, with TRL at VERSION when given (bench/conformance.py's PPO rows need 1.12, the last
# release with the experimental PPOTrainer).
#   bench/trl_venv.sh DIR [VERSION]       e.g. bench/trl_venv.sh /tmp/trl-venv; bench/trl_venv.sh /tmp/trl112 1.12.0
set -euo pipefail
dir=${1:?usage: bench/trl_venv.sh DIR [VERSION]}
version=${2:-}
python3 -m venv "$dir"
"$dir/bin/python" -m pip install -q torch==2.13.0
requirements=$(mktemp)
if [ -n "$version" ]; then
  sed "s/^trl==.*/trl==$version/" "$(dirname "$0")/trl_requirements.txt" > "$requirements"
else
  cp "$(dirname "$0")/trl_requirements.txt" "$requirements"
fi
"$dir/bin/python" -m pip install -q -r "$requirements"
rm -f "$requirements"
"$dir/bin/python" -c "import trl; print('trl', trl.__version__, 'in', '$dir')"
