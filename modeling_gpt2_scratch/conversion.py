"""Hugging Face GPT-2 (`GPT2LMHeadModel`) <-> scratch GPT-2 weights.

The module names are the same on both sides, so a conversion is a key-for-key copy plus:
- GPT-2's `Conv1D` stores its weight as `(in_features, out_features)`, `nn.Linear` as `(out, in)`: the four
  projection weights (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) are transposed;
- the token embedding and the LM head (tied to it unless `tie_word_embeddings=False`) are padded from GPT-2's 50257
  rows to `config.vocab_size` (50304) with zero rows on the way in, and sliced back on the way out;
- the causal-mask buffers old HF checkpoints carry (`attn.bias`, `attn.masked_bias`) are dropped.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig

from .configuration_gpt2_scratch import PLAIN_GPT2_ATTENTION, TANH_GELU_NAMES, GPT2ScratchConfig
from .data import one_line

if TYPE_CHECKING:
    from .modeling_gpt2_scratch import GPT2ScratchForCausalLM

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
VOCAB_MULTIPLE = 128  # pad the vocabulary to a multiple of this for fast matmuls

logger = logging.getLogger(__name__)


def _is_transposed(key: str) -> bool:
    return key.endswith(TRANSPOSED)


def _is_ignored_hf_buffer(key: str) -> bool:
    return key.endswith(IGNORED_HF_SUFFIXES)


def config_from_hf(hf_config: GPT2Config, pad_vocab: bool = True) -> GPT2ScratchConfig:
    """The scratch config with the same architecture as a Hugging Face `GPT2Config`.

    Raises:
        ValueError: if the HF config uses a GPT-2 variant this model does not implement.
    """
    unsupported = {
        "activation_function": (hf_config.activation_function, "gelu_new"),
        **{name: (getattr(hf_config, name), plain) for name, plain in PLAIN_GPT2_ATTENTION.items()},
    }
    if hf_config.activation_function in TANH_GELU_NAMES:  # GPT-2's tanh GELU, under either of its names
        del unsupported["activation_function"]
    bad = [f"{name}={got!r} (need {want!r})" for name, (got, want) in unsupported.items() if got != want]
    if bad:
        raise ValueError(
            f"This GPT-2 checkpoint uses a variant the scratch model does not implement: {', '.join(bad)}."
        )
    vocab = hf_config.vocab_size
    return GPT2ScratchConfig(
        vocab_size=math.ceil(vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE if pad_vocab else vocab,
        tokenizer_vocab_size=vocab,
        n_positions=hf_config.n_positions,
        n_embd=hf_config.n_embd,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_inner=hf_config.n_inner,
        layer_norm_epsilon=hf_config.layer_norm_epsilon,
        initializer_range=hf_config.initializer_range,
        resid_pdrop=hf_config.resid_pdrop,
        embd_pdrop=hf_config.embd_pdrop,
        attn_pdrop=hf_config.attn_pdrop,
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id,
        tie_word_embeddings=hf_config.tie_word_embeddings,
        use_cache=hf_config.use_cache,
    )


def hf_config_from_scratch(config: GPT2ScratchConfig) -> GPT2Config:
    """The Hugging Face `GPT2Config` of the same architecture, with the unpadded vocabulary."""
    return GPT2Config(
        vocab_size=config.tokenizer_vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_inner,
        activation_function="gelu_new",
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.initializer_range,
        resid_pdrop=config.resid_pdrop,
        embd_pdrop=config.embd_pdrop,
        attn_pdrop=config.attn_pdrop,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
    )


def hf_to_scratch_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map a `GPT2LMHeadModel` state dict onto the scratch model's keys and shapes (`expected`).

    Raises:
        ValueError: listing the missing keys, the unexpected keys and the shape mismatches, if any.
    """
    hf = {k: v for k, v in hf_state_dict.items() if not _is_ignored_hf_buffer(k)}
    hf.setdefault("lm_head.weight", hf.get("transformer.wte.weight"))  # tied: often stored once
    out, mismatched = {}, []
    for key, target in expected.items():
        if key not in hf or hf[key] is None:
            continue
        tensor = hf[key].t() if _is_transposed(key) else hf[key]
        if key in ("transformer.wte.weight", "lm_head.weight") and tensor.shape[0] < target.shape[0]:
            # pad GPT-2's vocabulary rows with zeros; their logits are masked to -inf anyway
            pad = tensor.new_zeros(target.shape[0] - tensor.shape[0], tensor.shape[1])
            tensor = torch.cat([tensor, pad], dim=0)
        if tensor.shape != target.shape:
            mismatched.append(f"{key}: checkpoint {tuple(hf[key].shape)} vs model {tuple(target.shape)}")
            continue
        out[key] = tensor.to(target.dtype).contiguous()
    missing = sorted(k for k in expected if k not in hf or hf[k] is None)
    unexpected = sorted(k for k in hf if k not in expected)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatches: {'; '.join(mismatched)}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        raise ValueError(
            "The GPT-2 checkpoint does not match the scratch model's configuration: "
            + " | ".join(parts)
            + ". Pass a GPT2LMHeadModel checkpoint of the same size (or config=None to infer it)."
        )
    return out


