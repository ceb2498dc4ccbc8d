"""BERT pretraining data: corpus -> WordPiece tokenizer -> packed sequences -> MLM masks -> Arrow shards.

``python -m ds_vrgd.pretrain.data --output DIR`` (:func:`main`) or :func:`prepare_pretraining_data`
writes DIR/tokenizer/, DIR/train/, DIR/heldout/ and DIR/meta.json; :func:`load_pretraining_data` and
:class:`MLMCollator` read them back for training. The format and its choices (packing, split, masking,
reproducibility): docs/pretraining.md, "1. Data".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path

import torch

from ds_vrgd.pretrain.corpus import Corpus, open_corpus

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MLM_PROBABILITY = 0.15
SPLITS = ("train", "heldout")
FORMAT_VERSION = 1
_ENCODE_BATCH = 256  # documents per tokenizer call (the Rust tokenizer parallelises inside a call)


# --------------------------------------------------------------------------- masking


@dataclass(frozen=True)
class MaskingSpec:
    """What :func:`mask_tokens` needs to know about the tokenizer and the MLM objective.

    ``special_ids``: never masked nor drawn as random tokens; ``max_predictions``: cap on masked
    tokens per sequence; ``mlm_probability``: the fraction of tokens masked.
    """

    vocab_size: int
    mask_id: int
    pad_id: int
    special_ids: tuple[int, ...]
    max_predictions: int
    mlm_probability: float = MLM_PROBABILITY

    @classmethod
    def from_meta(cls, meta: dict) -> MaskingSpec:
        """The spec recorded in a data directory's meta.json (see :func:`read_meta`)."""
        return cls(**{**meta["masking_spec"], "special_ids": tuple(meta["masking_spec"]["special_ids"])})


def default_max_predictions(max_seq_len: int) -> int:
    """Default cap on masked tokens per sequence: ceil(0.15 * max_seq_len) (20 at 128, 77 at 512)."""
    return math.ceil(MLM_PROBABILITY * max_seq_len)


