"""The data pipeline: sources -> uint16 shards + manifest -> ShardedTokenLoader batches."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from modeling_gpt2_scratch import data
from modeling_gpt2_scratch.data import (
    MANIFEST_NAME,
    DataArguments,
    ShardedTokenLoader,
    main,
    prepare_dataset,
    read_manifest,
)
from modeling_gpt2_scratch.tokenization import get_encoding

EOT = 50256


def read_split(data_dir: Path, split: str) -> np.ndarray:
    """A split's token stream, read the way another tool would: the manifest plus `np.fromfile` per shard."""
    manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
    arrays = [np.fromfile(data_dir / entry["file"], dtype="<u2") for entry in manifest["splits"][split]]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype="<u2")


def expected_stream(documents: list[str]) -> list[int]:
    encoding = get_encoding()
    ids = []
    for text in documents:
        ids += [EOT] + encoding.encode_ordinary(text)
    return ids


def write_token_shards(data_dir: Path, tokens: np.ndarray, shard_size: int, split: str = "train") -> Path:
    """A prepared folder written by hand in the documented format (the loader needs nothing else)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, start in enumerate(range(0, len(tokens), shard_size)):
        name = f"{split}_{i:06d}.bin"
        tokens[start : start + shard_size].astype("<u2").tofile(data_dir / name)
        entries.append({"file": name, "tokens": len(tokens[start : start + shard_size])})
    manifest = {
        "format_version": 1,
        "tokenizer": {"name": "gpt2", "n_vocab": 50257, "eot_token": EOT},
        "dtype": "uint16",
        "splits": {split: entries},
        "source": {"description": "test", "fingerprint": "test"},
    }
    (data_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    return data_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare(source, output_dir, **kwargs) -> Path:
    kwargs = {"num_proc": 1, "val_fraction": 0.0, **kwargs}
    return prepare_dataset(DataArguments(dataset=str(source), **kwargs), output_dir)


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory, shared_dir):
    """Tiny Shakespeare prepared once: 50k-token shards, last 10% held out."""
    out = tmp_path_factory.mktemp("shakespeare")
    prepare(shared_dir / "data" / "tinyshakespeare.txt", out, shard_size=50_000, val_fraction=0.1)
    return out


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small .jsonl corpus (40 documents) in its own folder."""
    (tmp_path / "corpus").mkdir()
    rows = [{"text": f"Document {i}: " + "the quick brown fox " * (i % 7 + 1), "id": i} for i in range(40)]
    return write_jsonl(tmp_path / "corpus" / "docs.jsonl", rows)


# --- preparing -------------------------------------------------------------------------------------------------------


def test_tiny_shakespeare_decodes_back_to_the_original(shakespeare_dir, shared_dir):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    stream = np.concatenate([read_split(shakespeare_dir, "train"), read_split(shakespeare_dir, "val")])
    assert get_encoding().decode(stream.tolist()) == "<|endoftext|>" + text


def test_val_split_is_the_last_fraction_of_the_stream(shakespeare_dir):
    train, val = read_split(shakespeare_dir, "train"), read_split(shakespeare_dir, "val")
    assert len(val) == round(0.1 * (len(train) + len(val)))
    assert train[0] == EOT and EOT not in val  # one document: the cut falls inside it


def test_local_files_ignore_split_names_and_say_so(corpus, tmp_path, caplog):
    prepare(corpus, tmp_path / "plain")
    with caplog.at_level("INFO", logger=data.__name__):
        prepare(corpus, tmp_path / "named", split="test", val_split="validation", dataset_config="sample-10BT")
    plain, named = read_split(tmp_path / "plain", "train"), read_split(tmp_path / "named", "train")
    assert len(plain) > 0 and np.array_equal(named, plain)  # the same one stream, all of it
    assert "ignoring --split test" in caplog.text and "ignoring --val_split" in caplog.text
    assert "ignoring --dataset_config sample-10BT" in caplog.text


def test_shards_hold_shard_size_tokens_as_raw_uint16(shakespeare_dir):
    manifest = read_manifest(shakespeare_dir)
    train = manifest["splits"]["train"]
    assert [entry["tokens"] for entry in train[:-1]] == [50_000] * (len(train) - 1)
    for entry in train + manifest["splits"]["val"]:
        assert (shakespeare_dir / entry["file"]).stat().st_size == 2 * entry["tokens"]


def _write_txt(folder: Path, documents: list[str]) -> None:
    for name, text in zip(["b.txt", "a.txt", "c.txt"], documents, strict=True):  # written out of order on purpose
        (folder / name).write_text(text, encoding="utf-8")


def _write_jsonl(folder: Path, documents: list[str]) -> None:
    write_jsonl(folder / "part-1.jsonl", [{"text": t, "n": i} for i, t in enumerate(documents[2:], 2)])
    write_jsonl(folder / "part-0.jsonl", [{"text": t, "n": i} for i, t in enumerate(documents[:2])])


def _write_parquet(folder: Path, documents: list[str]) -> None:
    pq.write_table(pa.table({"n": [2], "text": documents[2:]}), folder / "y.parquet")
    pq.write_table(pa.table({"n": [0, 1], "text": documents[:2]}), folder / "x.parquet")


