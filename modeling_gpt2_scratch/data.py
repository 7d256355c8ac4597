"""Corpus -> token shards -> (B, T) batches.

`prepare_dataset` (and `python -m modeling_gpt2_scratch.data prepare ...`) reads a Hugging Face Hub dataset (streamed,
so a corpus larger than RAM works) or local `.txt` / `.jsonl` / `.json` / `.parquet` / `.csv` files through `datasets`,
tokenizes every document with GPT-2's encoding in `num_proc` processes, and writes the token stream into shards.
`ShardedTokenLoader` reads the shards back through `np.memmap` as `(x, y)` batches for one rank of a run.

On disk (format version 1), in the output folder:

* `train_000000.bin`, `train_000001.bin`, ..., `val_000000.bin`, ...: the raw little-endian `uint16` token array, no
  header (`np.fromfile(path, dtype="<u2")` reads one). Every shard holds `shard_size` tokens except the last of each
  split and, with a held-out fraction, the two shards on either side of the train/val cut.
* `manifest.json`, e.g.::

    {"format_version": 1,
     "tokenizer": {"name": "gpt2", "n_vocab": 50257, "eot_token": 50256},
     "dtype": "uint16",
     "splits": {"train": [{"file": "train_000000.bin", "tokens": 304223}],
                "val": [{"file": "val_000000.bin", "tokens": 33803}]},
     "source": {"description": "local file tinyshakespeare.txt", "fingerprint": "<sha256>", "files": [...]},
     "settings": {"split": "train", "val_split": null, "text_column": "text", "val_fraction": 0.1,
                  "shard_size": 100000000},
     "stats": {"documents": 1, "empty_documents": 0, "train_tokens": 304223, "val_tokens": 33803}}

Decisions:

* **Documents.** A `.txt` file is one document, read as UTF-8 with universal newlines (`\\r\\n` and `\\r` become `\\n`,
  as `datasets`' text builder reads it). A `.jsonl`/`.json`/`.parquet`/`.csv` row is one document, its text in
  `text_column`. Empty and null documents are skipped (and counted). Files are read in sorted path order, rows in
  file order, so the token stream is the same on every run and for every `num_proc`.
* **Delimiter.** `<|endoftext|>` (50256) comes before every document, as in GPT-2's training and build-nanogpt's
  `fineweb.py`: the stream is `eot doc1 eot doc2 ...`. Text is encoded with `encode_ordinary`, so a literal
  `<|endoftext|>` inside a document is plain text, never the delimiter.
* **Undecodable bytes** fail the prepare with the file and the byte offset; nothing is replaced silently (a training
  corpus with mojibake is worse than a clear stop). A UTF-8 byte-order mark at the start of a `.txt` file is dropped.
  A malformed or corrupt file fails it naming that file (among several, they are read again one by one to find it).
* **Files.** A folder or glob lists files in sorted order, leaving out hidden ones, the output folder, other
  prepared folders and trainer run folders (a `run_config.json`, with their metrics and checkpoints) that lie inside
  the corpus folder, and empty ones (0 bytes, JSON files of blank lines, or a Parquet file of no rows). Names are
  literal: `[`, `*` in a file's name are not patterns. Only `text_column` is read from Parquet, and it must hold
  strings in every file (`datasets` would cast numbers to text); CSV cells are never read as missing ("NA", "null"
  are text).
  `datasets` reads every column of JSON files, so their other columns must be the same in every row and file;
  JSON rows are read as they are (a text column that holds a number in some row is an error, never JSON text).
* **Validation split.** With `val_split` (Hub datasets), that split. Otherwise the last `val_fraction` of the train
  token stream, cut inside the stream (possibly inside a document), so a corpus of one document (tiny Shakespeare)
  splits too. Local files form one stream: `split`, `val_split` and `dataset_config` apply to Hub datasets only
  (logged as ignored). `val_fraction=0` gives an empty val split.
* **Idempotence.** The manifest records a fingerprint of the source (local files: a SHA-256 of their contents, in
  order, cached against path, size and mtime so an unchanged corpus is not hashed again; Hub datasets: id, config
  and revision, so no network is needed to reuse a folder), the tokenizer and the settings. Preparing the same
  thing into the same folder reuses it; anything else in that folder is an error unless `overwrite=True`. A Hub
  dataset without a pinned `dataset_revision` is assumed unchanged. A touched but unchanged file is hashed once,
  and the manifest remembers its new mtime. A local corpus that is gone from the path it was prepared from
  (archived; the folder copied elsewhere) leaves its intact shards usable, with a warning; a folder that cannot be
  written to is only read.
* **Atomic writes.** Shards are written into a temporary folder inside the output folder; the old manifest is
  removed before any shard is replaced, and the new one is written (temp file + `os.replace`) last. An interrupted
  prepare leaves no manifest, never one that points at incomplete shards, and the next prepare starts over.
  Concurrent prepares of one folder wait for each other (a `flock` on `.prepare.lock`, which the tokenizer
  processes do not hold: a prepare killed outright, SIGKILL, frees the folder; on Linux they die with it).
* **Memory** is one shard's buffer plus the documents in flight (at most `2 * num_proc` tasks of about 4M
  characters), whatever the corpus size (but a `.json` file holding one array, which `datasets` reads whole: use
  `.jsonl` for a large corpus). A `.txt` file (one document) over 64 KiB is read line by line and tokenized in
  pieces of about 1M characters, cut before a space, tab or newline where GPT-2's pre-tokenizer splits anyway
  (`_safe_cut`), so its tokens are those of the whole text; only a text with no whitespace before a word (in any
  script) is held whole. Smaller ones are read whole, a run of them per `load_dataset` call (`_txt_runs`).
"""

from __future__ import annotations

import argparse
import codecs
import collections
import concurrent.futures
import contextlib
import difflib
import fnmatch
import glob
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from huggingface_hub.errors import HfHubHTTPError
from transformers import HfArgumentParser

from .tokenization import get_encoding

if TYPE_CHECKING:
    from datasets import IterableDataset

try:
    import fcntl
except ImportError:  # not POSIX: concurrent prepares of one folder are not serialised
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["DataArguments", "PrepareArguments", "ShardedTokenLoader", "main", "prepare_dataset", "read_manifest"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
TOKEN_DTYPE = np.dtype("<u2")  # little-endian uint16: GPT-2's 50257 ids fit, half the bytes of int32
TOKENIZER_INFO = {"name": "gpt2", "n_vocab": 50257, "eot_token": 50256}  # tiktoken's r50k_base == gpt2
EXTENSION_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
OFFLINE_EXAMPLE = "--dataset ../shared/data/tinyshakespeare.txt"
UNSET_WORDS = ("", "none", "null")  # what unsets an optional data flag on the command line

_SHARD_NAME = re.compile(r"(train|val)_\d{6}\.bin")
_TMP_PREFIX = ".tmp-prepare"
_LOCK_NAME = ".prepare.lock"
_HELD_LOCKS: set[int] = set()  # file descriptors of the folder locks this process holds
_ROWS_PER_READ = 1000  # rows pulled from `datasets` at a time
_DOCS_PER_TASK = 1024  # documents per tokenization task ...
_CHARS_PER_TASK = 4_000_000  # ... or fewer, when they reach this many characters
_TXT_PIECE_CHARS = 1_000_000  # a .txt file is tokenized in pieces of about this many characters
# .txt files up to this size are read whole (`sample_by="document"`), a run of them in one `load_dataset` call
# (3.9 ms each on its own); larger ones line by line, one call each, and joined into pieces
_TXT_WHOLE_BYTES = 64 << 10
# What GPT-2's pre-tokenizer regex calls whitespace (`\s`: Unicode's White_Space property, in tiktoken's Rust regex),
# exactly: Python's str.isspace() also takes U+001C-U+001F, which the regex does not
_REGEX_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SAFE_CUT = re.compile(f"[{_REGEX_WHITESPACE}](?=[^{_REGEX_WHITESPACE}])")  # the last whitespace before a non-space
_CUT_WINDOW = 1 << 16  # characters `_safe_cut` searches at a time, from the end
_HASH_CHUNK = 1 << 20
_REBUILD_FLAGS = "--overwrite (trainer: --overwrite_data)"  # the trainer's --overwrite is ambiguous


@dataclass
class DataArguments:
    """Where the training text comes from and how it is cut into token shards (shared by the trainer)."""

    dataset: str = field(
        metadata={
            "help": "A Hugging Face Hub dataset id (e.g. HuggingFaceFW/fineweb-edu, streamed) or local data: a "
            ".txt/.jsonl/.json/.parquet/.csv file, a folder of them, or a glob (quote it). Offline, pass local "
            f"files, e.g. {OFFLINE_EXAMPLE}."
        }
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "The Hub dataset's configuration name (e.g. sample-10BT for fineweb-edu)."}
    )
    dataset_revision: str | None = field(
        default=None,
        metadata={"help": "The Hub dataset's revision (branch, tag or commit). Pin it to notice upstream changes."},
    )
    split: str = field(
        default="train", metadata={"help": "The Hub split to train on. Local files always form one stream."}
    )
    val_split: str | None = field(
        default=None,
        metadata={
            "help": "The Hub split to validate on (e.g. validation). Unset (none), or for local files, the last "
            "--val_fraction of the training token stream is held out instead."
        },
    )
    text_column: str = field(
        default="text", metadata={"help": "The column holding the text (.jsonl/.json/.parquet/.csv, Hub datasets)."}
    )
    val_fraction: float = field(
        default=0.01,
        metadata={
            "help": "Fraction of the token stream held out as the val split (its end) when there is no "
            "--val_split; 0 disables validation."
        },
    )
    shard_size: int = field(
        default=100_000_000,
        metadata={"help": "Tokens per shard file (2 bytes each); preparing holds one shard in memory."},
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Tokenizer processes; default: the CPU cores available."}
    )

    def __post_init__(self) -> None:
        # the command line cannot give None: `--val_split none` unsets a preset's split (as "" and null do)
        for name in ("dataset_config", "dataset_revision", "val_split"):
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() in UNSET_WORDS:
                setattr(self, name, None)


