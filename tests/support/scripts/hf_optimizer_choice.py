"""Optimizer choices given to ``ds_vrgd.hf.add_gsnr``, one Trainer each; prints {case: error message or "accepted"}.

Single process; DeepSpeed cases build Trainers with a ds_config dict (DeepSpeed
initialises a one-rank gloo group from MASTER_ADDR/PORT, RANK, WORLD_SIZE set
here). Cases without DeepSpeed run first: accelerate keeps one global state per
process, and a DeepSpeed Trainer switches it to DeepSpeed.
"""

import json
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

import ds_vrgd.hf
from ds_vrgd.optim import VRLAMB
from tests.support.ds_harness import make_model

DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "zero_optimization": {"stage": 2}}


def with_optimizer(type_name: str) -> dict:
    return dict(DS_CONFIG, optimizer={"type": type_name, "params": {"lr": "auto"}})


CASES = {  # name: (ds_config or None, Trainer keyword arguments built from the model)
    "vr_class": (None, lambda model: {"optimizer_cls_and_kwargs": (VRLAMB, {"lr": 0.1})}),
    "vr_object": (None, lambda model: {"optimizers": (VRLAMB(model.parameters()), None)}),
    "default_optimizer": (None, lambda model: {}),
    "torch_optimizer": (None, lambda model: {"optimizers": (torch.optim.AdamW(model.parameters()), None)}),
    "torch_optimizer_class": (None, lambda model: {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.1})}),
    "vr_object_and_config_optimizer": (with_optimizer("VRLAMB"),
                                       lambda model: {"optimizers": (VRLAMB(model.parameters()), None)}),
    "vr_class_and_config_optimizer": (with_optimizer("AdamW"),
                                      lambda model: {"optimizer_cls_and_kwargs": (VRLAMB, {"lr": 0.1})}),
    "config_names_non_vr": (with_optimizer("AdamW"), lambda model: {}),
    "vr_object_under_deepspeed": (DS_CONFIG, lambda model: {"optimizers": (VRLAMB(model.parameters()), None)}),
    "config_names_vr": (with_optimizer("vrlamb"), lambda model: {}),
    "vr_class_under_deepspeed": (DS_CONFIG, lambda model: {"optimizer_cls_and_kwargs": (VRLAMB, {"lr": 0.1})}),
}


def error_of(name: str, out_dir: str) -> str:
    """The message add_gsnr raises for case ``name``, or "accepted"."""
    ds_config, trainer_kwargs = CASES[name]
    model = make_model()
    args = TrainingArguments(output_dir=os.path.join(out_dir, name), report_to=[], use_cpu=True, deepspeed=ds_config)
    trainer = Trainer(model=model, args=args, **trainer_kwargs(model))
    try:
        ds_vrgd.hf.add_gsnr(trainer)
    except ValueError as error:
        return str(error)
    return "accepted"


if __name__ == "__main__":
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    print(json.dumps({name: error_of(name, sys.argv[1]) for name in CASES}))