def _write_csv(folder: Path, documents: list[str]) -> None:
    (folder / "b.csv").write_text("text,n\n" + f'"{documents[2]}",2\n')
    (folder / "a.csv").write_text("text,n\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(documents[:2])))


@pytest.mark.parametrize("writer", [_write_txt, _write_jsonl, _write_parquet, _write_csv], ids=lambda f: f.__name__)
def test_multi_file_sources_give_documents_in_sorted_file_order(tmp_path, writer):
    documents = ["First, the alpha document.", "Second: beta, with more words in it.", "Third is gamma."]
    folder = tmp_path / "src"
    folder.mkdir()
    writer(folder, documents)
    # txt: a.txt, b.txt, c.txt hold documents 1, 0, 2; the others hold them in order
    order = [documents[1], documents[0], documents[2]] if writer is _write_txt else documents
    prepare(folder, tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(order)
    assert read_manifest(tmp_path / "out")["stats"]["documents"] == 3


def test_a_txt_file_is_one_document(tmp_path):
    text = "line one\nline two\n\nparagraph two\n"
    (tmp_path / "doc.txt").write_text(text)
    prepare(tmp_path / "doc.txt", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist().count(EOT) == 1


def test_small_txt_files_are_read_whole_in_one_call_and_give_the_tokens_of_each_file(tmp_path, monkeypatch):
    """Runs of small .txt files are read whole, one `load_dataset` call per run, larger files line by line: the
    same documents, in order, with the same text (CRLF and CR read as newlines, a byte-order mark dropped)."""
    monkeypatch.setattr(data, "_TXT_WHOLE_BYTES", 40)
    folder = tmp_path / "src"
    folder.mkdir()
    files = {
        "a.txt": b"alpha\r\nbeta\r\n",
        "b.txt": "\ufeffbom at the start".encode(),
        "c.txt": b"",  # empty: left out of the documents, as before
        "d.txt": b"a larger file, read line by line:\n" * 3,  # over 40 bytes
        "e.txt": b"old mac\rline\r",
        "f.txt": "Жук, 日本 ".encode(),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k["sample_by"]) or real_load(*a, **k))
    prepare(folder, tmp_path / "out")
    texts = ["alpha\nbeta\n", "bom at the start", "a larger file, read line by line:\n" * 3, "old mac\nline\n"]
    texts.append("Жук, 日本 ")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(texts)
    assert calls == ["document", "line", "document"]  # a.txt-c.txt, d.txt, e.txt-f.txt
    stats = read_manifest(tmp_path / "out")["stats"]
    assert stats["documents"] == 5


def test_txt_line_endings_are_read_as_newlines(tmp_path):
    (tmp_path / "dos.txt").write_bytes(b"one\r\ntwo\r\n")
    prepare(tmp_path / "dos.txt", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["one\ntwo\n"])


def test_glob_selects_matching_files(tmp_path):
    (tmp_path / "keep_1.txt").write_text("kept")
    (tmp_path / "skip.txt").write_text("skipped")
    prepare(str(tmp_path / "keep_*.txt"), tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["kept"])


def test_empty_and_null_documents_are_skipped(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": ""}, {"text": None}, {"text": "b"}])
    prepare(tmp_path / "d.jsonl", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["a", "b"])
    assert read_manifest(tmp_path / "out")["stats"]["empty_documents"] == 2


def test_two_processes_write_the_same_shards_as_one(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(data, "_DOCS_PER_TASK", 3)  # many small tasks, so order across processes matters
    prepare(corpus, tmp_path / "one", shard_size=100, num_proc=1)
    prepare(corpus, tmp_path / "two", shard_size=100, num_proc=2)
    assert np.array_equal(read_split(tmp_path / "one", "train"), read_split(tmp_path / "two", "train"))
    assert read_manifest(tmp_path / "one")["splits"] == read_manifest(tmp_path / "two")["splits"]


def test_hub_dataset_uses_its_validation_split(tmp_path, monkeypatch):
    splits = {"train": ["Train text, one row."], "validation": ["Held-out text."]}
    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"text": splits[split]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)  # data imports it when it tokenizes
    prepare("someone/tiny", tmp_path / "out", val_split="validation", val_fraction=0.5)
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(splits["train"])
    assert read_split(tmp_path / "out", "val").tolist() == expected_stream(splits["validation"])
    assert {call[2] for call in calls} == {"train", "validation"} and all(call[3] for call in calls)


def test_a_val_split_that_is_the_training_split_is_an_error_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("nothing should be read"))
    with pytest.raises(ValueError, match="--val_split train is the training split .*--val_split none"):
        prepare("someone/tiny", tmp_path / "out", split="train", val_split="train")
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("manifest.json"))


# --- idempotence and atomicity ---------------------------------------------------------------------------------------


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix in (".bin", ".json")}


def test_preparing_again_reuses_the_shards(tmp_path, corpus):
    prepare(corpus, tmp_path / "out", shard_size=100)
    before = _mtimes(tmp_path / "out")
    prepare(corpus, tmp_path / "out", shard_size=100)
    assert _mtimes(tmp_path / "out") == before and len(before) > 2


def test_a_touched_but_unchanged_source_is_reused_and_hashed_once(tmp_path, corpus, monkeypatch):
    prepare(corpus, tmp_path / "out", shard_size=100)
    before = {k: v for k, v in _mtimes(tmp_path / "out").items() if k != MANIFEST_NAME}
    hashed = []
    real_hash = data._sha256_file
    monkeypatch.setattr(data, "_sha256_file", lambda path: hashed.append(path) or real_hash(path))
    os.utime(corpus, ns=(1, 1))  # new mtime, same bytes: hashed again, found equal
    prepare(corpus, tmp_path / "out", shard_size=100)
    prepare(corpus, tmp_path / "out", shard_size=100)  # the new mtime was remembered: not hashed a second time
    assert hashed == [corpus]
    assert {k: v for k, v in _mtimes(tmp_path / "out").items() if k != MANIFEST_NAME} == before
    assert read_manifest(tmp_path / "out")["source"]["files"][0]["mtime_ns"] == 1


def test_a_different_source_in_the_same_folder_errors(tmp_path, corpus):
    prepare(corpus, tmp_path / "out")
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "something else"}])
    with pytest.raises(ValueError, match=r"different source.*--overwrite"):
        prepare(other, tmp_path / "out")


