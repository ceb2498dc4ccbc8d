"""Multi-process runs (DDP, DeepSpeed ZeRO 0-3 and offload, tensor and pipeline parallelism, checkpointing
patterns) equal one process fed the same micro-batch gradients. Add a test here when it spawns ranks and
compares with a single-process reference (support/ds_harness.py, support/launching.py)."""
