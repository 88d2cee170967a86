#!/usr/bin/env bash
# The device check (bench/device_check.py has the stages and what OUTDIR receives): on a bare GPU machine, after
# bench/device_wheels.sh here and with .whl carried there; `--cpu` here and in CI.
#   bench/device_check.sh OUTDIR [--cpu] [--budget SECONDS] [--scratch DIR]     (--cpu may come first, too)
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/device_check.py "$@"
