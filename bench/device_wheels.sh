#!/usr/bin/env bash
# Download the wheels bench/device_check.sh installs on a bare GPU machine (Python 3.12, manylinux x86-64, no
# network there) into .whl/, ignored by git: pass `.whl` to the device tool's carry. Run here, where PyPI answers.
#   bench/device_wheels.sh          # then, there: bench/device_check.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' bench/device_wheels.txt | grep . | while read -r requirement; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$requirement"
done
ls .whl
du -sh .whl
