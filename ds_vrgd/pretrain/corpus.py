"""Raw text sources for BERT pretraining: each yields documents (``str``).

:func:`open_corpus` validates the sources (files exist, globs match, files are text, there is text at
all), so bad input fails before tokenizer training, and returns a re-iterable :class:`Corpus` over
UTF-8 text files and/or a local Hugging Face ``datasets`` dataset (never downloaded) or, with neither,
the docstrings of the installed Python standard library (:func:`stdlib_docstrings`). The options:
docs/pretraining.md, "1. Data".
"""

from __future__ import annotations

import ast
import codecs
import glob
import importlib
import importlib.util
import inspect
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ExtensionFileLoader
from pathlib import Path

SNIFF_BYTES = 8192
_TEST_PARTS = frozenset({"test", "tests", "idle_test"})
_NEVER_IMPORT = frozenset({"readline"})  # importing it rebinds the terminal of the calling process


# --------------------------------------------------------------------------- files


def resolve_text_files(patterns: Sequence[str]) -> list[Path]:
    """Expand paths and globs to a sorted, de-duplicated list of text files.

    Raises FileNotFoundError for a missing path or a glob matching nothing, and
    ValueError for a directory or a file that is not UTF-8 text; every message
    names the path and the fix.
    """
    files: dict[Path, None] = {}
    for pattern in patterns:
        for path in _expand(pattern):
            _check_text_file(path)
            files[path] = None
    return list(files)


def _expand(pattern: str) -> list[Path]:
    """One ``--corpus`` entry -> the files it names (sorted)."""
    if glob.has_magic(pattern):
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(
                f"corpus glob {pattern!r} matches no files; check the pattern (quote it so the "
                "shell does not expand it, use '**' for subdirectories) or pass file paths"
            )
        return matches
    path = Path(pattern)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus file {str(path)!r} does not exist; fix the path or pass a glob such as 'texts/*.txt'"
        )
    if path.is_dir():
        raise ValueError(
            f"corpus path {str(path)!r} is a directory; pass the files in it as a glob, "
            f"e.g. '{path}/*.txt', or use --hf-dataset for a datasets directory"
        )
    return [path]


def _check_text_file(path: Path) -> None:
    """Raise ValueError unless the start of ``path`` is readable UTF-8 text without NUL bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as err:
        raise ValueError(f"corpus file {str(path)!r} cannot be read ({err}); fix its permissions or drop it") from err
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        binary = b"\x00" in head
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise ValueError(
            f"corpus file {str(path)!r} is not UTF-8 text (binary or another encoding); convert it "
            "with e.g. `iconv -t UTF-8` or remove it from --corpus"
        )


def text_file_documents(paths: Iterable[Path], doc_per_line: bool = False) -> Iterator[str]:
    """Documents of UTF-8 text files, streamed: blank-line separated, or one per line.

    Documents are stripped of surrounding whitespace; empty ones are skipped.
    """
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                yield from (line.strip() for line in f if line.strip()) if doc_per_line else _paragraphs(f)
        except UnicodeDecodeError as err:
            raise ValueError(
                f"corpus file {str(path)!r} is not valid UTF-8 ({err}); convert it or remove it from --corpus"
            ) from err


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Join runs of non-blank lines; blank lines end a document."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).strip()
            block = []
    if block:
        yield "".join(block).strip()


# --------------------------------------------------------------------------- datasets


def load_hf_text_dataset(name_or_path: str, text_column: str = "text", split: str = "train"):
    """A ``datasets.Dataset`` with a string column ``text_column``, loaded without network.

    ``name_or_path``: a ``save_to_disk`` directory (Dataset or DatasetDict), a
    directory of data files, or the name of a dataset in the local HF cache.
    ``split`` picks from a DatasetDict. Raises ValueError naming the fix when
    the dataset is not local, the split or the column does not exist, or the
    column is not text.
    """
    import datasets

    dataset = _load_local_or_cached(name_or_path)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(
                f"dataset {name_or_path!r} has no split {split!r}; pass --hf-split with one of {sorted(dataset)}"
            )
        dataset = dataset[split]
    if text_column not in dataset.column_names:
        raise ValueError(
            f"dataset {name_or_path!r} has no column {text_column!r}; pass --text-column with one of "
            f"{dataset.column_names}"
        )
    dtype = getattr(dataset.features[text_column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(
            f"column {text_column!r} of dataset {name_or_path!r} holds {dataset.features[text_column]}, not "
            "text; pass --text-column naming a string column"
        )
    return dataset


def _load_local_or_cached(name_or_path: str):
    """``load_from_disk`` for saved datasets, else ``load_dataset`` in offline mode."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
        return datasets.load_from_disk(str(path))
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"--hf-dataset {name_or_path!r} is a file; pass plain text files with --corpus, or the "
            "directory holding csv/json/parquet files"
        )
    try:
        with _hf_offline():
            return datasets.load_dataset(name_or_path)
    except (ConnectionError, FileNotFoundError) as err:
        raise ValueError(
            f"dataset {name_or_path!r} is neither a local directory nor in the local Hugging Face cache "
            f"({datasets.config.HF_DATASETS_CACHE}), and downloads are disabled; on a machine with internet "
            f"run `datasets.load_dataset({name_or_path!r}).save_to_disk(DIR)` and pass --hf-dataset DIR "
            f"({type(err).__name__}: {err})"
        ) from err


