"""The tiktoken encoding and the exported Hugging Face tokenizer give the same ids, and load offline."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import requests
import tiktoken.load
import tiktoken.registry
import torch
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast, pipeline

from modeling_gpt2_scratch.tokenization import (
    _GPT2_FILES,
    _R50K_BASE_FILES,
    EncodingFilesNotFoundError,
    get_encoding,
    get_hf_tokenizer,
    gpt2_vocab_and_merges,
    save_tokenizer,
)

SHARED_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"

EOT_ID = 50256

EDGE_CASES = {
    "accents": "héllo café naïve résumé Ångström",
    "combining_marks": "cafe\u0301 n\u0303o A\u030a Z\u0351\u0352\u0353",
    "cjk": "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji": "emoji 😀👍🏽 👨\u200d👩\u200d👧 🇫🇷!",
    "runs_of_spaces": "a  b   c    d          e",
    "leading_spaces": "    leading",
    "trailing_whitespace": "trailing   \t \n",
    "tabs": "\t\tindented\ttabs\t",
    "crlf": "line one\r\nline two\r\n\r\n",
    "blank_lines": "a\n \n\n  \nb",
    "unicode_spaces": "\u00a0nbsp\u2003em\u3000ideographic \u2028line\u0085next",
    "contractions": "It's don't they're we've I'm you'll he'd",
    "contractions_upper": "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "digits": "0 7 12 123 1234 12345678 3.14159 1,000,000 2024-01-01 ٣٤ ¾ Ⅻ",
    "code": "def f(x):\n\treturn {'a': [1, 2]}  # comment\n",
    "control_chars": "\x00\x01\x7f bell\x07",
    "empty": "",
    "single_space": " ",
}
LITERAL_EOT = "Hello<|endoftext|>world <|endoftext|> !"


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    return get_hf_tokenizer()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any download attempt, and start from empty `get_encoding` and tiktoken registry caches."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(requests, "head", refuse)
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # encodings loaded by earlier tests: load them again
    get_encoding.cache_clear()
    yield
    get_encoding.cache_clear()


def test_encoding_is_gpt2():
    enc = get_encoding()
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's published ids
    assert get_encoding() is enc


def test_hf_ids_equal_tiktoken_on_tiny_shakespeare(shared_dir, hf_tokenizer):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    expected = get_encoding().encode_ordinary(text)
    assert hf_tokenizer(text)["input_ids"] == expected
    assert hf_tokenizer.decode(expected) == text


@pytest.mark.parametrize("text", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_hf_ids_equal_tiktoken_on_edge_cases(hf_tokenizer, text):
    assert hf_tokenizer(text)["input_ids"] == get_encoding().encode_ordinary(text)


@pytest.mark.parametrize("text", [*EDGE_CASES.values(), LITERAL_EOT], ids=[*EDGE_CASES.keys(), "literal_eot"])
def test_decode_inverts_encode_with_both_tokenizers(hf_tokenizer, text):
    enc = get_encoding()
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.decode(enc.encode(text, allowed_special="all")) == text
    assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"]) == text
    assert hf_tokenizer.decode(hf_tokenizer(text, split_special_tokens=True)["input_ids"]) == text


def test_literal_eot_as_text_matches_encode_ordinary(hf_tokenizer):
    ids = hf_tokenizer(LITERAL_EOT, split_special_tokens=True)["input_ids"]
    assert ids == get_encoding().encode_ordinary(LITERAL_EOT)
    assert EOT_ID not in ids


def test_literal_eot_as_special_token_matches_allowed_special(hf_tokenizer):
    ids = hf_tokenizer(LITERAL_EOT)["input_ids"]
    assert ids == get_encoding().encode(LITERAL_EOT, allowed_special="all")
    assert ids.count(EOT_ID) == 2


def test_special_tokens_and_lengths(hf_tokenizer):
    assert len(hf_tokenizer) == hf_tokenizer.vocab_size == 50257  # as GPT2TokenizerFast: <|endoftext|> in the vocab
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(hf_tokenizer, name) == "<|endoftext|>"
        assert getattr(hf_tokenizer, f"{name}_id") == EOT_ID
    assert hf_tokenizer.model_max_length == 1024
    assert hf_tokenizer("Hello world")["input_ids"] == [15496, 995]  # no bos/eos added


def test_left_padding_puts_pads_before_the_text():
    tokenizer = get_hf_tokenizer(padding_side="left")
    batch = tokenizer(["Hi", "Hello there, world"], padding=True, return_tensors="pt")
    short = tokenizer("Hi")["input_ids"]
    n_pad = batch["input_ids"].shape[1] - len(short)
    assert n_pad > 0
    assert batch["input_ids"][0].tolist() == [EOT_ID] * n_pad + short
    assert batch["attention_mask"][0].tolist() == [0] * n_pad + [1] * len(short)
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]


def test_it_is_gpt2s_own_tokenizer_class_with_gpt2s_merges(tmp_path):
    """`GPT2Tokenizer` (saved as such, so transformers 4.x's `AutoTokenizer` opens it too) from GPT-2's vocabulary
    and 50,000 merges, in merges.txt's order; `add_prefix_space=True` works as for `GPT2TokenizerFast`."""
    vocab, merges = gpt2_vocab_and_merges()
    assert len(vocab) == 50257 and len(merges) == 50000
    assert merges[:4] == (("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"))  # GPT-2's merges.txt begins so
    tokenizer = get_hf_tokenizer()
    assert type(tokenizer) is GPT2Tokenizer
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    spaced = AutoTokenizer.from_pretrained(tmp_path, add_prefix_space=True)
    words = get_encoding().encode_ordinary(" Hello world")
    assert spaced("Hello world").input_ids == words
    assert spaced(["Hello", "world"], is_split_into_words=True).input_ids == words
    assert AutoTokenizer.from_pretrained(tmp_path)("Hello world").input_ids == get_encoding().encode("Hello world")


def test_save_tokenizer_adds_gpt2s_vocab_json_and_merges_txt(tmp_path, monkeypatch):
    """transformers v5 saves `tokenizer.json` alone; `save_tokenizer` adds GPT-2's two BPE files, which open alone."""
    written = save_tokenizer(get_hf_tokenizer(), tmp_path)
    assert sorted(Path(path).name for path in written) == [
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    for name, (_, sha256) in zip(("merges.txt", "vocab.json"), _GPT2_FILES, strict=True):  # vocab.bpe, encoder.json
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == sha256, f"{name}: not OpenAI's file"
    vocab, merges = gpt2_vocab_and_merges()
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == vocab  # <|endoftext|> = 50256 too
    merges_file = (tmp_path / "merges.txt").read_text(encoding="utf-8")
    assert merges_file.startswith("#version: 0.2\n") and merges_file.endswith("\n")
    lines = merges_file.split("\n")[1:-1]  # as transformers 4.x's GPT2Tokenizer reads it: header, last newline off
    assert tuple(tuple(line.split(" ")) for line in lines) == merges
    assert lines[-1] == "Ġg azed"  # GPT-2's merges.txt ends so
    (tmp_path / "tokenizer.json").unlink()  # the BPE files alone make the same tokenizer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_files = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*EDGE_CASES.values(), LITERAL_EOT]:
        assert from_files(text).input_ids == get_encoding().encode(text, allowed_special="all")


def test_saved_tokenizer_json_holds_its_merges_as_strings_as_gpt2s_does(tmp_path, monkeypatch):
    """transformers v5's `tokenizers` writes merges as pairs, which `tokenizers` < 0.20 (transformers < 4.45) cannot
    parse ("data did not match any variant of untagged enum ModelWrapper"); GPT-2's Hub file has "Ġ t" strings,
    which every version reads. Checked by hand with transformers 4.44.2: `AutoTokenizer` opens the export."""
    import tokenizers

    save_tokenizer(get_hf_tokenizer(), tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    _, merges = gpt2_vocab_and_merges()
    assert saved["model"]["merges"] == [" ".join(merge) for merge in merges]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*EDGE_CASES.values(), LITERAL_EOT]:
        expected = get_encoding().encode(text, allowed_special="all")
        assert reloaded(text).input_ids == raw.encode(text).ids == expected


def test_save_tokenizer_writes_no_bpe_files_for_another_kind_of_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    wordpiece = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), unk_token="[UNK]"
    )
    written = save_tokenizer(wordpiece, tmp_path)
    assert sorted(Path(path).name for path in written) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_padding_side_is_validated():
    with pytest.raises(ValueError, match="padding_side"):
        get_hf_tokenizer(padding_side="middle")