def mask_tokens(
    input_ids: torch.Tensor, spec: MaskingSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT MLM corruption of a batch.

    input_ids: integer tensor [B, L] (not modified). Returns ``(corrupted,
    labels)``, both int64 [B, L]: in each row exactly ``min(max_predictions,
    max(1, round(mlm_probability * n_tokens)))`` positions (n_tokens = non-[PAD]
    tokens, never more than the non-special ones) are chosen uniformly among
    the non-special tokens; ``labels`` holds their original ids and -100
    elsewhere; ``corrupted`` has 80% of them replaced by [MASK], 10% by a random
    non-special token, 10% unchanged. Deterministic given ``generator``'s state.
    """
    ids = input_ids.long()
    special = torch.isin(ids, torch.tensor(spec.special_ids))
    n_tokens = (ids != spec.pad_id).sum(1)
    n_predict = (n_tokens * spec.mlm_probability).round().long().clamp(1, spec.max_predictions)
    n_predict = torch.minimum(n_predict, (~special).sum(1))
    scores = torch.rand(ids.shape, generator=generator).masked_fill(special, 2.0)  # specials rank last
    chosen = scores.argsort(1).argsort(1) < n_predict.unsqueeze(1)
    action = torch.rand(ids.shape, generator=generator)
    random_ids = _random_non_special(ids.shape, spec, generator)
    corrupted = torch.where(chosen & (action < 0.8), spec.mask_id, ids)
    corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return corrupted, torch.where(chosen, ids, -100)


def _random_non_special(shape: torch.Size, spec: MaskingSpec, generator: torch.Generator) -> torch.Tensor:
    """Token ids uniform over the non-special ids, int64 ``shape``.

    Draws r in [0, #non-special) and maps it to the r-th non-special id by
    stepping over each special id in ascending order (no vocabulary-sized table).
    """
    specials = sorted(set(spec.special_ids))
    ids = torch.randint(spec.vocab_size - len(specials), shape, generator=generator)
    for special in specials:
        ids += ids >= special
    return ids


def _stable_hash(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that is the same in every process and Python run (unlike ``hash``)."""
    data = "\x1f".join(map(str, parts)).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def stable_seed(*key: object) -> int:
    """A seed in [0, 2**63) from ``key``, the same in every process and Python run."""
    return _stable_hash(*key) >> 1  # manual_seed takes < 2**63


def _row_generator(*key: object) -> torch.Generator:
    """A torch generator seeded from ``key`` (e.g. seed, split, copy, row index)."""
    return torch.Generator().manual_seed(stable_seed(*key))


class MLMCollator:
    """Examples -> ``{"input_ids", "labels"}`` int64 [B, L] for ``BertForMaskedLM``.

    Examples with ``labels`` (static masking, held-out) are stacked as they are;
    examples without are masked with :func:`mask_tokens` (dynamic masking). The
    generator is seeded from (seed, rank, DataLoader worker id, the key of
    :meth:`reseed`), so ranks and workers draw different masks; pass each
    data-parallel rank its ``rank``.
    """

    def __init__(self, spec: MaskingSpec, seed: int = 0, rank: int = 0):
        self.spec, self.seed, self.rank = spec, seed, rank
        self._key: tuple = ()
        self._worker_generator: tuple[int, torch.Generator] | None = None

    def reseed(self, *key: object) -> None:
        """Restart the dynamic masks from a state given by ``key`` (e.g. the training step).

        With in-process loading (``num_workers=0``) a run that reseeds before
        each step draws the same masks when it resumes from a checkpoint.
        """
        self._key, self._worker_generator = key, None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Collate a list of examples (dicts of [L] tensors or lists) into a batch."""
        input_ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples]).long()
        if "labels" in examples[0]:
            labels = torch.stack([torch.as_tensor(e["labels"]) for e in examples]).long()
            return {"input_ids": input_ids, "labels": labels}
        corrupted, labels = mask_tokens(input_ids, self.spec, self._generator())
        return {"input_ids": corrupted, "labels": labels}

    def _generator(self) -> torch.Generator:
        """This process's generator, created on first use in each DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if self._worker_generator is None or self._worker_generator[0] != worker:
            self._worker_generator = (worker, _row_generator(self.seed, "dynamic", self.rank, worker, *self._key))
        return self._worker_generator[1]


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: Iterable[str], vocab_size: int, show_progress: bool = True):
    """Train a lowercasing BERT WordPiece tokenizer on ``documents``; returns a ``BertTokenizerFast``.

    Special tokens get ids 0-4: [PAD] [UNK] [CLS] [SEP] [MASK]. The vocabulary
    can come out smaller than ``vocab_size`` on a small corpus.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece
    from transformers import BertTokenizerFast

    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress
    )
    tok.train_from_iterator(documents, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, model_max_length=512)


def load_tokenizer(path: str | Path):
    """A fast tokenizer from a local directory (no network), checked to have [CLS]/[SEP]/[MASK]/[PAD]-like tokens."""
    from transformers import AutoTokenizer

    if not Path(path, "tokenizer_config.json").is_file() and not Path(path, "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"--tokenizer {str(path)!r} is not a tokenizer directory (no tokenizer_config.json or tokenizer.json); "
            "pass a directory written by save_pretrained, e.g. DIR/tokenizer of an earlier run, or omit "
            "--tokenizer to train one"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = [n for n in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tokenizer, n) is None]
    if missing or not tokenizer.is_fast:
        problem = f"has no {', '.join(missing)}" if missing else "is not a fast (tokenizers-backed) tokenizer"
        raise ValueError(
            f"tokenizer {str(path)!r} {problem}; BERT pretraining needs a fast WordPiece-style tokenizer with "
            "[CLS] [SEP] [MASK] [PAD], or omit --tokenizer to train one"
        )
    return tokenizer


def masking_spec(tokenizer, max_predictions: int) -> MaskingSpec:
    """The :class:`MaskingSpec` of a transformers tokenizer."""
    return MaskingSpec(
        vocab_size=len(tokenizer),
        mask_id=tokenizer.mask_token_id,
        pad_id=tokenizer.pad_token_id,
        special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
        max_predictions=max_predictions,
    )


# --------------------------------------------------------------------------- packing


def is_heldout(text: str, heldout_fraction: float, seed: int) -> bool:
    """Whether a document belongs to the held-out split (seeded hash of its text < fraction)."""
    return _stable_hash(seed, "heldout", text) < heldout_fraction * 2**64


def split_documents(corpus: Iterable[str], split: str, heldout_fraction: float, seed: int) -> Iterator[str]:
    """The documents of ``corpus`` that belong to ``split`` ("train" or "heldout")."""
    want_heldout = split == "heldout"
    return (doc for doc in corpus if is_heldout(doc, heldout_fraction, seed) == want_heldout)


def pack_sequences(
    documents: Iterable[str], tokenizer, max_seq_len: int, stats: dict | None = None
) -> Iterator[dict[str, list[int]]]:
    """Tokenize and pack documents into ``{"input_ids": [CLS] + chunk + [SEP]}``, each exactly max_seq_len long.

    Documents are joined into one stream with [SEP] after each, and cut into
    chunks of ``max_seq_len - 2``; the final partial chunk is dropped.
    ``stats`` (optional) receives documents, tokens, sequences and dropped_tokens.
    """
    from tqdm.auto import tqdm

    cls_id, sep_id, body = tokenizer.cls_token_id, tokenizer.sep_token_id, max_seq_len - 2
    stats = {} if stats is None else stats
    stats.update(documents=0, tokens=0, sequences=0)
    stream: list[int] = []
    documents = iter(documents)
    with tqdm(desc="tokenize + pack", unit=" doc", mininterval=1.0) as bar:
        while batch := list(islice(documents, _ENCODE_BATCH)):
            for encoding in tokenizer.backend_tokenizer.encode_batch(batch, add_special_tokens=False):
                stream += encoding.ids
                stream.append(sep_id)
                stats["tokens"] += len(encoding.ids) + 1
            full = len(stream) - len(stream) % body
            for start in range(0, full, body):
                yield {"input_ids": [cls_id, *stream[start : start + body], sep_id]}
            stats["sequences"] += full // body
            stats["documents"] += len(batch)
            del stream[:full]
            bar.update(len(batch))
    stats["dropped_tokens"] = len(stream)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PrepareOptions:
    """Options of :func:`prepare_pretraining_data`; the CLI flags of the same names.

    ``tokenizer``: an existing tokenizer directory, or None to train a WordPiece
    vocabulary of ``vocab_size`` on the training documents.
    ``max_predictions``: None gives :func:`default_max_predictions`.
    ``num_proc``: processes for masking and saving.
    """

    tokenizer: str | None = None
    vocab_size: int = 8192
    max_seq_len: int = 128
    heldout_fraction: float = 0.02
    masking: str = "static"
    dupe_factor: int = 1
    max_predictions: int | None = None
    seed: int = 0
    num_proc: int = 1

    def check(self) -> None:
        """Raise ValueError naming every invalid option and its fix."""
        checks = [
            (self.max_seq_len >= 3, f"--max-seq-len {self.max_seq_len} leaves no room for text between [CLS] and "
             "[SEP]; use >= 3 (BERT: 128, then 512)"),
            (self.vocab_size >= 100, f"--vocab-size {self.vocab_size} is too small; use >= 100 (BERT: 30522)"),
            (0 <= self.heldout_fraction < 1, f"--heldout-fraction {self.heldout_fraction} must be in [0, 1)"),
            (self.masking in ("static", "dynamic"), f"--masking {self.masking!r} must be 'static' or 'dynamic'"),
            (self.dupe_factor >= 1 and (self.masking == "static" or self.dupe_factor == 1),
             f"--dupe-factor {self.dupe_factor} must be >= 1, and 1 with --masking dynamic (it remasks every batch)"),
            (self.max_predictions is None or self.max_predictions >= 1,
             f"--max-predictions {self.max_predictions} must be >= 1 (default ceil(0.15 * max_seq_len))"),
            (self.num_proc >= 1, f"--num-proc {self.num_proc} must be >= 1"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("invalid data preparation options:\n  " + "\n  ".join(problems))


def check_output(output: str | Path, overwrite: bool = False) -> None:
    """Raise ValueError naming the fix if ``output`` is a file, or a non-empty directory without ``overwrite``."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a file; pass a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(
            f"--output {str(output)!r} is not empty; pass --overwrite to replace its data or choose a new directory"
        )


