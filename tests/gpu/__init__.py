"""The same numbers on a CUDA GPU: the optimizer math on CUDA (foreach kernels on and off, fp32, bf16, fp16) and
rho on a real BERT against float64, DeepSpeed ZeRO-2/3 and ZeRO-Offload on one GPU with NCCL against the
single-process reference, and the VR step time next to fused AdamW and FusedLamb. Add a test here when it needs
CUDA: mark the module with cuda.MARKS (``gpu``; skipped without CUDA). Run them with bash launch/gpu_check.sh."""