def test_an_output_folder_that_is_a_file_names_both_flags(tmp_path, corpus):
    """The trainer's flag is --data_dir: the message named --output_dir alone (the trainer's run folder)."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"'\S*file' is a file; pass a folder \(--output_dir; trainer: --data_dir\)"):
        prepare(corpus, tmp_path / "file")


def test_an_output_folder_that_cannot_be_written_names_it_and_both_flags(tmp_path, corpus, monkeypatch):
    """Read-only storage, a file on its path: was a bare "[Errno 30] Read-only file system: '...'", naming no flag; a
    read-only folder with nothing to reuse, the same from the staging folder."""
    (tmp_path / "file").write_text("not a folder")
    fix = r"pass a folder you can write to \(--output_dir; trainer: --data_dir\)\.$"
    with pytest.raises(ValueError, match=r"^Cannot write the shards to '\S*file/out' \(Not a directory\); " + fix):
        prepare(corpus, tmp_path / "file" / "out")
    (tmp_path / "empty").mkdir()
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self.parent == tmp_path / "empty":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(ValueError, match=r"^Cannot write the shards to '\S*empty' \(Read-only file system\); " + fix):
        prepare(corpus, tmp_path / "empty")


def test_a_folder_prepared_with_another_tokenizer_errors(tmp_path, corpus):
    prepare(corpus, tmp_path / "out")
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"] = {"name": "llama", "n_vocab": 32000, "eot_token": 2}  # as another tool would write it
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"tokenizer .*llama.*--overwrite"):
        prepare(corpus, tmp_path / "out")


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: "{not json",
        lambda m: json.dumps(m | {"format_version": 2}),
        lambda m: json.dumps(m | {"dtype": "int32"}),
        lambda m: json.dumps({key: value for key, value in m.items() if key != "splits"}),
        lambda m: json.dumps(m | {"splits": {"train": [{"file": "train_000000.bin"}]}}),
        lambda m: json.dumps(m | {"source": None}),
    ],
    ids=["not-json", "format-version-2", "dtype-int32", "no-splits", "a-shard-without-tokens", "no-source"],
)
def test_an_unreadable_manifest_names_the_rebuild_flag_of_both_clis(tmp_path, corpus, damage):
    """The trainer has no --overwrite (argparse: ambiguous between --overwrite_data and --overwrite_output_dir).
    A manifest edited by hand is a one-line error too, for the loader as for a prepare (it was a KeyError)."""
    prepare(corpus, tmp_path / "out")
    manifest_path = tmp_path / "out" / MANIFEST_NAME
    manifest_path.write_text(damage(json.loads(manifest_path.read_text())))
    with pytest.raises(ValueError, match=r"prepare the folder again with --overwrite \(trainer: --overwrite_data\)"):
        prepare(corpus, tmp_path / "out")
    with pytest.raises(ValueError, match=r"prepare the folder again with --overwrite \(trainer: --overwrite_data\)"):
        ShardedTokenLoader(tmp_path / "out", "train", 1, 4)
    prepare_dataset(DataArguments(dataset=str(corpus), num_proc=1, val_fraction=0.0), tmp_path / "out", overwrite=True)
    assert read_manifest(tmp_path / "out")["dtype"] == "uint16"  # --overwrite rebuilds it


def test_different_settings_in_the_same_folder_error(tmp_path, corpus):
    prepare(corpus, tmp_path / "out", shard_size=100)
    with pytest.raises(ValueError, match=r"shard_size=100 \(now 200\).*--overwrite"):
        prepare(corpus, tmp_path / "out", shard_size=200)


def test_overwrite_rebuilds_and_removes_stale_shards(tmp_path, corpus):
    prepare(corpus, tmp_path / "out", shard_size=50)
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "something else"}])
    prepare_dataset(DataArguments(dataset=str(other), num_proc=1, val_fraction=0.0), tmp_path / "out", overwrite=True)
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["something else"])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train_000000.bin"]


def test_an_interrupted_prepare_leaves_no_manifest(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(data, "_DOCS_PER_TASK", 2)
    real_encode = data._encode_documents
    calls = []

    def encode_then_die(documents):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_encode(documents)

    monkeypatch.setattr(data, "_encode_documents", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tmp_path / "out", shard_size=20)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".prepare")] == []


def test_an_interrupted_overwrite_keeps_the_old_manifest_valid(tmp_path, corpus, monkeypatch):
    prepare(corpus, tmp_path / "out", shard_size=20)
    old = read_split(tmp_path / "out", "train")
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": f"new document {i}"} for i in range(10)])
    monkeypatch.setattr(data, "_commit", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(DataArguments(dataset=str(other), num_proc=1, val_fraction=0.0), tmp_path / "out", True)
    assert np.array_equal(ShardedTokenLoader(tmp_path / "out", "train", 1, 4)._read(0, len(old)), old)


def test_an_overwrite_interrupted_while_moving_shards_leaves_no_manifest(tmp_path, corpus, monkeypatch):
    prepare(corpus, tmp_path / "out", shard_size=20)
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "new document"}])
    monkeypatch.setattr(data, "fsync_dir", lambda directory: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # after the new shards replaced the old ones, before the new manifest
        prepare_dataset(DataArguments(dataset=str(other), num_proc=1, val_fraction=0.0), tmp_path / "out", True)
    with pytest.raises(FileNotFoundError, match="prepare the folder first"):
        read_manifest(tmp_path / "out")


# --- the loader ------------------------------------------------------------------------------------------------------


@pytest.fixture
def stream_dir(tmp_path) -> Path:
    """1000 tokens 0..999 (every token names its position) in shards of 64."""
    return write_token_shards(tmp_path / "stream", np.arange(1000), shard_size=64)


def test_batches_are_shifted_by_one_and_cross_shards_without_dropping(stream_dir):
    loader = ShardedTokenLoader(stream_dir, "train", batch_size=2, seq_len=8)
    batches = [loader.next_batch() for _ in range(loader.batches_per_epoch)]
    x = torch.cat([b[0].flatten() for b in batches])
    y = torch.cat([b[1].flatten() for b in batches])
    assert batches[0][0].shape == (2, 8) and x.dtype == torch.int64
    assert torch.equal(x, torch.arange(len(x))) and torch.equal(y, torch.arange(1, len(x) + 1))
    assert loader.batches_per_epoch == 999 // 16


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_batches_that_cover_one_rank(stream_dir, world_size):
    B, T = 2, 8
    single = ShardedTokenLoader(stream_dir, "train", B, T)
    ranks = [ShardedTokenLoader(stream_dir, "train", B, T, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [torch.cat([r.next_batch()[0].flatten() for _ in range(r.batches_per_epoch)]) for r in ranks]
    seen = torch.cat(per_rank).tolist()
    assert len(seen) == len(set(seen))  # disjoint
    single_x = torch.cat([single.next_batch()[0].flatten() for _ in range(ranks[0].batches_per_epoch * world_size)])
    assert sorted(seen) == single_x.tolist()  # together: the single rank's stream, less under world_size*B*T tokens
    assert single.batches_per_epoch * B * T - len(seen) < world_size * B * T


def test_one_step_of_all_ranks_reads_what_one_rank_reads_in_world_size_batches(stream_dir):
    # what makes a 2-process run match a 1-process run with twice the gradient accumulation
    single = ShardedTokenLoader(stream_dir, "train", 2, 8)
    ranks = [ShardedTokenLoader(stream_dir, "train", 2, 8, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        assert torch.equal(
            torch.cat([r.next_batch()[0] for r in ranks]), torch.cat([single.next_batch()[0] for _ in ranks])
        )


@pytest.mark.parametrize("world_size, batches_per_step", [(2, 1), (2, 3), (3, 2)])
def test_ranks_read_what_one_rank_with_their_accumulation_reads_step_for_step_across_epochs(
    stream_dir, world_size, batches_per_step
):
    """An epoch is whole optimizer steps, so N ranks skip the same remainder at its end as one rank with N times the
    accumulation: a 2-process run matched a 1-process one only until the split's first wrap."""
    B, T = 2, 8  # 62 chunks of 16 tokens: 60 in 10 steps of 6 chunks, 62 in 31 steps of 2
    alone = ShardedTokenLoader(stream_dir, "train", B, T, batches_per_step=world_size * batches_per_step)
    ranks = [
        ShardedTokenLoader(stream_dir, "train", B, T, rank=r, world_size=world_size, batches_per_step=batches_per_step)
        for r in range(world_size)
    ]
    steps = 3 * alone.batches_per_epoch // (world_size * batches_per_step) + 1  # into the fourth epoch
    for _ in range(steps):
        together = [row for r in ranks for _ in range(batches_per_step) for row in r.next_batch()[0].tolist()]
        one = [row for _ in range(world_size * batches_per_step) for row in alone.next_batch()[0].tolist()]
        assert sorted(together) == sorted(one)
    assert ranks[0].epoch == alone.epoch == 3
    assert alone.batches_per_epoch % (world_size * batches_per_step) == 0  # no step spans two epochs


