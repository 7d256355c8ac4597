"""Data pipeline throughput: prepare (tokens/s, peak memory) and ShardedTokenLoader (batches/s).

Builds a synthetic `.jsonl` corpus of about `--corpus_multiple` x `--shard_size` tokens (tiny Shakespeare's
paragraphs, repeated, one paragraph per document), prepares it with each `--num_proc` in a fresh child process
(so its peak resident memory is its own; the fastest of `--repeats` runs is reported, as the machine may be shared),
then times the loader on the prepared train split. Prints markdown tables.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/data_throughput.py

The peak memory rows show what bounds it: the preparing process holds one shard buffer (2 bytes x shard_size) plus
the documents in flight, so its peak does not grow with the corpus (compare the two corpus sizes). A worker's RSS
counts the pages it shares with the forked parent (imports), so it overstates what the worker adds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli import positive_int, text_file  # this folder is on sys.path when run as a script

REPO_ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from modeling_gpt2_scratch.data import DataArguments, prepare_dataset, read_manifest
from modeling_gpt2_scratch.tokenization import get_encoding

get_encoding()
def status_mib(field):  # this process's own VmRSS / VmHWM (ru_maxrss would carry the parent's peak over the exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
def workers_peak_mib():  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
def cpu_s(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime
baseline = status_mib("VmRSS")
cpu_before = cpu_s(resource.RUSAGE_SELF)
start = time.perf_counter()
path = prepare_dataset(
    DataArguments(dataset={corpus!r}, shard_size={shard_size}, num_proc={num_proc}, val_fraction=0.0), {out!r}
)
seconds = time.perf_counter() - start
stats = read_manifest(path)["stats"]
print(json.dumps({{
    "seconds": seconds, "tokens": stats["train_tokens"] + stats["val_tokens"], "documents": stats["documents"],
    "baseline_mib": baseline, "peak_mib": status_mib("VmHWM"), "worker_peak_mib": workers_peak_mib(),
    "main_cpu_s": cpu_s(resource.RUSAGE_SELF) - cpu_before, "worker_cpu_s": cpu_s(resource.RUSAGE_CHILDREN),
}}))
"""


def write_corpus(folder: Path, target_tokens: int, shakespeare: Path, docs_per_file: int = 20_000) -> Path:
    """About `target_tokens` tokens of tiny Shakespeare paragraphs as .jsonl documents, in several files."""
    from modeling_gpt2_scratch.tokenization import get_encoding

    paragraphs = [p for p in shakespeare.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    tokens_per_copy = sum(
        1 + len(ids) for ids in get_encoding().encode_ordinary_batch([f"[0] {p}" for p in paragraphs])
    )
    copies = math.ceil(target_tokens / tokens_per_copy)
    folder.mkdir(parents=True, exist_ok=True)
    documents = (f"[{copy}] {p}" for copy in range(copies) for p in paragraphs)
    index, handle = 0, None
    for i, text in enumerate(documents):
        if i % docs_per_file == 0:
            if handle:
                handle.close()
            handle = open(folder / f"part-{index:05d}.jsonl", "w")
            index += 1
        handle.write(json.dumps({"text": text}) + "\n")
    handle.close()
    return folder


def run_prepare(corpus: Path, out: Path, shard_size: int, num_proc: int, repeats: int) -> dict:
    """The fastest of `repeats` fresh prepares (each in its own process, into an empty folder)."""
    runs = []
    for i in range(repeats):
        code = CHILD.format(
            repo=str(REPO_ROOT), corpus=str(corpus), out=f"{out}_{i}", shard_size=shard_size, num_proc=num_proc
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"prepare failed: {result.stderr.strip().splitlines()[-1]}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["seconds"])


def time_loader(data_dir: Path, batch_size: int, seq_len: int, seconds: float = 2.0) -> float:
    from modeling_gpt2_scratch.data import ShardedTokenLoader

    loader = ShardedTokenLoader(data_dir, "train", batch_size, seq_len)
    loader.next_batch()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loader.next_batch()
        n += 1
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard_size", type=positive_int, default=1_000_000, help="tokens per shard")
    parser.add_argument("--corpus_multiple", type=positive_int, default=10, help="corpus size in shards")
    parser.add_argument("--num_proc", type=positive_int, nargs="+", default=[1, 2], help="process counts to time")
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="prepare runs per row; the fastest is reported"
    )
    parser.add_argument("--shakespeare", type=text_file, default=REPO_ROOT.parent / "shared/data/tinyshakespeare.txt")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO_ROOT.parent / "shared/tiktoken_cache"))
    import torch

    from modeling_gpt2_scratch.training import describe_device

    with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
        tmp = Path(tmp)
        small = write_corpus(tmp / "corpus_x1", args.corpus_multiple * args.shard_size, args.shakespeare)
        large = write_corpus(tmp / "corpus_x2", 2 * args.corpus_multiple * args.shard_size, args.shakespeare)
        rows = []
        for num_proc in args.num_proc:
            result = run_prepare(small, tmp / f"out_{num_proc}", args.shard_size, num_proc, args.repeats)
            rows.append((small, num_proc, result))
        num_proc = max(args.num_proc)
        rows.append((large, num_proc, run_prepare(large, tmp / "out_large", args.shard_size, num_proc, args.repeats)))

        print(
            f"\n## Data pipeline: {describe_device(torch.device('cpu'))}; python {platform.python_version()}, "
            f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\n"
        )
        command = " ".join(["python benchmarks/data_throughput.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"Command: `{command}`\n")
        print(f"shard_size {args.shard_size:,} tokens ({2 * args.shard_size / 2**20:.1f} MiB buffer)\n")
        print(
            "| num_proc | corpus tokens | documents | wall s | tokens/s | main CPU s | workers CPU s "
            "| RSS after imports MiB | peak RSS MiB | peak RSS of a worker MiB |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for _, num_proc, r in rows:
            multi = num_proc > 1
            worker_cpu = f"{r['worker_cpu_s']:.2f}" if multi else "-"
            worker_peak = f"{r['worker_peak_mib']:.0f}" if multi else "-"
            print(
                f"| {num_proc} | {r['tokens']:,} | {r['documents']:,} | {r['seconds']:.2f} "
                f"| {r['tokens'] / r['seconds']:,.0f} | {r['main_cpu_s']:.2f} | {worker_cpu} "
                f"| {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | {worker_peak} |"
            )
        print("\n| loader batch (B x T) | batches/s | tokens/s |")
        print("|---|---:|---:|")
        for batch_size, seq_len in ((8, 1024), (64, 1024)):
            rate = time_loader(tmp / f"out_{args.num_proc[0]}_0", batch_size, seq_len)
            print(f"| {batch_size} x {seq_len} | {rate:,.0f} | {rate * batch_size * seq_len:,.0f} |")


if __name__ == "__main__":
    main()
