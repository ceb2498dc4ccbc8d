"""Real BERT gradient samples for numerics tests and benchmarks/gsnr_numerics.py.

A randomly initialised ``BertForMaskedLM`` (tied word embeddings) on real
text: the first ``max_bytes`` of the embedded stdlib-docstring corpus, a
WordPiece tokenizer trained on it, packed sequences, 15% dynamic masking.
Nothing here is ds_vrgd's GSNR code: it only produces models and batches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ds_vrgd.pretrain import corpus as corpus_mod
from ds_vrgd.pretrain import data, models


@dataclass
class BertBatches:
    """Packed sequences [N, L] int64 and the masking spec of their tokenizer."""

    sequences: torch.Tensor
    spec: data.MaskingSpec
    vocab_size: int

    def micro_batch(self, index: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of ``size`` sequences (cycling), masked with a generator seeded by (seed, index)."""
        rows = torch.arange(index * size, (index + 1) * size) % self.sequences.shape[0]
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        input_ids, labels = data.mask_tokens(self.sequences[rows], self.spec, generator)
        return {"input_ids": input_ids, "labels": labels}


@functools.lru_cache(maxsize=4)
def bert_batches(seq_len: int = 64, vocab_size: int = 2000, max_bytes: int = 400_000) -> BertBatches:
    """Sequences of the embedded corpus, tokenized with a tokenizer trained on it (cached per process)."""
    documents = list(corpus_mod.open_corpus(max_bytes=max_bytes))
    tokenizer = data.train_tokenizer(documents, vocab_size, show_progress=False)
    rows = [row["input_ids"] for row in data.pack_sequences(documents, tokenizer, seq_len)]
    spec = data.masking_spec(tokenizer, data.default_max_predictions(seq_len))
    return BertBatches(torch.tensor(rows, dtype=torch.long), spec, len(tokenizer))


def bert_model(preset: str, batches: BertBatches, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``BertForMaskedLM`` preset without dropout (samples are then deterministic functions of the batch)."""
    model = models.build_bert_mlm(preset, batches.vocab_size, seed=seed, max_position_embeddings=128)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.to(dtype)


def mlm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the predicted positions (labels -100 elsewhere)."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def pretrain_steps(model, batches: BertBatches, steps: int, micro_batch: int = 8, lr: float = 1e-3) -> None:
    """``steps`` AdamW steps of plain training (torch.optim), to move away from the initialisation."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        mlm_loss(model, batches.micro_batch(10_000 + step, micro_batch)).backward()
        optimizer.step()
        optimizer.zero_grad()


def init_and_trained(batches: BertBatches, steps: int = 30, device: str = "cpu", train_batches=None) -> dict:
    """BERT-tiny's state dicts (fp32, on the CPU): 'init', and 'trained' after ``steps`` AdamW steps on ``device``
    (``train_batches``: the batches as that device needs them; default ``batches``)."""
    model = bert_model("tiny", batches)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    pretrain_steps(model.to(device), train_batches or batches, steps)
    return {"init": init, "trained": {k: v.cpu().clone() for k, v in model.state_dict().items()}}


def sample_grads(model, batches: BertBatches, n: int, micro_batch: int = 8, scale: float = 1.0) -> dict[str, list]:
    """name -> the gradients of micro-batches 0..n-1 (each in the parameter's dtype), one backward at a time.

    ``scale``: the loss is multiplied by it (a loss scale).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    samples: dict[str, list] = {name: [] for name, _ in named}
    for i in range(n):
        model.zero_grad(set_to_none=True)
        (mlm_loss(model, batches.micro_batch(i, micro_batch)) * scale).backward()
        for name, p in named:
            samples[name].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return samples