def test_save_pretrained_loads_with_autotokenizer_offline(tmp_path, monkeypatch):
    get_hf_tokenizer(padding_side="left").save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)  # transformers' own class: no remote code
    assert "auto_map" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert loaded.padding_side == "left"
    assert loaded.model_max_length == 1024
    assert loaded.eos_token_id == loaded.pad_token_id == loaded.bos_token_id == EOT_ID
    for text in [*EDGE_CASES.values(), LITERAL_EOT]:
        assert loaded(text, split_special_tokens=True)["input_ids"] == get_encoding().encode_ordinary(text)


def test_get_encoding_fails_fast_offline_with_empty_cache(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncodingFilesNotFoundError, match="TIKTOKEN_CACHE_DIR") as excinfo:
        get_encoding()
    assert isinstance(excinfo.value, FileNotFoundError)
    assert "connect to the internet" in str(excinfo.value)


def test_a_damaged_cached_file_fails_fast_offline_instead_of_downloading(tmp_path, monkeypatch, no_network):
    """tiktoken downloads a cached file whose hash is wrong again (without a timeout, even offline)."""
    good = Path(os.environ.get("TIKTOKEN_CACHE_DIR", SHARED_CACHE))
    for name in os.listdir(good):
        (tmp_path / name).write_bytes((good / name).read_bytes()[:1000])  # cut short
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncodingFilesNotFoundError, match="damaged in tiktoken's cache .*delete it"):
        get_encoding()