def test_a_state_past_a_shorter_epochs_end_starts_the_next_epoch(stream_dir):
    """A loader whose epoch is whole steps of 3 batches (60 of 62 chunks) restores a state saved at batch 61 (by a
    loader of 1-batch steps, or before epochs were whole steps) at the next epoch's first batch."""
    saving = ShardedTokenLoader(stream_dir, "train", 2, 8)
    for _ in range(61):
        saving.next_batch()
    resumed = ShardedTokenLoader(stream_dir, "train", 2, 8, batches_per_step=3)
    resumed.load_state_dict(saving.state_dict())
    assert resumed.epoch == 1 and torch.equal(resumed.next_batch()[0], torch.arange(16).view(2, 8))


def test_a_train_split_smaller_than_one_optimizer_step_is_an_error(stream_dir):
    with pytest.raises(ValueError, match=r"fewer than the 1,025 that one optimizer step needs .*batches_per_step 8.*"
                       r"lower the tokens per step \(--total_batch_tokens\)"):  # fmt: skip
        ShardedTokenLoader(stream_dir, "train", 2, 8, world_size=8, batches_per_step=8)


def test_resume_gives_the_uninterrupted_batches_across_a_shard_boundary(tmp_path):
    data_dir = write_token_shards(tmp_path / "d", np.arange(300), shard_size=50)
    uninterrupted = ShardedTokenLoader(data_dir, "train", 2, 8)
    expected = [uninterrupted.next_batch() for _ in range(13)]
    first = ShardedTokenLoader(data_dir, "train", 2, 8)
    for _ in range(3):
        first.next_batch()
    torch.save(first.state_dict(), tmp_path / "loader.pt")  # as accelerate's save_state does
    resumed = ShardedTokenLoader(data_dir, "train", 2, 8)
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=True))
    for x_expected, y_expected in expected[3:]:  # batch 3 spans tokens 48..64: shard 0 ends at 50
        x, y = resumed.next_batch()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_the_loader_wraps_around_and_counts_epochs(stream_dir):
    loader = ShardedTokenLoader(stream_dir, "train", 4, 16)
    first = loader.next_batch()
    for _ in range(loader.batches_per_epoch - 1):
        loader.next_batch()
    assert loader.epoch == 1
    assert torch.equal(loader.next_batch()[0], first[0])


def test_reset_starts_again_from_the_first_batch(stream_dir):
    loader = ShardedTokenLoader(stream_dir, "train", 2, 8)
    first = loader.next_batch()
    loader.next_batch()
    loader.reset()
    assert torch.equal(loader.next_batch()[0], first[0]) and loader.epoch == 0


def test_the_state_is_the_same_on_every_rank(stream_dir):
    loaders = [ShardedTokenLoader(stream_dir, "train", 2, 8, rank=r, world_size=2) for r in range(2)]
    for loader in loaders:
        for _ in range(5):
            loader.next_batch()
    assert loaders[0].state_dict() == loaders[1].state_dict()


def test_restoring_a_state_of_another_batch_size_continues_from_the_same_token(stream_dir):
    """A resume with another --micro_batch_size: the next batch starts where the saving loader would have read."""
    one = ShardedTokenLoader(stream_dir, "train", 1, 8)
    sequences = torch.cat([one.next_batch()[0] for _ in range(24)])  # the stream, one sequence at a time
    saving = ShardedTokenLoader(stream_dir, "train", 4, 8)
    for _ in range(3):  # 12 sequences read
        saving.next_batch()
    for batch_size in (2, 6, 12):
        resumed = ShardedTokenLoader(stream_dir, "train", batch_size, 8)
        resumed.load_state_dict(saving.state_dict())
        assert torch.equal(resumed.next_batch()[0], sequences[12 : 12 + batch_size])
    with pytest.raises(ValueError, match=r"not at the start of a batch of that size.*divides 12"):
        ShardedTokenLoader(stream_dir, "train", 5, 8).load_state_dict(saving.state_dict())


def test_the_loader_reads_a_prepared_val_split(shakespeare_dir):
    x, y = ShardedTokenLoader(shakespeare_dir / MANIFEST_NAME, "val", 4, 32).next_batch()
    val = read_split(shakespeare_dir, "val")
    assert x[0].tolist() == val[:32].tolist() and y[0].tolist() == val[1:33].tolist()


# --- bad input: one line each, naming the input and the fix ------------------------------------------------------


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found") as excinfo:
        prepare(tmp_path / "nope.txt", tmp_path / "out")
    assert "nope.txt" in _one_line_error(excinfo)


def test_a_glob_that_matches_nothing_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No files matched .*\*\.jsonl") as excinfo:
        prepare(str(tmp_path / "*.jsonl"), tmp_path / "out")
    _one_line_error(excinfo)


def test_a_folder_without_data_files_errors(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.md").write_text("not data")
    with pytest.raises(FileNotFoundError, match=r"No .*txt.* files under folder") as excinfo:
        prepare(tmp_path / "src", tmp_path / "out")
    _one_line_error(excinfo)


@pytest.mark.parametrize(
    "name, content",
    [("empty.txt", ""), ("empty.jsonl", ""), ("blank.jsonl", '{"text": ""}\n'), ("blank_lines.jsonl", "\n \n\n")],
)
def test_an_empty_corpus_errors(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=r"Empty corpus") as excinfo:
        prepare(tmp_path / name, tmp_path / "out")
    assert name in _one_line_error(excinfo)


def test_a_split_smaller_than_one_batch_errors(stream_dir):
    with pytest.raises(ValueError, match=r"1,000 tokens, fewer than the 1,025") as excinfo:
        ShardedTokenLoader(stream_dir, "train", batch_size=2, seq_len=256, rank=1, world_size=2)
    assert "lower the batch size" in _one_line_error(excinfo)


def test_a_missing_text_column_lists_the_columns(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"content": "hello", "id": 1}])
    with pytest.raises(ValueError, match=r"Column 'text' not found.*\['content', 'id'\].*--text_column") as excinfo:
        prepare(tmp_path / "d.jsonl", tmp_path / "out")
    _one_line_error(excinfo)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.jsonl", '{"text": "fine"}\n{"text": broken\n', r"Cannot read .*bad\.jsonl.*valid json"),
        # `datasets` (fsspec) reads "::" in a path as a URL chain: it cannot open such a file
        ("notes::2024.txt", "hello", r"notes::2024\.txt.* contains '::'.*rename the file"),
    ],
)
def test_a_file_that_cannot_be_read_is_a_one_line_error_naming_it(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match) as excinfo:
        prepare(tmp_path / name, tmp_path / "out")
    _one_line_error(excinfo)