# --------------------------------------------------------------------------- datasets


def _features(with_labels: bool):
    """Arrow schema of a split: int32 token ids (torch format turns them into int64)."""
    from datasets import Features, Sequence, Value

    columns = {"input_ids": Sequence(Value("int32"))}
    if with_labels:
        columns["labels"] = Sequence(Value("int32"))
    return Features(columns)


def _packed_dataset(corpus: Corpus, split: str, tokenizer, options: PrepareOptions, cache_dir: str, stats: dict):
    """The unmasked packed sequences of one split as a ``datasets.Dataset`` (Arrow files in ``cache_dir``).

    ``stats`` receives the counts of :func:`pack_sequences`. Raises ValueError
    naming the fix when the split gets no full sequence.
    """
    from datasets import Dataset

    if split == "heldout" and options.heldout_fraction == 0:
        stats.update(documents=0, tokens=0, sequences=0, dropped_tokens=0)
        return Dataset.from_dict({"input_ids": []}, features=_features(False))
    documents = split_documents(corpus, split, options.heldout_fraction, options.seed)
    gen_kwargs = {"documents": documents, "tokenizer": tokenizer, "max_seq_len": options.max_seq_len, "stats": stats}
    try:
        return Dataset.from_generator(
            pack_sequences,
            features=_features(False),
            gen_kwargs=gen_kwargs,
            cache_dir=cache_dir,
            fingerprint=f"{split}-{_stable_hash(cache_dir, split)}",  # a fresh cache dir: nothing to reuse
        )
    except ValueError:  # datasets refuses an empty generator ("corresponds to no data")
        if stats.get("sequences", 1):
            raise
        raise ValueError(
            f"the {split} split has no full sequence: {stats['tokens']} tokens from {stats['documents']} "
            f"documents < max_seq_len - 2 = {options.max_seq_len - 2}; add text or lower --max-seq-len"
            + (", or raise --heldout-fraction (0 disables the held-out split)" if split == "heldout" else "")
        ) from None