@contextmanager
def _hf_offline():
    """Make ``datasets`` and ``huggingface_hub`` behave as with ``HF_HUB_OFFLINE=1`` inside the block."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def hf_dataset_documents(dataset, text_column: str, batch_size: int = 1000) -> Iterator[str]:
    """Non-empty, stripped values of ``text_column`` of a ``datasets.Dataset``, in row order."""
    for start in range(0, len(dataset), batch_size):
        for text in dataset[start : start + batch_size][text_column]:
            if text and text.strip():
                yield text.strip()


# --------------------------------------------------------------------------- stdlib


def stdlib_source_files() -> list[tuple[str, Path]]:
    """(module name, source path) of the public, non-test stdlib modules, sorted by name.

    A module is kept when its top-level package is in ``sys.stdlib_module_names``
    and no dotted part is private (leading ``_``) or a test package.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and _is_public_stdlib(parts):
            modules.append((".".join(parts), path))
    return sorted(modules)


def _is_public_stdlib(parts: list[str]) -> bool:
    """True for a public, non-test stdlib module given as dotted-name parts."""
    return (
        parts[0] in sys.stdlib_module_names
        and all(p.isidentifier() and not p.startswith("_") for p in parts)
        and not any(p in _TEST_PARTS or p.startswith("test_") for p in parts)
    )


def module_docstrings(path: Path) -> list[str]:
    """Docstrings of a source file, in source order: module, then classes and functions (nested).

    Files that fail to read or parse give ``[]``. Docstrings are cleaned with
    ``inspect.cleandoc`` (via ``ast.get_docstring``).
    """
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
        return []
    return [doc for node in (tree, *_definitions(tree)) if (doc := ast.get_docstring(node))]