def scratch_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: GPT2ScratchConfig) -> dict:
    """The scratch model's weights under `GPT2LMHeadModel`'s layout (Conv1D transposes, unpadded vocabulary)."""
    out = {}
    for key, tensor in state_dict.items():
        if _is_transposed(key):
            tensor = tensor.t()
        elif key in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: config.tokenizer_vocab_size]
        out[key] = tensor.contiguous()
    return out


def cannot_be_a_hub_id(source: str | Path) -> bool:
    """Whether `source` can only name a local folder: a `Path`, or a name no Hub id has (`./x`, `/x`, `~/x`,
    `a/b/c`). Such a name that is not there is reported missing, not looked up on the Hub."""
    return isinstance(source, Path) or source.startswith((".", "/", "~")) or source.count("/") > 1


def load_hf_gpt2(source: str | Path | GPT2LMHeadModel, **from_pretrained_kwargs) -> GPT2LMHeadModel:
    """A `GPT2LMHeadModel` from an instance, a local directory or a Hub id (e.g. `"gpt2"`).

    `source` is a local folder where one is there, or where it can only be one: a `Path`, or a name that is not a Hub
    id (`./x`, `/x`, `~/x`, `a/b/c`). `from_pretrained_kwargs` (`dtype`, `revision`, ...) go to
    `GPT2LMHeadModel.from_pretrained`, so they need a folder or a Hub id.

    Raises:
        FileNotFoundError: `source` can only be a local folder, and is not there.
        ValueError: `source` is a file; `from_pretrained_kwargs` with an instance; the checkpoint is not a Hugging
            Face GPT-2 (its `model_type`), or lacks weights the model needs (`from_pretrained` would have drawn them
            at random).
        OSError: `source` is no local folder, and loading it from the Hub failed (offline, no such repository), on
            one line naming it.
    """
    if isinstance(source, GPT2LMHeadModel):
        if from_pretrained_kwargs:  # they were ignored: `dtype=torch.bfloat16` gave a float32 model
            raise ValueError(
                "from_hf_gpt2 got a GPT2LMHeadModel and from_pretrained arguments "
                f"({', '.join(from_pretrained_kwargs)}), which only loading a folder or a Hub id takes: convert the "
                "model without them (then e.g. `.to(torch.bfloat16)`)."
            )
        return source
    if not isinstance(source, (str, Path)):
        raise ValueError(
            f"source must be a Hub id, a local directory or a GPT2LMHeadModel, got {type(source).__name__}."
        )
    path = Path(source).expanduser()
    if path.is_file():
        raise ValueError(f"GPT-2 checkpoint {source} is a file: pass the folder that holds it, or a Hub id.")
    if not path.exists() and cannot_be_a_hub_id(source):
        raise FileNotFoundError(f"GPT-2 checkpoint directory {source} does not exist: pass a folder or a Hub id.")
    source = str(path) if path.exists() else source  # else a Hub id
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source, **from_pretrained_kwargs)
    except OSError as err:  # transformers' message can span lines, and the Hub's does not name the id
        where = "" if path.exists() else "no such local folder, and loading it from the Hub failed: "
        raise OSError(f"GPT-2 checkpoint {source}: {where}{one_line(err)}") from err
    # GPT2LMHeadModel.from_pretrained takes any config.json and draws the weights it does not find at random
    model_type = config_dict.get("model_type")
    if model_type == GPT2ScratchConfig.model_type:
        raise ValueError(
            f"{source} is a gpt2-scratch model already (model_type {model_type!r}), not a Hugging Face GPT-2: load it "
            f"with GPT2ScratchForCausalLM.from_pretrained({source!r})."
        )
    if model_type != "gpt2" and (model_type or not config_dict):  # a config.json without model_type (written before
        # transformers recorded it) loads as GPT-2's: the weights check below refuses another model's
        found = f"its config.json has model_type {model_type!r}" if model_type else "no config.json"
        raise ValueError(
            f"{source} is not a Hugging Face GPT-2 checkpoint ({found}): from_hf_gpt2 converts GPT2LMHeadModel "
            "checkpoints (model_type 'gpt2')."
        )
    hf_model, info = GPT2LMHeadModel.from_pretrained(source, output_loading_info=True, **from_pretrained_kwargs)
    not_loaded = sorted({*info["missing_keys"], *(key for key, *_ in info["mismatched_keys"])})
    if not_loaded:
        raise ValueError(
            f"GPT-2 checkpoint {source} lacks weights of the model ({', '.join(not_loaded)}; missing, or of another "
            "shape): from_pretrained would draw them at random. Pass a complete GPT2LMHeadModel checkpoint (every "
            "shard, the LM head if untied)."
        )
    return hf_model


def _same_attention(source, target) -> None:
    """`target` computes attention as `source` does (`eager`, `sdpa`, ...): `output_attentions` works the same."""
    implementation = source.config._attn_implementation
    if implementation and implementation != target.config._attn_implementation:
        target.set_attn_implementation(implementation)


def check_tied_head(model: torch.nn.Module, name: str) -> None:
    """Refuse a `model` whose config ties its LM head to its token embedding while its head is a tensor of its own
    with other values (set by hand, e.g. `model.lm_head.weight = nn.Parameter(...)`): it computes with that head, and
    the converted model, tied as the config says, would hold one of the two in place of the other.

    Raises:
        ValueError: naming the model and the two fixes.
    """
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and head is not embedding and not torch.equal(head, embedding):
        raise ValueError(
            f"The {name} has tie_word_embeddings=True in its config but an LM head of its own (not its token "
            "embedding): converting it would tie the two and change its logits. Set `model.config."
            "tie_word_embeddings = False` to keep both, or call `model.tie_weights()` to use the embedding as head."
        )


def check_config_fits(config: GPT2ScratchConfig, inferred: GPT2ScratchConfig, hf_model: GPT2LMHeadModel) -> None:
    """Refuse a `config` given to `from_hf_gpt2` that would compute something else with the checkpoint's weights:
    what the weights' shapes do not show (the heads, LayerNorm's epsilon), real token ids without a trained row, or a
    tied head where the checkpoint's is its own (tying would overwrite one of the two).

    Raises:
        ValueError: naming each field that does not fit, the checkpoint's value and the fix.
    """
    bad = [
        f"{name}={getattr(config, name)!r} (checkpoint: {getattr(inferred, name)!r})"
        for name in ("n_head", "layer_norm_epsilon")
        if getattr(config, name) != getattr(inferred, name)
    ]
    rows = hf_model.get_input_embeddings().weight.shape[0]
    if config.tokenizer_vocab_size > rows:
        bad.append(f"tokenizer_vocab_size={config.tokenizer_vocab_size} (checkpoint: {rows} token rows)")
    elif config.tokenizer_vocab_size < rows:  # a checkpoint padded already may mean it; added tokens would be lost
        logger.warning(
            "tokenizer_vocab_size=%d of the config leaves out the checkpoint's token rows %d-%d: they become padding "
            "(logits -inf, never generated; to_hf_gpt2 drops them). Pass tokenizer_vocab_size=%d to keep them.",
            config.tokenizer_vocab_size,
            config.tokenizer_vocab_size,
            rows - 1,
            rows,
        )
    head, embedding = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    if config.tie_word_embeddings and head is not embedding and not torch.equal(head, embedding):
        bad.append("tie_word_embeddings=True (checkpoint: an LM head of its own)")
    if bad:
        raise ValueError(
            f"The config does not fit the GPT-2 checkpoint: {', '.join(bad)}. Pass a config with the checkpoint's "
            "values, or config=None to take its architecture."
        )


