"""BERT masked-LM pretraining with Hugging Face Trainer and a VR optimizer, with or without DeepSpeed.

A local text file (documents separated by blank lines; default: a sample of
the Python stdlib docstrings written to OUTPUT/corpus.txt), a WordPiece
tokenizer trained on it locally, a randomly initialised tiny BERT,
``DataCollatorForLanguageModeling``, and ``ds_vrgd.hf.add_gsnr(trainer)``,
which puts gsnr_mean, gsnr_frac_low/high, gsnr_n and b_simple in the logs.

    # DeepSpeed: the ds_config names VRLAMB ("auto" values filled by Trainer)
    accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/hf_auto_zero2_vrlamb.json \\
        --num_processes 2 examples/hf_trainer_mlm.py
    deepspeed --num_gpus 2 examples/hf_trainer_mlm.py --deepspeed ds_configs/hf_auto_zero2_vrlamb.json
    # torch DDP (no DeepSpeed; --multi_gpu runs on CPU too, with gloo): the optimizer from --optimizer
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer_mlm.py --optimizer VRLAMB

``bash launch/hf_trainer_mlm.sh MODE`` runs these (and ``single``). The main
process prints the final metrics as one JSON line and writes them to
OUTPUT/metrics.json. An existing OUTPUT/tokenizer is reused. Multi-node
without a shared OUTPUT: pass ``--tokenizer`` (a directory present on every
node) and ``--text-file``.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from accelerate.utils import parse_flag_from_env
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import ds_vrgd.hf  # imports ds_vrgd, which registers the VR types with DeepSpeed
from ds_vrgd.optim import VR_OPTIMIZERS
from ds_vrgd.pretrain.corpus import stdlib_docstrings, text_file_documents
from ds_vrgd.pretrain.data import load_tokenizer, pack_sequences, split_documents, train_tokenizer
from ds_vrgd.pretrain.models import build_bert_mlm

HELDOUT_FRACTION = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-file", help="UTF-8 text, documents separated by blank lines (default: stdlib sample)")
    parser.add_argument("--max-bytes", type=int, default=300_000, help="size of the default stdlib sample")
    parser.add_argument("--output-dir", default="runs/hf_trainer_mlm")
    parser.add_argument("--tokenizer", help="an existing tokenizer directory (default: train one into OUTPUT)")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--deepspeed", help="a ds_config naming the optimizer (or use accelerate --use_deepspeed)")
    parser.add_argument("--optimizer", choices=VR_OPTIMIZERS,
                        help="the VR optimizer without DeepSpeed (default VRLAMB); with DeepSpeed the ds_config names it")
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--per-device-batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fills the ds_config's \"auto\")")
    parser.add_argument("--report-to", default="none", help="tensorboard, wandb, ... (Trainer's report_to)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # added by `deepspeed`
    return parser.parse_args(argv)


def corpus_file(cli: argparse.Namespace) -> str:
    """The text file to train on: --text-file, or the stdlib sample written once into OUTPUT."""
    if cli.text_file:
        return cli.text_file
    path = os.path.join(cli.output_dir, "corpus.txt")
    if not os.path.exists(path):
        os.makedirs(cli.output_dir, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n\n".join(stdlib_docstrings(max_bytes=cli.max_bytes)) + "\n")
        os.replace(path + ".tmp", path)
    return path


def tokenizer_for(cli: argparse.Namespace, text_file: str):
    """--tokenizer, or a WordPiece tokenizer trained on the training documents and saved into OUTPUT."""
    path = cli.tokenizer or os.path.join(cli.output_dir, "tokenizer")
    if not cli.tokenizer and not os.path.exists(path):
        documents = split_documents(text_file_documents([text_file]), "train", HELDOUT_FRACTION, cli.seed)
        train_tokenizer(documents, cli.vocab_size, show_progress=False).save_pretrained(path)
    return load_tokenizer(path)


def packed_split(text_file: str, split: str, tokenizer, cli: argparse.Namespace) -> Dataset:
    """One split of the text file as packed [CLS] ... [SEP] sequences of --max-seq-len tokens."""
    documents = split_documents(text_file_documents([text_file]), split, HELDOUT_FRACTION, cli.seed)
    return Dataset.from_list(list(pack_sequences(documents, tokenizer, cli.max_seq_len)))


def check_heldout_size(rows: int, args: TrainingArguments) -> None:
    """Raise ValueError if the held-out split cannot fill one evaluation batch (partial batches are dropped)."""
    needed = args.per_device_eval_batch_size * args.world_size
    if rows < needed:
        raise ValueError(f"the held-out split has {rows} sequences, fewer than one evaluation batch ({needed} = "
                         f"per-device batch x {args.world_size} processes); give more text (--text-file, "
                         "--max-bytes) or a smaller --per-device-batch-size")


def build_trainer(cli: argparse.Namespace) -> Trainer:
    """Data, tokenizer, model, Trainer; GSNR through ds_vrgd.hf.add_gsnr."""
    args = TrainingArguments(
        output_dir=cli.output_dir, per_device_train_batch_size=cli.per_device_batch_size,
        per_device_eval_batch_size=cli.per_device_batch_size, gradient_accumulation_steps=cli.grad_accum,
        max_steps=cli.max_steps, learning_rate=cli.lr, weight_decay=cli.weight_decay, warmup_steps=0,
        bf16=cli.bf16, logging_steps=1, save_strategy="no", report_to=cli.report_to, seed=cli.seed,
        deepspeed=cli.deepspeed, dataloader_drop_last=True, disable_tqdm=True,
        use_cpu=not torch.accelerator.is_available(),  # else Trainer on CPU ignores the launcher's other ranks
    )
    with args.main_process_first(local=False, desc="corpus and tokenizer"):
        text_file = corpus_file(cli)
        tokenizer = tokenizer_for(cli, text_file)
    train, heldout = (packed_split(text_file, split, tokenizer, cli) for split in ("train", "heldout"))
    check_heldout_size(len(heldout), args)
    model = build_bert_mlm("tiny", len(tokenizer), seed=cli.seed, max_seq_len=cli.max_seq_len)
    model.accepts_loss_kwargs = False  # its loss is a plain mean: Trainer divides it by the accumulation steps
    deepspeed = cli.deepspeed is not None or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    name = cli.optimizer or (None if deepspeed else "VRLAMB")
    trainer = Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=heldout, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        optimizer_cls_and_kwargs=(VR_OPTIMIZERS[name], {"lr": cli.lr, "gamma": cli.gamma}) if name else None,
    )
    ds_vrgd.hf.add_gsnr(trainer)
    return trainer


def final_metrics(trainer: Trainer, train_loss: float, eval_loss: float) -> dict:
    """Losses, the optimizer actually used, its sample count n and the last logged GSNR statistics."""
    optimizer = ds_vrgd.hf.find_vr_optimizer(trainer.optimizer, trainer.model_wrapped)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "optimizer": type(optimizer).__name__, "deepspeed": trainer.is_deepspeed_enabled,
        "world_size": trainer.args.world_size, "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "n": optimizer.gsnr_stats()["n"], "steps": trainer.state.global_step,
        "losses": [entry["loss"] for entry in logged], "train_loss": train_loss,
        "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss),
        **{key: logged[-1].get(key) for key in ds_vrgd.gsnr.LOG_FIELDS},
    }


def main(argv=None) -> dict:
    cli = parse_args(argv)
    trainer = build_trainer(cli)
    train_loss = trainer.train().training_loss
    eval_loss = trainer.evaluate()["eval_loss"]
    metrics = final_metrics(trainer, train_loss, eval_loss)
    if trainer.is_world_process_zero():
        print(json.dumps(metrics))
        with open(os.path.join(cli.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    trainer.accelerator.end_training()  # destroys the process group: a clean exit for gloo
    ds_vrgd.shutdown()  # under the deepspeed launcher, frees DeepSpeed's shared memory on CPU
    return metrics


if __name__ == "__main__":
    main()
