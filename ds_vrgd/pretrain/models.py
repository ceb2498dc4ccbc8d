"""BERT masked-LM models from size presets, randomly initialised (nothing is loaded from a hub).

:data:`PRESETS` (tiny, mini, small, medium, base, large), :func:`bert_config` and :func:`build_bert_mlm`
give a ``transformers.BertForMaskedLM``; :class:`MaskedPositionsMLM` wraps it to score only the
predicted positions. The presets and their sources: docs/pretraining.md, "2. Training" (Model).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of positions that are not predicted (transformers' convention)

PRESETS: dict[str, dict[str, int]] = {
    name: dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ff)
    for name, (layers, hidden, heads, ff) in {
        "tiny": (2, 128, 2, 512),
        "mini": (4, 256, 4, 1024),
        "small": (4, 512, 8, 2048),
        "medium": (8, 512, 8, 2048),
        "base": (12, 768, 12, 3072),
        "large": (24, 1024, 16, 4096),
    }.items()
}


def check_seq_len(max_seq_len: int, max_position_embeddings: int) -> None:
    """Raise ValueError if sequences of ``max_seq_len`` do not fit the position embeddings."""
    if max_seq_len > max_position_embeddings:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings {max_position_embeddings}; "
            f"prepare data with --max-seq-len <= {max_position_embeddings} (BERT: 128, then 512)"
        )


def bert_config(preset: str, vocab_size: int, max_position_embeddings: int = 512, max_seq_len: int | None = None):
    """The ``transformers.BertConfig`` of a preset.

    ``vocab_size``: the tokenizer's (``len(tokenizer)`` or meta.json
    ``vocab_size``). ``max_seq_len`` (optional) is checked against
    ``max_position_embeddings``. Raises ValueError for an unknown preset.
    """
    from transformers import BertConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown BERT preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size {vocab_size} must be >= 1; pass the tokenizer's len(tokenizer)")
    if max_seq_len is not None:
        check_seq_len(max_seq_len, max_position_embeddings)
    return BertConfig(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, **PRESETS[preset])


def build_bert_mlm(
    preset: str, vocab_size: int, seed: int = 0, max_position_embeddings: int = 512, max_seq_len: int | None = None
):
    """A randomly initialised ``transformers.BertForMaskedLM`` of ``preset``.

    ``vocab_size``, ``max_position_embeddings``, ``max_seq_len``: as :func:`bert_config` (ValueError
    likewise). The weights depend only on ``seed``; the global torch RNG is left untouched.
    """
    from transformers import BertForMaskedLM

    config = bert_config(preset, vocab_size, max_position_embeddings, max_seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForMaskedLM(config)


class MaskedPositionsMLM(torch.nn.Module):
    """A ``BertForMaskedLM`` (``mlm``) that computes logits only where a token is predicted.

    Holds the model's ``bert`` and ``cls`` modules under the same names, so its
    ``state_dict`` loads into ``BertForMaskedLM`` (and back) unchanged.
    """

    def __init__(self, mlm):
        super().__init__()
        self.config, self.bert, self.cls = mlm.config, mlm.bert, mlm.cls

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, labels: int64 [B, L] (labels -100 = not predicted) -> (logits [M, V], targets [M]).

        M = number of predicted positions in the batch.
        """
        hidden = self.bert(input_ids=input_ids).last_hidden_state  # [B, L, H]
        predicted = labels != IGNORE_INDEX
        return self.cls(hidden[predicted]), labels[predicted]
