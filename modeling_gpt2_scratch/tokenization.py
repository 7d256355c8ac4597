"""GPT-2's tokenizer: tiktoken for speed, and the matching Hugging Face tokenizer for checkpoints and the Hub.

`get_encoding()` is what the data pipeline uses to turn text into ids (tiktoken is several times faster than the
Hugging Face tokenizer: `benchmarks/tokenizer_throughput.py`). `get_hf_tokenizer()` builds a `transformers.PreTrainedTokenizerFast` from the very same BPE ranks, so
the tokenizer written next to a checkpoint gives the ids the model was trained on, and `AutoTokenizer`, `generate()`
and pipelines work with it offline and without remote code.

This module imports nothing from the model, so the model-independent data pipeline can use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from typing import Literal

import tiktoken
import tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"  # GPT-2's only special token (id 50256): document separator, bos, eos and pad
MODEL_MAX_LENGTH = 1024  # GPT-2's context length

# Where tiktoken downloads GPT-2's ranks from. `r50k_base` is one file; tiktoken's `gpt2` builds the same ranks from
# the two files of OpenAI's original release.
_R50K_BASE_URLS = ("https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",)
_GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
_NETWORK_TIMEOUT_S = 10.0  # how long the reachability check waits before declaring the download site unreachable


class EncodingFilesNotFoundError(FileNotFoundError):
    """GPT-2's BPE ranks are neither in tiktoken's cache nor downloadable (offline, or the site is unreachable)."""


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


def _is_cached(urls: tuple[str, ...]) -> bool:
    return _tiktoken_cache_dir() != "" and all(os.path.isfile(_cache_path(url)) for url in urls)


def _offline_mode() -> bool:
    """True when the user asked the Hugging Face stack not to touch the network (`HF_HUB_OFFLINE`, ...)."""
    return any(
        os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _missing_ranks_error(reason: str) -> EncodingFilesNotFoundError:
    url = _R50K_BASE_URLS[0]
    return EncodingFilesNotFoundError(
        f"Cannot load GPT-2's BPE ranks for tiktoken: {url} is not in tiktoken's cache "
        f"({_cache_path(url)!r}) and {reason}. Set TIKTOKEN_CACHE_DIR to a folder that holds it "
        "(in this project: ../shared/tiktoken_cache), or connect to the internet"
        + (" and unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE." if _offline_mode() else ".")
    )


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding: 50257 ids, `<|endoftext|>` = 50256.

    The ranks come from tiktoken's `r50k_base` encoding, whose ranks, split pattern and special token are byte for
    byte those of tiktoken's `gpt2` encoding. `r50k_base` is one `.tiktoken` file (what `../shared/tiktoken_cache/`
    and CI hold), where `gpt2` needs two files from OpenAI's original release, so it is the one to ship and download.
    A cache that holds only the `gpt2` files (from an earlier `tiktoken.get_encoding("gpt2")`) is used as it is. The
    returned encoding's `name` is therefore `"r50k_base"` (or `"gpt2"`); the ids are the same either way.

    Loading never waits on the network when the files are cached. Otherwise, with `HF_HUB_OFFLINE` or
    `TRANSFORMERS_OFFLINE` set it fails at once, and online it first checks that the download site answers within
    10 seconds (tiktoken's own download has no timeout), then lets tiktoken download the file into its cache.

    Returns:
        The encoding, cached: every call returns the same object.

    Raises:
        EncodingFilesNotFoundError: (a `FileNotFoundError`) when the ranks are neither cached nor downloadable; the
            message says to set `TIKTOKEN_CACHE_DIR` or connect to the internet.
    """
    for name, urls in (("r50k_base", _R50K_BASE_URLS), ("gpt2", _GPT2_URLS)):
        if _is_cached(urls):
            return tiktoken.get_encoding(name)
    if _offline_mode():
        raise _missing_ranks_error("offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)")

    import requests  # tiktoken's own HTTP client

    url = _R50K_BASE_URLS[0]
    logger.info("Downloading GPT-2's BPE ranks from %s into %s", url, _tiktoken_cache_dir())
    try:
        requests.head(url, timeout=_NETWORK_TIMEOUT_S, allow_redirects=True).raise_for_status()
        return tiktoken.get_encoding("r50k_base")
    except (requests.RequestException, OSError, ValueError) as err:
        raise _missing_ranks_error(f"downloading it failed ({type(err).__name__}: {err})") from err


