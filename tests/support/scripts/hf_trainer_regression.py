"""HF Trainer with VRLAMB through ``ds_vrgd.hf.add_gsnr`` on a tiny regression, no DeepSpeed.

Run single-process (``main(out_dir)`` in-process, or ``python``) or on torch
DDP under ``accelerate launch --multi_gpu --num_processes 2`` (CPU: gloo).
The model records the example indices of every micro-batch it trains on, so a
test can redo the run single-process from the same micro-batches
(:func:`reference`). Every rank writes ``rank{R}.pt`` into ``out_dir`` (argv[1]):
its index batches, world size, the wrapper type and the optimizer's n; rank 0
also the final parameters and the Trainer's log history.
"""

import os
import sys

import torch
from transformers import Trainer, TrainingArguments

import ds_vrgd.hf
from ds_vrgd.optim import VRLAMB
from tests.support.ds_harness import loss_of, make_model

SIZE = 96
MICRO_BATCH, ACCUMULATION, STEPS, MAX_GRAD_NORM = 4, 2, 3, 0.05
OPTIMIZER_PARAMS = {"lr": 0.01, "gamma": 0.5}


def example(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Example i: x [7], y [1], fixed by i."""
    generator = torch.Generator().manual_seed(i)
    return torch.randn(7, generator=generator), torch.randn(1, generator=generator)


class Examples(torch.utils.data.Dataset):
    def __len__(self):
        return SIZE

    def __getitem__(self, i):
        x, y = example(i)
        return {"x": x, "y": y, "index": torch.tensor(i)}


class Regression(torch.nn.Module):
    """tests.support.ds_harness's MLP with an MSE loss; records the indices of every micro-batch."""

    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.seen: list[list[int]] = []

    def forward(self, x, y, index):
        self.seen.append(index.tolist())
        return {"loss": loss_of(self.net, x, y)}


def main(out_dir: str) -> None:
    model = Regression()
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=MICRO_BATCH,
                             gradient_accumulation_steps=ACCUMULATION, max_steps=STEPS, lr_scheduler_type="constant",
                             max_grad_norm=MAX_GRAD_NORM, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    optimizer = VRLAMB(model.parameters(), **OPTIMIZER_PARAMS)
    trainer = Trainer(model=model, args=args, train_dataset=Examples(), optimizers=(optimizer, None))
    ds_vrgd.hf.add_gsnr(trainer)
    trainer.train()
    result = {"seen": model.seen, "world_size": args.world_size, "wrapped": type(trainer.model_wrapped).__name__,
              "n": optimizer.gsnr_stats()["n"]}
    if args.process_index == 0:
        result.update(params={k: v.detach().clone() for k, v in model.net.state_dict().items()},
                      log_history=trainer.state.log_history)
    torch.save(result, os.path.join(out_dir, f"rank{args.process_index}.pt"))


def reference(seen_per_rank: list[list[list[int]]]) -> dict:
    """The run redone single-process from the same micro-batches: Trainer's loss / (ranks x accumulation),
    clipping to MAX_GRAD_NORM, then the plain VR optimizer's step; returns params and GSNR statistics."""
    model = make_model()
    optimizer = VRLAMB(model.parameters(), **OPTIMIZER_PARAMS)
    samples = len(seen_per_rank) * ACCUMULATION
    for step in range(STEPS):
        for seen in seen_per_rank:
            for indices in seen[step * ACCUMULATION:(step + 1) * ACCUMULATION]:
                x, y = (torch.stack(part) for part in zip(*map(example, indices)))
                (loss_of(model, x, y) / samples).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
    return {"params": model.state_dict(), "stats": optimizer.gsnr_stats(MICRO_BATCH)}


if __name__ == "__main__":
    main(sys.argv[1])
