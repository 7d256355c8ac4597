"""GPT-2's tokenizer: tiktoken for speed, and the matching Hugging Face tokenizer for checkpoints and the Hub.

`get_encoding()` is what the data pipeline uses to turn text into ids (tiktoken is several times faster than the
Hugging Face tokenizer: `benchmarks/tokenizer_throughput.py`). `get_hf_tokenizer()` builds `transformers`' own
`GPT2Tokenizer` from the very same BPE ranks, so the tokenizer written next to a checkpoint gives the ids the model
was trained on, and `AutoTokenizer`, `generate()` and pipelines work with it offline and without remote code.

This module imports nothing from the model, so the model-independent data pipeline can use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Literal

import tiktoken
from transformers import GPT2Tokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"  # GPT-2's only special token (id 50256): document separator, bos, eos and pad
MODEL_MAX_LENGTH = 1024  # GPT-2's context length
VOCAB_FILES = ("vocab.json", "merges.txt")  # GPT-2's own BPE files, which `save_tokenizer` writes too

# Where tiktoken downloads GPT-2's ranks from, with the SHA-256 it checks each file against (`tiktoken_ext.
# openai_public`). `r50k_base` is one file; tiktoken's `gpt2` builds the same ranks from the two files of OpenAI's
# original release.
_R50K_BASE_FILES = (
    (
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
)
_GPT2_FILES = (
    (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
)
_NETWORK_TIMEOUT_S = 10.0  # how long the reachability check waits before declaring the download site unreachable


class EncodingFilesNotFoundError(FileNotFoundError):
    """GPT-2's BPE ranks are neither in tiktoken's cache nor downloadable into it (offline, the site is unreachable,
    or the cache folder cannot be written)."""


def _tiktoken_cache_dir() -> str:
    """The folder tiktoken reads and writes its downloads in, resolved exactly as `tiktoken.load.read_file_cached`."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cache_path(url: str) -> str:
    """tiktoken's cache file for `url`: the cache folder joined with the SHA-1 of the URL."""
    return os.path.join(_tiktoken_cache_dir(), hashlib.sha1(url.encode()).hexdigest())


