"""Tokens per second of tiktoken and of the exported Hugging Face tokenizer on tiny Shakespeare.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/tokenizer_throughput.py

The corpus goes in three ways, each concatenating back to the exact corpus: whole (one 1.1 MB string, tiktoken
only), as paragraphs (chunks that end at a blank line, `\\n\\n`: 7,224 of about 46 tokens, like short documents)
and as 16 blocks of whole paragraphs (about 70 kB each, like long documents). Token counts differ slightly between
them because a chunk's trailing `\\n\\n` is one token where the whole corpus has two. Every method's ids are checked
against tiktoken's `encode_ordinary` before timing; each time is the median of `--repeats` runs after a warm-up run.
The parallel rows run 2 threads on both sides: tiktoken's `num_threads=2`, and `RAYON_NUM_THREADS=2` for the Rust
tokenizer's pool (which otherwise takes every core). Prints a markdown table.
"""

import argparse
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version  # tiktoken 0.7 (the floor) has no __version__
from pathlib import Path

import tokenizers
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import positive_int, text_file  # noqa: E402  (this folder is on sys.path when run as a script)

from modeling_gpt2_scratch.tokenization import get_encoding, get_hf_tokenizer  # noqa: E402
from modeling_gpt2_scratch.training import describe_device  # noqa: E402

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
THREADS = 2  # the parallel rows': tiktoken's `num_threads`, and the Rust tokenizer's pool (`RAYON_NUM_THREADS`)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=text_file, default=DEFAULT_CORPUS, help="a UTF-8 text file")
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed runs per method (the median is reported)"
    )
    return parser.parse_args(argv)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_batch(tokenizer, texts: list[str], parallel: bool) -> list[list[int]]:
    """The HF tokenizer on a batch; `parallel` toggles the Rust thread pool (read from the environment per call)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    return tokenizer(texts)["input_ids"]


def backend_batch(tokenizer, texts: list[str], parallel: bool) -> list[list[int]]:
    """The Rust tokenizer under the HF one, without `transformers`' Python-side batching and conversions."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    return [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(texts)]


def split_corpus(text: str, n_blocks: int) -> dict[str, list[str]]:
    """The corpus as one text, as paragraphs (ending at a blank line) and as `n_blocks` runs of whole paragraphs."""
    paragraphs = re.split(r"(?<=\n\n)", text)
    blocks, block = [], ""
    for paragraph in paragraphs:
        block += paragraph
        if len(block) >= len(text) / n_blocks:
            blocks.append(block)
            block = ""
    blocks += [block] if block else []
    return {"whole corpus": [text], f"{len(paragraphs):,} paragraphs": paragraphs, f"{len(blocks)} blocks": blocks}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(THREADS)  # read when the pool starts: at the first parallel batch
    text = args.corpus.read_text(encoding="utf-8")
    inputs = split_corpus(text, n_blocks=16)
    enc = get_encoding()
    tokenizer = get_hf_tokenizer()
    tokenizer.model_max_length = int(1e30)  # no "sequence longer than the model" warnings for long blocks

    # (tokenizer and call, threads, function of a list of texts); the whole corpus only goes through tiktoken's loop
    methods: list[tuple[str, int, Callable[[list[str]], list[list[int]]]]] = [
        ("tiktoken `encode_ordinary`, a loop", 1, lambda texts: [enc.encode_ordinary(t) for t in texts]),
        (
            "tiktoken `encode_ordinary_batch`",
            THREADS,
            lambda texts: enc.encode_ordinary_batch(texts, num_threads=THREADS),
        ),
        ("HF fast tokenizer, one batch", 1, lambda texts: hf_batch(tokenizer, texts, parallel=False)),
        ("HF fast tokenizer, one batch", THREADS, lambda texts: hf_batch(tokenizer, texts, parallel=True)),
        ("its `tokenizers` backend, `encode_batch`", 1, lambda texts: backend_batch(tokenizer, texts, False)),
        ("its `tokenizers` backend, `encode_batch`", THREADS, lambda texts: backend_batch(tokenizer, texts, True)),
    ]
    runs = [(name, threads, fn, key) for key in inputs for name, threads, fn in methods]
    runs = [run for run in runs if run[3] != "whole corpus" or run[0].endswith("a loop")]

    n_tokens = {}
    for key, texts in inputs.items():
        expected = [enc.encode_ordinary(t) for t in texts]
        n_tokens[key] = sum(map(len, expected))
        for name, threads, fn, run_key in runs:
            if run_key == key and fn(texts) != expected:
                raise RuntimeError(f"{name} with {threads} thread(s) on {key} gave different ids from tiktoken")

    print(
        f"\n## Tokenizer throughput: {describe_device(torch.device('cpu'))}; python {platform.python_version()}, "
        f"tiktoken {version('tiktoken')}, tokenizers {tokenizers.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\n"
    )
    command = " ".join(["python benchmarks/tokenizer_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: `{command}`\n")
    print(f"corpus: {args.corpus.name}, {len(text):,} characters; median of {args.repeats} runs\n")
    print("| tokenizer, call | input | tokens | threads | seconds | tokens/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, threads, fn, key in runs:
        seconds = median_seconds(lambda: fn(inputs[key]), args.repeats)  # noqa: B023 (called before the loop moves)
        rate = n_tokens[key] / seconds
        print(f"| {name} | {key} | {n_tokens[key]:,} | {threads} | {seconds:.3f} | {rate / 1e6:.2f} M |")


if __name__ == "__main__":
    main()