def test_undecodable_bytes_in_a_txt_file_error_with_the_offset(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("fine")
    (tmp_path / "src" / "b.txt").write_bytes(b"caf\xe9 au lait")  # latin-1 e-acute
    with pytest.raises(ValueError, match=r"b\.txt' is not valid UTF-8 \(byte 0xe9 at offset 3\).*iconv") as excinfo:
        prepare(tmp_path / "src", tmp_path / "out")
    _one_line_error(excinfo)


def test_an_unreachable_hub_says_to_pass_local_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ValueError, match=r"karpathy/tiny_shakespeare.*--dataset \.\./shared/data/tinyshakespeare\.txt"
    ):
        prepare("karpathy/tiny_shakespeare", tmp_path / "out")


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    status = main(["prepare", "--dataset", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and "missing.txt" in err
    (tmp_path / "a.txt").write_text("hello")  # an output folder under a file: an OSError, one line too
    status = main(["prepare", "--dataset", str(tmp_path / "a.txt"), "--output_dir", str(tmp_path / "a.txt" / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and "a.txt/out" in err
    status = main(
        ["prepare", "--dataset", str(tmp_path / "a.txt"), "--output_dir", str(tmp_path / "o"), "--val_fracton"]
    )
    err = capsys.readouterr().err  # a mistyped flag
    assert status == 2 and err.count("\n") == 1 and "--val_fracton" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard_sise", "5"], "unrecognized arguments: --shard_sise 5: did you mean --shard_size? (see --help)"),
        (["--shard_size", "abc"], "argument --shard_size/--shard-size: invalid int value: 'abc' (see --help)"),
    ],
)
def test_a_mistyped_flag_or_value_of_the_cli_is_one_line_naming_it(tmp_path, capsys, flags, message):
    """A typo'd flag was "Some specified arguments are not used by the HfArgumentParser: [...]"; a value argparse
    refuses came below its usage block, with argparse's exit."""
    status = main(["prepare", "--dataset", str(tmp_path / "a.txt"), "--output_dir", str(tmp_path / "o"), *flags])
    assert (status, capsys.readouterr().err) == (2, f"error: {message}\n")


def test_a_shard_size_too_large_to_hold_is_one_line_naming_the_flag(tmp_path, capsys):
    """The shard buffer's allocation failed with numpy's `_ArrayMemoryError` traceback."""
    (tmp_path / "a.txt").write_text("hello")
    flags = ["prepare", "--dataset", str(tmp_path / "a.txt"), "--output_dir", str(tmp_path / "o")]
    assert main([*flags, "--shard_size", str(2**60)]) == 2  # 2 EiB: more than any address space
    err = capsys.readouterr().err
    assert err.startswith(f"error: --shard_size {2**60:,}: one shard (2,147,483,648 GiB) cannot be held in memory")
    assert err.count("\n") == 1 and "pass a smaller --shard_size" in err
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()
    assert main([*flags, "--shard_size", str(10**9)]) == 0  # 2 GB asked: pages are only taken as tokens arrive
    assert read_split(tmp_path / "o", "train").tolist() == expected_stream(["hello"])


def test_the_cli_prints_a_malformed_json_file_on_one_line(tmp_path):
    """`datasets`' json reader logs the error it then raises: the command printed that line twice above its own."""
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"text": "fine"}])
    (tmp_path / "src" / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["prepare", "--dataset", str(tmp_path / "src"), "--output_dir", str(tmp_path / "out"), "--num_proc", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "modeling_gpt2_scratch.data", *args], env=env, capture_output=True, text=True
    )
    errors = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert re.match(r"error: Cannot read local file \S*b\.jsonl: JSON parse error", errors[0])


def test_the_cli_prepares_a_folder(tmp_path, corpus, capsys):
    status = main(["prepare", "--dataset", str(corpus), "--output_dir", str(tmp_path / "out"), "--num_proc", "1"])
    assert status == 0 and capsys.readouterr().out.strip() == str(tmp_path / "out" / MANIFEST_NAME)
    assert read_manifest(tmp_path / "out")["settings"]["val_fraction"] == 0.01


# --- awkward local corpora -------------------------------------------------------------------------------------------


def test_an_output_folder_inside_the_corpus_folder_is_not_read_as_data(tmp_path):
    corpus = tmp_path / "mine"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    prepare(corpus, corpus / "tokens")
    prepare(corpus, corpus / "tokens")  # reused: its manifest.json is not a new corpus file
    assert read_split(corpus / "tokens", "train").tolist() == expected_stream(["alpha", "beta"])
    assert len(read_manifest(corpus / "tokens")["source"]["files"]) == 1


@pytest.mark.parametrize("kind", ["json", "txt"])
def test_another_prepared_folder_inside_the_corpus_is_not_read_as_data(tmp_path, kind):
    corpus = tmp_path / "mine"
    corpus.mkdir()
    if kind == "json":
        (corpus / "a.json").write_text(json.dumps([{"text": "alpha"}, {"text": "beta"}]))
    else:
        (corpus / "a.txt").write_text("alpha beta")
    prepare(corpus, corpus / "tokens-v1")
    prepare(corpus, tmp_path / "tokens-v2")  # its manifest is neither a document nor a second file type
    assert read_split(tmp_path / "tokens-v2", "train").tolist() == read_split(corpus / "tokens-v1", "train").tolist()
    assert [Path(f["path"]).name for f in read_manifest(tmp_path / "tokens-v2")["source"]["files"]] == [f"a.{kind}"]


def test_files_only_in_run_folders_are_a_one_line_error_saying_so(tmp_path, monkeypatch):
    """A glob whose matches all lie in trainer run folders said "No files matched", though they did."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "corpus" / "run1"
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"model": {}, "data": {}, "training": {}}))
    (run / "notes.txt").write_text("text kept in a run folder")
    with pytest.raises(FileNotFoundError, match=r"The 1 file\(s\) --dataset 'corpus/run\*/notes.txt' lists lie in "):
        prepare("corpus/run*/notes.txt", tmp_path / "out")
    prepare("corpus/run1/*.txt", tmp_path / "out")  # a run folder named as the corpus's own folder is read
    assert read_split(tmp_path / "out", "train").tolist()[1:] == get_encoding().encode_ordinary(
        "text kept in a run folder"
    )


def test_a_jsonl_of_blank_lines_beside_other_files_is_skipped(tmp_path):
    """It was read with no columns, and `datasets` failed to cast the next file's to them (or the other way round,
    depending on the names' order)."""
    corpus = tmp_path / "mine"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n \n\n")
    write_jsonl(corpus / "b.jsonl", [{"text": "alpha"}])
    prepare(corpus, tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["alpha"])