def _definitions(node: ast.AST) -> Iterator[ast.AST]:
    """Class/function definitions under ``node`` (also inside if/try/with blocks), depth first in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
        if isinstance(child, (ast.stmt, ast.excepthandler)):
            yield from _definitions(child)


def extension_module_docstrings(name: str) -> list[str]:
    """Docstrings of a compiled stdlib module: the module, then its public functions and classes
    (sorted by name), each class followed by its public methods in definition order.

    Only built-in and C-extension modules are imported (importing them runs
    no Python code); any other module, or one that fails to import, gives ``[]``.
    """
    try:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.origin == "built-in" or isinstance(spec.loader, ExtensionFileLoader)):
            return []
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure just drops the module from the corpus
        return []
    objects = [module]
    for attr, obj in sorted(vars(module).items()):
        if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
            objects.append(obj)
            if inspect.isclass(obj):
                objects.extend(v for k, v in vars(obj).items() if not k.startswith("_"))
    return [inspect.cleandoc(doc) for obj in objects if isinstance(doc := getattr(obj, "__doc__", None), str)]


def _stdlib_texts() -> Iterator[str]:
    """Unbounded default corpus documents, in a fixed order: source modules, compiled modules, help topics."""
    for _, path in stdlib_source_files():
        yield "\n\n".join(module_docstrings(path))
    for name in sorted(sys.stdlib_module_names - _NEVER_IMPORT):
        if not name.startswith("_"):
            yield "\n\n".join(extension_module_docstrings(name))
    from pydoc_data.topics import topics  # the Python language reference pages that help() shows

    yield from (topics[key] for key in sorted(topics))


def stdlib_docstrings(max_bytes: int | None = None) -> Iterator[str]:
    """The default corpus, needing no download: documentation shipped with the Python stdlib.

    Documents, in a fixed order (deterministic for a given Python build):
    one per public non-test source module (its module, class and function
    docstrings joined by blank lines, parsed with ``ast``, never imported:
    importing runs module code, ``antigravity`` opens a browser), one per
    compiled module (``math``, ``itertools``, ``builtins``...), and one per
    ``help()`` topic of ``pydoc_data`` (the language reference). About 2.4 MB
    with CPython 3.11. With ``max_bytes`` the stream stops once that many UTF-8
    bytes were yielded (the last document is cut).
    """
    remaining = max_bytes
    for text in _stdlib_texts():
        data = text.strip().encode("utf-8")
        if not data:
            continue
        if remaining is not None:
            if remaining <= 0:
                return
            data = data[:remaining]
            remaining -= len(data)
        yield data.decode("utf-8", errors="ignore")


# --------------------------------------------------------------------------- corpus


class Corpus:
    """A re-iterable stream of documents from files, a datasets dataset, or the default corpus.

    Built by :func:`open_corpus`; ``iter(corpus)`` starts a fresh pass each time
    and ``corpus.description`` says where the text comes from (for meta.json).
    """

    def __init__(self, passes: list, description: str):
        self._passes = passes  # zero-argument callables, each returning a fresh document iterator
        self.description = description

    def __iter__(self) -> Iterator[str]:
        for new_pass in self._passes:
            yield from new_pass()


def open_corpus(
    files: Sequence[str] = (),
    hf_dataset: str | None = None,
    text_column: str = "text",
    hf_split: str = "train",
    doc_per_line: bool = False,
    max_bytes: int | None = None,
) -> Corpus:
    """Validate the sources and return a :class:`Corpus` over them.

    ``files``: paths/globs of text files, one document per line with
    ``doc_per_line`` (else blank-line separated); ``hf_dataset``,
    ``text_column``, ``hf_split``: see :func:`load_hf_text_dataset`. With
    neither, the stdlib docstring corpus (``max_bytes`` limits only that one).
    Raises FileNotFoundError/ValueError naming the path and the fix, including
    for a corpus with no text.
    """
    passes, parts = [], []
    if files:
        paths = resolve_text_files(files)
        passes.append(lambda: text_file_documents(paths, doc_per_line))
        mode = "one document per line" if doc_per_line else "blank-line separated documents"
        parts.append(f"text files {[str(p) for p in paths]} ({mode})")
    if hf_dataset is not None:
        dataset = load_hf_text_dataset(hf_dataset, text_column, hf_split)
        passes.append(lambda: hf_dataset_documents(dataset, text_column))
        parts.append(f"datasets {hf_dataset!r} split {hf_split!r} column {text_column!r}")
    if not passes:
        documents = list(stdlib_docstrings(max_bytes))  # ~2 MB: parse the stdlib once, not on every pass
        passes.append(lambda: iter(documents))
        limit = "" if max_bytes is None else f", first {max_bytes} bytes"
        parts.append(f"Python {sys.version.split()[0]} stdlib docstrings{limit}")
    corpus = Corpus(passes, "; ".join(parts))
    if next(iter(corpus), None) is None:
        raise ValueError(
            f"the corpus is empty (no non-blank text in {corpus.description}); pass files or a "
            "dataset column that contain text"
        )
    return corpus