def _cache_state(files: tuple[tuple[str, str], ...]) -> Literal["cached", "missing", "damaged"]:
    """Whether tiktoken's cache holds these files intact: tiktoken would download a damaged one again, without a
    timeout, even offline."""
    if _tiktoken_cache_dir() == "":
        return "missing"
    for url, sha256 in files:
        try:
            with open(_cache_path(url), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != sha256:
                    return "damaged"
        except OSError:
            return "missing"
    return "cached"


def _offline_mode() -> bool:
    """True when the user asked the Hugging Face stack not to touch the network (`HF_HUB_OFFLINE`, ...)."""
    return any(
        os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _missing_ranks_error(reason: str, damaged: bool = False, unwritable: bool = False) -> EncodingFilesNotFoundError:
    url = _R50K_BASE_FILES[0][0]
    where = (
        f"is damaged in tiktoken's cache ({_cache_path(url)!r}: not the published file; delete it)"
        if damaged
        else f"is not in tiktoken's cache ({_cache_path(url)!r})"
    )
    if unwritable:
        fix = "Set TIKTOKEN_CACHE_DIR to a folder this process can write, or to one that holds the file."
    else:
        fix = (
            "Set TIKTOKEN_CACHE_DIR to a folder that holds it (in this project: ../shared/tiktoken_cache), or connect "
            "to the internet" + (" and unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE." if _offline_mode() else ".")
        )
    return EncodingFilesNotFoundError(f"Cannot load GPT-2's BPE ranks for tiktoken: {url} {where} and {reason}. {fix}")


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding: 50257 ids, `<|endoftext|>` = 50256.

    The ranks come from tiktoken's `r50k_base` encoding, whose ranks, split pattern and special token are byte for
    byte those of tiktoken's `gpt2` encoding. `r50k_base` is one `.tiktoken` file (what `../shared/tiktoken_cache/`
    and CI hold), where `gpt2` needs two files from OpenAI's original release, so it is the one to ship and download.
    A cache that holds only the `gpt2` files (from an earlier `tiktoken.get_encoding("gpt2")`) is used as it is. The
    returned encoding's `name` is therefore `"r50k_base"` (or `"gpt2"`); the ids are the same either way.

    Loading never waits on the network when the files are cached intact (their SHA-256 is checked, as tiktoken
    does). Otherwise, with `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set it fails at once, and online it first
    checks that the download site answers within 10 seconds (tiktoken's own download has no timeout), then lets
    tiktoken download the file into its cache (replacing a damaged one).

    Returns:
        The encoding, cached: every call returns the same object.

    Raises:
        EncodingFilesNotFoundError: (a `FileNotFoundError`) when the ranks are neither cached nor downloadable; the
            message says to set `TIKTOKEN_CACHE_DIR` or connect to the internet. Also when tiktoken downloads them
            but cannot write them into the `TIKTOKEN_CACHE_DIR` set (a read-only folder, a path under a file): the
            message says to set `TIKTOKEN_CACHE_DIR` to a folder this process can write.
    """
    states = {name: _cache_state(files) for name, files in (("r50k_base", _R50K_BASE_FILES), ("gpt2", _GPT2_FILES))}
    for name, state in states.items():
        if state == "cached":
            return tiktoken.get_encoding(name)
    damaged = states["r50k_base"] == "damaged"
    if _offline_mode():
        raise _missing_ranks_error("offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)", damaged)

    import requests  # tiktoken's own HTTP client

    url = _R50K_BASE_FILES[0][0]
    logger.info("Downloading GPT-2's BPE ranks from %s into %s", url, _tiktoken_cache_dir())
    try:
        requests.head(url, timeout=_NETWORK_TIMEOUT_S, allow_redirects=True).raise_for_status()
        return tiktoken.get_encoding("r50k_base")
    except (requests.RequestException, ValueError) as err:  # ValueError: the download is not the published file
        raise _missing_ranks_error(f"downloading it failed ({type(err).__name__}: {err})", damaged) from err
    except OSError as err:  # other than a RequestException (an OSError too): writing into TIKTOKEN_CACHE_DIR
        reason = f"tiktoken cannot write it into its cache folder ({type(err).__name__}: {err})"
        raise _missing_ranks_error(reason, damaged, unwritable=True) from err


def _split_in_two(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The merge that made `token`: its bytes merged by BPE (lowest-ranked adjacent pair first) with only the ranks
    below its own, which always leaves exactly two parts, GPT-2's merge rule for it."""
    rank, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts[:-1], parts[1:], strict=False)]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[best] >= rank:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"the ranks do not make {token!r} from two lower-ranked tokens: not a byte-level BPE")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def gpt2_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """GPT-2's `vocab.json` and `merges.txt`, rebuilt from `get_encoding()`'s ranks (built once, 1-2 s).

    Tokens are written in GPT-2's printable alphabet for bytes (`bytes_to_unicode`); `<|endoftext|>` is in the vocab
    (50256) with no merge, as in GPT-2's own files. The 50,000 merges are in rank order, each token's two parts found
    by `_split_in_two`: BPE with these merges is tiktoken's rule (merge the adjacent pair whose concatenation has the
    lowest rank), so the ids are tiktoken's.
    """
    encoding = get_encoding()
    ranks = encoding._mergeable_ranks
    alphabet = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()} | encoding._special_tokens
    merges = tuple(
        (text(first), text(second))
        for first, second in (_split_in_two(ranks, token) for token in sorted(ranks, key=ranks.get) if len(token) > 1)
    )
    return vocab, merges


def get_hf_tokenizer(
    padding_side: Literal["right", "left"] = "right", model_max_length: int = MODEL_MAX_LENGTH
) -> GPT2Tokenizer:
    """`transformers`' own GPT-2 tokenizer (`GPT2Tokenizer`, the fast one in v5), giving the same ids as
    `get_encoding()`.

    It is built from GPT-2's vocabulary and merges, recovered from tiktoken's ranks (`gpt2_vocab_and_merges`), so
    `tokenizer(text).input_ids == get_encoding().encode_ordinary(text)` for text without `<|endoftext|>` in it, and
    `decode` inverts `encode` exactly (no clean-up of spaces). The one exception is text with a lone surrogate
    (`"\\ud800"`, not valid Unicode): tiktoken encodes it as U+FFFD, the `tokenizers` library (GPT-2's own tokenizer
    too) raises a `TypeError` ("TextEncodeInput must be ..."). Being GPT-2's class, it saves `tokenizer_class:
    GPT2Tokenizer`, which `AutoTokenizer` of transformers 4.x opens too (as `GPT2TokenizerFast`), and it honours
    `add_prefix_space=True` (`AutoTokenizer.from_pretrained(dir, add_prefix_space=True)`, for `is_split_into_words`).

    `<|endoftext|>` (50256) is the bos, eos, unk and pad token. Padding with eos is the GPT-2 convention: GPT-2 has
    no pad token of its own, and padded positions are masked by the attention mask, so the id they carry does not
    matter. (Because pad id == eos id, mask padded labels with the attention mask, not by comparing ids with
    `pad_token_id`, or real `<|endoftext|>` tokens get masked too.)

    Like every Hugging Face tokenizer (and GPT-2's own), it reads the literal text `<|endoftext|>` as the special
    token: `tokenizer(text)` equals tiktoken's `encode(text, allowed_special="all")`. Pass
    `split_special_tokens=True` to read it as plain text, which equals `encode_ordinary(text)`. No bos/eos is
    added around the text (GPT-2 adds none).

    `save_pretrained(dir)` writes `tokenizer.json` and `tokenizer_config.json`; `AutoTokenizer.from_pretrained(dir)`
    loads them back without this package, offline and without remote code. `save_tokenizer(tokenizer, dir)` adds
    GPT-2's `vocab.json` and `merges.txt`, for transformers 4.x's `use_fast=False` and tools that read BPE files.
    (Next to a `gpt2_scratch` model's `config.json`, which `AutoTokenizer` reads first, pass `trust_remote_code=True`
    where the package is not imported.)

    Args:
        padding_side: `"right"` (training, scoring) or `"left"` (batched `generate()`, so that every row's last
            position is a real token). Saved with the tokenizer; it can also be changed later via
            `tokenizer.padding_side`.
        model_max_length: the longest sequence the model takes; keep it equal to the model's `n_positions`.

    Returns:
        A new tokenizer on every call (changing one does not change the others).

    Raises:
        ValueError: for a `padding_side` other than `"right"` or `"left"`.
        EncodingFilesNotFoundError: when the ranks cannot be loaded (see `get_encoding`).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    vocab, merges = gpt2_vocab_and_merges()
    return GPT2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        model_max_length=model_max_length,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def _merges_as_strings(path: Path) -> None:
    """Rewrite the BPE merges of the `tokenizer.json` at `path` as `"first second"` strings, the form GPT-2's Hub
    file has and every `tokenizers` reads. The `tokenizers` of transformers v5 writes them as pairs, which
    `tokenizers` < 0.20 (transformers < 4.45) cannot parse ("data did not match any variant of untagged enum
    ModelWrapper"). Merges with a space in a part (no byte-level BPE has one) keep the pair form."""
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    merges = saved.get("model", {}).get("merges") or []
    if not all(isinstance(merge, list) and len(merge) == 2 and " " not in "".join(merge) for merge in merges):
        return
    saved["model"]["merges"] = [" ".join(merge) for merge in merges]
    path.write_text(json.dumps(saved, indent=2, ensure_ascii=False), encoding="utf-8")


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> tuple[str, ...]:
    """`tokenizer.save_pretrained(folder)`, plus GPT-2's `vocab.json` and `merges.txt` (`VOCAB_FILES`).

    transformers v5 saves a fast tokenizer as `tokenizer.json` alone. GPT-2's Hub repository also holds the two files
    of OpenAI's release (`encoder.json` and `vocab.bpe`, renamed), and those are what transformers 4.x with
    `use_fast=False` (the Python `GPT2Tokenizer`) and tools that read BPE files need. They are written from the
    tokenizer's own BPE model, so they hold what `tokenizer.json` holds: `vocab.json` maps each token (bytes in
    GPT-2's printable alphabet, `<|endoftext|>` included) to its id, in id order, and `merges.txt` lists the merges in
    rank order after a `#version: 0.2` line, one `first second` pair and a newline each. For GPT-2's tokenizer
    (`get_hf_tokenizer`) both are byte for byte OpenAI's files. A tokenizer whose model is not a BPE one is saved as
    `save_pretrained` saves it. The merges in `tokenizer.json` are written as strings, as in GPT-2's Hub file, so
    transformers 4.x before 4.45 reads it too (`_merges_as_strings`).

    Returns:
        The paths written, as `save_pretrained` returns them, then the two files'.

    Raises:
        OSError: a write that failed, also where the `tokenizers` library (which writes `tokenizer.json`) raised a
            bare `Exception("No space left on device (os error 28)")`, which callers that handle a full disk missed.
    """
    try:
        saved = tuple(tokenizer.save_pretrained(folder))
    except Exception as err:
        failed = re.fullmatch(r"(.*) \(os error (\d+)\)", str(err))
        if type(err) is not Exception or failed is None:
            raise
        raise OSError(int(failed.group(2)), failed.group(1), str(folder)) from err
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        return saved
    _merges_as_strings(Path(folder) / "tokenizer.json")
    vocab_path, merges_path = (Path(folder) / name for name in VOCAB_FILES)
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))  # in id order, as OpenAI's encoder.json
    vocab_path.write_bytes(json.dumps(vocab).encode())
    merges = "".join(f"{first} {second}\n" for first, second in model["merges"])  # pairs, as tokenizers>=0.20 has them
    merges_path.write_bytes(("#version: 0.2\n" + merges).encode())  # bytes: "\n" on Windows too, as OpenAI's file
    return (*saved, str(vocab_path), str(merges_path))