@pytest.mark.parametrize("dataset", ["data/raw", "data/raw/*.jsonl", "data/raw/a.jsonl", "data/*/a.jsonl"])
def test_a_corpus_inside_the_output_folder_is_read(tmp_path, monkeypatch, dataset):
    """Only an output folder inside the corpus is skipped; a corpus inside the output folder is the corpus."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "raw" / "a.jsonl", [{"text": "alpha"}])
    prepare(dataset, "data")
    assert read_split(tmp_path / "data", "train").tolist() == expected_stream(["alpha"])


def test_the_trainers_default_data_dir_is_never_the_corpus(tmp_path, monkeypatch):
    from modeling_gpt2_scratch.training import TrainArguments, resolve_data_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "mine").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "corpus.jsonl", [{"text": "x"}])
    train_args = TrainArguments(output_dir="run")

    def data_dir(dataset: str) -> str:
        return str(resolve_data_dir(DataArguments(dataset=dataset), train_args))

    assert data_dir("data/mine") == "data/mine-tokens"
    assert data_dir("data/corpus.jsonl") == "data/corpus.jsonl-tokens"
    assert data_dir("a/*.jsonl") != data_dir("b/*.jsonl")
    assert data_dir("karpathy/tiny_shakespeare") == "data/tiny_shakespeare"  # Hub ids keep their short names


def test_file_names_are_literal_not_patterns(tmp_path):
    write_jsonl(tmp_path / "d[12].jsonl", [{"text": "the named file"}])
    write_jsonl(tmp_path / "d1.jsonl", [{"text": "a file the pattern d[12] matches"}])
    prepare(tmp_path / "d[12].jsonl", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["the named file"])


def test_parquet_files_may_differ_in_the_columns_not_read(tmp_path):
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"text": ["one"], "id": [1]}), tmp_path / "src" / "a.parquet")
    pq.write_table(pa.table({"text": ["two"], "id": ["b"], "url": ["u"]}), tmp_path / "src" / "b.parquet")
    prepare(tmp_path / "src", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["one", "two"])


def test_json_files_whose_other_columns_differ_are_read_or_error_in_one_line_with_the_fix(tmp_path):
    """datasets 5's json builder refuses files whose columns differ; datasets 4 (the floor) reads them."""
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "src" / "b.jsonl", [{"text": "two", "url": "u"}])
    try:
        prepare(tmp_path / "src", tmp_path / "out")
    except ValueError as err:
        assert re.search(r"same columns of the same types.*Parquet", str(err)) and "\n" not in str(err), err
    else:
        assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["one", "two"])


@pytest.mark.parametrize("odd", [7, {"k": "v"}, ["a", "b"]], ids=["number", "object", "list"])
def test_a_json_text_column_that_changes_type_in_a_later_file_errors_naming_it(tmp_path, odd):
    """datasets 5's json builder turned such a column into JSON text, in every row of that file's batch: the
    documents were tokenized with their quotes (`"second"`) and the number as the text `7`."""
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"text": "first"}])
    write_jsonl(tmp_path / "src" / "b.jsonl", [{"text": "second"}, {"text": odd}])
    with pytest.raises(
        ValueError, match=r"^Cannot read local file \S*b\.jsonl: .*Column\(/text\) changed from"
    ) as exc:
        prepare(tmp_path / "src", tmp_path / "out")
    assert "same columns of the same types" in _one_line_error(exc)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_json_rows_that_look_like_chat_logs_keep_their_text_column(tmp_path):
    """datasets 5 rewrote such files as agent traces (other columns, no `text`): 'Column 'text' not found'."""
    rows = [
        {"id": str(i), "source": "s", "model": "m", "system_prompt": "p", "messages": [{"role": "user"}], "text": t}
        for i, t in enumerate(["first chat", "second chat"])
    ]
    prepare(write_jsonl(tmp_path / "chats.jsonl", rows), tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["first chat", "second chat"])


def test_csv_text_that_reads_like_numbers_is_text(tmp_path):
    """pandas infers a column of 1984, 2001 as integers (per chunk of rows); the text column is read as text."""
    (tmp_path / "d.csv").write_text("id,text,score\n1,1984,0.5\n2,2001,0.25\n3,007,1\n")
    prepare(tmp_path / "d.csv", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["1984", "2001", "007"])


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_missing_text_column_lists_the_files_columns(tmp_path, kind):
    if kind == "csv":
        (tmp_path / "d.csv").write_text("content,id\nhello,1\n")
    else:
        pq.write_table(pa.table({"content": ["hello"], "id": [1]}), tmp_path / "d.parquet")
    with pytest.raises(
        ValueError, match=r"^Column 'text' not found in local file .*d\.\w+; its columns are \['content', 'id'\]"
    ) as excinfo:
        prepare(tmp_path / f"d.{kind}", tmp_path / "out")
    assert "Cannot read" not in _one_line_error(excinfo)  # not wrapped in a read error that says the file is invalid


def test_a_parquet_text_column_of_numbers_in_a_later_file_errors(tmp_path):
    """`datasets` casts every file to the first one's types: a later file's numbers were read as the text "7"."""
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"text": ["a document"]}), tmp_path / "src" / "a.parquet")
    pq.write_table(pa.table({"text": [7]}), tmp_path / "src" / "b.parquet")
    with pytest.raises(ValueError, match=r"Column 'text' of local file \S*b\.parquet holds int64 values, not text"):
        prepare(tmp_path / "src", tmp_path / "out")


def test_a_parquet_file_whose_text_column_is_all_null_may_come_first(tmp_path):
    """A column of nulls only (what pandas writes for all-None) is text with no documents, in any file order:
    `datasets` cast the next files' strings to the first one's null type and failed."""
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"text": pa.array([None, None], pa.null())}), tmp_path / "src" / "a.parquet")
    pq.write_table(pa.table({"text": ["kept"]}), tmp_path / "src" / "b.parquet")
    prepare(tmp_path / "src", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["kept"])
    assert read_manifest(tmp_path / "out")["stats"]["empty_documents"] == 2


def test_csv_cells_that_read_like_missing_values_are_text(tmp_path):
    (tmp_path / "d.csv").write_text("text\nNA\nnull\nn/a\nreal\n")
    prepare(tmp_path / "d.csv", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["NA", "null", "n/a", "real"])


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_empty_files_in_a_folder_are_skipped(tmp_path, kind):
    (tmp_path / "src").mkdir()
    if kind == "parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "src" / "a.parquet")
        pq.write_table(pa.table({"text": ["kept"]}), tmp_path / "src" / "b.parquet")
    else:
        (tmp_path / "src" / "a.csv").write_text("")
        (tmp_path / "src" / "b.csv").write_text("text\nkept\n")
    prepare(tmp_path / "src", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["kept"])


