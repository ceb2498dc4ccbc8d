"""Minimal DeepSpeed training with a VR optimizer named in the ds_config.

    deepspeed --num_gpus 2 examples/deepspeed_minimal.py \
        --deepspeed_config ds_configs/cpu_tiny_zero2_vrlamb.json --steps 20

(on CPU: export DS_ACCELERATOR=cpu). The ds_vrgd lines are ``import ds_vrgd``
(the optimizer comes from the config's "optimizer" block) and the closing
``ds_vrgd.shutdown()``.
A small MLP learns scikit-learn's digits; rank 0 prints one JSON line per
step with the loss and the GSNR statistics, and writes ``--summary`` at the end.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
from sklearn.datasets import load_digits

import ds_vrgd  # registers VRSGD ... VRLAMB as ds_config optimizer types


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", default=None, help="write the final JSON summary here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    deepspeed.init_distributed()
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    rank, world = engine.global_rank, engine.world_size
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    generator = torch.Generator().manual_seed(args.seed)
    dtype = next(engine.module.parameters()).dtype
    first_loss = last_loss = None
    for step in range(args.steps):
        batch = torch.randperm(len(y), generator=generator)[: micro * gas * world].view(gas, world, micro)
        for m in range(gas):
            index = batch[m, rank]
            loss = torch.nn.functional.cross_entropy(engine(x[index].to(dtype)).float(), y[index])
            engine.backward(loss)
            engine.step()
        first_loss = loss.item() if first_loss is None else first_loss
        last_loss = loss.item()
        stats = engine.vr_optimizer.gsnr_stats()
        if rank == 0:
            print(json.dumps({"step": step + 1, "loss": round(last_loss, 4), "n": stats["n"],
                              "gsnr_mean": stats.get("gsnr_mean"), "b_simple": stats.get("b_simple")}), flush=True)
    if rank == 0 and args.summary:
        summary = {"optimizer": type(engine.vr_optimizer).__name__, "zero_stage": engine.zero_optimization_stage(),
                   "world_size": world, "steps": args.steps, "first_loss": first_loss, "final_loss": last_loss,
                   "n": engine.vr_optimizer.gsnr_stats()["n"]}
        with open(args.summary, "w") as f:
            json.dump(summary, f)
    ds_vrgd.shutdown()  # destroys the process group; also frees DeepSpeed's shared memory on CPU


if __name__ == "__main__":
    main()
