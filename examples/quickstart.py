"""Plain-PyTorch quick start: a VR optimizer in an unchanged training loop.

Trains a small MLP on scikit-learn's digits (ships with the package, no
download) at a large batch: each step takes ``--micro-batches`` backward
passes, which are the GSNR samples. Prints the held-out accuracy of the VR
optimizer and of its base optimizer (``vr=False``) side by side, and the GSNR
statistics of the last step.

    python examples/quickstart.py --optimizer VRLAMB --steps 60
"""

from __future__ import annotations

import argparse
import json

import torch
from sklearn.datasets import load_digits

from ds_vrgd.optim import VR_OPTIMIZERS

DEFAULT_LR = {"VRSGD": 0.2, "VRAdam": 3e-3, "VRAdamW": 3e-3, "VRLARS": 2.0, "VRLAMB": 1e-2}


def digits(seed: int):
    """Digits split 1,500 train / 297 held out, standardised, as tensors."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def train(name: str, vr: bool, args) -> dict:
    torch.manual_seed(args.seed)
    (x, y), (x_test, y_test) = digits(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = VR_OPTIMIZERS[name](model.parameters(), lr=args.lr or DEFAULT_LR[name], gamma=args.gamma, vr=vr)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        batch = torch.randperm(len(y), generator=generator)[: args.batch_size]
        for micro in batch.chunk(args.micro_batches):
            loss = torch.nn.functional.cross_entropy(model(x[micro]), y[micro]) / args.micro_batches
            loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        train_loss = torch.nn.functional.cross_entropy(model(x), y).item()
    stats = opt.gsnr_stats(micro_batch_size=args.batch_size // args.micro_batches)
    return {"optimizer": name if vr else f"{name}(vr=False)", "train_loss": round(train_loss, 4),
            "test_accuracy": round(accuracy, 4), "n": stats.get("n"), "b_simple": stats.get("b_simple")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=sorted(VR_OPTIMIZERS), default="VRLAMB")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--micro-batches", type=int, default=8, help="backward passes (GSNR samples) per step")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.micro_batches < 1 or args.batch_size % args.micro_batches:
        parser.error(f"--batch-size {args.batch_size} must be a positive multiple of --micro-batches")
    for vr in (False, True):
        print(json.dumps(train(args.optimizer, vr, args)))


if __name__ == "__main__":
    main()
