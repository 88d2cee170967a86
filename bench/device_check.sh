#!/usr/bin/env bash
# The device check (bench/device_check.py has the stages): on a bare GPU machine, after bench/device_wheels.sh
# here and with .whl carried there; `--cpu` here and in CI. Everything it prints is also in OUTDIR/device_check.log.
#   bench/device_check.sh OUTDIR [--cpu] [--budget SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/device_check.sh OUTDIR [--cpu] [--budget SECONDS]}
mkdir -p "$out"
python3 bench/device_check.py "$@" 2>&1 | tee "$out/device_check.log"
exit "${PIPESTATUS[0]}"