@dataclass(kw_only=True)
class PrepareArguments(DataArguments):
    """`python -m modeling_gpt2_scratch.data prepare`: the data arguments plus where the shards go."""

    output_dir: str = field(metadata={"help": "Folder for the shards and manifest.json (created if missing)."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Rebuild the folder when it holds shards of another source, tokenizer or settings."},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Source:
    """A resolved `--dataset`: either local files of one type or a Hub dataset id."""

    name: str  # what the user passed
    files: tuple[Path, ...] = ()
    builder: str | None = None  # datasets' packaged builder for the local files
    hub_id: str | None = None

    @property
    def is_local(self) -> bool:
        return self.hub_id is None

    def describe(self, args: DataArguments) -> str:
        if not self.is_local:
            config = f", config {args.dataset_config}" if args.dataset_config else ""
            revision = f", revision {args.dataset_revision}" if args.dataset_revision else ""
            return f"Hub dataset {self.hub_id}{config}{revision}"
        if len(self.files) == 1:
            return f"local file {self.files[0]}"
        first, last = self.files[0].name, self.files[-1].name
        return f"{len(self.files)} local {self.builder} files from {self.name} ({first} ... {last})"


class PrepareError(RuntimeError):
    """Preparing stopped for a reason outside the input (a tokenizer process died); nothing half-done is kept."""


def one_line(text: object) -> str:
    """`text` (an error, mostly) on one line: its line breaks and runs of spaces as single spaces."""
    return " ".join(str(text).split())


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a Hub id (`name` or `owner/name`): absolute, relative, home-based or with a file type."""
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
        or Path(name).suffix.lower() in EXTENSION_BUILDERS
    )


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder.resolve())


def local_corpus_root(dataset: str) -> Path:
    """The path a local `--dataset` names (a file or folder), or a glob's fixed folder (`a/*/b.txt` -> `a`)."""
    local = Path(os.path.expanduser(dataset))
    for index, part in enumerate(local.parts):
        if glob.has_magic(part):
            return Path(*local.parts[:index]) if index else Path(".")
    return local


def _is_run_folder(folder: Path) -> bool:
    """A trainer's run folder: its `run_config.json` (`training.RUN_CONFIG_NAME`) holds the model, data and training
    settings."""
    try:
        config = json.loads((folder / "run_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "data", "training"} <= config.keys()


def _not_prepared(files: list[Path], root: Path) -> list[Path]:
    """`files` (under `root`) without the manifests of prepared folders (a `manifest.json` beside `train_*.bin`
    shards) and the files of trainer run folders (metrics.jsonl, JSON files, checkpoints): another prepared folder or
    a run's `--output_dir` inside the corpus folder is not corpus."""
    depth = len(root.parts)
    in_run: dict[Path, bool] = {}  # per folder below `root`: it or a folder above it (up to `root`) is a run folder

    def in_a_run(folder: Path) -> bool:
        if len(folder.parts) <= depth:  # `root` itself, or above it
            return False
        if folder not in in_run:
            in_run[folder] = _is_run_folder(folder) or in_a_run(folder.parent)
        return in_run[folder]

    return [
        f
        for f in files
        if not (f.name == MANIFEST_NAME and any(f.parent.glob("train_*.bin"))) and not in_a_run(f.parent)
    ]


def _all_left_out(name: str, listed: list[Path]) -> FileNotFoundError:
    return FileNotFoundError(
        f"The {len(listed)} file(s) --dataset {name!r} lists lie in trainer run folders or are prepared shards' "
        f"manifests (e.g. {str(listed[0])!r}), which are not read as corpus; copy them out, or point --dataset at "
        "other files."
    )


def _has_rows(path: Path) -> bool:
    """False for a 0-byte file, a JSON file of whitespace only (blank lines) or a Parquet file of no rows (which
    `datasets` cannot read, or reads with no columns, failing beside other files); they are skipped."""
    if path.stat().st_size == 0:
        return False
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, "rb") as f:  # the first bytes, as a rule: only blank lines read on to the end
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return True
        return False
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows > 0
        except (OSError, pa.ArrowException):
            return True  # unreadable: let the read name it
    return True


def _resolve_source(name: str, exclude: Path | None = None) -> _Source:
    """Local file, folder or glob (sorted paths), else a Hub id. Raises for paths that match nothing.

    Files under `exclude` (the output folder, when it lies inside the corpus folder) are not part of the corpus, nor
    are other prepared folders' manifests and trainer run folders (`_not_prepared`).
    """
    supported = "/".join(EXTENSION_BUILDERS)
    expanded = os.path.expanduser(name)
    path = Path(expanded)
    root = local_corpus_root(name)  # a glob's fixed folder: "data/*/a.jsonl" -> "data"
    if exclude is not None and _inside(root, exclude):
        exclude = None  # the corpus lies inside the output folder: only an output folder inside the corpus is skipped
    if path.is_file():
        files = [path]
    elif path.is_dir():
        listed = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in EXTENSION_BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and not _inside(p, exclude)
        )
        files = _not_prepared(listed, path)
        if not listed:
            raise FileNotFoundError(
                f"No {supported} files under folder {name!r}; point --dataset at a folder, file or glob of such files."
            )
        if not files:
            raise _all_left_out(name, listed)
    elif glob.has_magic(expanded):
        listed = sorted(
            Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p) and not _inside(Path(p), exclude)
        )
        files = _not_prepared(listed, root)
        if not listed:
            raise FileNotFoundError(
                f"No files matched {name!r}; fix the pattern (and quote it so the shell does not expand it)."
            )
        if not files:
            raise _all_left_out(name, listed)
    elif _looks_like_path(name):
        raise FileNotFoundError(
            f"Dataset path {name!r} not found; pass an existing {supported} file, a folder or a glob of them, "
            "or a Hub dataset id such as karpathy/tiny_shakespeare."
        )
    else:
        return _Source(name=name, hub_id=name)

    unsupported = sorted({p.suffix or p.name for p in files if p.suffix.lower() not in EXTENSION_BUILDERS})
    if unsupported:
        raise ValueError(
            f"Unsupported file type(s) {', '.join(unsupported)} in --dataset {name!r}; use {supported} files."
        )
    chained = [str(p) for p in files if "::" in str(p)]
    if chained:  # `datasets` (fsspec) splits data file paths at "::" (URL chaining): such a file cannot be opened
        raise ValueError(
            f"Path {chained[0]!r} of --dataset {name!r} contains '::', which `datasets` reads as a URL chain: rename "
            "the file or folder."
        )
    builders = {EXTENSION_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        kinds = ", ".join(sorted({p.suffix.lower() for p in files}))
        raise ValueError(f"--dataset {name!r} mixes file types ({kinds}); point it at files of one type.")
    empty = [p for p in files if not _has_rows(p)]
    if empty and len(empty) < len(files):
        logger.info("Skipping %d empty file(s) of --dataset %r: %s", len(empty), name, ", ".join(map(str, empty)))
        files = [p for p in files if p not in empty]
    return _Source(name=name, files=tuple(files), builder=builders.pop())


def _check_text_column(source: _Source, args: DataArguments) -> None:
    """Every CSV and Parquet file has the text column (their headers and schemas are read, not their rows): else the
    one-line error lists the columns that file has."""
    if source.builder not in ("csv", "parquet"):
        return
    import pandas as pd
    import pyarrow.parquet as pq

    for path in source.files:
        try:
            if source.builder == "csv":
                columns = list(pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns)
            else:
                schema = pq.read_schema(path)
                columns = schema.names
        except (ValueError, pa.ArrowException) as err:  # undecodable bytes, a malformed or truncated file: name it
            found = _first_undecodable([path]) if isinstance(err, UnicodeDecodeError) else None
            raise (_undecodable_error(*found) if found else _read_error(source, f"local file {path}", err)) from err
        if args.text_column not in columns:
            raise _missing_column(args.text_column, f"local file {path}", columns)
        if source.builder == "parquet" and not _is_text_type(schema.field(args.text_column).type):
            # `datasets` casts every file to the first one's types: numbers after text would be read as "1", "2"
            raise _not_text(args.text_column, f"local file {path}", schema.field(args.text_column).type)


def _is_text_type(arrow_type: pa.DataType) -> bool:
    """A string column (or one of nulls only, or dictionary-encoded strings)."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return any(
        check(arrow_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_null, is_string_view)
    )


def _not_text(column: str, where: str, kind: object) -> ValueError:
    return ValueError(
        f"Column {column!r} of {where} holds {kind} values, not text; pass --text_column naming a text column."
    )


def _hub_unreachable(source: _Source, err: BaseException) -> ValueError:
    return ValueError(
        f"Could not reach the Hugging Face Hub for dataset {source.hub_id!r} (and no local path of that name exists): "
        f"{one_line(err)}. Offline, pass local files instead, e.g. {OFFLINE_EXAMPLE} (a .txt/.jsonl/.json/.parquet/"
        ".csv file, a folder or a glob)."
    )


def _open_split(
    source: _Source, split: str, args: DataArguments
) -> IterableDataset | list[tuple[IterableDataset, bool]]:
    """`datasets.load_dataset(..., streaming=True)` for one split, with its errors turned into one-line messages.

    `.txt` files give a list of `(dataset, whole)`: a run of small files read whole (`whole`: one row per file), or
    one larger file's lines (`_iter_documents` joins them into pieces of the document). Both read the text as
    Python's text mode does (universal newlines, the byte-order mark dropped).

    `datasets` is imported here, when a corpus is tokenized, not with the module: training from prepared shards
    (and the benchmarks) never needs it.
    """
    from datasets import Features, Value, load_dataset
    from datasets.exceptions import DatasetNotFoundError

    _check_text_column(source, args)  # its errors are complete: not wrapped in "Cannot read" below
    try:
        if source.builder == "text":  # each file is one document: small ones read whole, larger ones in pieces
            return [
                (
                    load_dataset(
                        "text",
                        data_files=[glob.escape(str(path)) for path in paths],  # patterns: `[`, `*` literal here
                        split="train",
                        streaming=True,
                        sample_by="document" if whole else "line",
                        keep_linebreaks=True,
                        encoding="utf-8-sig",  # a byte-order mark is not text
                    ),
                    whole,
                )
                for whole, paths in _txt_runs(source.files)
            ]
        if source.is_local:
            extra = {
                "parquet": {  # the text column alone (other columns may differ from file to file), as strings:
                    # every file's is text (`_check_text_column`), but `datasets` would cast all files to the first
                    # one's type, and a first file of nulls only gives the null type
                    "columns": [args.text_column],
                    "features": Features({args.text_column: Value("string")}),
                },
                "csv": {  # the text column alone, as text: a column of "1984", "2001" is text, not numbers
                    "usecols": [args.text_column],
                    "features": Features({args.text_column: Value("string")}),
                    "keep_default_na": False,  # a document reading "NA" or "null" is text, not missing
                },
                "json": _plain_json_options(),
            }.get(source.builder, {})
            files = [glob.escape(str(p)) for p in source.files]
            return load_dataset(source.builder, data_files=files, split="train", streaming=True, **extra)
        return load_dataset(
            source.hub_id, args.dataset_config, split=split, revision=args.dataset_revision, streaming=True
        )
    except DatasetNotFoundError as err:
        raise FileNotFoundError(
            f"Dataset {source.name!r} is neither a local path nor a dataset on the Hub ({one_line(err)}); check the "
            f"name (gated datasets need `hf auth login`) or pass local files, e.g. {OFFLINE_EXAMPLE}."
        ) from err
    except (ConnectionError, TimeoutError) as err:
        raise _hub_unreachable(source, err) from err
    except StopIteration as err:  # the json builder, on files without a single row
        raise ValueError(f"Empty corpus: {source.describe(args)} has no rows; pass files that hold text.") from err
    except (ValueError, KeyError, TypeError, pa.ArrowException) as err:  # unknown split/config, unreadable file...
        which = f"split {split!r} of " if not source.is_local else ""
        raise _read_error(source, which + source.describe(args), err) from err


def _plain_json_options() -> dict[str, Any]:
    """The json builder's options (datasets >= 5) that read rows as they are, where datasets' versions have them.

    `on_mixed_types="use_json"` (the default) turns a column whose values change type into JSON text: after the
    first 10 MB of the first file, every text of that batch was tokenized with its JSON quotes (`"a document"`)
    and a number in the text column as the text `7`. `parse_agent_traces` rewrites files whose columns look like
    chat logs (`id`, `source`, `model`, `system_prompt`, `messages`) into other columns, dropping the text column.
    """
    from datasets.packaged_modules.json.json import JsonConfig

    names = {option.name for option in fields(JsonConfig)}
    return {key: value for key, value in {"on_mixed_types": None, "parse_agent_traces": False}.items() if key in names}


def _txt_runs(files: Iterable[Path]) -> Iterator[tuple[bool, list[Path]]]:
    """`(whole, files)` in order: each run of consecutive files of at most `_TXT_WHOLE_BYTES` (read whole), and each
    larger file alone (read line by line)."""
    for whole, run in itertools.groupby(files, key=lambda path: path.stat().st_size <= _TXT_WHOLE_BYTES):
        if whole:
            yield True, list(run)
        else:
            yield from ((False, [path]) for path in run)


def _first_undecodable(files: Iterable[Path]) -> tuple[Path, int, int] | None:
    """(file, byte offset, byte) of the first byte that is not UTF-8, or None when every file decodes."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(_HASH_CHUNK)
                pending = decoder.getstate()[0]
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    data = pending + chunk
                    return path, offset - len(pending) + err.start, data[err.start]
                if not chunk:
                    break
                offset += len(chunk)
    return None


@dataclass
class _Counts:
    documents: int = 0
    empty_documents: int = 0


def _read_error(source: _Source, where: str, err: BaseException) -> ValueError:
    fix = (
        f"check that the files are valid {source.builder} (or leave the bad one out of --dataset)"
        if source.is_local
        else "check --dataset, --dataset_config, --split and --val_split"
    )
    if source.builder == "json" and ("cast" in str(err).lower() or ") changed from " in str(err)):
        fix = (
            "`datasets` reads every JSON column, with the names and types of the first rows, so every file and "
            "row must have the same columns of the same types: drop the others (keep --text_column), or convert "
            "the files to Parquet (only --text_column is read there)"
        )
    return ValueError(f"Cannot read {where}: {one_line(err)}; {fix}.")


def _undecodable_error(path: Path, offset: int, byte: int) -> ValueError:
    return ValueError(
        f"{str(path)!r} is not valid UTF-8 (byte 0x{byte:02x} at offset {offset}); convert it to UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8 IN > OUT`) or leave it out of --dataset."
    )


def _unreadable_file(source: _Source, args: DataArguments, err: BaseException) -> Path | None:
    """After `err` reading several local files: the first that cannot be read on its own, or None (not local, one
    file, or JSON files whose columns differ, which read well one by one).

    The files are read again in order, without tokenizing, as `_first_undecodable` reads their bytes: on this error
    path only, so a folder of thousands of files names the bad one.
    """
    if not source.is_local or len(source.files) < 2 or source.builder == "text" or "cast" in str(err).lower():
        return None
    for path in source.files:
        try:
            alone = _open_split(_Source(name=str(path), files=(path,), builder=source.builder), "train", args)
            with _quiet_readers():
                for _ in alone.iter(batch_size=_ROWS_PER_READ):
                    pass
        except (ValueError, KeyError, TypeError, OSError, pa.ArrowException):
            return path
    return None


class _RaisedAnyway(logging.Filter):
    """Drops the ERROR lines that `datasets`' file readers log just before they raise the error those lines describe:
    the error reaches the user on one line (`_read_error`), where the command lines printed it above that, twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_readers() -> Iterator[None]:
    loggers = [logging.getLogger(f"datasets.packaged_modules.{name}.{name}") for name in ("json", "csv", "parquet")]
    quiet = _RaisedAnyway()
    for reader in loggers:
        reader.addFilter(quiet)
    try:
        yield
    finally:
        for reader in loggers:
            reader.removeFilter(quiet)


def _iter_rows(ds: IterableDataset, source: _Source, args: DataArguments, where: str) -> Iterator[dict]:
    """`ds.iter(...)` batches, with the errors of reading the source turned into one-line messages naming the file."""
    try:
        with _quiet_readers():
            yield from ds.iter(batch_size=_ROWS_PER_READ)
    except UnicodeDecodeError as err:
        found = _first_undecodable(p for p in source.files if p.suffix.lower() != ".parquet")
        if found is None:
            raise ValueError(f"{where} is not valid UTF-8 ({one_line(err)}); convert it to UTF-8.") from err
        raise _undecodable_error(*found) from err
    except (ConnectionError, TimeoutError, HfHubHTTPError) as err:
        raise ValueError(
            f"Lost the connection to the Hub while streaming {where} ({one_line(err)}); run prepare again "
            f"(it starts over), or download the files and pass them locally, e.g. {OFFLINE_EXAMPLE}."
        ) from err
    except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as err:  # malformed JSON, CSV or Parquet
        if isinstance(err, OSError) and err.errno is not None:
            raise  # the system's own error (permission denied, a full disk) names its file
        bad = _unreadable_file(source, args, err)  # Arrow's errors name no file; its OSError: a corrupt Parquet page
        raise _read_error(source, f"local file {bad}" if bad else where, err) from err


def _safe_cut(text: str) -> int | None:
    """The last index `i` where GPT-2's pre-tokenizer splits `text[:i]` and `text[i:]` as it splits `text`, or None.

    `i` is the last character of a run of (regex) whitespace, with a non-space character after it. In `text`, the
    run's pre-tokens end there whatever came before: `\\s+(?!\\S)` takes the run but its last character (it cannot
    take the last, a non-space follows), and that character starts the next pre-token (` ?\\p{L}+`, ` ?\\p{N}+`
    or ` ?[^\\s\\p{L}\\p{N}]+` when it is a space, else `\\s+` alone); no other pattern crosses whitespace, so the
    pre-token before the run ends where the run starts. `text[:i]` ends with the run less its last character, one
    `\\s+(?!\\S)` pre-token at the end of a text, and `text[i:]` starts as `text` does at `i`. So the tokens of
    the two parts, concatenated, are the tokens of `text`. Any text with a space, tab or newline before a word has
    such places, in any script.
    """
    end = len(text) - 1
    while end > 1:
        start = max(1, end - _CUT_WINDOW)
        cuts = [match.start() for match in _SAFE_CUT.finditer(text, start, end + 1)]
        if cuts:
            return cuts[-1]
        end = start
    return None


def _txt_pieces(lines: Iterable[str], piece_chars: int | None = None) -> Iterator[str]:
    """A text file's lines joined into pieces of about `piece_chars` (default `_TXT_PIECE_CHARS`) characters, cut
    only where `_safe_cut` allows, so tokenizing the pieces gives the file's tokens while memory stays bounded (a
    text with no such place is one piece)."""
    piece_chars = piece_chars or _TXT_PIECE_CHARS
    buffer: list[str] = []
    size, next_try = 0, piece_chars
    for line in lines:
        buffer.append(line)
        size += len(line)
        if size >= next_try:
            text = "".join(buffer)
            cut = _safe_cut(text)
            if cut is None:
                buffer, next_try = [text], 2 * size  # try again once it has doubled, not at every line
                continue
            yield text[:cut]
            buffer, size, next_try = [text[cut:]], len(text) - cut, piece_chars
    text = "".join(buffer)
    if text:
        yield text


def _missing_column(column: str, where: str, columns: Iterable[str]) -> ValueError:
    return ValueError(
        f"Column {column!r} not found in {where}; its columns are {sorted(columns)}. Pass --text_column with one of "
        "them."
    )


def _iter_documents(
    ds: IterableDataset | list[tuple[IterableDataset, bool]], source: _Source, args: DataArguments, counts: _Counts
) -> Iterator[tuple[str, bool]]:
    """The non-empty texts of a split, in order, as `(text, starts a document)`: a `.txt` file comes in pieces."""
    where = source.describe(args)
    column = args.text_column
    if isinstance(ds, list):  # .txt files: runs of small ones read whole, and larger ones line by line
        if column != "text":
            raise _missing_column(column, where, ["text"])
        for files_ds, whole in ds:
            tables = _iter_rows(files_ds.with_format("arrow"), source, args, where)
            if whole:  # one row per file
                documents = ([text] for table in tables for text in table["text"].to_pylist())
            else:  # Arrow batches of one file's lines, each joined into one string: no Python object per line
                documents = [("".join(table["text"].to_pylist()) for table in tables)]
            for texts in documents:
                first = True
                for piece in _txt_pieces(texts):
                    yield piece, first
                    first = False
                if first:
                    counts.empty_documents += 1
                else:
                    counts.documents += 1
        return
    if ds.column_names:  # [] when the stream has no rows (a .jsonl of blank lines): that is an empty corpus
        if column not in ds.column_names:
            raise _missing_column(column, where, ds.column_names)
        ds = ds.select_columns([column])
    for batch in _iter_rows(ds, source, args, where):
        if column not in batch:
            raise _missing_column(column, where, batch)
        for text in batch[column]:
            if text is None or text == "":
                counts.empty_documents += 1
                continue
            if not isinstance(text, str):
                raise _not_text(column, where, type(text).__name__)
            counts.documents += 1
            yield text, True


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


def _encode_documents(documents: list[tuple[str, bool]]) -> np.ndarray:
    """`eot doc1 eot doc2 ...` as uint16 (runs in the tokenizer processes); a piece that continues a document gets
    no `eot` of its own."""
    encoding = get_encoding()
    eot = encoding.eot_token
    ids: list[int] = []
    for text, starts_document in documents:
        if starts_document:
            ids.append(eot)
        ids.extend(encoding.encode_ordinary(text))
    return np.array(ids, dtype=TOKEN_DTYPE)


def _tokenizer_process_init() -> None:
    """First thing in each tokenizer process: let go of the folder lock it inherited, and die with its parent.

    A forked process holds copies of its parent's file descriptors, the `.prepare.lock` one among them, and `flock`
    is released only when every copy is closed. A prepare killed outright (SIGKILL, the out-of-memory killer) left its
    tokenizer processes behind, blocked on their queues for ever and holding the lock: the next prepare of the folder
    (a new run, every process of it) waited for it without a word. On Linux they are also killed with their parent
    (`PR_SET_PDEATHSIG`), rather than linger with their documents in memory.
    """
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()
    die_with_parent(signal.SIGKILL)


def die_with_parent(sig: signal.Signals) -> bool:
    """Have Linux send `sig` to this process when its parent dies (`PR_SET_PDEATHSIG`), at once where the parent died
    before the request; False where that cannot be set (not Linux, no `prctl` to call)."""
    if sys.platform != "linux":
        return False
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it died before the request: the signal it would have sent
        os.kill(os.getpid(), sig)
    return True


def _document_batches(documents: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    chars = 0
    for document in documents:
        batch.append(document)
        chars += len(document[0])
        if len(batch) >= _DOCS_PER_TASK or chars >= _CHARS_PER_TASK:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_stream(batches: Iterator[list[str]], num_proc: int) -> Iterator[np.ndarray]:
    """Token arrays of the document batches, in order, from `num_proc` processes with a bounded number in flight.

    (`Pool.imap` would read the whole input ahead of the workers; submitting through a bounded queue keeps memory
    flat on a streamed corpus.) A process that dies (the kernel's out-of-memory killer) is a `PrepareError`.
    """
    if num_proc <= 1:
        for batch in batches:
            yield _encode_documents(batch)
        return
    context = multiprocessing.get_context()
    pool = concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=context, initializer=_tokenizer_process_init)
    with pool:
        pending: collections.deque = collections.deque()
        try:
            for batch in batches:
                pending.append(pool.submit(_encode_documents, batch))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except concurrent.futures.process.BrokenProcessPool as err:  # `multiprocessing.Pool` would wait forever
            raise PrepareError(
                f"A tokenizer process died (killed by the system: out of memory?) with --num_proc {num_proc}; "
                "prepare again (it starts over) with a lower --num_proc."
            ) from err
        finally:
            for future in pending:
                future.cancel()


class _ShardWriter:
    """Cuts a token stream into `{prefix}_{index:06d}.bin` files of `shard_size` tokens, one buffer in memory."""

    def __init__(self, directory: Path, prefix: str, shard_size: int) -> None:
        self.directory = directory
        self.prefix = prefix
        try:  # pages are only taken as tokens arrive: a shard larger than the corpus costs the corpus
            self.buffer = np.empty(shard_size, dtype=TOKEN_DTYPE)
        except (MemoryError, ValueError):  # ValueError: larger than numpy's largest array
            size = shard_size * TOKEN_DTYPE.itemsize
            raise ValueError(
                f"--shard_size {shard_size:,}: one shard ({size / 2**30:,.0f} GiB) cannot be held in memory while it "
                "is written; pass a smaller --shard_size (the default, 100,000,000 tokens, takes 200 MB)."
            ) from None
        self.filled = 0
        self.shards: list[tuple[str, int]] = []
        self.tokens = 0
        self.started = time.perf_counter()

    def write(self, tokens: np.ndarray) -> None:
        start = 0
        while start < len(tokens):
            n = min(len(tokens) - start, len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[start : start + n]
            self.filled += n
            start += n
            if self.filled == len(self.buffer):
                self._flush()

    def close(self) -> list[tuple[str, int]]:
        self._flush()
        return self.shards

    def _flush(self) -> None:
        if self.filled == 0:
            return
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        _write_tokens(self.directory / name, self.buffer[: self.filled])
        self.shards.append((name, self.filled))
        self.tokens += self.filled
        self.filled = 0
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        # "part": the stream that the val split is cut from at the end (its files are renamed train_*/val_* then)
        split = "train + val" if self.prefix == "part" else self.prefix
        logger.info("%s: %s tokens so far (%.0f tokens/s)", split, f"{self.tokens:,}", rate)


def _write_tokens(path: Path, tokens: np.ndarray) -> None:
    """Writes a shard into the staging folder (`path`'s folder, inside the output folder), flushed to disk.

    Raises:
        PrepareError: a failed write (a full disk: numpy said only "100000 requested and 53248 written"), naming the
            output folder.
    """
    try:
        with open(path, "wb") as f:
            tokens.astype(TOKEN_DTYPE, copy=False).tofile(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise PrepareError(
            f"Writing token shards into {path.parent.parent} failed ({one_line(err)}): is its disk full? Free space "
            "there, then prepare again (it starts over)."
        ) from err


def _tokenize_split(
    ds: IterableDataset, source: _Source, args: DataArguments, directory: Path, prefix: str, counts: _Counts
) -> list[tuple[str, int]]:
    writer = _ShardWriter(directory, prefix, args.shard_size)
    documents = _iter_documents(ds, source, args, counts)
    for tokens in _encode_stream(_document_batches(documents), _num_proc(args)):
        writer.write(tokens)
    return writer.close()


def _num_proc(args: DataArguments) -> int:
    if args.num_proc is not None:
        return args.num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _hold_out_tail(
    directory: Path, parts: list[tuple[str, int]], val_tokens: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Renames the stream's parts into train shards and the last `val_tokens` tokens into val shards.

    The part that straddles the cut is split in two files through a memmap (no more than one shard in memory).
    """
    cut = sum(n for _, n in parts) - val_tokens
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []

    def add(split: list[tuple[str, int]], prefix: str, part: str, tokens: np.ndarray | None = None) -> None:
        """Appends `part` (renamed) or `tokens` (written) to `split` as its next shard."""
        name = f"{prefix}_{len(split):06d}.bin"
        if tokens is None:
            os.replace(directory / part, directory / name)
            split.append((name, (directory / name).stat().st_size // TOKEN_DTYPE.itemsize))
        else:
            _write_tokens(directory / name, tokens)
            split.append((name, len(tokens)))

    offset = 0
    for part, n in parts:
        if offset + n <= cut:
            add(train, "train", part)
        elif offset >= cut:
            add(val, "val", part)
        else:
            tokens = np.memmap(directory / part, dtype=TOKEN_DTYPE, mode="r")
            add(train, "train", part, tokens[: cut - offset])
            add(val, "val", part, tokens[cut - offset :])
            del tokens
            (directory / part).unlink()
        offset += n
    return train, val


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprints, manifest, atomic commit


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _source_record(source: _Source, args: DataArguments, previous: dict | None) -> dict:
    """`{"description", "fingerprint", ...}`; local contents are hashed unless path, size and mtime are unchanged."""
    if not source.is_local:
        hub = {"id": source.hub_id, "config": args.dataset_config, "revision": args.dataset_revision}
        fingerprint = hashlib.sha256(json.dumps(hub, sort_keys=True).encode()).hexdigest()
        return {"description": source.describe(args), "fingerprint": fingerprint, "hub": hub}
    known = {f["path"]: f for f in ((previous or {}).get("source") or {}).get("files", []) if isinstance(f, dict)}
    files = []
    for path in source.files:
        stat = path.stat()
        entry = {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = known.get(entry["path"], {})
        same_file = old.get("bytes") == entry["bytes"] and old.get("mtime_ns") == entry["mtime_ns"]
        entry["sha256"] = old["sha256"] if same_file and "sha256" in old else _sha256_file(path)
        files.append(entry)
    content = {"builder": source.builder, "files": [[f["sha256"], f["bytes"]] for f in files]}
    fingerprint = hashlib.sha256(json.dumps(content).encode()).hexdigest()
    return {"description": source.describe(args), "fingerprint": fingerprint, "files": files}


def _settings(source: _Source, args: DataArguments) -> dict:
    """The arguments that change the shards (local files ignore `split` and `val_split`)."""
    return {
        "split": args.split if not source.is_local else "train",
        "val_split": args.val_split if not source.is_local else None,
        "text_column": args.text_column,
        "val_fraction": args.val_fraction if args.val_split is None or source.is_local else None,
        "shard_size": args.shard_size,
    }


def _tokenizer_info() -> dict:
    encoding = get_encoding()
    info = {"name": "gpt2", "n_vocab": encoding.n_vocab, "eot_token": encoding.eot_token}
    if info != TOKENIZER_INFO:
        raise ValueError(f"get_encoding() is not GPT-2's encoding ({info}); the shards store GPT-2 ids as uint16.")
    return info


def _difference(old: dict, new: dict) -> str | None:
    """Why a prepared folder does not match what is asked now, or None when it does."""
    if old.get("format_version") != new["format_version"]:
        return f"format version {old.get('format_version')!r} (this code writes {new['format_version']})"
    if old.get("tokenizer") != new["tokenizer"]:
        return f"tokenizer {old.get('tokenizer')} (now {new['tokenizer']})"
    old_source = old.get("source") or {}
    if old_source.get("fingerprint") != new["source"]["fingerprint"]:
        return f"a different source ({old_source.get('description', 'unknown')}; now {new['source']['description']})"
    for key, value in new["settings"].items():
        if (old.get("settings") or {}).get(key) != value:
            return f"{key}={(old.get('settings') or {}).get(key)!r} (now {value!r})"
    return None


def _prepared_from_missing_corpus(out: Path, args: DataArguments) -> dict | None:
    """The manifest of `out` when its shards were prepared from local files at the path `args.dataset` names (a file,
    a folder, or a glob that now matches nothing), with these settings and tokenizer, and are intact; else None.
    Shards copied to another machine, or kept after the text was archived, stay usable by the same command."""
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError, OSError):
        return None
    files = [Path(f["path"]) for f in (manifest.get("source") or {}).get("files") or [] if "path" in f]
    expanded = os.path.expanduser(args.dataset)
    named, pattern = Path(expanded).resolve(), os.path.abspath(expanded)
    if not files or not all(
        f == named or named in f.parents or (glob.has_magic(expanded) and fnmatch.fnmatch(str(f), pattern))
        for f in files
    ):
        return None
    wanted = {  # what preparing would ask for, with the source as recorded (its files cannot be read)
        "format_version": FORMAT_VERSION,
        "tokenizer": _tokenizer_info(),
        "source": manifest["source"],
        "settings": _settings(_Source(name=args.dataset, files=tuple(files)), args),
    }
    return manifest if _difference(manifest, wanted) is None and _shards_intact(out, manifest) else None


def _shards_intact(directory: Path, manifest: dict) -> bool:
    for entries in manifest.get("splits", {}).values():
        for entry in entries:
            path = directory / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["tokens"] * TOKEN_DTYPE.itemsize:
                return False
    return True


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}-{path.name}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(staging: Path, out: Path, manifest: dict) -> None:
    """Moves the shards from `staging` into `out`, then writes the manifest: the manifest is the commit point."""
    manifest_path = out / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)  # from here until the end, no manifest points at half-replaced shards
    new_files = {entry["file"] for entries in manifest["splits"].values() for entry in entries}
    for stale in out.iterdir():
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in new_files:
            stale.unlink()
    for name in sorted(new_files):
        os.replace(staging / name, out / name)
    fsync_dir(out)
    _write_json_atomic(manifest_path, manifest)
    fsync_dir(out)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """An exclusive `flock` on `out/.prepare.lock`. In a folder this process cannot write to, the lock file is
    opened to read (flock needs no write access), or, where there is none, nothing is locked: such a folder is only
    read."""
    if fcntl is None:
        yield
        return
    try:
        lock = open(out / _LOCK_NAME, "a")  # closed by the `with` below
    except OSError:  # a read-only folder (a copy on read-only storage, another user's)
        try:
            lock = open(out / _LOCK_NAME)
        except OSError:
            yield
            return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _HELD_LOCKS.add(lock.fileno())  # not to be held by the tokenizer processes (`_tokenizer_process_init`)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(lock.fileno())
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The `manifest.json` of a prepared folder (`data_dir` may also be the manifest's own path).

    Raises:
        FileNotFoundError: when the folder has no manifest (not prepared, or an interrupted prepare).
        ValueError: when the manifest is unreadable, of another format version, or lacks its shard list.
    """
    path = Path(data_dir)
    if path.name != MANIFEST_NAME:
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MANIFEST_NAME} in {str(path.parent)!r}; prepare the folder first: python -m "
            f"modeling_gpt2_scratch.data prepare --dataset SOURCE --output_dir {path.parent}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Cannot read {str(path)!r} ({one_line(err)}); prepare the folder again with {_REBUILD_FLAGS}."
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(
            f"{str(path)!r} has format version {version!r}, this code reads {FORMAT_VERSION}; "
            f"prepare the folder again with {_REBUILD_FLAGS}."
        )
    if manifest.get("dtype") != "uint16":
        raise ValueError(
            f"{str(path)!r} has dtype {manifest.get('dtype')!r}, expected 'uint16'; prepare the folder again with "
            f"{_REBUILD_FLAGS}."
        )
    splits = manifest.get("splits")
    entries_ok = isinstance(splits, dict) and all(
        isinstance(entries, list)
        and all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and type(e.get("tokens")) is int for e in entries
        )
        for entries in splits.values()
    )
    if not entries_ok or not isinstance(manifest.get("source"), dict):
        raise ValueError(
            f"{str(path)!r} lacks its 'source', or its 'splits' of shard files and token counts (edited by hand?); "
            f"prepare the folder again with {_REBUILD_FLAGS}."
        )
    return manifest


def _check_args(args: DataArguments) -> None:
    if not isinstance(args.shard_size, int) or args.shard_size < 1:
        raise ValueError(f"--shard_size must be a positive number of tokens, got {args.shard_size!r}.")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be in [0, 1), got {args.val_fraction!r}.")
    if args.num_proc is not None and args.num_proc < 1:
        raise ValueError(f"--num_proc must be at least 1, got {args.num_proc!r}.")
    if not args.text_column:
        raise ValueError("--text_column must name a column, got an empty string.")
    if not str(args.dataset).strip():  # an unset shell variable: Path("") is ".", the working folder read as corpus
        raise ValueError(
            "--dataset is empty: pass a text file, a folder or glob of data files, or a Hub dataset id such as "
            "karpathy/tiny_shakespeare."
        )


def _cannot_write(out: Path, err: OSError) -> str:
    return (
        f"Cannot write the shards to {str(out)!r} ({err.strerror or one_line(err)}); pass a folder you can write to "
        "(--output_dir; trainer: --data_dir)."
    )


def prepare_dataset(
    args: DataArguments, output_dir: str | os.PathLike | None = None, overwrite: bool | None = None
) -> Path:
    """Tokenizes `args.dataset` into uint16 shards and a manifest in `output_dir`, or reuses what is already there.

    Call it on one process per machine (e.g. the main process, before the others build their loaders); concurrent
    calls on one folder wait for each other and then reuse the result.

    Args:
        args: the source and shard settings (a `PrepareArguments` also carries `output_dir` and `overwrite`).
        output_dir: the folder for shards and manifest; defaults to `args.output_dir`.
        overwrite: rebuild a folder prepared from another source, tokenizer or settings instead of raising; defaults
            to `args.overwrite` (False for plain `DataArguments`).

    Returns:
        The path of `manifest.json`; `ShardedTokenLoader` takes it or its folder.

    Raises:
        FileNotFoundError: a local path that does not exist, a glob or folder with no data files, a Hub id that
            does not exist.
        ValueError: every other bad input, each with its fix: the Hub unreachable, an empty corpus, a missing text
            column, undecodable bytes in a .txt file, a folder prepared from something else, bad settings.
    """
    if output_dir is None:
        output_dir = getattr(args, "output_dir", None)
        if output_dir is None:
            raise ValueError("prepare_dataset needs an output_dir (or PrepareArguments with one).")
    if overwrite is None:
        overwrite = bool(getattr(args, "overwrite", False))
    _check_args(args)
    out = Path(output_dir)
    try:
        source, missing = _resolve_source(args.dataset, exclude=out), None
    except FileNotFoundError as err:
        source, missing = None, err
    # a path that matches nothing now, or a name that no local path has now (`corpus`, `data/mine`: taken for a Hub
    # id), may be where the folder's shards were prepared from: archived since, or the shards copied elsewhere
    if missing is not None or source.hub_id is not None:
        manifest = _prepared_from_missing_corpus(out, args)
        if manifest is not None:
            logger.warning(
                "--dataset %r is not there (any more); reusing the shards in %s that were prepared from it (%s), as "
                "they are: the corpus itself cannot be checked.",
                args.dataset,
                out,
                manifest["source"].get("description"),
            )
            return out / MANIFEST_NAME
        if missing is not None:
            raise missing
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file; pass a folder (--output_dir; trainer: --data_dir).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # read-only storage, a file on its path: was a bare "[Errno 30] Read-only file system"
        raise ValueError(_cannot_write(out, err)) from err
    manifest_path = out / MANIFEST_NAME

    with _folder_lock(out):
        for stale in out.glob(f"{_TMP_PREFIX}*"):  # what an interrupted prepare left behind
            with contextlib.suppress(OSError):  # a read-only folder keeps them
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        previous = None
        if manifest_path.exists():
            try:
                previous = read_manifest(out)
            except ValueError:
                if not overwrite:
                    raise
        wanted = {
            "format_version": FORMAT_VERSION,
            "tokenizer": _tokenizer_info(),
            "source": _source_record(source, args, previous),
            "settings": _settings(source, args),
        }
        if previous is not None:
            reason = _difference(previous, wanted)
            if reason is None and _shards_intact(out, previous):
                logger.info("Reusing the shards in %s (%s)", out, wanted["source"]["description"])
                if previous["source"] != wanted["source"]:  # same contents, newly hashed: remember path, size, mtime
                    try:
                        _write_json_atomic(manifest_path, previous | {"source": wanted["source"]})
                    except OSError as err:  # a folder it may read but not write: hashed again next time
                        logger.debug("Could not update %s: %s", manifest_path, err)
                return manifest_path
            if reason is None:
                logger.warning("Shards listed in %s are missing or truncated; preparing them again", manifest_path)
            elif not overwrite:
                raise ValueError(
                    f"{str(out)!r} already holds shards prepared with {reason}; pass --overwrite (trainer: "
                    "--overwrite_data) to rebuild it, or use another folder (--output_dir; trainer: --data_dir)."
                )
            else:
                logger.warning("Overwriting %s (it was prepared with %s)", out, reason)

        staging = out / f"{_TMP_PREFIX}-{os.getpid()}"
        try:
            staging.mkdir()
        except OSError as err:  # a read-only folder with nothing to reuse
            raise ValueError(_cannot_write(out, err)) from err
        try:
            splits, stats = _build_shards(source, args, staging)
            manifest = {
                "format_version": FORMAT_VERSION,
                "tokenizer": wanted["tokenizer"],
                "dtype": "uint16",
                "splits": splits,
                "source": wanted["source"],
                "settings": wanted["settings"],
                "stats": stats,
            }
            _commit(staging, out, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Prepared %s: %s train and %s val tokens from %s documents",
        out,
        f"{stats['train_tokens']:,}",
        f"{stats['val_tokens']:,}",
        f"{stats['documents']:,}",
    )
    return manifest_path


def _build_shards(source: _Source, args: DataArguments, staging: Path) -> tuple[dict, dict]:
    """Tokenizes the source into `staging`; returns the manifest's `splits` and `stats`."""
    where = source.describe(args)
    counts = _Counts()
    use_val_split = args.val_split is not None and not source.is_local
    if use_val_split and args.val_split == args.split:
        raise ValueError(
            f"--val_split {args.val_split} is the training split (--split): its loss would measure nothing held out; "
            f"pass another split of {where}, or --val_split none to hold out the last --val_fraction of it."
        )
    train_ds = _open_split(source, args.split, args)
    if args.split != "train" and source.is_local:
        logger.info("Local files form one stream: ignoring --split %s; training on all of them", args.split)
    if args.val_split is not None and source.is_local:
        logger.info("Local files form one stream: ignoring --val_split; holding out --val_fraction instead")
    if args.dataset_config is not None and source.is_local:
        logger.info("Local files have no Hub configurations: ignoring --dataset_config %s", args.dataset_config)
    val_ds = _open_split(source, args.val_split, args) if use_val_split else None  # a bad name fails before the work
    parts = _tokenize_split(train_ds, source, args, staging, "train" if use_val_split else "part", counts)
    if not parts:
        split = f"split {args.split!r} of " if not source.is_local else ""
        raise ValueError(
            f"Empty corpus: {split}{where} has no text in column {args.text_column!r} "
            f"({counts.empty_documents} empty documents); pass a source that holds text."
        )
    if val_ds is not None:
        train = parts
        val = _tokenize_split(val_ds, source, args, staging, "val", counts)
        if not val:
            raise ValueError(
                f"Empty corpus: split {args.val_split!r} of {where} has no text in column {args.text_column!r}; "
                "pass another --val_split, or none to hold out --val_fraction."
            )
    else:
        total = sum(n for _, n in parts)
        val_tokens = round(total * args.val_fraction)
        if val_tokens == 0 and args.val_fraction > 0:
            logger.warning(
                "--val_fraction %s of %d tokens holds out nothing: the val split is empty", args.val_fraction, total
            )
        if val_tokens >= total:
            raise ValueError(f"--val_fraction {args.val_fraction} leaves no training tokens of {where}; lower it.")
        train, val = _hold_out_tail(staging, parts, val_tokens)
    splits = {
        "train": [{"file": name, "tokens": n} for name, n in train],
        "val": [{"file": name, "tokens": n} for name, n in val],
    }
    stats = {
        "documents": counts.documents,
        "empty_documents": counts.empty_documents,
        "train_tokens": sum(n for _, n in train),
        "val_tokens": sum(n for _, n in val),
    }
    return splits, stats


# ---------------------------------------------------------------------------------------------------------------------
# Loader


class ShardedTokenLoader:
    """`(x, y)` batches of one rank from a prepared split, read through `np.memmap`, resumable exactly.

    The split's shards are one token stream (a batch may span two shards; nothing is dropped at shard ends). It is
    cut into chunks of `B*T` tokens; batch `i` of an epoch of rank `r` is chunk `i * world_size + r`, with `x` its
    `B*T` tokens and `y` the same window shifted by one token (so consecutive chunks overlap by `y`'s last token).
    Round `i` of all ranks thus reads consecutive chunks. An epoch is a whole number of optimizer steps of all ranks
    (`batches_per_step` batches each, the gradient accumulation): the remainder (less than one step's
    `world_size*batches_per_step*B*T` tokens, at the end of the split) is skipped, then the stream starts over from
    its first token and `epoch` goes up by one. So `world_size` ranks together see what one rank with `world_size`
    times the gradient accumulation sees, step for step, in every epoch, and no optimizer step spans two epochs.

    `state_dict()` is the same on every rank (epoch and batch index), so saving it from the main process only (as
    `accelerator.save_state` does for `register_for_checkpointing` objects) restores every rank. A restored loader
    needs the same split, sequence length and world size; another batch size (or accumulation) continues from the
    same token.

    Args:
        data_dir: a folder written by `prepare_dataset`, or its `manifest.json`.
        split: `"train"` or `"val"`.
        batch_size: `B`, sequences per batch on this rank.
        seq_len: `T`, tokens per sequence.
        rank: this process's index among `world_size` (accelerate: `accelerator.process_index`).
        world_size: the number of processes (accelerate: `accelerator.num_processes`).
        batches_per_step: batches per rank and optimizer step (the gradient accumulation); 1 for evaluation.

    Raises:
        FileNotFoundError: no manifest (or a shard is missing).
        ValueError: unknown split, bad sizes, or a split with fewer than `world_size * batches_per_step * B * T + 1`
            tokens (one optimizer step).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        batches_per_step: int = 1,
    ) -> None:
        sizes = ("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)
        for name, value in (*sizes, ("batches_per_step", batches_per_step)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}.")
        manifest = read_manifest(data_dir)
        self.data_dir = Path(data_dir).parent if Path(data_dir).name == MANIFEST_NAME else Path(data_dir)
        if split not in manifest["splits"]:
            raise ValueError(
                f"Split {split!r} not in {str(self.data_dir / MANIFEST_NAME)!r}; it has {sorted(manifest['splits'])}."
            )
        self.split = split
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.batches_per_step = batches_per_step
        self._shards = [self._open_shard(entry) for entry in manifest["splits"][split]]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # token offset of each shard, and the end
        self.num_tokens = int(self._starts[-1])
        needed = world_size * batches_per_step * batch_size * seq_len + 1
        if self.num_tokens < needed:
            fix = " (or prepare with a larger --val_fraction)" if split == "val" else " (or prepare more text)"
            accumulation = f" x batches_per_step {batches_per_step}" if batches_per_step > 1 else ""
            what = "one optimizer step" if batches_per_step > 1 else "one batch per rank"
            lower = "the tokens per step (--total_batch_tokens)" if batches_per_step > 1 else "the batch size"
            raise ValueError(
                f"Split {split!r} of {str(self.data_dir)!r} has {self.num_tokens:,} tokens, fewer than the "
                f"{needed:,} that {what} needs (world_size {world_size}{accumulation} x batch_size {batch_size} x "
                f"seq_len {seq_len} + 1); lower {lower} or the sequence length{fix}."
            )
        self.batches_per_epoch = self._batches_per_epoch(batch_size)
        self.epoch = 0  # completed passes over the split
        self._batch = 0  # batches this rank has taken in the current epoch

    def _batches_per_epoch(self, batch_size: int) -> int:
        """Batches of `batch_size` sequences per rank in one pass over the split: whole optimizer steps of all ranks
        (the remainder is skipped)."""
        step_tokens = self.world_size * self.batches_per_step * batch_size * self.seq_len
        return (self.num_tokens - 1) // step_tokens * self.batches_per_step

    def _open_shard(self, entry: dict) -> np.memmap:
        path = self.data_dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"Shard {str(path)!r} is missing; prepare {str(self.data_dir)!r} again.")
        size = path.stat().st_size
        if size != entry["tokens"] * TOKEN_DTYPE.itemsize:
            raise ValueError(
                f"Shard {str(path)!r} has {size} bytes, the manifest says {entry['tokens']} tokens; "
                f"prepare {str(self.data_dir)!r} again with {_REBUILD_FLAGS}."
            )
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of the split as int64, across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            offset = start - int(self._starts[shard])
            end = min(stop, int(self._starts[shard + 1]))
            pieces.append(self._shards[shard][offset : offset + end - start])
            start = end
            shard += 1
        return np.concatenate(pieces).astype(np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `(x, y)`, both int64 `(B, T)`, `y[:, t] == x[:, t + 1]` within the stream."""
        B, T = self.batch_size, self.seq_len
        start = (self._batch * self.world_size + self.rank) * B * T
        tokens = torch.from_numpy(self._read(start, start + B * T + 1))
        x = tokens[:-1].view(B, T)
        y = tokens[1:].view(B, T)
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._batch = 0
            self.epoch += 1
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches (it wraps around); take as many as needed."""
        while True:
            yield self.next_batch()

    def reset(self) -> None:
        """Back to the first batch of epoch 0 (e.g. before each evaluation over the val split)."""
        self.epoch = 0
        self._batch = 0

    def state_dict(self) -> dict[str, Any]:
        """The position (the same on every rank) and the shape it is valid for; plain Python values."""
        return {
            "split": self.split,
            "num_tokens": self.num_tokens,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "batch_in_epoch": self._batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from `state`: the next batch is the one the saving loader would have given next.

        A state saved with another batch size (a resume that changes `--micro_batch_size`) continues from the same
        token of the stream, which must start a batch of this size (an optimizer step's end does: its tokens are a
        whole number of micro-batches of either size); where that is past this loader's last batch of the epoch (its
        epoch may be shorter: another accumulation, or a state saved before epochs were whole optimizer steps), the
        next epoch starts.
        """
        for key in ("split", "num_tokens", "seq_len", "world_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"Cannot resume the {self.split!r} loader: the saved state has {key}={state.get(key)!r}, this "
                    f"loader {key}={getattr(self, key)!r}; resume with the same data, sequence length and number of "
                    "processes."
                )
        saved_batch_size = state.get("batch_size")
        if not isinstance(saved_batch_size, int) or saved_batch_size < 1:
            raise ValueError(f"Cannot resume the {self.split!r} loader from a corrupt state {state}.")
        rounds = (self.num_tokens - 1) // (saved_batch_size * self.seq_len) // self.world_size  # in any epoch
        if not 0 <= state["batch_in_epoch"] < rounds or state["epoch"] < 0:
            raise ValueError(f"Cannot resume the {self.split!r} loader from a corrupt state {state}.")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if saved_batch_size != self.batch_size:
            sequences = batch * saved_batch_size  # per rank and round: the same place in the stream
            if sequences % self.batch_size:
                raise ValueError(
                    f"Cannot resume the {self.split!r} loader with batch_size={self.batch_size}: the saved state "
                    f"(batch {batch} of {saved_batch_size} sequences) is not at the start of a batch of that size; "
                    f"resume with batch_size={saved_batch_size}, or one that divides {sequences}."
                )
            batch = sequences // self.batch_size
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self._batch = epoch, batch


# ---------------------------------------------------------------------------------------------------------------------
# CLI

_USAGE = "usage: python -m modeling_gpt2_scratch.data prepare --dataset SOURCE --output_dir DIR [options]"


def unrecognized_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """argparse's "unrecognized arguments: ..." for a command line, naming the flag closest to the first one (a typo:
    `--max_stpes` -> `--max_steps`)."""
    flags = [option for action in parser._actions for option in action.option_strings]
    first = unknown[0].split("=")[0]
    guess = difflib.get_close_matches(first, flags, n=1) if first.startswith("-") else []
    return f"unrecognized arguments: {' '.join(unknown)}" + (f": did you mean {guess[0]}?" if guess else "")


def one_line_parse_errors(parser: argparse.ArgumentParser) -> None:
    """Make `parser`'s own errors (a bad value or choice, a missing flag) a `ValueError` of one line, which the
    command prints as `error: ...`, instead of argparse's usage block (dozens of lines) above it and its exit."""

    def error(message: str):
        raise ValueError(f"{message} (see --help)")

    parser.error = error


def configure_cli_logging(fmt: str, *own: str) -> None:
    """A command line's logging: INFO from its own loggers (`own`, and their children), WARNING and above from every
    other library. A library's INFO lines (matplotlib building its font cache on a fresh machine, one line per HTTP
    request) are not what the user asked to see."""
    logging.basicConfig(format=fmt, level=logging.WARNING)
    for name in own:
        logging.getLogger(name).setLevel(logging.INFO)


PREPARE_DESCRIPTION = "Tokenize a Hub dataset or local files into uint16 token shards and a manifest.json."


def main(argv: list[str] | None = None) -> int:
    """`python -m modeling_gpt2_scratch.data prepare ...`; returns the exit status (2 on bad input, one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    configure_cli_logging("%(asctime)s %(levelname)s %(name)s: %(message)s", "modeling_gpt2_scratch")
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{_USAGE}\n\nCommands:\n  prepare  {PREPARE_DESCRIPTION}\n\n`prepare --help` lists its options.")
        return 0
    if argv[:1] != ["prepare"]:
        print(f"error: expected the command 'prepare'; {_USAGE}", file=sys.stderr)
        return 2
    parser = HfArgumentParser(
        PrepareArguments,
        prog="python -m modeling_gpt2_scratch.data prepare",
        description=PREPARE_DESCRIPTION,
    )
    one_line_parse_errors(parser)
    try:
        args, unknown = parser.parse_args_into_dataclasses(argv[1:], return_remaining_strings=True)
        if unknown:
            raise ValueError(f"{unrecognized_arguments(parser, unknown)} (see --help)")
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        manifest_path = prepare_dataset(args)
    except (ValueError, OSError, PrepareError) as err:  # OSError: e.g. an --output_dir under a file, a full disk
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1 if isinstance(err, PrepareError) else 2
    print(manifest_path)
    return 0


if __name__ == "__main__":
    # Run the importable module's `main`, so tokenizer processes find `_encode_documents` under its real name.
    from modeling_gpt2_scratch.data import main as _main

    sys.exit(_main())
