#!/usr/bin/env bash
# A separate environment for TRL's side of bench/trl_grpo.py: bench/trl_venv.sh DIR, then
#   python bench/trl_grpo.py --trl-python DIR/bin/python
set -euo pipefail
dir=${1:?usage: bench/trl_venv.sh DIR}
python3 -m venv "$dir"
"$dir/bin/python" -m pip install -q torch==2.13.0
"$dir/bin/python" -m pip install -q -r "$(dirname "$0")/trl_requirements.txt"
"$dir/bin/python" -c "import trl; print('trl', trl.__version__, 'in', '$dir')"