def test_undecodable_bytes_in_jsonl_error_with_the_file_and_offset(tmp_path):
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"text": "fine"}])
    (tmp_path / "src" / "b.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl' is not valid UTF-8 \(byte 0xe9 at offset 13\)") as excinfo:
        prepare(tmp_path / "src", tmp_path / "out")
    _one_line_error(excinfo)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("b.csv", b"text\ncaf\xe9\n", r"b\.csv' is not valid UTF-8 \(byte 0xe9 at offset 8\); convert it"),
        ("b.parquet", b"PAR1 truncated", r"^Cannot read local file \S*b\.parquet: .*valid parquet"),
    ],
)
def test_a_bad_file_among_several_csv_or_parquet_is_named(tmp_path, name, content, match):
    """Their headers and schemas are read first: an error there names the file (and the offset of a byte that is not
    UTF-8), once, not the whole folder inside another "Cannot read" message."""
    (tmp_path / "src").mkdir()
    for good in ("a", "c"):
        if name.endswith(".csv"):
            (tmp_path / "src" / f"{good}.csv").write_text("text\nfine\n")
        else:
            pq.write_table(pa.table({"text": ["fine"]}), tmp_path / "src" / f"{good}.parquet")
    (tmp_path / "src" / name).write_bytes(content)
    with pytest.raises(ValueError, match=match) as excinfo:
        prepare(tmp_path / "src", tmp_path / "out")
    assert _one_line_error(excinfo).count("Cannot read") <= 1 and "3 local" not in str(excinfo.value)


def test_a_malformed_file_among_several_is_named(tmp_path):
    """Arrow's parse errors name no file: the one-line error names the bad file, not only the folder."""
    (tmp_path / "src").mkdir()
    for name in ("a", "c"):
        write_jsonl(tmp_path / "src" / f"{name}.jsonl", [{"text": "fine"}] * 3)
    (tmp_path / "src" / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"^Cannot read local file \S*b\.jsonl: JSON parse error.*valid json") as exc:
        prepare(tmp_path / "src", tmp_path / "out")
    _one_line_error(exc)


def test_a_corrupt_parquet_page_is_a_one_line_error_naming_the_file(tmp_path):
    """pyarrow raises a bare, multi-line OSError for a damaged page header ("Couldn't deserialize thrift")."""
    (tmp_path / "src").mkdir()
    for name in ("a", "b", "c"):
        pq.write_table(pa.table({"text": [f"document {name}"]}), tmp_path / "src" / f"{name}.parquet")
    damaged = bytearray((tmp_path / "src" / "b.parquet").read_bytes())
    damaged[4] = 0xFF  # the first page header starts right after the magic bytes "PAR1"
    (tmp_path / "src" / "b.parquet").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"^Cannot read local file \S*b\.parquet: .*valid parquet") as excinfo:
        prepare(tmp_path / "src", tmp_path / "out")
    _one_line_error(excinfo)


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode())
    prepare(tmp_path / "bom.txt", tmp_path / "out")
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(["hello"])


def test_a_txt_file_is_tokenized_in_pieces_that_give_the_whole_files_tokens(tmp_path, shared_dir, monkeypatch):
    """Memory stays bounded for a multi-GB .txt: pieces cut where GPT-2's pre-tokenizer splits anyway."""
    monkeypatch.setattr(data, "_TXT_PIECE_CHARS", 20_000)
    pieces = []
    real_encode = data._encode_documents
    monkeypatch.setattr(data, "_encode_documents", lambda docs: pieces.extend(docs) or real_encode(docs))
    shakespeare = shared_dir / "data" / "tinyshakespeare.txt"
    prepare(shakespeare, tmp_path / "out")
    text = shakespeare.read_text(encoding="utf-8")
    assert read_split(tmp_path / "out", "train").tolist() == [EOT, *get_encoding().encode_ordinary(text)]
    assert len(pieces) > 40 and [starts for _, starts in pieces] == [True] + [False] * (len(pieces) - 1)
    assert read_manifest(tmp_path / "out")["stats"]["documents"] == 1


def test_safe_cuts_keep_the_tokens_of_awkward_text():
    import random

    encoding = get_encoding()
    rng = random.Random(0)
    # every kind of regex whitespace, and U+001C-U+001F, U+200B, U+180E, U+FEFF: whitespace to str.isspace() or
    # once to Unicode, but not to the regex (cutting at those changes the tokens)
    alphabet = ["a", "Zb", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\x0b", "\x0c", ".", "'", "'s", "'ll", "é", "12"]
    alphabet += ["\u00a0", "\x85", "\u1680", "\u2003", "\u2028", "\u2029", "\u202f", "\u3000", "\x1c", "\x1f"]
    alphabet += ["\u200b", "\u180e", "\ufeff", "日本", "Жу", "٣", "😀", "\u0301", "!!"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
        lines = text.splitlines(keepends=True)
        pieces = list(data._txt_pieces(lines, piece_chars=rng.randint(1, 20)))
        assert "".join(pieces) == text
        assert [t for piece in pieces for t in encoding.encode_ordinary(piece)] == encoding.encode_ordinary(text)
    for _ in range(1000):  # every place the cut may be made, not only the last
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 40)))
        for cut in (match.start() for match in data._SAFE_CUT.finditer(text, 1, len(text) - 1)):
            assert encoding.encode_ordinary(text[:cut]) + encoding.encode_ordinary(text[cut:]) == (
                encoding.encode_ordinary(text)
            ), (text, cut)


@pytest.mark.parametrize(
    "line",
    ["Мой дядя самых честных правил, когда не в шутку занемог,\n", "床前明月光，疑是地上霜。 举头望明月。\n",
     "    indented = code(line)  # and a comment\n", "日本語の文章です、空白なしで続く。\n"],
)  # fmt: skip
def test_text_in_any_script_is_cut_into_pieces(line):
    """A piece is cut at whitespace before a non-space, in any script: memory stays bounded for a large file (only
    ASCII lines could be cut before)."""
    lines = [line] * 2000
    pieces = list(data._txt_pieces(lines, piece_chars=5_000))
    assert "".join(pieces) == "".join(lines)
    assert len(pieces) >= len(line) * 2000 // 5_000 - 1
    assert max(len(piece) for piece in pieces) <= 5_000 + 2 * len(line)


def _encode_or_die(documents):
    """`_encode_documents`, except that the tokenizer process holding document 1500 is killed (as by the kernel's
    out-of-memory killer)."""
    if any(text == "doc 1500" for text, _ in documents):
        os.kill(os.getpid(), signal.SIGKILL)
    return data._real_encode_documents(documents)


def test_a_tokenizer_process_that_dies_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """`multiprocessing.Pool` never returns a killed worker's task, so prepare used to wait forever."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5000)))
    monkeypatch.setattr(data, "_real_encode_documents", data._encode_documents, raising=False)
    monkeypatch.setattr(data, "_encode_documents", _encode_or_die)
    monkeypatch.setattr(data, "_DOCS_PER_TASK", 500)

    def hung(signum, frame):
        raise AssertionError("prepare still waits for the killed tokenizer process")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with pytest.raises(data.PrepareError, match=r"A tokenizer process died .* --num_proc 2; prepare again"):
            prepare(corpus, tmp_path / "out", num_proc=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob(".tmp-prepare*"))  # the staging folder is cleaned up


SLOW_PREPARE = """
import os, sys, time
from pathlib import Path
from modeling_gpt2_scratch import data