def _mask_rows(batch: dict, indices: list[int], spec: MaskingSpec, key: tuple) -> dict:
    """``datasets.map`` function: static masks for a batch, row i seeded by (*key, i)."""
    ids = torch.tensor(batch["input_ids"])
    rows = [mask_tokens(ids[j : j + 1], spec, _row_generator(*key, i)) for j, i in enumerate(indices)]
    return {"input_ids": torch.cat([r[0] for r in rows]).tolist(), "labels": torch.cat([r[1] for r in rows]).tolist()}


def _num_proc(rows: int, num_proc: int) -> int | None:
    """``num_proc`` for a ``datasets`` call: None (in-process) unless several processes get rows."""
    return num_proc if rows > num_proc > 1 else None


def _static_masked(dataset, spec: MaskingSpec, split: str, copies: int, seed: int, num_proc: int):
    """``copies`` statically masked versions of ``dataset``, concatenated (adds ``labels``)."""
    from datasets import concatenate_datasets

    masked = [
        dataset.map(
            _mask_rows,
            batched=True,
            with_indices=True,
            fn_kwargs={"spec": spec, "key": (seed, split, copy)},
            features=_features(True),
            num_proc=_num_proc(len(dataset), num_proc),
            desc=f"mask {split} (copy {copy + 1}/{copies})",
        )
        for copy in range(copies)
    ]
    return concatenate_datasets(masked)


# --------------------------------------------------------------------------- prepare


def prepare_pretraining_data(
    output: str | Path, corpus: Corpus, options: PrepareOptions = PrepareOptions(), overwrite: bool = False
) -> dict:
    """Write ``output``/{tokenizer,train,heldout,meta.json} from ``corpus`` (docs/pretraining.md, "1. Data").

    ``overwrite``: replace the data in a non-empty ``output``. Options and output are checked
    first, then the tokenizer is loaded or trained, the splits packed, masked and saved.
    Returns the meta.json content. ValueError/FileNotFoundError naming the fix for bad input.
    """
    options.check()
    check_output(output, overwrite)
    output = Path(output)
    if options.tokenizer is not None:
        tok = load_tokenizer(options.tokenizer)
    else:
        train_docs = split_documents(corpus, "train", options.heldout_fraction, options.seed)
        tok = train_tokenizer(train_docs, options.vocab_size)
    spec = masking_spec(tok, options.max_predictions or default_max_predictions(options.max_seq_len))
    output.mkdir(parents=True, exist_ok=True)
    cache_dir = tempfile.mkdtemp(prefix=".cache-", dir=output)
    try:
        stats = {split: {} for split in SPLITS}
        packed = {split: _packed_dataset(corpus, split, tok, options, cache_dir, stats[split]) for split in SPLITS}
        final = {"heldout": _static_masked(packed["heldout"], spec, "heldout", 1, options.seed, options.num_proc)}
        final["train"] = packed["train"] if options.masking == "dynamic" else _static_masked(
            packed["train"], spec, "train", options.dupe_factor, options.seed, options.num_proc
        )
        for name in (*SPLITS, "tokenizer", "meta.json"):
            _remove(output / name)
        tok.save_pretrained(output / "tokenizer")
        for split, dataset in final.items():
            dataset.save_to_disk(str(output / split), num_proc=_num_proc(len(dataset), options.num_proc))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "max_seq_len": options.max_seq_len,
        "vocab_size": spec.vocab_size,
        "masking": options.masking,
        "packing": "full-sentences: [CLS] + contiguous chunk of the [SEP]-joined document stream + [SEP]",
        "options": asdict(options),
        "masking_spec": asdict(spec),
        "counts": {split: {**stats[split], "rows": len(final[split])} for split in SPLITS},  # rows: with dupes
        "source": corpus.description,
    }
    (output / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _remove(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --------------------------------------------------------------------------- reading


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared data directory; FileNotFoundError naming the fix if there is none."""
    path = Path(data_dir, "meta.json")
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(data_dir)!r} is not a prepared pretraining data directory (no meta.json); create it with "
            f"`python -m ds_vrgd.pretrain.data --output {data_dir}`"
        )
    return json.loads(path.read_text())


def load_pretraining_data(data_dir: str | Path, split: str = "train"):
    """A split of a prepared data directory, memory-mapped, in torch format.

    Rows are ``{"input_ids": int64 [max_seq_len]}`` plus ``"labels"`` (int64
    [max_seq_len], -100 = not predicted) when statically masked; batch them
    with :class:`MLMCollator` (``MaskingSpec.from_meta(read_meta(data_dir))``).
    """
    from datasets import load_from_disk

    if split not in SPLITS:
        raise ValueError(f"split {split!r} does not exist; use one of {list(SPLITS)}")
    read_meta(data_dir)
    return load_from_disk(str(Path(data_dir, split))).with_format("torch")


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ds_vrgd.pretrain.data",
        description="Prepare BERT MLM pretraining data (tokenizer, packed masked sequences) without network access.",
    )
    p.add_argument("--output", required=True, help="directory to write tokenizer/, train/, heldout/, meta.json")
    src = p.add_argument_group("corpus (default: Python stdlib docstrings, no download)")
    src.add_argument("--corpus", nargs="+", action="extend", default=[], metavar="PATH_OR_GLOB", help="UTF-8 files")
    src.add_argument("--doc-per-line", action="store_true", help="one document per line (default: blank lines)")
    src.add_argument("--hf-dataset", metavar="NAME_OR_PATH", help="save_to_disk dir, data-file dir, or cached name")
    src.add_argument("--text-column", default="text", help="text column of --hf-dataset (default: text)")
    src.add_argument("--hf-split", default="train", help="split of --hf-dataset (default: train)")
    src.add_argument("--max-bytes", type=int, help="use only the first N bytes of the default corpus")
    p.add_argument("--tokenizer", metavar="DIR", help="existing tokenizer dir (default: train WordPiece)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--heldout-fraction", type=float, default=0.02)
    p.add_argument("--masking", choices=["static", "dynamic"], default="static")
    p.add_argument("--dupe-factor", type=int, default=1, help="masked copies of the train split (static masking)")
    p.add_argument("--max-predictions", type=int, help="cap on masked tokens per sequence (default ceil(0.15 * seq))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=int, default=1, help="processes for masking and saving")
    p.add_argument("--overwrite", action="store_true", help="replace the data in a non-empty --output")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``argv``: None for sys.argv): check the options, open the corpus, prepare, print a
    summary. Returns the exit code: 0, or 2 after printing ``error: ...`` for bad input."""
    args = vars(_parser().parse_args(argv))
    try:
        options = PrepareOptions(**{f.name: args[f.name] for f in fields(PrepareOptions)})
        options.check()  # before opening the corpus, which can take long for a large dataset
        check_output(args["output"], args["overwrite"])
        corpus = open_corpus(args["corpus"], args["hf_dataset"], args["text_column"], args["hf_split"],
                             args["doc_per_line"], args["max_bytes"])
        meta = prepare_pretraining_data(args["output"], corpus, options, args["overwrite"])
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(args["output"], meta))
    return 0


def summary(output: str | Path, meta: dict) -> str:
    """One line per split: rows, documents and tokens of a prepared directory (for the CLI)."""
    lines = [f"wrote {output}: seq {meta['max_seq_len']}, vocab {meta['vocab_size']}, {meta['masking']} masking"]
    for split, c in meta["counts"].items():
        lines.append(f"  {split}: {c['rows']} rows from {c['documents']} documents, {c['tokens']} tokens")
    return "\n".join(lines + [f"  details: {Path(output, 'meta.json')}"])


if __name__ == "__main__":
    sys.exit(main())
