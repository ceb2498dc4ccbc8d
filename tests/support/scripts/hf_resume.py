"""HF Trainer ``resume_from_checkpoint`` under ``accelerate launch --use_deepspeed`` with a VR optimizer.

    accelerate launch --use_deepspeed --deepspeed_config_file CONFIG ... hf_resume.py OUT_DIR first
    accelerate launch --use_deepspeed --deepspeed_config_file CONFIG ... hf_resume.py OUT_DIR resume

``first`` trains STEPS steps uninterrupted (no checkpoints), then, in the same processes, a second
run of the same STEPS-step schedule that saves a checkpoint every SAVE_STEPS steps and is stopped
right after the one at STOP (as a kill would: the linear lr schedule stays that of STEPS steps).
``resume``, in fresh processes, resumes that run from OUT_DIR/interrupted/checkpoint-STOP with
``trainer.train(resume_from_checkpoint=...)`` to STEPS. Every rank writes ``{run}_rank{R}.pt``
(run: full, interrupted, resumed): the gathered weights, the VR optimizer's fp32 partitions and
per-element state, the lr scheduler's state, the global step, DeepSpeed's step counters, the
GSNR statistics, the log history and the input ids of every micro-batch it trained on.

Deterministic: a fixed data set (labels fixed, no collator masking), dropout off, Trainer's
seedable sampler; 6 steps per epoch, so the resumed run skips 8 micro-batches of epoch 0 and
crosses into epoch 1.
"""

import os
import sys

import torch
from transformers import AutoModelForMaskedLM, BertConfig, Trainer, TrainerCallback, TrainingArguments

import ds_vrgd.hf  # imports ds_vrgd: the VR types are registered with DeepSpeed

STEPS, SAVE_STEPS, STOP = 8, 2, 4
MICRO_BATCH, ACCUMULATION, SIZE, SEQ = 4, 2, 96, 16


class FixedMLM(torch.utils.data.Dataset):
    """SIZE distinct examples, each fixed by its index (the labels too: no masking randomness)."""

    def __len__(self):
        return SIZE

    def __getitem__(self, i):
        ids = torch.randint(5, 100, (SEQ,), generator=torch.Generator().manual_seed(1000 + i))
        labels = ids.clone()
        labels[::3] = -100
        return {"input_ids": ids, "labels": labels}


class StopAt(TrainerCallback):
    """Stop training at the end of step ``step`` (after its checkpoint): the interruption."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def build(out_dir: str, run: str, save: bool) -> tuple[Trainer, list]:
    """A Trainer of STEPS steps (checkpoints every SAVE_STEPS into OUT/run if ``save``) and the list its
    model appends every micro-batch's input ids to."""
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, run), per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATION, max_steps=STEPS, learning_rate=2e-3, weight_decay=0.01,
        adam_beta2=0.98, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, report_to=[],
        save_strategy="steps" if save else "no", save_steps=SAVE_STEPS, seed=0, use_cpu=True, disable_tqdm=True,
    )
    # after TrainingArguments: under a ZeRO-3 config from_config builds the model inside deepspeed.zero.Init
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    seen: list = []
    model.bert.embeddings.word_embeddings.register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].tolist()))
    trainer = Trainer(model=model, args=args, train_dataset=FixedMLM())
    ds_vrgd.hf.add_gsnr(trainer)
    return trainer, seen


def result(trainer: Trainer, seen: list) -> dict:
    """What the test compares, on this rank."""
    import deepspeed  # here: the test module imports this one's constants
    engine = trainer.deepspeed
    optimizer = engine.vr_optimizer
    parameters = list(trainer.model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in parameters]):  # no-op below ZeRO-3
        weights = {name: p.detach().clone() for name, p in parameters}
    return {
        "weights": weights,
        "partitions": [p.detach().clone() for p in optimizer.state],  # the fp32 master partitions
        "state": [{key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
                  for state in optimizer.state.values()],
        "group_lrs": [group["lr"] for group in optimizer.param_groups],
        "scheduler": {key: trainer.lr_scheduler.state_dict()[key] for key in ("last_epoch", "_step_count", "_last_lr")},
        "global_step": trainer.state.global_step,
        "engine_steps": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                         "skipped_steps": engine.skipped_steps},
        "gsnr_stats": optimizer.gsnr_stats(),
        "log_history": trainer.state.log_history,
        "seen": seen,
        "world_size": trainer.args.world_size,
    }


def main(out_dir: str, phase: str) -> None:
    rank = int(os.environ.get("RANK", "0"))

    def save(run: str, trainer: Trainer, seen: list) -> None:
        torch.save(result(trainer, seen), os.path.join(out_dir, f"{run}_rank{rank}.pt"))

    if phase == "first":
        trainer, seen = build(out_dir, "full", save=False)
        trainer.train()
        save("full", trainer, seen)
        trainer, seen = build(out_dir, "interrupted", save=True)
        trainer.add_callback(StopAt(STOP))
        trainer.train()
        save("interrupted", trainer, seen)
    elif phase == "resume":
        trainer, seen = build(out_dir, "interrupted", save=True)
        trainer.train(resume_from_checkpoint=os.path.join(out_dir, "interrupted", f"checkpoint-{STOP}"))
        save("resumed", trainer, seen)
    else:
        raise SystemExit(f"unknown phase {phase!r}: first or resume")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
