"""ds_vrgd.pretrain corpus, data preparation, masking and model presets (fast, offline)."""

from __future__ import annotations

import json
import random

import pytest
import torch

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from ds_vrgd.pretrain import data  # noqa: E402
from ds_vrgd.pretrain.corpus import open_corpus, stdlib_docstrings, text_file_documents  # noqa: E402
from ds_vrgd.pretrain.data import MaskingSpec, MLMCollator, load_pretraining_data, mask_tokens, read_meta  # noqa: E402
from ds_vrgd.pretrain.models import PRESETS, bert_config, build_bert_mlm  # noqa: E402

SEQ = 64
WORDS = [a + b for a in ("al", "be", "ko", "ra", "ti", "mu", "sen", "dor") for b in ("pa", "na", "lix", "me", "su")]


def write_corpus(path, n_docs=240, seed=0):
    """Blank-line separated synthetic documents, each starting with a unique marker word."""
    rng = random.Random(seed)
    docs = [f"doc{i} " + " ".join(rng.choices(WORDS, k=rng.randint(20, 60))) + "." for i in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return docs


def prepare(out, corpus, **kw):
    kw = {"vocab_size": 300, "max_seq_len": SEQ, "heldout_fraction": 0.1, **kw}
    return data.prepare_pretraining_data(out, corpus, data.PrepareOptions(**kw))


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory):
    """Static-masked data from a slice of the default (stdlib docstring) corpus."""
    out = tmp_path_factory.mktemp("static") / "data"
    prepare(out, open_corpus(max_bytes=120_000), vocab_size=1000)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(corpus file, its documents, dynamic-masked data dir)."""
    root = tmp_path_factory.mktemp("synthetic")
    docs = write_corpus(root / "corpus.txt")
    out = root / "data"
    prepare(out, open_corpus([str(root / "corpus.txt")]), masking="dynamic", seed=1)
    return root / "corpus.txt", docs, out


def spec_for(vocab=1000, max_predictions=20):
    return MaskingSpec(vocab, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4), max_predictions=max_predictions)


# --------------------------------------------------------------------------- corpus


def test_default_corpus_slice_is_deterministic_and_bounded():
    docs = list(stdlib_docstrings(max_bytes=40_000))
    assert docs == list(stdlib_docstrings(max_bytes=40_000))
    assert sum(len(d.encode()) for d in docs) <= 40_000 and all(d.strip() for d in docs)
    assert docs[0].startswith("Abstract Base Classes")  # abc: the first public module


def test_text_file_documents_blank_lines_and_per_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nline two\n\n\n  second doc  \n\nthird\n")
    assert list(text_file_documents([path])) == ["first doc\nline two", "second doc", "third"]
    assert list(text_file_documents([path], doc_per_line=True)) == ["first doc", "line two", "second doc", "third"]


def test_globs_are_sorted_and_deduplicated(tmp_path):
    for name in ("b.txt", "a.txt"):
        (tmp_path / name).write_text(f"text of {name}\n")
    corpus = open_corpus([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    assert list(corpus) == ["text of a.txt", "text of b.txt"]
    assert "a.txt" in corpus.description and "b.txt" in corpus.description


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda d: str(d / "missing.txt"), FileNotFoundError, "does not exist; fix the path"),
        (lambda d: str(d / "*.nothing"), FileNotFoundError, "matches no files"),
        (lambda d: str(d), ValueError, "is a directory; pass the files in it as a glob"),
        (lambda d: _write(d / "bin.txt", b"\x89PNG\x00\x01"), ValueError, "is not UTF-8 text"),
        (lambda d: _write(d / "latin.txt", "caf\xe9".encode("latin-1")), ValueError, "convert it"),
        (lambda d: _write(d / "blank.txt", b"\n \n\n"), ValueError, "the corpus is empty"),
    ],
)
def test_corpus_file_errors_name_path_and_fix(tmp_path, make, error, message):
    pattern = make(tmp_path)
    with pytest.raises(error, match=message) as info:
        open_corpus([pattern])
    assert str(tmp_path) in str(info.value)


def _write(path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def test_hf_dataset_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ds = datasets.Dataset.from_dict({"text": ["hello world", "", "second"], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.jsonl").write_text('{"body": "from json"}\n')
    assert list(open_corpus(hf_dataset=str(tmp_path / "ds"))) == ["hello world", "second"]
    assert list(open_corpus(hf_dataset=str(tmp_path / "dd"), hf_split="validation")) == ["second"]
    assert list(open_corpus(hf_dataset=str(tmp_path / "files"), text_column="body")) == ["from json"]
    with pytest.raises(ValueError, match=r"no column 'body'; pass --text-column with one of \['text', 'n'\]"):
        open_corpus(hf_dataset=str(tmp_path / "ds"), text_column="body")
    with pytest.raises(ValueError, match="column 'n' .* not text; pass --text-column"):
        open_corpus(hf_dataset=str(tmp_path / "ds"), text_column="n")
    with pytest.raises(ValueError, match=r"no split 'test'; pass --hf-split with one of \['train', 'validation'\]"):
        open_corpus(hf_dataset=str(tmp_path / "dd"), hf_split="test")
    with pytest.raises(ValueError, match="nor in the local Hugging Face cache .* downloads are disabled.*save_to_disk"):
        open_corpus(hf_dataset="surely-not-a-cached-dataset-ds-vrgd")


# --------------------------------------------------------------------------- masking


def test_mask_tokens_rates_and_never_specials():
    spec = spec_for(vocab=5000)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 5000, (2000, 128), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[:, 50], ids[:, 70] = 1, 3  # [UNK] and a document separator inside the sequence
    corrupted, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert (chosen.sum(1) == round(0.15 * 128)).all()  # exactly 19 per full sequence
    assert not chosen[:, [0, 50, 70, 127]].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(corrupted[~chosen], ids[~chosen])
    n = chosen.sum().item()
    to_mask = (corrupted[chosen] == 4).sum().item() / n
    kept = (corrupted[chosen] == ids[chosen]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(1 - to_mask - kept - 0.1) < 0.01
    assert not torch.isin(corrupted[chosen & (corrupted != 4)], torch.tensor(spec.special_ids)).any()
    positions = chosen[:, 1:50].float().mean()  # positions are uniform over the non-special tokens
    assert abs(positions - 19 / 124) < 0.01


def test_random_replacements_are_uniform_over_non_special_ids():
    spec = MaskingSpec(12, mask_id=5, pad_id=0, special_ids=(11, 0, 5, 2), max_predictions=3)
    counts = torch.bincount(data._random_non_special((80_000,), spec, torch.Generator().manual_seed(0)), minlength=12)
    assert counts[[0, 2, 5, 11]].sum() == 0
    assert (counts[[1, 3, 4, 6, 7, 8, 9, 10]] - 10_000).abs().max() < 500


def test_mask_tokens_cap_padding_and_determinism():
    ids = torch.randint(5, 1000, (4, 40))
    ids[1, 20:] = 0  # padded row: 20 tokens -> round(3.0) = 3 predictions
    out1 = mask_tokens(ids, spec_for(max_predictions=5), torch.Generator().manual_seed(7))
    assert (out1[1] != -100).sum(1).tolist() == [5, 3, 5, 5]  # round(0.15 * 40) = 6, capped at 5
    out2 = mask_tokens(ids, spec_for(max_predictions=5), torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))


def test_static_masks_do_not_depend_on_batching():
    spec, ids = spec_for(), torch.randint(5, 1000, (6, SEQ)).tolist()
    key = (0, "train", 0)
    whole = data._mask_rows({"input_ids": ids}, [*range(6)], spec, key)
    parts = [data._mask_rows({"input_ids": ids[a:b]}, [*range(a, b)], spec, key) for a, b in ((0, 4), (4, 6))]
    assert whole["labels"] == parts[0]["labels"] + parts[1]["labels"]


# --------------------------------------------------------------------------- prepared data


def test_static_data_layout(static_dir):
    meta = read_meta(static_dir)
    assert meta["masking"] == "static" and meta["max_seq_len"] == SEQ and meta["vocab_size"] == 1000
    assert meta["masking_spec"]["max_predictions"] == 10  # ceil(0.15 * 64)
    assert "stdlib docstrings, first 120000 bytes" in meta["source"]
    for split in ("train", "heldout"):
        ds = load_pretraining_data(static_dir, split)
        assert meta["counts"][split]["rows"] == len(ds) > 0
        batch = ds[:]
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.dtype == torch.int64 and ids.shape == labels.shape == (len(ds), SEQ)
        assert (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()
        assert ((labels != -100).sum(1) == round(0.15 * SEQ)).all()
        original = torch.where(labels != -100, labels, ids)
        assert not torch.isin(labels[labels != -100], torch.tensor([0, 1, 2, 3, 4])).any()
        assert (original[:, 1:-1] != 0).all()  # packed: no padding anywhere


def test_tokenizer_round_trip_offline(static_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(static_dir / "tokenizer"), local_files_only=True)
    assert tok.is_fast and len(tok) == 1000
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.mask_token_id) == (0, 4)
    ids = tok("Return the Value of the object.")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert tok.decode(ids, skip_special_tokens=True) == "return the value of the object."


def test_dynamic_data_and_collator(synthetic):
    _, _, out = synthetic
    train, heldout = load_pretraining_data(out, "train"), load_pretraining_data(out, "heldout")
    assert train.column_names == ["input_ids"] and heldout.column_names == ["input_ids", "labels"]
    spec = MaskingSpec.from_meta(read_meta(out))
    examples = [train[i] for i in range(8)]
    batch = MLMCollator(spec, seed=3)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (8, SEQ)
    assert ((batch["labels"] != -100).sum(1) == round(0.15 * SEQ)).all()
    assert torch.equal(MLMCollator(spec, seed=3)(examples)["labels"], batch["labels"])
    assert not torch.equal(MLMCollator(spec, seed=3, rank=1)(examples)["labels"], batch["labels"])
    fixed = MLMCollator(spec)([heldout[0], heldout[1]])
    assert torch.equal(fixed["labels"], heldout[:2]["labels"])


def test_train_and_heldout_are_disjoint_by_document(synthetic):
    path, docs, out = synthetic
    meta = read_meta(out)
    corpus = open_corpus([str(path)])
    train = set(data.split_documents(corpus, "train", 0.1, seed=1))
    heldout = set(data.split_documents(corpus, "heldout", 0.1, seed=1))
    assert train.isdisjoint(heldout) and train | heldout == set(docs) and heldout
    assert meta["counts"]["heldout"]["documents"] == len(heldout)
    stream = " ".join(map(str, load_pretraining_data(out, "train")[:]["input_ids"][:, 1:-1].flatten().tolist()))
    held = load_pretraining_data(out, "heldout")[:]
    original = torch.where(held["labels"] != -100, held["labels"], held["input_ids"])
    assert all(" ".join(map(str, row[1:-1].tolist())) not in stream for row in original)


def test_same_seed_same_data_and_existing_tokenizer(synthetic, tmp_path):
    path, _, out = synthetic
    kw = dict(tokenizer=str(out / "tokenizer"), masking="static", dupe_factor=2, seed=5)
    prepare(tmp_path / "a", open_corpus([str(path)]), **kw)
    prepare(tmp_path / "b", open_corpus([str(path)]), **kw, num_proc=2)
    a, b = (load_pretraining_data(tmp_path / d, "train")[:] for d in "ab")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    half = len(a["labels"]) // 2  # dupe_factor 2: same sequences, different masks
    original = torch.where(a["labels"] != -100, a["labels"], a["input_ids"])
    assert torch.equal(original[:half], original[half:]) and not torch.equal(a["labels"][:half], a["labels"][half:])
    tok_a, tok_out = (json.loads((d / "tokenizer" / "tokenizer.json").read_text()) for d in (tmp_path / "a", out))
    assert tok_a["model"]["vocab"] == tok_out["model"]["vocab"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_seq_len=2), "--max-seq-len 2 leaves no room"),
        (dict(vocab_size=10), "--vocab-size 10 is too small"),
        (dict(heldout_fraction=1.0), r"--heldout-fraction 1.0 must be in \[0, 1\)"),
        (dict(masking="dynamic", dupe_factor=3), "--dupe-factor 3 must be .* 1 with --masking dynamic"),
        (dict(max_predictions=0), "--max-predictions 0 must be >= 1"),
        (dict(masking="sometimes"), "--masking 'sometimes' must be 'static' or 'dynamic'"),
    ],
)
def test_bad_options_fail_before_work(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        data.prepare_pretraining_data(tmp_path / "out", open_corpus(max_bytes=100), data.PrepareOptions(**kw))
    assert not (tmp_path / "out").exists()


def test_output_and_tokenizer_errors(tmp_path, synthetic):
    path, _, out = synthetic
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        data.check_output(tmp_path / "full")
    with pytest.raises(FileNotFoundError, match="is not a tokenizer directory .* omit --tokenizer to train one"):
        data.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"heldout split has no full sequence: .* raise --heldout-fraction"):
        prepare(tmp_path / "o", open_corpus([str(path)]), tokenizer=str(out / "tokenizer"), heldout_fraction=0.001)
    with pytest.raises(FileNotFoundError, match="not a prepared pretraining data .*`python -m ds_vrgd.pretrain.data"):
        load_pretraining_data(tmp_path, "train")
    with pytest.raises(ValueError, match=r"split 'test' does not exist; use one of \['train', 'heldout'\]"):
        load_pretraining_data(out, "test")


def test_cli_reports_errors_and_writes_meta(tmp_path, capsys, synthetic):
    path, _, out = synthetic
    assert data.main(["--output", str(tmp_path / "o"), "--corpus", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt' does not exist" in capsys.readouterr().err
    argv = ["--output", str(tmp_path / "o"), "--corpus", str(path), "--tokenizer", str(out / "tokenizer"),
            "--max-seq-len", "32", "--heldout-fraction", "0.2", "--max-predictions", "3", "--masking", "dynamic"]
    assert data.main(argv) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["masking_spec"]["max_predictions"] == 3 and meta["masking"] == "dynamic"
    assert f"train: {meta['counts']['train']['rows']} rows" in capsys.readouterr().out


# --------------------------------------------------------------------------- models


def test_model_presets():
    tiny = build_bert_mlm("tiny", 1000, seed=0)
    assert isinstance(tiny, transformers.BertForMaskedLM) and tiny.config.num_hidden_layers == 2
    embeddings = (1000 + 512 + 2) * 128 + 2 * 128  # words, positions, token types, LayerNorm
    layer = 4 * (128 * 128 + 128) + 2 * (128 * 512) + 512 + 128 + 2 * 2 * 128
    head = 128 * 128 + 128 + 2 * 128 + 1000  # transform, LayerNorm, decoder bias (weight tied, no pooler)
    assert sum(p.numel() for p in tiny.parameters()) == embeddings + 2 * layer + head == 608_360
    same = build_bert_mlm("tiny", 1000, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(tiny.parameters(), same.parameters()))
    with torch.device("meta"):
        base = transformers.BertForMaskedLM(bert_config("base", 30522))
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(110e6, rel=0.01)
    assert [PRESETS[p]["hidden_size"] for p in ("mini", "small", "medium", "large")] == [256, 512, 512, 1024]


def test_model_errors():
    valid = "tiny, mini, small, medium, base, large"
    with pytest.raises(ValueError, match=f"unknown BERT preset 'huge'; valid presets: {valid}$"):
        bert_config("huge", 1000)
    with pytest.raises(ValueError, match="max_seq_len 1024 exceeds the model's max_position_embeddings 512"):
        build_bert_mlm("tiny", 1000, max_seq_len=1024)