class _EncodingConverter(TikTokenConverter):
    """transformers' `TikTokenConverter`, fed an in-memory `tiktoken.Encoding` instead of a `.tiktoken` file.

    The converter maps bytes to GPT-2's printable unicode alphabet (`bytes_to_unicode`) for the vocab, and recovers
    the merges from the ranks: every split of a token into two tokens becomes a merge, at the token's rank. Applying
    merges lowest-rank-first then reproduces tiktoken's rule (merge the adjacent pair whose concatenation has the
    lowest rank), and `ignore_merges` reproduces tiktoken's shortcut for a pre-token that is itself in the vocab.
    Only a tie could differ (two different splits of one token at overlapping positions of a pre-token, which
    tiktoken breaks leftmost-first and `tokenizers` by merge order); none shows up in tiny Shakespeare, the tests'
    edge cases, or a quarter million strings built from every token that has two or more splits.
    """

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        super().__init__(pattern=encoding._pat_str, extra_special_tokens=encoding._special_tokens)
        self._ranks = encoding._mergeable_ranks

    def load_tiktoken_bpe(self, tiktoken_url: str | None) -> dict[bytes, int]:
        return self._ranks


@functools.lru_cache(maxsize=1)
def _backend_tokenizer() -> tokenizers.Tokenizer:
    """The `tokenizers` byte-level BPE built from `get_encoding()`'s ranks (built once; callers get copies).

    `<|endoftext|>` goes into the BPE vocabulary too (with no merges), as in GPT-2's own `tokenizer.json`, so
    `tokenizer.vocab_size` is 50257 like `GPT2TokenizerFast`'s; the text is only ever matched as the special token.
    """
    encoding = get_encoding()
    state = json.loads(_EncodingConverter(encoding).converted().to_str())
    state["model"]["vocab"].update(encoding._special_tokens)
    return tokenizers.Tokenizer.from_str(json.dumps(state))


def get_hf_tokenizer(
    padding_side: Literal["right", "left"] = "right", model_max_length: int = MODEL_MAX_LENGTH
) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer that gives the same ids as `get_encoding()`.

    It is a byte-level BPE (`tokenizers` library) built from tiktoken's ranks, with tiktoken's GPT-2 split pattern
    as pre-tokenizer and a byte-level decoder, so `tokenizer(text).input_ids == get_encoding().encode_ordinary(text)`
    for text without `<|endoftext|>` in it, and `decode` inverts `encode` exactly (no clean-up of spaces).

    `<|endoftext|>` (50256) is the bos, eos, unk and pad token. Padding with eos is the GPT-2 convention: GPT-2 has
    no pad token of its own, and padded positions are masked by the attention mask, so the id they carry does not
    matter. (Because pad id == eos id, mask padded labels with the attention mask, not by comparing ids with
    `pad_token_id`, or real `<|endoftext|>` tokens get masked too.)

    Like every Hugging Face tokenizer (and GPT-2's own), it reads the literal text `<|endoftext|>` as the special
    token: `tokenizer(text)` equals tiktoken's `encode(text, allowed_special="all")`. Pass
    `split_special_tokens=True` to read it as plain text, which equals `encode_ordinary(text)`. No bos/eos is
    added around the text (GPT-2 adds none).

    `save_pretrained(dir)` writes `tokenizer.json` and `tokenizer_config.json`; `AutoTokenizer.from_pretrained(dir)`
    loads them back without this package, offline and without remote code. (Next to a `gpt2_scratch` model's
    `config.json`, which `AutoTokenizer` reads first, pass `trust_remote_code=True` where the package is not imported.)

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
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(),
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        model_max_length=model_max_length,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )
