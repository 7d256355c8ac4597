"""GPT2ScratchConfig: the GPT-2 hyperparameters, under GPT-2's own attribute names.

This file travels to the Hub with the model: it imports nothing but `transformers` and the standard library.
"""

import re

import transformers
from transformers import PretrainedConfig

# The oldest transformers the model's code runs under: 5.24 renamed `past_key_values` to `cache` (in the masks, the
# outputs and generate), the name it uses. An export loaded under 5.12, 5.18, 5.21 and 5.23 failed; under 5.24, ok.
MIN_TRANSFORMERS_VERSION = "5.24"
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")  # transformers' two names for GPT-2's tanh-approximated GELU
# `GPT2Config`'s attention variants this model does not implement, with the value of plain GPT-2 that it computes
# (`reorder_and_upcast_attn` is not among them: it computes the same function, in float32 under fp16/bf16)
PLAIN_GPT2_ATTENTION = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def check_transformers_version(installed: str) -> None:
    """Raise a one-line `ImportError` naming both versions and the fix where `installed` is older than
    `MIN_TRANSFORMERS_VERSION`. Checked when this file is imported, which `from_pretrained` does first: the model's
    code would otherwise fail deep inside, under 5.23 at the first forward (`create_causal_mask() got an unexpected
    keyword argument 'cache'`), under 5.18 on import (no `slice_logits_to_keep`), under 4.x on import (no
    `transformers.initialization`)."""
    release = re.match(r"\d+(\.\d+)*", installed)  # "5.24.0" of "5.24.0.dev0", "5.24" of "5.24rc1", ...
    if release is None:  # not a release number (a fork's own scheme?): let it try
        return
    if _numbers(release.group()) < _numbers(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"This model's code (gpt2-scratch) needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers "
            f"{installed} is installed: upgrade it with `pip install -U transformers`."
        )


check_transformers_version(transformers.__version__)


class GPT2ScratchConfig(PretrainedConfig):
    """Configuration of a GPT-2 language model written from scratch.

    The defaults are GPT-2 124M. `vocab_size` is GPT-2's 50257 tokens padded to 50304 (a multiple of 128) so the
    embedding and LM-head matmuls hit fast kernels; the padded ids `>= tokenizer_vocab_size` never carry
    probability (their logits are `-inf`, see `GPT2ScratchForCausalLM`).

    Generic names work too: `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`
    and the seed's `block_size` are aliases (`attribute_map`) for `n_embd`, `n_layer`, `n_head` and `n_positions`.

    Raises:
        ValueError: for a configuration that cannot work, naming the field (e.g. `n_embd` not divisible by `n_head`).
    """

    model_type = "gpt2_scratch"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "block_size": "n_positions",
    }

    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 128 for speed
    tokenizer_vocab_size: int = 50257  # ids the tokenizer can produce; logits of ids above it are -inf
    n_positions: int = 1024  # context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # GPT-2's tanh approximation of GELU (the only one implemented)
    resid_pdrop: float = 0.0  # GPT-2 used 0.1; pretraining on a large corpus does not need dropout
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256  # <|endoftext|>
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """`PretrainedConfig`'s, refusing a Hugging Face GPT-2 checkpoint (`model_type` "gpt2"): its `Conv1D`
        weights are stored transposed, so `from_pretrained` would fail on their shapes or, for the square
        `attn.c_proj`, load them silently wrong. `from_hf_gpt2` converts them."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "gpt2":
            source = str(pretrained_model_name_or_path)
            raise ValueError(
                f"{source} is a Hugging Face GPT-2 checkpoint (model_type 'gpt2'), stored in another layout: load "
                f"it with GPT2ScratchForCausalLM.from_hf_gpt2({source!r})."
            )
        return config_dict, kwargs

    def validate_architecture(self):
        """Raise a `ValueError` naming the field for a configuration the model cannot be built from."""
        for name in ("vocab_size", "tokenizer_vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2ScratchConfig.{name} must be a positive integer, got {value!r}.")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(f"GPT2ScratchConfig.n_inner must be a positive integer or None, got {self.n_inner!r}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2ScratchConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "choose n_head among the divisors of n_embd."
            )
        if self.vocab_size < self.tokenizer_vocab_size:
            raise ValueError(
                f"GPT2ScratchConfig.vocab_size ({self.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"(tokenizer_vocab_size={self.tokenizer_vocab_size}): use vocab_size >= {self.tokenizer_vocab_size} "
                "(50304 pads GPT-2's 50257 for speed)."
            )
        for name, plain in PLAIN_GPT2_ATTENTION.items():  # a GPT2Config's fields passed on (`**gpt2.to_dict()`)
            value = getattr(self, name, plain)
            if value != plain:
                raise ValueError(
                    f"GPT2ScratchConfig.{name}={value!r} is not implemented: the attention computes plain GPT-2's "
                    f"({name}={plain!r})."
                )
        if self.activation_function not in TANH_GELU_NAMES:
            raise ValueError(
                f"GPT2ScratchConfig.activation_function={self.activation_function!r} is not implemented: the MLP "
                f"computes GPT-2's tanh-approximated GELU, named {' or '.join(map(repr, TANH_GELU_NAMES))}."
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GPT2ScratchConfig.{name} must be in [0, 1), got {value!r}.")
