"""HF Trainer on a tiny random BERT with a DeepSpeed config naming VRLAMB ("auto" values).

Run under `deepspeed` (config passed as TrainingArguments(deepspeed=...), --via-args)
or under `accelerate launch --use_deepspeed --deepspeed_config_file ...` (any ZeRO stage;
at stage 3 the model is built inside deepspeed.zero.Init).
``ds_vrgd.hf.add_gsnr`` puts the GSNR statistics into the Trainer's logs.
Rank 0 writes a JSON result to argv[1].
"""

import json
import os
import sys

import torch
from transformers import AutoModelForMaskedLM, BertConfig, Trainer, TrainingArguments

import ds_vrgd.hf  # imports ds_vrgd: the VR types are registered with DeepSpeed
from tests.support import REPO

CONFIG = str(REPO / "ds_configs" / "hf_auto_zero2_vrlamb.json")


class RandomMLM(torch.utils.data.Dataset):
    def __len__(self):
        return 128

    def __getitem__(self, i):
        ids = torch.randint(5, 100, (16,), generator=torch.Generator().manual_seed(i % 8))
        labels = ids.clone()
        labels[::3] = -100
        return {"input_ids": ids, "labels": labels}


def main(out: str, via_args: bool) -> None:
    args = TrainingArguments(output_dir=os.path.join(os.path.dirname(out), "trainer"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=8, learning_rate=2e-3, weight_decay=0.01,
                             adam_beta2=0.98, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             deepspeed=CONFIG if via_args else None)
    # after TrainingArguments, as users do: under a ZeRO-3 config from_config builds the model inside
    # deepspeed.zero.Init, so its parameters are partitioned from the start
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=64))
    trainer = Trainer(model=model, args=args, train_dataset=RandomMLM())
    ds_vrgd.hf.add_gsnr(trainer)
    trainer.train()
    optimizer = trainer.deepspeed.vr_optimizer
    logged = [log for log in trainer.state.log_history if "loss" in log]
    if trainer.args.process_index == 0:
        group = optimizer.param_groups[0]
        with open(out, "w") as f:
            json.dump({"optimizer": type(optimizer).__name__, "n": optimizer.gsnr_stats()["n"],
                       "betas": list(group["betas"]), "weight_decay": group["weight_decay"],
                       "world_size": trainer.args.world_size, "losses": [log["loss"] for log in logged],
                       "gsnr_logs": [{key: log.get(key) for key in ds_vrgd.gsnr.LOG_FIELDS} for log in logged],
                       "last_gsnr_mean": optimizer.gsnr_stats()["gsnr_mean"]}, f)


if __name__ == "__main__":
    positional = [a for a in sys.argv[1:] if not a.startswith("--")]  # the deepspeed launcher adds --local_rank
    main(positional[0], "--via-args" in sys.argv)