def encode_slowly(documents):  # in each tokenizer process: say which one, then take (nearly) for ever
    (Path(sys.argv[3]) / str(os.getpid())).touch()
    time.sleep(600)

data._encode_documents = encode_slowly
data._DOCS_PER_TASK = 1
data.prepare_dataset(data.DataArguments(dataset=sys.argv[1], num_proc=2, val_fraction=0.0), sys.argv[2])
"""


def _a_slow_tokenizer(pid: int) -> bool:
    """Whether `pid` is still one of SLOW_PREPARE's tokenizer processes (not gone, not a zombie, not reused)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and "encode_slowly" in Path(f"/proc/{pid}/cmdline").read_text()
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_prepare_killed_outright_leaves_no_process_holding_its_folder(tmp_path, corpus):
    """Its tokenizer processes, forked with the folder lock's file descriptor, lived on (blocked on their queues)
    holding the lock: the next prepare of the folder, every process of a new run, waited for ever without a word."""
    import fcntl

    workers, out = tmp_path / "workers", tmp_path / "out"
    workers.mkdir()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    killed = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(corpus), str(out), str(workers)], env=env)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2:
            assert killed.poll() is None and time.monotonic() < deadline, "the tokenizer processes did not start"
            time.sleep(0.1)
            pids = [int(p.name) for p in workers.iterdir()]
        killed.kill()  # SIGKILL, as the out-of-memory killer sends
        killed.wait()
        deadline = time.monotonic() + 10
        with open(out / ".prepare.lock") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the killed prepare's folder lock is still held"
                    time.sleep(0.1)
            fcntl.flock(lock, fcntl.LOCK_UN)
        while any(_a_slow_tokenizer(pid) for pid in pids):
            assert time.monotonic() < deadline, "the killed prepare's tokenizer processes live on"
            time.sleep(0.1)
        assert prepare(corpus, out) == out / MANIFEST_NAME
        assert read_split(out, "train").tolist() == expected_stream(
            [r["text"] for r in map(json.loads, corpus.open())]
        )
    finally:
        killed.kill()
        for pid in pids:
            if _a_slow_tokenizer(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device every write to fails on")
def test_a_full_disk_while_preparing_is_one_line_naming_the_folder_and_keeps_its_shards(tmp_path, monkeypatch):
    """numpy's message alone was the error ("20200 requested and 0 written"; on a full tmpfs too): neither the
    folder nor the full disk. A rebuild that fails so leaves the folder's earlier shards as they were."""
    import builtins

    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"text": "the quick brown fox " * 50}] * 100)  # 20k tokens
    out = tmp_path / "out"
    prepare(corpus, out, shard_size=100)
    before = (out / MANIFEST_NAME).read_text()

    def full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith(".bin") and "w" in mode:
            file = "/dev/full"  # ENOSPC on every write, as a full disk
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(data, "open", full_disk, raising=False)
    with pytest.raises(
        data.PrepareError,
        match=rf"^Writing token shards into {re.escape(str(out))} failed \(\d+ requested and \d+ written\): is its "
        r"disk full\? Free space there, then prepare again \(it starts over\)\.$",
    ):
        args = DataArguments(dataset=str(corpus), num_proc=1, val_fraction=0.0)
        prepare_dataset(args, out, overwrite=True)  # a rebuild with other settings, its shard in one write
    monkeypatch.undo()
    assert (out / MANIFEST_NAME).read_text() == before and not list(out.glob(".tmp-prepare*"))
    assert prepare(corpus, out, shard_size=100) == out / MANIFEST_NAME  # reused


def test_a_prepared_folder_that_cannot_be_written_is_reused(tmp_path, corpus, monkeypatch):
    """Shards on read-only storage: no lock file can be opened to write, no stale file removed, no manifest updated;
    a matching folder is reused all the same (it used to fail on opening `.prepare.lock`)."""
    import builtins

    prepare(corpus, tmp_path / "out", shard_size=100)
    before = _mtimes(tmp_path / "out")
    (tmp_path / "out" / ".prepare.lock").unlink()
    os.utime(corpus, ns=(1, 1))  # so that the manifest would be updated, if it could be

    def read_only_open(file, mode="r", *args, **kwargs):
        if Path(file).parent == tmp_path / "out" and any(c in mode for c in "wax+"):
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(data, "open", read_only_open, raising=False)
    monkeypatch.setattr(data.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    assert prepare(corpus, tmp_path / "out", shard_size=100) == tmp_path / "out" / MANIFEST_NAME
    assert _mtimes(tmp_path / "out") == before


@pytest.mark.parametrize("name", ["texts", "texts/", "data/texts"])
def test_shards_are_reused_when_a_corpus_named_like_a_hub_id_is_gone(tmp_path, corpus, monkeypatch, caplog, name):
    """A folder named without `./` (`texts`, `data/texts`) reads as a Hub id once it is gone: the same command said
    "prepared with a different source (local file ...; now Hub dataset texts)" and offered --overwrite, which would
    have streamed a Hub dataset of that name."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / name.rstrip("/")
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text(corpus.read_text()[:20_000])
    prepare(name, tmp_path / "out", shard_size=1000)
    tokens = read_split(tmp_path / "out", "train")
    folder.rename(tmp_path / "archived")
    with caplog.at_level("WARNING", logger=data.logger.name):
        assert prepare(name, tmp_path / "out", shard_size=1000) == tmp_path / "out" / MANIFEST_NAME
    assert f"--dataset {name!r} is not there (any more); reusing the shards" in caplog.text
    assert np.array_equal(read_split(tmp_path / "out", "train"), tokens)


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_dataset_is_a_one_line_error_not_the_working_folder(tmp_path, monkeypatch, name):
    """`--dataset "$CORPUS"` with the variable unset: Path("") is ".", and the working folder was read as the corpus."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a corpus " * 100)
    with pytest.raises(ValueError, match=r"^--dataset is empty: pass a text file, a folder or glob of data files"):
        prepare(name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shards_are_reused_when_their_corpus_is_gone(tmp_path, corpus, caplog):
    """Shards kept after the text was archived (or copied with their folder): the same command trains on them, with
    a warning; other settings, or another path, still need the corpus."""
    text = tmp_path / "texts" / "shakespeare.txt"
    text.parent.mkdir()
    text.write_text(corpus.read_text())
    out = tmp_path / "out"
    prepare(text, out, shard_size=1000)
    tokens = read_split(out, "train")
    text.unlink()
    for dataset in (text, text.parent, tmp_path / "texts" / "*.txt"):
        with caplog.at_level("WARNING", logger=data.logger.name):
            assert prepare(dataset, out, shard_size=1000) == out / MANIFEST_NAME
        assert "is not there (any more); reusing the shards" in caplog.text
        caplog.clear()
    assert np.array_equal(read_split(out, "train"), tokens)
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare(text, out, shard_size=500)  # other settings: those shards are not the ones asked for
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare(tmp_path / "elsewhere.txt", out, shard_size=1000)