def test_get_encoding_unreachable_download_raises_clear_error(tmp_path, monkeypatch, no_network):
    def unreachable(url, **kwargs):
        assert kwargs["timeout"] <= 10  # never a call without a timeout
        raise requests.ConnectionError(f"cannot resolve {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(requests, "head", unreachable)
    with pytest.raises(EncodingFilesNotFoundError, match="ConnectionError") as excinfo:
        get_encoding()
    assert "TIKTOKEN_CACHE_DIR" in str(excinfo.value)
    assert "connect to the internet" in str(excinfo.value)


def test_an_unwritable_cache_folder_is_named_as_such_not_as_a_failed_download(tmp_path, monkeypatch, no_network):
    """Online, tiktoken downloads the file and then fails to write it into a TIKTOKEN_CACHE_DIR it cannot write: the
    fix is another cache folder, not a connection."""

    class Reachable:
        def raise_for_status(self) -> None:
            pass

    url = _R50K_BASE_FILES[0][0]
    published = (
        Path(os.environ.get("TIKTOKEN_CACHE_DIR", SHARED_CACHE)) / hashlib.sha1(url.encode()).hexdigest()
    ).read_bytes()
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a_file" / "cache"))  # under a file: not writable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(requests, "head", lambda url, **kwargs: Reachable())
    monkeypatch.setattr(tiktoken.load, "read_file", lambda blobpath: published)
    with pytest.raises(EncodingFilesNotFoundError, match="cannot write") as excinfo:
        get_encoding()
    message = str(excinfo.value)
    assert "TIKTOKEN_CACHE_DIR" in message and str(tmp_path / "a_file") in message
    assert "downloading it failed" not in message and "connect to the internet" not in message
    assert "\n" not in message


def test_text_generation_pipeline_runs_offline_on_a_saved_model(tmp_path, monkeypatch):
    from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64))
    model.save_pretrained(tmp_path)
    get_hf_tokenizer(model_max_length=64).save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=str(tmp_path), trust_remote_code=True)
    prompt = "First Citizen:"
    out = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith(prompt)
    assert len(get_encoding().encode_ordinary(out)) > len(get_encoding().encode_ordinary(prompt))