def from_hf_gpt2(
    source: str | Path | GPT2LMHeadModel,
    config: GPT2ScratchConfig | None = None,
    pad_vocab: bool = True,
    **from_pretrained_kwargs,
) -> GPT2ScratchForCausalLM:
    """Build a scratch `GPT2ScratchForCausalLM` holding the weights of a Hugging Face GPT-2 checkpoint.

    Args:
        source: a `GPT2LMHeadModel`, a local directory of one, or a Hub id such as `"gpt2"` (needs the Hub).
        config: the scratch config to load into (e.g. other dropouts, a wider padded vocabulary); it must have the
            checkpoint's architecture (`check_config_fits`). Default: the checkpoint's (`config_from_hf`).
        pad_vocab: pad the vocabulary to a multiple of 128 (50257 -> 50304) when `config` is None.

    Raises:
        FileNotFoundError: `source` names a local folder that is not there.
        OSError: `source` is no local folder, and loading it from the Hub failed (offline, no such repository).
        ValueError: `source` is a file, or not a Hugging Face GPT-2 (another `model_type`, a gpt2-scratch folder),
            lacks some of its weights, does not fit `config`, or ties its LM head in its config while the head is a
            tensor of its own (`check_tied_head`); `from_pretrained_kwargs` with an instance.
    """
    from .modeling_gpt2_scratch import GPT2ScratchForCausalLM, pad_with_eos

    hf_model = load_hf_gpt2(source, **from_pretrained_kwargs)
    inferred = config_from_hf(hf_model.config, pad_vocab=pad_vocab)  # refuses the GPT-2 variants not implemented
    check_tied_head(hf_model, "GPT2LMHeadModel")
    if config is None:
        config = inferred
    else:
        check_config_fits(config, inferred, hf_model)
    model = GPT2ScratchForCausalLM(config).to(device=hf_model.device, dtype=hf_model.dtype)  # where the source is
    expected = model.state_dict()
    state_dict = hf_to_scratch_state_dict(hf_model.state_dict(), expected)
    model.load_state_dict(state_dict)  # strict: every key present, checked above with a clearer message
    model.tie_weights()
    _same_attention(hf_model, model)
    if hf_model.generation_config is not None:  # its decoding settings (a pad token, max_length...) come along
        model.generation_config = copy.deepcopy(hf_model.generation_config)
        pad_with_eos(model.generation_config, config.eos_token_id)  # as the model's own default
    model.train(hf_model.training)
    return model


def to_hf_gpt2(model: GPT2ScratchForCausalLM) -> GPT2LMHeadModel:
    """A `transformers.GPT2LMHeadModel` with the same weights as the scratch `model`, and the same logits: its
    vocabulary is the model's real tokens (`tokenizer_vocab_size`, GPT-2's 50257), without the padding rows.
    `from_hf_gpt2` pads them again, with zeros (they carry no probability either way). Either way the new model is
    on the device and in the dtype of the one converted.

    Raises:
        ValueError: the model's config ties its LM head, but the head is a tensor of its own (`check_tied_head`).
    """
    check_tied_head(model, "GPT2ScratchForCausalLM")
    hf_model = GPT2LMHeadModel(hf_config_from_scratch(model.config)).to(device=model.device, dtype=model.dtype)
    hf_model.load_state_dict(scratch_to_hf_state_dict(model.state_dict(), model.config))
    hf_model.tie_weights()
    _same_attention(model, hf_model)
    if model.generation_config is not None:
        hf_model.generation_config = copy.deepcopy(model.generation_config)
    hf_model.train(model.training)
    return hf_model
