"""Plumbing the scripts share: loading models and data, flag checks, logging, checkpoints, padding and FSDP
details. A reader of the algorithms can skip this folder; `common.py` holds what the training loops compute with."""
