"""Parity of the scratch GPT-2 with Hugging Face's `GPT2LMHeadModel` (the reference), and its Hub format."""

import ast
import inspect
import json
import logging
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, Cache, GPT2Config, GPT2LMHeadModel

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, GPT2ScratchModel
from modeling_gpt2_scratch import configuration_gpt2_scratch as configuration
from modeling_gpt2_scratch import modeling_gpt2_scratch as modeling
from modeling_gpt2_scratch.configuration_gpt2_scratch import MIN_TRANSFORMERS_VERSION, check_transformers_version
from modeling_gpt2_scratch.conversion import from_hf_gpt2

GPT2_VOCAB = 50257
SMALL = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)


def make_pair(seed: int = 0, **shape) -> tuple[GPT2LMHeadModel, GPT2ScratchForCausalLM]:
    """A random HF GPT-2 (eval mode) and the scratch model holding the same weights."""
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**(shape or SMALL))).eval()
    return hf, GPT2ScratchForCausalLM.from_hf_gpt2(hf).eval()


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, GPT2_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- config ----------------------------------------------------------------------------------------------------------


def test_config_defaults_are_gpt2_124m_with_padded_vocab():
    config = GPT2ScratchConfig()
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (12, 12, 768, 1024)
    assert config.vocab_size == 50304 and config.vocab_size % 128 == 0
    assert config.tokenizer_vocab_size == GPT2_VOCAB
    assert config.model_type == "gpt2_scratch"


def test_config_generic_names_are_aliases():
    config = GPT2ScratchConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, block_size=128)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (64, 3, 8, 128)
    assert config.max_position_embeddings == 128


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_head=-2), "n_head"),
        (dict(n_positions=0), "n_positions"),
        (dict(vocab_size=1000), "vocab_size"),
        (dict(n_inner=0), "n_inner"),
        (dict(attn_pdrop=1.5), "attn_pdrop"),
        (dict(activation_function="relu"), "activation_function"),  # the MLP computes tanh-GELU only
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPT2ScratchConfig(**kwargs)


# --- initialisation --------------------------------------------------------------------------------------------------


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = GPT2ScratchConfig(n_embd=256, n_layer=8, n_head=4, n_positions=64)
    model = GPT2ScratchForCausalLM(config)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / (2 * config.n_layer) ** 0.5
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.count_nonzero(block.mlp.c_fc.bias) == 0
    assert torch.equal(block.ln_1.weight, torch.ones_like(block.ln_1.weight))
    assert model.lm_head.weight is model.transformer.wte.weight


# --- forward parity --------------------------------------------------------------------------------------------------


def test_logits_and_loss_match_hf_small(pair):
    hf, model = pair
    ids = random_ids(3, 40)
    with torch.no_grad():
        ref, out = hf(ids, labels=ids), model(ids, labels=ids)
    assert out.logits.shape == ref.logits.shape == (3, 40, GPT2_VOCAB)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5


@pytest.mark.slow
def test_logits_and_loss_match_hf_124m():
    hf, model = make_pair(seed=0, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    ids = random_ids(2, 64)
    with torch.no_grad():
        ref, out = hf(ids, labels=ids), model(ids, labels=ids)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5


def test_labels_minus_100_are_ignored(pair):
    hf, model = pair
    ids = random_ids(2, 20)
    labels = ids.clone()
    labels[:, :7] = -100
    with torch.no_grad():
        ref, out = hf(ids, labels=labels).loss, model(ids, labels=labels).loss
    assert abs(out.item() - ref.item()) <= 1e-5
    assert abs(out.item() - model(ids, labels=ids).loss.item()) > 1e-4


@pytest.mark.parametrize("bad", [GPT2_VOCAB, 50303, 50304, -1])  # the padded ids, past them, negative
@pytest.mark.parametrize("training", [False, True])  # the plain head's loss, and the fused one
@pytest.mark.parametrize("key", ["labels", "shift_labels"])
def test_a_label_outside_the_tokenizer_ids_is_a_one_line_error(pair, bad, training, key):
    """HF's GPT-2 raises (its loss's index check); ours padded the vocabulary to 50304 and gave an infinite loss for
    50257-50303, an IndexError from the loss's gather past them."""
    hf, model = pair
    ids = random_ids(2, 20)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 9] = bad
    with pytest.raises(IndexError, match="out of bounds"):
        with torch.no_grad():
            hf(ids, labels=labels)
    model.train(training)
    try:
        with pytest.raises(ValueError, match=rf"^{key}: id {bad} is outside the model's 50257 token ids"):
            model(ids, **{key: labels})
    finally:
        model.eval()


@pytest.mark.parametrize("training", [False, True])
def test_input_ids_or_embeddings_of_another_rank_are_a_one_line_error(pair, training):
    """One sequence without its batch dimension, or GPT2Model's multiple-choice `(B, N, T)`, failed deep inside with
    a size mismatch."""
    _, model = pair
    model.train(training)
    ids = random_ids(2, 12)
    cases = [
        ({"input_ids": ids[0]},
         r"input_ids has shape \(12,\); the model takes \(batch, seq_len\): pass input_ids\[None\]"),
        ({"input_ids": ids.view(2, 2, 6)}, r"input_ids has shape \(2, 2, 6\); .* flatten the leading dimensions"),
        ({"inputs_embeds": torch.zeros(12, 64)},
         r"inputs_embeds has shape \(12, 64\); the model takes \(batch, seq_len, n_embd\)"),
    ]  # fmt: skip
    try:
        for inputs, message in cases:
            for forward in (model, model.transformer):
                labels = {"labels": ids[0]} if forward is model and "input_ids" in inputs else {}
                with pytest.raises(ValueError, match=message):
                    forward(**inputs, **labels)
    finally:
        model.eval()


def test_left_padded_batch_matches_hf_on_real_tokens(pair):
    hf, model = pair
    ids = random_ids(3, 24)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :11] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        out = model(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max().item() <= 1e-4
    # the padding really changes the result: without the mask the first row differs
    unmasked = model(ids, position_ids=position_ids).logits
    assert (unmasked[0, 5:] - out[0, 5:]).abs().max().item() > 1e-3


def test_right_padded_batch_matches_unpadded_rows(pair):
    _, model = pair
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :10]).logits
    assert (out[1, :10] - alone[0]).abs().max().item() <= 1e-5


def test_explicit_position_ids_match_hf(pair):
    hf, model = pair
    ids = random_ids(2, 12)
    position_ids = torch.arange(20, 32).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ref = hf(ids, position_ids=position_ids).logits
        out = model(ids, position_ids=position_ids).logits
        default = model(ids).logits
    assert (out - ref).abs().max().item() <= 1e-4
    assert (out - default).abs().max().item() > 1e-3


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_sequences_by_position_ids_attend_within_themselves(attn_implementation):
    """Position ids that restart mark packed sequences (e.g. DataCollatorWithFlattening): `create_causal_mask` keeps
    attention within each, so each sequence's logits are its logits alone (HF's GPT-2 lets them see each other)."""
    _, model = make_pair()
    model.set_attn_implementation(attn_implementation)
    ids = random_ids(2, 14)
    position_ids = torch.cat([torch.arange(5), torch.arange(9)]).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        out = model(ids, position_ids=position_ids, use_cache=False).logits
        first, second = model(ids[:, :5], use_cache=False).logits, model(ids[:, 5:], use_cache=False).logits
    torch.testing.assert_close(out[:, :5], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], second, rtol=1e-5, atol=1e-5)


def varlen_cpu_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flash_attention_2's contract on a CPU: no mask without padding (`flash_attention_mask`), and packed sequences
    told apart by their restarting `position_ids` alone, as `_flash_attention_forward` does (varlen attention)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    assert attention_mask is None  # no padding here: flash gets no mask
    position_ids = kwargs.get("position_ids")
    bounds = [0, query.shape[2]]
    if position_ids is not None and _is_packed_sequence(position_ids, query.shape[0]):
        (cu_seq_lens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        bounds = cu_seq_lens.tolist()
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                *(x[:, :, s:e] for x in (query, key, value)), is_causal=True, scale=scaling
            )
            for s, e in zip(bounds[:-1], bounds[1:], strict=False)
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def test_packed_sequences_by_position_ids_attend_within_themselves_under_flash_attention():
    """Under flash attention the mask is None without padding, so the attention function sees the packing only in
    the `position_ids` keyword (DataCollatorWithFlattening's padding-free batches). The blocks pass them on, as HF's
    GPT-2 does; without them the second sequence attended to the first (off by 0.2). Checked on a CPU with an
    attention function of flash's contract, registered as transformers registers its own."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register("varlen_cpu", varlen_cpu_attention)
    AttentionMaskInterface.register("varlen_cpu", flash_attention_mask)
    _, model = make_pair()
    model.set_attn_implementation("varlen_cpu")
    assert model.config._attn_implementation == "varlen_cpu"
    ids = random_ids(1, 14)  # one packed row, as DataCollatorWithFlattening makes
    position_ids = torch.cat([torch.arange(5), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        out = model(ids, position_ids=position_ids, use_cache=False).logits
        first, second = model(ids[:, :5], use_cache=False).logits, model(ids[:, 5:], use_cache=False).logits
    torch.testing.assert_close(out[:, :5], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], second, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_implementations_agree(attn_implementation):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL)).eval()
    model = GPT2ScratchForCausalLM.from_hf_gpt2(hf).eval()
    model.set_attn_implementation(attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask).logits
    assert (out[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-4


def _sdpa_calls_under_compile(model, ids, attention_mask=None):
    """The keyword arguments of each `scaled_dot_product_attention` call in the graph torch.compile traces."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=capture)(ids, attention_mask=attention_mask, use_cache=False).logits
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = [node.kwargs for gm in graphs for node in gm.graph.nodes if node.target is sdpa]
    return out, calls


def test_training_forward_under_compile_uses_sdpa_causal_path(pair):
    """No padding, no cache: sdpa gets `is_causal=True` and no mask under torch.compile too, as in eager (a built
    (B, 1, T, T) mask would rule out the flash kernels and double the attention work on a GPU)."""
    _, model = pair
    ids = random_ids(2, 16)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        out, calls = _sdpa_calls_under_compile(model, ids)
        assert len(calls) == SMALL["n_layer"]
        assert all(call["attn_mask"] is None and call["is_causal"] for call in calls)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        padding = torch.ones_like(ids)
        padding[0, :5] = 0  # with padding the mask is still built and passed
        _, calls = _sdpa_calls_under_compile(model, ids, attention_mask=padding)
    assert all(call["attn_mask"] is not None and not call["is_causal"] for call in calls)


def test_output_hidden_states_and_attentions_match_hf(pair):
    hf, model = pair
    ids = random_ids(1, 10)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == SMALL["n_layer"] + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-4
    model.set_attn_implementation("eager")
    try:
        attentions = model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    assert len(attentions) == SMALL["n_layer"] and attentions[0].shape == (1, SMALL["n_head"], 10, 10)
    assert torch.allclose(attentions[0].sum(-1), torch.ones(1, SMALL["n_head"], 10))
    with torch.no_grad():  # sdpa computes no weights: an empty tuple, as HF's (not a None per layer)
        assert model(ids, output_attentions=True).attentions == hf(ids, output_attentions=True).attentions == ()


@pytest.mark.parametrize("training", [False, True])
def test_return_dict_false_gives_hf_s_tuple(pair, training):
    """In training mode the fused loss returns no logits, so the tuple was `(loss, cache)`: `out[1]` was the cache
    where `GPT2LMHeadModel`'s is the logits. With `return_dict=False` the logits are computed, as HF's are."""
    hf, model = pair
    ids = random_ids(1, 8)
    hf.train(training), model.train(training)
    try:
        with torch.no_grad():
            ref = hf(ids, labels=ids, return_dict=False)
            out = model(ids, labels=ids, return_dict=False)
    finally:
        hf.eval(), model.eval()
    assert len(out) == len(ref) == 3  # loss, logits, cache
    loss, logits = out[:2]
    assert loss.ndim == 0 and logits.shape == ref[1].shape == (1, 8, GPT2_VOCAB)
    assert isinstance(out[2], Cache) and isinstance(ref[2], Cache)
    assert model(ids, labels=ids, use_cache=False, return_dict=False, skip_logits=True)[1:] == ()  # when asked


def test_padded_vocab_carries_no_probability(pair):
    _, model = pair
    ids = random_ids(2, 8)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == GPT2_VOCAB  # padded ids are not returned at all
    probs = logits.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 8))
    # with the padded rows made to win, no probability leaks there and generate never picks them
    with torch.no_grad():  # padded rows aligned with the hidden states: huge raw logits (inputs never use these rows)
        hidden = model.transformer(ids).last_hidden_state
        model.transformer.wte.weight[GPT2_VOCAB:] = 100.0 * hidden.reshape(-1, hidden.shape[-1]).sum(0)
    try:
        full = model.lm_head(model.transformer(ids).last_hidden_state)
        assert full.argmax(-1).min() >= GPT2_VOCAB  # the raw head would pick a padded id...
        out = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
        assert out.max() < GPT2_VOCAB  # ...the model never does
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.transformer.wte.weight.grad[GPT2_VOCAB:].abs().max() == 0
    finally:
        with torch.no_grad():
            model.transformer.wte.weight[GPT2_VOCAB:] = 0.0
        model.zero_grad(set_to_none=True)


def test_logits_to_keep(pair):
    _, model = pair
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, GPT2_VOCAB)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)


@pytest.mark.parametrize("kind", ["1-D", "2-D positions", "2-D mask"])
def test_logits_to_keep_tensors_as_hf(pair, kind):
    hf, model = pair
    ids = random_ids(2, 10)
    keep = {
        "1-D": torch.tensor([0, 7]),
        "2-D positions": torch.tensor([[0, 3], [9, 2]]),  # per row
        "2-D mask": torch.rand(2, 10, generator=torch.Generator().manual_seed(0)) > 0.5,  # flat (n, V) logits
    }[kind]
    with torch.no_grad():
        got, want = model(ids, logits_to_keep=keep).logits, hf(ids, logits_to_keep=keep).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_input_longer_than_context_raises(pair):
    _, model = pair
    n = SMALL["n_positions"]
    with pytest.raises(ValueError, match=f"position {n} is outside the model's context \\(n_positions={n}\\)"):
        model(random_ids(1, n + 1))
    with torch.no_grad():
        cache = model(random_ids(1, n - 2), use_cache=True).past_key_values
        model(random_ids(1, 2), cache=cache)  # positions n-2, n-1: the last ones
        with pytest.raises(ValueError, match=f"position {n} is outside"):
            model(random_ids(1, 1), cache=cache)  # the cache is full
        with pytest.raises(ValueError, match=f"position {n + 3} is outside"):
            model(random_ids(1, 4), position_ids=torch.tensor([[0, 1, n + 3, 2]]))  # given ones are read
        with pytest.raises(ValueError, match=f"position {n} is outside"):
            model(random_ids(1, 1), cache_position=torch.tensor([n]))


def test_forward_takes_gpt2s_positional_order(pair):
    hf, model = pair
    for ours, theirs in ((model, hf), (model.transformer, hf.transformer)):
        names = list(inspect.signature(ours.forward).parameters)[:6]
        assert names == list(inspect.signature(theirs.forward).parameters)[:6]
    ids = random_ids(1, 10)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).cache
        step = model(ids[:, 6:], cache).logits  # positional, as `GPT2LMHeadModel(input_ids, cache)` takes it
        torch.testing.assert_close(step, model(ids).logits[:, 6:], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="positional"):
        model(ids, None, None, None, None, None, ids)  # HF's 7th is encoder_hidden_states: not silently labels


@pytest.mark.parametrize("which", ["model", "transformer"])
def test_encoder_hidden_states_are_a_one_line_error(pair, which):
    """`GPT2Model` without cross-attention layers refuses `encoder_hidden_states` (a `ValueError`); ours has none
    either, and took them into `**kwargs` and returned the logits of the tokens alone, as if there were no encoder."""
    hf, model = pair
    ours, theirs = (model, hf) if which == "model" else (model.transformer, hf.transformer)
    ids, encoder_states = random_ids(1, 6), torch.randn(1, 4, SMALL["n_embd"])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        theirs(ids, encoder_hidden_states=encoder_states)
    with pytest.raises(ValueError, match=r"^encoder_hidden_states: .*no cross-attention.*add_cross_attention=True"):
        ours(ids, encoder_hidden_states=encoder_states)
    with torch.no_grad():  # None, as a generic caller passes it, is no encoder: the plain forward
        torch.testing.assert_close(ours(ids, encoder_hidden_states=None)[0], ours(ids)[0])


def test_token_type_ids_match_hf_in_forward_backward_and_generate():
    hf, model = make_pair(seed=4, **SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids, types = random_ids(2, 12), random_ids(2, 12, seed=7) % 3
    with torch.no_grad():
        ref, out = hf(ids, token_type_ids=types).logits, model(ids, token_type_ids=types).logits
    assert (out - ref).abs().max().item() <= 1e-4
    assert (out - model(ids).logits).abs().max().item() > 1e-2  # they change the result
    hf.train()
    model.train()  # the fused loss and (on a CPU) the tied embedding's in-place gradient path
    hf(ids, token_type_ids=types, labels=ids).loss.backward()
    model(ids, token_type_ids=types, labels=ids).loss.backward()
    torch.testing.assert_close(
        model.transformer.wte.weight.grad[:GPT2_VOCAB], hf.transformer.wte.weight.grad, rtol=1e-4, atol=1e-6
    )
    hf.eval()
    model.eval()
    prompt, prompt_types = random_ids(1, 6), torch.ones(1, 6, dtype=torch.long)
    ref = hf.generate(prompt, token_type_ids=prompt_types, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt, token_type_ids=prompt_types, max_new_tokens=8, do_sample=False), ref)


# --- cache and generate ----------------------------------------------------------------------------------------------


def test_token_by_token_cache_matches_full_forward(pair):
    _, model = pair
    ids = random_ids(2, 16)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(5, 16):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert cache.get_seq_length() == 16
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_growing_cache_holds_what_dynamic_cache_holds_without_copying_each_step(pair):
    from transformers import DynamicCache

    _, model = pair
    ids = random_ids(3, 12)
    growing, dynamic = modeling.GrowingCache(model.config), DynamicCache(config=model.config)
    first_keys = None
    with torch.no_grad():
        for start, stop in ((0, 5), (5, 6), (6, 9), (9, 10), (10, 12)):  # a prompt, then 1- and 3-token steps
            got = model(ids[:, start:stop], cache=growing).logits
            want = model(ids[:, start:stop], cache=dynamic).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            for layer, reference in zip(growing.layers, dynamic.layers, strict=True):
                assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
            first_keys = first_keys if first_keys is not None else growing.layers[0].keys
    assert growing.layers[0].keys.data_ptr() == first_keys.data_ptr()  # 12 positions fit the first buffer: no copy
    assert growing.get_seq_length() == 12
    with torch.no_grad():
        assert isinstance(model(ids[:, :2], use_cache=True).cache, modeling.GrowingCache)  # forward's own cache


def test_growing_cache_after_crop_reorder_and_batch_select_matches_dynamic_cache(pair):
    from transformers import DynamicCache

    _, model = pair
    ids = random_ids(4, 10)
    caches = [modeling.GrowingCache(model.config), DynamicCache(config=model.config)]
    logits = []
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :6], cache=cache)
            keys_before_crop = cache.layers[0].keys
            cache.crop(-2)  # speculative decoding's rollback: the next step writes over positions 4 and 5
            step = [model(ids[:, 6:7], cache=cache).logits]
            if isinstance(cache, modeling.GrowingCache):
                assert cache.layers[0].keys.data_ptr() == keys_before_crop.data_ptr()  # the same room
            cache.reorder_cache(torch.tensor([2, 0, 0, 1]))  # beam search
            step.append(model(ids[:, 7:8], cache=cache).logits)
            cache.batch_select_indices(torch.tensor([0, 3]))
            step.append(model(ids[[0, 3], 8:9], cache=cache).logits)
            logits.append(step)
    for got, want in zip(*logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert caches[0].get_seq_length() == caches[1].get_seq_length() == 7


@pytest.mark.parametrize(
    "shape, device",
    [((1, 4, 1, 8), "cpu"), ((4, 1, 1, 8), "cpu"), ((4, 4, 1, 1), "cpu"), ((4, 4, 1, 8), "meta")],
    ids=["batch", "heads", "head_dim", "device"],
)
def test_growing_cache_refuses_states_that_cannot_follow_its_own_and_keeps_them_as_dynamic_cache_does(shape, device):
    """Decoding a batch of 1 on a cache filled at batch 4: `DynamicCache`'s `torch.cat` fails with the cache intact;
    the growing cache broadcast the new keys over the 4 rows of its buffer first (one position longer, every row
    overwritten), and failed later in the attention."""
    from transformers import DynamicCache

    config = GPT2ScratchConfig(**SMALL)  # 4 heads of 8
    past = torch.randn(4, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    errors = []
    for cache in (modeling.GrowingCache(config), DynamicCache(config=config)):
        cache.update(past, past + 1, layer_idx=0)
        new = torch.zeros(shape, device=device)
        with pytest.raises(RuntimeError) as error:
            cache.update(new, new, layer_idx=0)
        errors.append(error)
        assert cache.get_seq_length() == 6
        assert torch.equal(cache.layers[0].keys, past) and torch.equal(cache.layers[0].values, past + 1)
    assert errors[0].type is errors[1].type  # what a user of `DynamicCache` catches
    assert f"New keys of shape {shape} on {device} cannot follow the cache's, of shape (4, 4, 6, 8)" in str(
        errors[0].value
    )


def test_growing_cache_under_autograd_gives_dynamic_cache_gradients():
    from transformers import DynamicCache

    _, model = make_pair(seed=4)
    ids = random_ids(2, 8)
    grads = []
    for cache in (modeling.GrowingCache(model.config), DynamicCache(config=model.config)):
        model.zero_grad(set_to_none=True)
        prefill = model(ids[:, :6], cache=cache).logits
        step = model(ids[:, 6:7], cache=cache).logits  # must not write over what the prefill saved for backward
        (prefill.sum() + step.sum()).backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_growing_cache_behind_a_soft_prompt_gives_dynamic_cache_gradients():
    from transformers import DynamicCache

    _, model = make_pair(seed=4)
    model.requires_grad_(False)  # a frozen model: only the past keys of the prompt require grad, not the new ones
    ids = random_ids(1, 4)
    grads = []
    for cache in (modeling.GrowingCache(model.config), DynamicCache(config=model.config)):
        soft = torch.randn(1, 4, model.config.n_embd, generator=torch.Generator().manual_seed(0)).requires_grad_()
        loss = model(inputs_embeds=soft, cache=cache).logits.logsumexp(-1).sum()
        for t in range(3):  # decoding steps must not write over the prompt's keys that the backward reads
            loss = loss + model(ids[:, t : t + 1], cache=cache).logits.logsumexp(-1).sum()
        loss.backward()
        grads.append(soft.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("prefill_context", ["inference_mode", "autocast"])
def test_growing_cache_continues_a_prefill_made_under_another_mode(pair, prefill_context):
    """A prompt cache made under `torch.inference_mode()` (inference tensors) or bf16 autocast (bf16 keys), then
    decoded from in plain float32 without inference mode: as `DynamicCache` does it."""
    from transformers import DynamicCache

    _, model = pair
    ids = random_ids(2, 8)
    logits = []
    for cache in (modeling.GrowingCache(model.config), DynamicCache(config=model.config)):
        if prefill_context == "inference_mode":
            context = torch.inference_mode()
        else:
            context = torch.autocast("cpu", dtype=torch.bfloat16)
        with context, torch.no_grad():
            model(ids[:, :6], cache=cache)
        with torch.no_grad():
            logits.append([model(ids[:, t : t + 1], cache=cache).logits for t in (6, 7)])
    for got, want in zip(*logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_model_decodes_again_with_a_fresh_default_cache():
    """`torch.compile` must not capture the `GrowingCache`'s in-place writes: the second decoding round, with a new
    cache, failed in inductor's graph (a 1-D placeholder where the first round's room was)."""
    _, model = make_pair(seed=0)
    model.eval()
    ids = random_ids(2, 8)
    compiled = torch.compile(model)

    def decode(forward) -> torch.Tensor:
        out = forward(ids, use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(3):
            out = forward(ids[:, t : t + 1], cache=cache)
            cache, steps = out.cache, steps + [out.logits]
        assert isinstance(cache, modeling.GrowingCache) and cache.get_seq_length() == 11
        return torch.cat(steps, dim=1)

    with torch.no_grad():
        want = decode(model)
        for _ in range(2):
            torch.testing.assert_close(decode(compiled), want, rtol=1e-5, atol=1e-5)


def test_generate_uses_a_growing_cache_unless_told_otherwise(pair):
    from transformers import DynamicCache, StaticCache

    hf, model = pair
    prompt = random_ids(2, 6)
    reference = hf.generate(prompt, max_new_tokens=6, do_sample=False)

    def run(**kwargs):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, reference)
        return out.past_key_values

    assert type(run()) is modeling.GrowingCache
    assert type(run(cache=DynamicCache(config=model.config))) is DynamicCache  # the caller's own cache
    assert isinstance(run(cache_implementation="static"), StaticCache)
    assert run(use_cache=False) is None


def test_assisted_and_beam_search_generation_match_hf(pair):
    hf, model = pair
    prompt = random_ids(1, 8)
    _, assistant = make_pair(seed=1, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, assistant_model=assistant, max_new_tokens=12, do_sample=False), greedy)
    beams = hf.generate(prompt, num_beams=3, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, num_beams=3, max_new_tokens=12, do_sample=False), beams)


def test_a_hugging_face_gpt2_assistant_drafts_for_the_scratch_model(pair):
    """An assistant with the model's real token ids (`tokenizer_vocab_size`: 50257, e.g. distilgpt2) shares its
    tokenizer, though `config.vocab_size` (50304, padded) differs: assisted decoding runs, as for HF's GPT-2, where
    it stopped asking for two tokenizers. An assistant with other ids still needs them."""
    hf, model = pair
    prompt = random_ids(1, 8)
    hf_assistant, _ = make_pair(seed=1, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    assisted = model.generate(prompt, assistant_model=hf_assistant, max_new_tokens=12, do_sample=False)
    assert torch.equal(assisted, greedy)
    other_tokens, _ = make_pair(seed=1, vocab_size=300, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    with pytest.raises(ValueError, match="different tokenizers"):
        model.generate(prompt, assistant_model=other_tokens, max_new_tokens=2, do_sample=False)


def test_a_hugging_face_gpt2_takes_the_model_as_assistant_through_to_hf_gpt2(pair):
    """The README's other way round: `GPT2LMHeadModel` refuses the padded model as its assistant, takes
    `model.to_hf_gpt2()`; `from_hf_gpt2`, which the README pointed to, cannot convert a gpt2-scratch model."""
    hf, model = pair
    prompt = random_ids(1, 8)
    greedy = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=50256)
    with pytest.raises(ValueError, match="different tokenizers"):
        hf.generate(prompt, assistant_model=model, max_new_tokens=8, do_sample=False, pad_token_id=50256)
    assisted = hf.generate(prompt, assistant_model=model.to_hf_gpt2(), max_new_tokens=8, do_sample=False,
                           pad_token_id=50256)  # fmt: skip
    assert torch.equal(assisted, greedy)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        GPT2ScratchForCausalLM.from_hf_gpt2(model, pad_vocab=False)


def test_past_key_values_keyword_still_accepted(pair):
    _, model = pair
    ids = random_ids(1, 6)
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated.*Use `cache` instead"):
            step = model(ids[:, 5:], past_key_values=cache).logits
        full = model(ids).logits
    assert (step[:, 0] - full[:, -1]).abs().max().item() <= 1e-4


def test_greedy_generate_matches_hf(pair):
    hf, model = pair
    prompt = random_ids(1, 8)
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    out = model.generate(prompt, max_new_tokens=32, do_sample=False)
    assert out.shape == (1, 40)
    assert torch.equal(out, ref)


def test_sampling_top_k_matches_hf_with_same_seed(pair):
    hf, model = pair
    prompt = random_ids(2, 8)
    torch.manual_seed(123)
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=True, top_k=50)
    torch.manual_seed(123)
    out = model.generate(prompt, max_new_tokens=32, do_sample=True, top_k=50)
    assert torch.equal(out, ref)


def test_batched_left_padded_greedy_matches_hf(pair):
    hf, model = pair
    ids = random_ids(3, 12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :9] = 0
    ids = ids.masked_fill(mask == 0, 50256)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=50256)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_continues_from_the_cache_of_an_earlier_generate_as_hf(pair, beams):
    """A conversation: the cache one `generate()` returned (a `GrowingCache`, its rooms partly filled) is passed to
    the next with the reply and a new left-padded turn; with beams, generate repeats its rows for the beams first."""
    hf, model = pair
    ids = random_ids(3, 10, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 50256)
    kwargs = dict(do_sample=False, num_beams=beams, pad_token_id=50256)

    def converse(module) -> tuple[torch.Tensor, Cache]:
        first = module.generate(ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, **kwargs)
        turn = torch.cat([first.sequences, random_ids(3, 3, seed=9)], dim=1)
        turn_mask = torch.cat([mask, torch.ones(3, turn.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
        cache = first.past_key_values
        return module.generate(turn, attention_mask=turn_mask, cache=cache, max_new_tokens=6, **kwargs), cache

    (want, _), (got, cache) = converse(hf), converse(model)
    assert isinstance(cache, modeling.GrowingCache)
    assert torch.equal(got, want)


def test_static_cache_generate_matches_dynamic(pair):
    _, model = pair
    prompt = random_ids(1, 8)
    dynamic = model.generate(prompt, max_new_tokens=12, do_sample=False)
    static = model.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("beams", [1, 3])
def test_transition_scores_match_hf(pair, beams):
    """`compute_transition_scores` over the logits' width (50257), not `config.vocab_size` (50304, padded)."""
    hf, model = pair
    prompt = random_ids(3, 8)
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    kwargs |= dict(pad_token_id=50256, num_beams=beams, num_return_sequences=min(beams, 2))
    ref, out = hf.generate(prompt, **kwargs), model.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for normalize in (False, True):
        expected = hf.compute_transition_scores(ref.sequences, ref.scores, ref.get("beam_indices"), normalize)
        got = model.compute_transition_scores(out.sequences, out.scores, out.get("beam_indices"), normalize)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if beams == 1:  # greedy: each row's score is that of its chosen token, in every row
        chosen = torch.stack([out.scores[t].gather(1, out.sequences[:, 8 + t, None])[:, 0] for t in range(5)], 1)
        assert torch.equal(model.compute_transition_scores(out.sequences, out.scores), chosen)


def test_watermarked_generation_matches_hf(pair):
    """The watermark's green ids are drawn over the 50257 ids the logits hold, as for HF's GPT-2."""
    from transformers import WatermarkingConfig

    hf, model = pair
    prompt = random_ids(2, 8)
    kwargs = dict(max_new_tokens=12, do_sample=False, watermarking_config=WatermarkingConfig(bias=5.0))
    assert torch.equal(model.generate(prompt, **kwargs), hf.generate(prompt, pad_token_id=50256, **kwargs))


def test_watermark_detection_needs_the_real_vocabulary_width(pair):
    """`WatermarkDetector` draws its green lists over `model_config.vocab_size`: the README's
    `model.to_hf_gpt2().config` (50257) finds the watermark; `model.config` (50304, padded) cannot."""
    from transformers import WatermarkDetector, WatermarkingConfig

    _, model = pair
    watermark = WatermarkingConfig(bias=5.0)
    out = model.generate(random_ids(1, 8), max_new_tokens=40, do_sample=False, watermarking_config=watermark)
    found = WatermarkDetector(model.to_hf_gpt2().config, "cpu", watermark)(out, return_dict=True)
    missed = WatermarkDetector(model.config, "cpu", watermark)(out, return_dict=True)
    assert found.prediction[0] and found.z_score[0] > 4
    assert not missed.prediction[0]


def test_prompt_lookup_decoding_with_bad_words_matches_hf(pair):
    """Prompt lookup tries its candidates on logits of the width the model returns (50257), not `config.vocab_size`:
    a processor that sizes itself at its first call (`bad_words_ids`) then fits the model's own logits."""
    hf, model = pair
    prompt = random_ids(1, 8).repeat(1, 2)  # repeated: prompt lookup finds candidates in it
    kwargs = dict(max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3, bad_words_ids=[[int(prompt[0, 5])]])
    assert torch.equal(model.generate(prompt, **kwargs), hf.generate(prompt, pad_token_id=50256, **kwargs))


def test_continuous_batching_and_the_paged_cache_generate_what_generate_does(pair):
    """The attention passes its kwargs to `cache.update`, as HF's GPT-2 does: the paged cache needs them."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    _, model = pair
    prompt = random_ids(3, 8)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    small = ContinuousBatchingConfig(num_blocks=4, max_batch_tokens=64)  # by default 90% of free RAM, 9 s to fill
    paged = model.generate(
        prompt, max_new_tokens=6, do_sample=False, cache_implementation="paged", continuous_batching_config=small
    )
    assert torch.equal(paged.reshape(expected.shape), expected)  # (1, 3, 14): what HF's GPT-2 returns too
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=50256)
    batch = model.generate_batch(
        inputs=prompt.tolist(), generation_config=config, progress_bar=False, continuous_batching_config=small
    )
    assert [batch[key].generated_tokens for key in sorted(batch)] == expected[:, 8:].tolist()


def test_generate_takes_the_models_generation_config_where_the_callers_leaves_a_field_unset(pair):
    from transformers import GenerationConfig

    hf, model = pair
    prompt = random_ids(1, 8)
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    saved = model.generation_config
    try:
        model.generation_config = GenerationConfig.from_dict(saved.to_dict() | {"cache_implementation": "static"})
        given = GenerationConfig(max_new_tokens=5, do_sample=False)
        assert torch.equal(model.generate(prompt, generation_config=given), expected)  # a static cache
        model.generation_config = GenerationConfig.from_dict(saved.to_dict() | {"use_cache": False})
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        assert out.past_key_values is None and torch.equal(out.sequences, expected)  # as HF: no cache made
    finally:
        model.generation_config = saved


# --- decoding with MKL-packed weights --------------------------------------------------------------------------------

needs_mkl = pytest.mark.skipif(not modeling.mkl_packing_available(), reason="this torch has no MKL packed GEMM")


@pytest.fixture
def packs_made(monkeypatch) -> list[tuple[int, ...]]:
    """The (weight shape..., rows) of every MKL weight pack made while the test runs."""
    made = []
    reorder = torch.ops.mkl._mkl_reorder_linear_weight
    monkeypatch.setattr(
        torch.ops.mkl, "_mkl_reorder_linear_weight", lambda w, rows: made.append((*w.shape, rows)) or reorder(w, rows)
    )
    return made


def linears(model) -> list[modeling.Linear]:
    return [m for m in model.modules() if isinstance(m, modeling.Linear)]


@needs_mkl
def test_generate_decodes_batches_of_four_with_packed_weights_and_hf_ids(pair, packs_made):
    hf, model = pair
    prompt = random_ids(5, 8)
    ref = hf.generate(prompt, max_new_tokens=16, do_sample=False)
    out = model.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(out, ref)
    # each of the 2 x 4 block linears and the LM head packed once, for the 5 decoding rows; the prefill did not pack
    assert sorted(packs_made) == sorted((*m.weight.shape, 5) for m in linears(model))
    assert all(m.decoding_pack is None for m in linears(model))  # dropped after the call


@needs_mkl
def test_packed_decoding_step_matches_f_linear_and_follows_weight_changes(packs_made):
    _, model = make_pair()
    ids = random_ids(4, 6)

    def last_step_logits() -> torch.Tensor:
        with torch.no_grad():
            cache = model(ids[:, :-1], use_cache=True).cache
            return model(ids[:, -1:], cache=cache).logits  # (4, 1, V): one decoding step of 4 rows

    reference = last_step_logits()
    with modeling.packed_decoding(model):
        with modeling.packed_decoding(model):  # nested: the outer block keeps the packs
            pass
        packed = last_step_logits()
        assert len(packs_made) == len(linears(model))
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)  # in place: its pack must follow
        packed_after_change = last_step_logits()
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    assert len(packs_made) == len(linears(model)) + 1  # only the changed weight packed again
    torch.testing.assert_close(packed_after_change, last_step_logits(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed_after_change, reference, atol=1e-3)


@needs_mkl
def test_an_untied_head_resized_still_decodes_with_packed_weights(packs_made):
    """`resize_token_embeddings` makes a new head for an untied model: transformers' is a plain `nn.Linear`, which
    never packs, so `generate()` multiplied the largest weight by `F.linear` (8 of the 9 linears were packed)."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL, tie_word_embeddings=False)).eval()
    model.resize_token_embeddings(GPT2_VOCAB + 3)
    assert type(model.lm_head) is modeling.Linear
    model.generate(random_ids(4, 6), max_new_tokens=3, do_sample=False)
    assert (GPT2_VOCAB + 3, SMALL["n_embd"], 4) in packs_made


@needs_mkl
def test_packed_decoding_of_a_model_made_under_inference_mode(packs_made):
    with torch.inference_mode():  # its weights are inference tensors: no version counter to key the packs on
        hf, model = make_pair()
        prompt = random_ids(4, 8)
        assert torch.equal(model.generate(prompt, max_new_tokens=8), hf.generate(prompt, max_new_tokens=8))
    assert model.lm_head.weight.is_inference() and len(packs_made) == len(linears(model))


def test_compiled_decoding_does_not_recompile_on_the_next_call(pair):
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    hf, model = pair
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # generate() compiles only on CUDA-like devices otherwise
    prompt = random_ids(4, 8)
    kwargs = dict(max_new_tokens=5, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(model.generate(prompt, **kwargs), hf.generate(prompt, max_new_tokens=5))
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(prompt, **kwargs), hf.generate(prompt, max_new_tokens=5))
    assert counters["stats"]["unique_graphs"] == graphs  # the packing switch is no guard of the compiled step


@needs_mkl
def test_threads_can_share_one_model_for_packed_decoding(pair):
    """A threaded server calls `generate()` on one model from several threads, each its own number of rows."""
    _, model = pair
    prompts = {rows: random_ids(rows, 6, seed=rows) for rows in (4, 5, 6, 7)}
    expected = {rows: model.generate(p, max_new_tokens=16, do_sample=False) for rows, p in prompts.items()}
    results, errors = [], []

    def worker(rows: int) -> None:
        for _ in range(10):
            try:
                results.append(
                    torch.equal(model.generate(prompts[rows], max_new_tokens=16, do_sample=False), expected[rows])
                )
            except Exception as error:  # noqa: BLE001 - every failure in a thread is the test's result
                errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, args=(rows,)) for rows in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [True] * 40
    assert all(m.decoding_pack is None for m in linears(model))


@needs_mkl
@pytest.mark.parametrize("when", [1, 3], ids=["before-any-pack", "with-packs"])
def test_a_copy_taken_while_generate_runs_has_no_packs_and_decodes_alike(when):
    """A snapshot from a streamer's callback (or another thread) while `generate()` decodes with packed weights:
    with packs made, `deepcopy`, `pickle` and `torch.save` failed on MKL's opaque pack ("Cannot access storage of
    OpaqueTensorImpl"); before any, the copy kept an empty pack dict, so it took every later `generate()` for a
    nested block and packed for good, ignoring `pack_decoding_weights = False` and later `weight.data` changes."""
    import copy
    import io
    import pickle

    from transformers.generation.streamers import BaseStreamer

    # a model of its own: the module's shared one may hold transformers' compiled `__call__` (`_compiled_call`, from
    # a static-cache generate() with compile elsewhere in this file), which no copy can pickle, as for HF's GPT-2
    _, model = make_pair()
    prompt = random_ids(4, 6)
    copies = []

    class Snapshot(BaseStreamer):
        calls = 0

        def put(self, value):
            Snapshot.calls += 1
            if Snapshot.calls == when:
                buffer = io.BytesIO()
                torch.save(model, buffer)
                buffer.seek(0)
                copies.extend([copy.deepcopy(model), pickle.loads(pickle.dumps(model))])
                copies.append(torch.load(buffer, weights_only=False))

        def end(self):
            pass

    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, streamer=Snapshot()), expected)
    assert len(copies) == 3
    for snapshot in copies:
        assert all(m.decoding_pack is None for m in linears(snapshot))
        assert torch.equal(snapshot.generate(prompt, max_new_tokens=6, do_sample=False), expected)
        assert all(m.decoding_pack is None for m in linears(snapshot))  # its own block ended: no packs kept


@needs_mkl
def test_no_packs_below_four_rows_with_grad_or_when_switched_off(pair, packs_made, monkeypatch):
    _, model = pair
    model.generate(random_ids(3, 8), max_new_tokens=4, do_sample=False)  # 3 decoding rows
    with modeling.packed_decoding(model):
        model(random_ids(4, 1)).logits.sum().backward()  # autograd needs F.linear's backward
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(model, "pack_decoding_weights", False)
    model.generate(random_ids(4, 8), max_new_tokens=4, do_sample=False)
    assert packs_made == []


# --- gradients -------------------------------------------------------------------------------------------------------


def test_gradients_match_hf():
    hf, model = make_pair(seed=3, **SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout noise
    hf.train()
    model.train()
    ids = random_ids(2, 24)
    hf(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, param in model.named_parameters():
        ref = hf_grads[name].grad
        grad = param.grad
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            ref = ref.t()
        if name == "transformer.wte.weight":
            assert grad[GPT2_VOCAB:].abs().max() == 0
            grad = grad[:GPT2_VOCAB]
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=name)


def _graph_functions(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind `tensor`."""
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _plain_embedding_grads(model, monkeypatch, run) -> dict[str, torch.Tensor]:
    """The gradients `run()` leaves with `TiedEmbedding` switched off (the lookup through `wte`, as HF does)."""
    with monkeypatch.context() as patch:
        patch.setattr(model, "add_embedding_gradient_in_place", False)
        model.zero_grad(set_to_none=True)
        run()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_torch_func_grad_of_the_training_loss_matches_hf():
    """Under `torch.func` transforms the training loss takes the plain head (the fused loss's `autograd.Function`
    cannot run there): `torch.func.grad` gives HF's gradients, as used for per-sample gradients."""
    hf, model = make_pair(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    ids = random_ids(2, 8)

    def grads(module):
        module.train()
        params = {name: p.detach() for name, p in module.named_parameters()}

        def loss(params):
            return torch.func.functional_call(module, params, (ids,), {"labels": ids, "use_cache": False}).loss

        return torch.func.grad(loss)(params)

    ours, theirs = grads(model), grads(hf)
    torch.testing.assert_close(ours["transformer.wte.weight"][:GPT2_VOCAB], theirs["transformer.wte.weight"])
    torch.testing.assert_close(ours["transformer.h.0.mlp.c_fc.weight"], theirs["transformer.h.0.mlp.c_fc.weight"].t())


def test_torch_export_of_the_training_loss_matches_hf():
    """`torch.export` (non-strict, its default) of the training forward with labels failed inside the fused loss's
    `autograd.Function` ("mul(): functions with out=... arguments don't support automatic differentiation"), where
    `GPT2LMHeadModel` exports: it takes the plain head there, and the exported graph gives HF's loss and gradients."""
    hf, model = make_pair(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    ids = random_ids(2, 8)
    kwargs = {"labels": ids, "use_cache": False}
    exported = torch.export.export(model.train(), (ids,), kwargs=kwargs).module()
    loss = exported(ids, **kwargs)["loss"]
    loss.backward()
    expected = hf.train()(ids, **kwargs).loss
    expected.backward()
    torch.testing.assert_close(loss, expected)
    grad = dict(exported.named_parameters())["transformer.wte.weight"].grad
    torch.testing.assert_close(grad[:GPT2_VOCAB], hf.transformer.wte.weight.grad)


def test_tied_embedding_adds_its_rows_to_the_head_gradient_over_accumulated_micro_batches(monkeypatch):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    batches = [random_ids(2, 16, seed=s) for s in (1, 2)]

    def run():
        for ids in batches:  # two micro-batches: the second adds to `.grad`
            model(ids, labels=ids).loss.backward()

    plain = _plain_embedding_grads(model, monkeypatch, run)
    model.zero_grad(set_to_none=True)
    run()
    assert "TiedEmbeddingBackward" in _graph_functions(model(batches[0], labels=batches[0]).loss)
    wte = model.transformer.wte.weight
    assert not wte.grad.is_sparse and wte.grad.data_ptr() != plain["transformer.wte.weight"].data_ptr()
    for name, param in model.named_parameters():  # the embedding's rows are there: they are most of these
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_tied_embedding_rows_of_two_forwards_summed_into_one_backward_reach_the_gradient(monkeypatch):
    """Two training forwards whose losses are added before one backward (losses of several batches, or micro-batches
    accumulated by hand). The first forward's head gradient was summed into autograd's buffer for `.grad` before its
    lookup's rows were added to it in place: those rows were lost (`wte.grad` off by 0.14 at most 0.24)."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    first, second = random_ids(2, 10, seed=1), random_ids(2, 10, seed=2)

    def run():
        (model(first, labels=first).loss + model(second, labels=second).loss).backward()

    plain = _plain_embedding_grads(model, monkeypatch, run)
    model.zero_grad(set_to_none=True)
    run()
    torch.testing.assert_close(
        model.transformer.wte.weight.grad, plain["transformer.wte.weight"], rtol=1e-6, atol=1e-7
    )


def test_tied_embedding_takes_no_head_gradient_of_an_earlier_backward(monkeypatch):
    """A first backward through the loss that stops short of the lookup (`autograd.grad` of one block's weight,
    `retain_graph=True`) left the head's gradient for the lookup's backward, and a later backward that never went
    through the head (from the embeddings' output) added it to `wte.grad` (off by 0.10)."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    ids = random_ids(2, 16)

    def run():
        out = model(ids, labels=ids, output_hidden_states=True)
        torch.autograd.grad(out.loss, [model.transformer.h[0].mlp.c_fc.weight], retain_graph=True)
        out.hidden_states[0].square().sum().backward()

    plain = _plain_embedding_grads(model, monkeypatch, run)["transformer.wte.weight"]
    model.zero_grad(set_to_none=True)
    run()
    torch.testing.assert_close(model.transformer.wte.weight.grad, plain, rtol=0, atol=0)


def test_tied_embedding_without_the_head_gradient_returns_its_own(monkeypatch):
    """A backward that does not reach the LM head (here: from the embeddings' output) still gets the lookup's."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    ids = random_ids(2, 16)

    def run():
        out = model(ids, labels=ids, output_hidden_states=True)
        out.hidden_states[0].square().sum().backward()

    plain = _plain_embedding_grads(model, monkeypatch, run)["transformer.wte.weight"]
    model.zero_grad(set_to_none=True)
    run()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(model.transformer.wte.weight.grad, plain, rtol=0, atol=0)


@pytest.mark.parametrize("enable", ["config", "context"])
def test_tied_embedding_under_compiled_autograd_gives_eager_gradients(enable):
    """An eager training forward (fused loss, `TiedEmbedding`), its backward under compiled autograd: the graph it
    captures expects the head's weight gradient, which the handoff returned as None (`TypeError: add(): argument
    'input' (position 1) must be Tensor, not NoneType`). Through the documented flag (a compiled function that calls
    `backward`), and through the context with a compiler that runs the captured graph as it is (the backwards run
    in Python, not traced by dynamo)."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    ids = random_ids(2, 16)

    def grads(backward) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        assert "TiedEmbeddingBackward" in _graph_functions(loss)
        backward(loss)
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    def compiled_backward(loss):
        if enable == "config":
            torch.compile(lambda loss: loss.backward(), backend="eager")(loss)
        else:
            with torch._dynamo.compiled_autograd._enable(lambda graph: graph):
                loss.backward()

    torch._dynamo.reset()
    try:  # the config's own patch: pytest 9.2's monkeypatch undoes with a delattr, which hides the flag for good
        with torch._dynamo.config.patch(compiled_autograd=enable == "config"):
            got = grads(compiled_backward)
    finally:
        torch._dynamo.reset()  # also drops compiled autograd's cached graphs
    want = grads(lambda loss: loss.backward())
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-7, msg=name)  # the rows summed in another order


def test_tied_embedding_only_where_exact():
    torch.manual_seed(0)
    ids = random_ids(2, 8)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    uses = lambda **kw: "TiedEmbeddingBackward" in _graph_functions(model(ids, **kw).loss)  # noqa: E731
    assert uses(labels=ids)
    assert not uses(labels=ids, skip_logits=False)  # the plain head: autograd sums the two gradients itself
    calls = []
    handle = model.transformer.wte.register_forward_hook(lambda *args: calls.append(1))
    assert not uses(labels=ids) and calls == [1]  # hooks on wte (e.g. NEFTune's) run: the module is called
    handle.remove()
    untied = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL, tie_word_embeddings=False)).train()
    assert "TiedEmbeddingBackward" not in _graph_functions(untied(ids, labels=ids).loss)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    ids = random_ids(2, 16)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_drops_the_cache_with_hf_s_warning(monkeypatch, caplog):
    """As `GPT2LMHeadModel`: a training forward under checkpointing returns no cache, and says so (once)."""
    monkeypatch.setattr(modeling, "logger", logging.getLogger("gpt2_scratch_test.checkpointing"))  # nothing said yet
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    model.activation_checkpointing_enable()
    ids = random_ids(1, 8)
    with caplog.at_level("WARNING", logger="gpt2_scratch_test.checkpointing"):
        assert model(ids, use_cache=True).cache is None
    assert "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`." in caplog.text
    with torch.no_grad():  # no backward to replay: the cache is kept
        assert model(ids, use_cache=True).cache is not None


# --- conversion ------------------------------------------------------------------------------------------------------


def test_to_hf_round_trip_gives_identical_weights_and_logits(pair):
    hf, model = pair
    back = model.to_hf_gpt2().eval()
    assert isinstance(back, GPT2LMHeadModel) and back.config.vocab_size == GPT2_VOCAB
    original = hf.state_dict()
    for name, tensor in back.state_dict().items():  # HF -> scratch -> HF is lossless
        assert torch.equal(tensor, original[name]), name
    ids = random_ids(2, 16)
    with torch.no_grad():  # Conv1D (addmm) and nn.Linear round differently: equal up to float32 rounding
        assert (back(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_from_pretrained_of_a_hugging_face_gpt2_folder_points_to_from_hf_gpt2(pair, tmp_path):
    """HF's Conv1D weights are stored transposed: `from_pretrained` of its folder is a one-line pointer to
    `from_hf_gpt2` (it failed on shapes, or loaded the square `attn.c_proj` wrong), which converts it."""
    hf, model = pair
    hf.save_pretrained(tmp_path)
    for load in (GPT2ScratchForCausalLM.from_pretrained, GPT2ScratchConfig.from_pretrained):
        with pytest.raises(ValueError, match=re.escape(f"from_hf_gpt2({str(tmp_path)!r})")):
            load(tmp_path)
    converted = GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path).eval()
    assert torch.equal(converted.transformer.h[0].attn.c_proj.weight, model.transformer.h[0].attn.c_proj.weight)


def test_conversion_keeps_the_attention_implementation(pair):
    hf, _ = pair
    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        model = GPT2ScratchForCausalLM.from_hf_gpt2(hf).eval()
        assert model.config._attn_implementation == "eager"
        ids = random_ids(1, 6)
        with torch.no_grad():
            got, want = model(ids, output_attentions=True).attentions, hf(ids, output_attentions=True).attentions
        assert len(got) == len(want) == SMALL["n_layer"]  # weights, as HF's eager model gives: not ()
        for layer, reference in zip(got, want, strict=True):
            torch.testing.assert_close(layer, reference, rtol=1e-5, atol=1e-6)
        assert model.to_hf_gpt2().config._attn_implementation == "eager"
    finally:
        hf.set_attn_implementation(before)


def test_from_hf_local_directory(tmp_path, pair):
    hf, model = pair
    hf.save_pretrained(tmp_path / "gpt2")
    loaded = GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path / "gpt2").eval()
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_hf_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path / "nope")


@pytest.mark.parametrize("source", [Path("nope"), "~/nope", "a/b/c"])
def test_from_hf_a_folder_that_is_not_there_is_named_where_it_cannot_be_a_hub_id(tmp_path, monkeypatch, source):
    """A `Path`, `~/x` or `a/b/c` is a local folder: they went to the Hub as ids (`~` was not expanded), and the error
    was the Hub's, not naming them ("Repo id must be in the form 'repo_name' or 'namespace/repo_name'")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(f"GPT-2 checkpoint directory {source} does not exist")):
        GPT2ScratchForCausalLM.from_hf_gpt2(source)


def test_from_hf_a_home_folder_and_a_file_are_read_as_paths(tmp_path, monkeypatch, pair):
    hf, model = pair
    hf.save_pretrained(tmp_path / "gpt2")
    monkeypatch.setenv("HOME", str(tmp_path))
    converted = GPT2ScratchForCausalLM.from_hf_gpt2("~/gpt2")
    assert torch.equal(converted.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'gpt2' / 'config.json'} is a file: pass the folder")):
        GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path / "gpt2" / "config.json")


def test_from_hf_a_hub_id_that_cannot_be_loaded_is_one_line_naming_it(tmp_path, monkeypatch):
    """Offline (or no such repository): the Hub's message spanned lines and did not say which name was tried."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as raised:
        GPT2ScratchForCausalLM.from_hf_gpt2("no-such-gpt2")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        "GPT-2 checkpoint no-such-gpt2: no such local folder, and loading it from the Hub failed"
    )


def test_from_hf_loading_arguments_with_an_instance_are_an_error(pair):
    """`from_pretrained` arguments were ignored for a `GPT2LMHeadModel` instance: `dtype=torch.bfloat16` gave
    float32."""
    hf, _ = pair
    with pytest.raises(ValueError, match=r"from_pretrained arguments \(dtype\), which only loading a folder"):
        GPT2ScratchForCausalLM.from_hf_gpt2(hf, dtype=torch.bfloat16)


def test_from_hf_passes_loading_arguments_to_from_pretrained(tmp_path, pair):
    hf, model = pair
    hf.save_pretrained(tmp_path)
    converted = GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path, dtype=torch.bfloat16)
    assert converted.dtype == torch.bfloat16
    assert torch.equal(converted.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_from_hf_a_folder_of_another_model_is_a_one_line_error_naming_it(tmp_path, pair):
    """`GPT2LMHeadModel.from_pretrained` takes any config.json and draws the weights it does not find at random: a
    Llama folder converted silently into a random GPT-2; a gpt2-scratch folder failed on shapes after a load report."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
    )
    LlamaForCausalLM(llama).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError) as raised:
        GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path / "llama")
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "llama") in message and "model_type 'llama'" in message
    pair[1].save_pretrained(tmp_path / "scratch")
    with pytest.raises(
        ValueError, match=re.escape(f"GPT2ScratchForCausalLM.from_pretrained({str(tmp_path / 'scratch')!r})")
    ):
        GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path / "scratch")


def test_from_hf_a_gpt2_config_without_model_type_converts_and_another_models_does_not(tmp_path, pair):
    """A config.json written before transformers recorded `model_type` loads with `GPT2LMHeadModel.from_pretrained`
    and converted before the model_type check; another model's without one is refused by its missing weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf, model = pair
    hf.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    converted = GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path / "old")
    assert torch.equal(converted.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    llama = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
    )
    LlamaForCausalLM(llama).save_pretrained(tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks weights of the model"):
        GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is not a Hugging Face GPT-2 checkpoint \(no config.json\)"):
        GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path / "empty")


def test_from_hf_a_checkpoint_without_some_weights_is_an_error_naming_them(tmp_path, pair):
    """Weights missing from the checkpoint (a lost shard, a hand-made file) were drawn at random by `from_pretrained`
    and converted silently."""
    from safetensors.torch import load_file, save_file

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".h.1." not in k}, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights of the model \(transformer\.h\.1\.attn\.c_attn\.bias, "):
        GPT2ScratchForCausalLM.from_hf_gpt2(tmp_path)


def test_mismatched_size_lists_what_did_not_match(pair):
    hf, _ = pair
    with pytest.raises(ValueError, match=r"shape mismatches: .*transformer\.wpe\.weight"):
        from_hf_gpt2(hf, config=GPT2ScratchConfig(n_embd=32, n_layer=2, n_head=4, n_positions=128))
    with pytest.raises(ValueError, match=r"missing keys: .*transformer\.h\.2\."):
        from_hf_gpt2(hf, config=GPT2ScratchConfig(n_embd=32, n_layer=3, n_head=4, n_positions=64))


@pytest.mark.parametrize(
    "hf_kwargs, config_kwargs, named",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, {}, "scale_attn_by_inverse_layer_idx=True"),
        ({}, {"n_head": 8}, "n_head=8 (checkpoint: 4)"),
        ({}, {"layer_norm_epsilon": 1e-2}, "layer_norm_epsilon=0.01 (checkpoint: 1e-05)"),
        ({"vocab_size": 300}, {}, "tokenizer_vocab_size=50257 (checkpoint: 300 token rows)"),
        ({"tie_word_embeddings": False}, {}, "tie_word_embeddings=True (checkpoint: an LM head of its own)"),
    ],
)
def test_a_config_that_does_not_fit_the_checkpoint_is_an_error_naming_the_field(hf_kwargs, config_kwargs, named):
    """What the weights' shapes do not show converted silently into another model: a GPT-2 variant the model does not
    implement (checked only without `config`), other heads or epsilon, real ids given zero rows, or a tied head that
    overwrote the checkpoint's token embedding with its own head."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, **hf_kwargs))
    with pytest.raises(ValueError, match=re.escape(named)):
        from_hf_gpt2(hf, config=GPT2ScratchConfig(**{**SMALL, **config_kwargs}))


def test_a_config_that_fits_the_checkpoint_converts_it(caplog):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, vocab_size=50304)).eval()  # nanoGPT's padded export: 47 unused rows
    with caplog.at_level(logging.WARNING, logger="modeling_gpt2_scratch.conversion"):
        model = from_hf_gpt2(hf, config=GPT2ScratchConfig(**SMALL, resid_pdrop=0.1)).eval()
    # meant here, but the same config on a checkpoint with added tokens would turn them into padding: said aloud
    assert "leaves out the checkpoint's token rows 50257-50303: they become padding" in caplog.text
    assert model.config.resid_pdrop == 0.1 and model.config.tokenizer_vocab_size == GPT2_VOCAB
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits[..., :GPT2_VOCAB]).abs().max().item() <= 1e-5


def test_unexpected_keys_are_listed():
    torch.manual_seed(0)
    deeper = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match=r"unexpected keys: .*transformer\.h\.2\.attn\.c_attn\.weight"):
        from_hf_gpt2(deeper, config=GPT2ScratchConfig(**SMALL))


def test_untied_checkpoints_convert_both_ways():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_()  # a head of its own
    model = GPT2ScratchForCausalLM.from_hf_gpt2(hf).eval()
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    ids = random_ids(2, 10)
    back = model.to_hf_gpt2().eval()
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
        assert torch.equal(back.lm_head.weight, hf.lm_head.weight)
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("direction", ["from_hf", "to_hf"])
def test_a_head_of_its_own_under_a_tied_config_is_refused_both_ways(direction):
    """A model whose config ties the head while its head is a tensor of its own (set by hand) computes with that
    head: converted, the tied copy held one of the two in place of the other, and its logits changed silently."""
    torch.manual_seed(0)
    source = (
        GPT2LMHeadModel(GPT2Config(**SMALL))
        if direction == "from_hf"
        else GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL))
    )
    source.lm_head.weight = torch.nn.Parameter(torch.randn_like(source.lm_head.weight) * 0.02)
    convert = GPT2ScratchForCausalLM.from_hf_gpt2 if direction == "from_hf" else GPT2ScratchForCausalLM.to_hf_gpt2
    with pytest.raises(ValueError, match=r"tie_word_embeddings=True in its config but an LM head of its own"):
        convert(source)
    source.config.tie_word_embeddings = False  # the fix the message names: both kept, the same logits
    converted = convert(source).eval()
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert (converted(ids).logits - source.eval()(ids).logits).abs().max().item() <= 1e-5


def test_pytorch_tanh_gelu_checkpoints_convert():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, activation_function="gelu_pytorch_tanh")).eval()
    model = GPT2ScratchForCausalLM.from_hf_gpt2(hf).eval()
    ids = random_ids(1, 10)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_conversion_keeps_the_pad_token_and_generation_settings():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, pad_token_id=50255)).eval()
    hf.generation_config.max_new_tokens = 7
    model = GPT2ScratchForCausalLM.from_hf_gpt2(hf)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 50255
    assert model.generation_config.max_new_tokens == 7
    back = model.to_hf_gpt2()
    assert back.config.pad_token_id == back.generation_config.pad_token_id == 50255
    assert back.generation_config.max_new_tokens == 7
    plain = GPT2ScratchForCausalLM.from_hf_gpt2(GPT2LMHeadModel(GPT2Config(**SMALL)))  # GPT-2: no pad token
    assert plain.config.pad_token_id is None and plain.generation_config.pad_token_id == 50256  # eos
    uncached = GPT2ScratchForCausalLM.from_hf_gpt2(GPT2LMHeadModel(GPT2Config(**SMALL, use_cache=False)))
    assert uncached.config.use_cache is False and uncached.to_hf_gpt2().config.use_cache is False


@pytest.mark.parametrize("via", ["scratch", "from_hf"])
def test_a_list_of_eos_ids_pads_with_the_first_and_generates_as_gpt2_does(via):
    """`GPT2Config` allows several eos ids; the whole list became the pad token and every `generate()` failed with
    "'<' not supported between instances of 'list' and 'int'"."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, eos_token_id=[5, 7])).eval()
    if via == "from_hf":
        model = GPT2ScratchForCausalLM.from_hf_gpt2(hf).eval()
    else:
        model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL, eos_token_id=[5, 7])).eval()
        model.load_state_dict(GPT2ScratchForCausalLM.from_hf_gpt2(hf).state_dict())
    assert model.generation_config.pad_token_id == 5
    ids = random_ids(2, 6)
    kwargs = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, **kwargs), hf.generate(ids, pad_token_id=5, **kwargs))


@pytest.mark.parametrize(
    "name, value",
    [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False), ("add_cross_attention", True)],
)
def test_the_config_refuses_gpt2_attention_variants_it_does_not_implement(name, value):
    """A config built from a `GPT2Config`'s fields (or an edited config.json) kept them and computed plain GPT-2:
    logits off by 0.03 for `scale_attn_by_inverse_layer_idx`, without a word."""
    with pytest.raises(ValueError, match=rf"GPT2ScratchConfig\.{name}={value} is not implemented"):
        GPT2ScratchConfig(**{**SMALL, name: value})
    fields = GPT2Config(**SMALL, **{name: value}).to_dict()
    fields.pop("model_type")
    with pytest.raises(ValueError, match=rf"{name}={value} is not implemented"):
        GPT2ScratchConfig(**fields)
    config = GPT2ScratchConfig(**SMALL)
    setattr(config, name, value)  # after the config was made (`EncoderDecoderModel` sets add_cross_attention)
    with pytest.raises(ValueError, match=rf"{name}={value} is not implemented"):
        GPT2ScratchForCausalLM(config)
    plain = GPT2Config(**SMALL).to_dict()  # GPT-2's own values of them pass
    plain.pop("model_type")
    assert GPT2ScratchConfig(**plain).n_embd == SMALL["n_embd"]


def test_unsupported_gpt2_variant_raises():
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, activation_function="relu"))
    with pytest.raises(ValueError, match="activation_function"):
        GPT2ScratchForCausalLM.from_hf_gpt2(hf)


# --- Hub format ------------------------------------------------------------------------------------------------------


def test_auto_classes_work_without_remote_code():
    config = GPT2ScratchConfig(**SMALL)
    assert isinstance(AutoModelForCausalLM.from_config(config), GPT2ScratchForCausalLM)
    assert isinstance(AutoModel.from_config(config), GPT2ScratchModel)
    assert AutoConfig.for_model("gpt2_scratch").__class__ is GPT2ScratchConfig


def test_save_pretrained_writes_hub_files(tmp_path, pair):
    _, model = pair
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"configuration_gpt2_scratch.py", "modeling_gpt2_scratch.py"} <= names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2_scratch"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gpt2_scratch.GPT2ScratchConfig",
        "AutoModel": "modeling_gpt2_scratch.GPT2ScratchModel",
        "AutoModelForCausalLM": "modeling_gpt2_scratch.GPT2ScratchForCausalLM",
    }
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # tied weight stored once
    assert not any("_orig_mod" in k for k in keys)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == generation["pad_token_id"] == 50256


def test_saved_code_imports_only_torch_transformers_and_itself(tmp_path, pair):
    """Every import in the two files that travel to the Hub, at any depth: torch, transformers, the standard library,
    or the other file (relative)."""
    _, model = pair
    model.save_pretrained(tmp_path)
    allowed = {"torch", "transformers", "__future__"} | sys.stdlib_module_names
    for name in ("configuration_gpt2_scratch.py", "modeling_gpt2_scratch.py"):
        for node in ast.walk(ast.parse((tmp_path / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: the other travelling file only
                assert node.module == "configuration_gpt2_scratch", f"{name}: from {'.' * node.level}{node.module}"
            elif isinstance(node, ast.Import | ast.ImportFrom):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    assert module.split(".")[0] in allowed, f"{name}: {module}"


def test_conversion_without_the_package_says_how_to_install_it(pair, monkeypatch):
    """The model file travels to the Hub alone; its conversions need the package, which is not on PyPI: the message
    said `pip install gpt2-scratch`."""
    import importlib

    real = importlib.import_module

    def without_conversion(name, *args):
        if name == "modeling_gpt2_scratch.conversion":
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    _, model = pair
    monkeypatch.setattr(importlib, "import_module", without_conversion)
    with pytest.raises(ImportError, match=r"needs the gpt2-scratch package: `pip install -e \.` in a clone"):
        model.to_hf_gpt2()


@pytest.mark.parametrize("installed", ["4.57.6", "5.0.0rc1", "5.9rc1", "5.23.0"])  # 5.23: the newest that fails
def test_the_model_code_refuses_a_transformers_older_than_it_needs_in_one_line(installed):
    with pytest.raises(ImportError) as raised:
        check_transformers_version(installed)
    message = str(raised.value)
    assert "\n" not in message and f"transformers {installed} is installed" in message
    assert f"transformers>={MIN_TRANSFORMERS_VERSION}" in message
    assert "pip install -U transformers" in message


@pytest.mark.parametrize("installed", ["5.24.0", "5.24.0.dev0", "5.24rc1", "5.30.1", "6.0.0", "unknown"])
def test_the_model_code_accepts_the_transformers_it_needs_or_newer(installed):
    check_transformers_version(installed)


def test_a_patch_release_minimum_compares_whole_versions(monkeypatch):
    monkeypatch.setattr(configuration, "MIN_TRANSFORMERS_VERSION", "5.24.1")
    for newer in ("5.24.1", "5.24.3", "5.25.0"):
        check_transformers_version(newer)
    with pytest.raises(ImportError, match="needs transformers>=5.24.1, but transformers 5.24.0 is installed"):
        check_transformers_version("5.24.0")


@pytest.mark.slow
@pytest.mark.parametrize(
    "version, fake, load",
    [
        # what a user with transformers 4.57 sees (4.x cannot be installed here: its version is faked): the error
        # from the config file, which `from_pretrained` imports first; before, `ImportError: cannot import name
        # 'initialization' from 'transformers'` from deep inside the model file
        ("4.57.6", "", "AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)"),
        # `config=` a plain `PretrainedConfig` makes `from_pretrained` import the model file first, and an older
        # transformers lacks what its imports name (faked: 5.18's missing `slice_logits_to_keep`; 4.x lacks
        # `initialization`): the model file imports the config, and so checks the version, before anything else
        (
            "5.18.0",
            "del transformers.modeling_utils.slice_logits_to_keep",
            "AutoModelForCausalLM.from_pretrained(ckpt, config=PretrainedConfig.from_pretrained(ckpt), "
            "trust_remote_code=True)",
        ),
    ],
    ids=["config_first", "model_file_first"],
)
def test_remote_code_under_an_older_transformers_stops_with_the_version_error(
    tmp_path, pair, run_without_repo, version, fake, load
):
    """An older transformers gets the one-line version error, whichever of the two files it imports first."""
    pair[1].save_pretrained(tmp_path / "ckpt")
    result = run_without_repo(
        f"""
        import transformers
        import transformers.modeling_utils
        from transformers import AutoModelForCausalLM, PretrainedConfig
        transformers.__version__ = {version!r}
        {fake}
        ckpt = {str(tmp_path / "ckpt")!r}
        try:
            {load}
        except ImportError as err:
            print(err)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(
        f"needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers {version} is installed: upgrade it with "
        "`pip install -U transformers`."
    )


@pytest.mark.slow
def test_checkpoint_loads_with_remote_code_in_fresh_offline_process(tmp_path, pair, run_without_repo):
    _, model = pair
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits.contiguous()}, tmp_path / "expected.pt")
    result = run_without_repo(
        f"""
        try:
            import modeling_gpt2_scratch  # noqa: F401
            raise SystemExit("repository importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        path = {str(ckpt)!r}
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        assert type(config).__name__ == "GPT2ScratchConfig", type(config)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        assert type(model).__name__ == "GPT2ScratchForCausalLM" and not model.training
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        assert type(base).__name__ == "GPT2ScratchModel"
        assert torch.equal(base.wte.weight, model.transformer.wte.weight)
        out = model.generate(expected["ids"][:1], max_new_tokens=5, do_sample=False)
        assert out.shape == (1, 17)
        print("OK")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


# --- fused LM-head loss ----------------------------------------------------------------------------------------------


def _loss_and_grads(model, ids, labels, skip_logits, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, skip_logits=skip_logits, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_rows", [None, 16])  # None: the default chunk holds all 60 rows; 16: four chunks
@pytest.mark.parametrize("masked", [False, True])
def test_fused_loss_matches_plain_loss_and_gradients(masked, chunk_rows):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    if chunk_rows:
        model.loss_chunk_elements = chunk_rows * model.config.vocab_size
    ids = random_ids(3, 20)
    labels = ids.clone()
    if masked:
        labels[0, :9] = -100
        labels[1, 5:] = -100  # rows ignored in several chunks
    plain, plain_grads = _loss_and_grads(model, ids, labels, skip_logits=False)
    fused, fused_grads = _loss_and_grads(model, ids, labels, skip_logits=True)
    assert fused.logits is None and plain.logits is not None
    assert abs(fused.loss.item() - plain.loss.item()) <= 1e-5
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)  # float32 rounding


def test_fused_loss_chunk_rows_by_device_or_the_models_setting(monkeypatch):
    """The fused loss's chunk: 2**26 logits on a CPU, 2**30 on a CUDA GPU (a 16 x 1024 micro-batch in one chunk,
    faster there: BENCHMARKS.md), or `model.loss_chunk_elements`; the forward hands it to `LinearCrossEntropy`."""
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    vocab = model.config.vocab_size
    assert model.loss_chunk_rows(torch.device("cpu")) == 2**26 // vocab
    assert model.loss_chunk_rows(torch.device("cuda")) == 2**30 // vocab >= 16 * 1024
    model.loss_chunk_elements = 16 * vocab
    assert model.loss_chunk_rows("cpu") == model.loss_chunk_rows("cuda") == 16
    chunk_plans = []
    apply = modeling.LinearCrossEntropy.apply
    monkeypatch.setattr(
        modeling.LinearCrossEntropy, "apply", lambda *args: chunk_plans.append(args[6]) or apply(*args)
    )
    ids = random_ids(2, 8)
    model(ids, labels=ids)
    assert chunk_plans == [((0, 16),)]
    assert modeling.LinearCrossEntropy.chunks(40, 16) == ((0, 14), (14, 14), (28, 12))  # 3 chunks, none small


@pytest.mark.slow
def test_fused_loss_compiles_when_the_batch_shape_changes():
    """A compiled training forward under bf16 autocast, called at a second batch size (dynamo then recompiles with
    dynamic shapes, as `Trainer` with `torch_compile` and padded batches does): the loss and gradients of eager mode.
    On torch 2.11 dynamo failed to compile the fused loss ("Expected subgraph_vt to be a tensor") when it computed
    its chunks from the symbolic row count inside the `autograd.Function`."""
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    model.loss_chunk_elements = 5 * model.config.vocab_size  # several chunks, their count depending on the shape
    torch._dynamo.reset()  # dynamo keeps the shapes it saw per code object: the first call here compiles static
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break around the loss fails too
    for batch in (2, 3):
        ids = random_ids(batch, 8, seed=batch)
        results = []
        for forward in (compiled, model):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = forward(ids, labels=ids).loss
            loss.backward()
            results.append((loss.detach(), model.transformer.h[0].attn.c_attn.weight.grad.clone()))
        (loss, grad), (want_loss, want_grad) = results
        torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=0)
        assert ((grad - want_grad).norm() / want_grad.norm()).item() < 1e-2  # bf16 rounding, in another order


def test_fused_loss_without_autograd_computes_the_loss_alone():
    """Under `torch.no_grad()` (the trainer's evaluation) the fused loss runs one matmul per chunk instead of three
    (logits; no gradients of the hidden states or of the weight) and gives the loss it gives with autograd."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    model.loss_chunk_elements = 16 * model.config.vocab_size  # 60 rows: four chunks of 15
    ids = random_ids(3, 20)
    labels = ids.clone()
    labels[0, :9] = -100
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        with_autograd = model(ids, labels=labels, skip_logits=True).loss
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_alone = model(ids, labels=labels, skip_logits=True).loss
        plain = model(ids, labels=labels, skip_logits=False).loss
    # the trunk's linears are `aten::addmm` (bias); the weight gradient is accumulated with `addmm_` after chunk 1
    head_matmuls = [e for e in recorded.events() if e.name in ("aten::mm", "aten::addmm_")]
    assert len(head_matmuls) == 12  # four chunks x (logits, hidden gradient, weight gradient)
    assert sum(e.name == "aten::mm" for e in prof.events()) == 4 + 1  # four chunks' logits, then the plain head
    assert loss_alone.item() == with_autograd.item()
    assert abs(loss_alone.item() - plain.item()) <= 1e-5


def test_fused_loss_on_a_cpu_holds_one_logits_sized_tensor_per_chunk():
    """On a CPU (eager) the log-softmax is written over the chunk's logits: the only (n, V) allocation is the
    matmul's."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    n, c, v = 64, 32, 1000
    hidden, weight = torch.randn(n, c, requires_grad=True), torch.randn(v, c, requires_grad=True)
    targets = torch.randint(0, v - 10, (n,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = modeling.LinearCrossEntropy.apply(
            hidden, weight, targets, v - 10, torch.tensor(float(n)), -100, ((0, n),)
        )
    logits_sized = [e.name for e in prof.events() if e.self_cpu_memory_usage >= n * v * 4]
    assert logits_sized == ["aten::mm"]
    logits = (hidden @ weight.t()).masked_fill(torch.arange(v) >= v - 10, float("-inf"))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_fused_loss_in_chunks_under_torch_compile_matches_eager(monkeypatch):
    """The chunks run in order under torch.compile (BENCHMARKS.md); the loss and gradients stay eager's."""
    monkeypatch.setattr(modeling, "LOSS_CHUNK_ELEMENTS", 16 * GPT2ScratchConfig().vocab_size)
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    ids = random_ids(3, 20)
    labels = ids.clone()
    labels[0, :9] = -100
    eager, eager_grads = _loss_and_grads(model, ids, labels, skip_logits=True)
    compiled_model = torch.compile(model)
    compiled, compiled_grads = _loss_and_grads(compiled_model, ids, labels, skip_logits=True)
    assert abs(compiled.loss.item() - eager.loss.item()) <= 1e-5
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[f"_orig_mod.{name}"], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # the loss alone (the trainer's evaluation), compiled too
        assert abs(compiled_model(ids, labels=labels, skip_logits=True).loss.item() - eager.loss.item()) <= 1e-5


def test_mlp_under_torch_compile_takes_the_sigmoid_form_of_tanh_gelu():
    """Compiled, the MLP writes GPT-2's tanh-GELU as x * sigmoid(2u) (inductor's CPU kernel for it is faster); the
    values and gradients stay eager's `F.gelu` ones to float32 rounding."""
    torch.manual_seed(0)
    mlp = modeling.MLP(GPT2ScratchConfig(**SMALL))
    x = (torch.randn(2, 8, SMALL["n_embd"]) * 3).requires_grad_()
    ops = []

    def capture(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(mlp, backend=capture)(x)
    assert any("sigmoid" in op for op in ops) and not any("gelu" in op for op in ops)
    (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), x)
    eager = mlp(x)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-5)


def test_fused_loss_is_the_default_in_training_mode_only(pair):
    _, model = pair
    ids = random_ids(1, 8)
    assert model(ids, labels=ids).logits is not None  # eval mode: logits as usual
    model.train()
    try:
        assert model(ids, labels=ids).logits is None
        assert model(ids).logits is not None  # no labels: nothing to fuse
    finally:
        model.eval()


def test_training_loss_of_the_kept_positions_with_logits_to_keep_is_hf_s():
    """`logits_to_keep=4` with labels of those 4 positions in training mode: HF's loss over the kept logits. The fused
    loss, the default there, ignored `logits_to_keep` and refused labels of fewer positions than the input's."""
    hf, model = make_pair(seed=0, **SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = random_ids(2, 10)
    reference = hf.train()(ids, labels=ids[:, -4:], logits_to_keep=4).loss
    torch.testing.assert_close(model.train()(ids, labels=ids[:, -4:], logits_to_keep=4).loss, reference)


def test_fused_loss_of_a_batch_without_targets_is_nan_with_zero_gradients_as_hf():
    """Every label -100 (e.g. fine-tuning rows whose answers were all cut off): HF's mean loss is nan (0 / 0) and its
    gradients are zero. The fused loss multiplied its zero gradients by 1 / 0: nan in every weight after the step."""
    hf, model = make_pair(seed=3, **SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf.train()
    model.train()
    ids = random_ids(2, 12)
    labels = torch.full_like(ids, -100)
    reference, fused = hf(ids, labels=labels).loss, model(ids, labels=labels, skip_logits=True).loss
    reference.backward()
    fused.backward()
    assert reference.isnan() and fused.isnan()
    assert all(param.grad.abs().max() == 0 for param in hf.parameters())
    for name, param in model.named_parameters():
        assert param.grad.abs().max() == 0, name


@pytest.mark.parametrize("key", ["labels", "shift_labels"])
@pytest.mark.parametrize("shape", [(2, 8), (1, 10)])  # shorter rows, fewer rows
def test_fused_loss_with_fewer_targets_than_positions_is_a_one_line_error(pair, key, shape):
    """HF's GPT-2 (and our plain head) raise "Expected input batch_size (20) to match target batch_size (16)"; the
    fused loss took the first 16 positions' hidden states for the 16 targets and gave a loss (10.81), misaligned."""
    hf, model = pair
    ids = random_ids(2, 10)
    with pytest.raises(ValueError, match="Expected input batch_size"):
        hf(ids, labels=ids[: shape[0], : shape[1]])
    model.train()
    try:
        with pytest.raises(ValueError, match=rf"^{key} of shape \({shape[0]}, {shape[1]}\) .* of shape \(2, 10\)"):
            model(ids, skip_logits=True, **{key: ids[: shape[0], : shape[1]]})
    finally:
        model.eval()


def test_second_derivatives_through_the_fused_loss_are_refused_and_the_plain_head_gives_hf_s():
    """A Hessian-vector product (`create_graph=True`, then a second backward: influence functions, MAML, gradient
    penalties) through the fused loss, the default in training mode with labels. Its backward scales stored gradients,
    so the second backward missed the softmax's curvature, without a word: in a random 2-layer model the product's
    absolute sum was 5.1143 where HF's is 5.1264."""
    hf, model = make_pair(seed=0, **SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = random_ids(2, 10)

    def hessian_vector_product(module, **kwargs):
        weight = module.transformer.h[1].mlp.c_fc.weight
        (grad,) = torch.autograd.grad(module.train()(ids, labels=ids, **kwargs).loss, [weight], create_graph=True)
        return torch.autograd.grad(grad.square().sum(), [weight])[0]

    with pytest.raises(ValueError, match="^The fused LM-head loss cannot differentiate twice"):
        hessian_vector_product(model)
    torch.testing.assert_close(hessian_vector_product(model, skip_logits=False), hessian_vector_product(hf).t())


def test_fused_loss_honours_num_items_in_batch_and_shift_labels():
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    ids = random_ids(2, 12)
    targets = random_ids(2, 12, seed=5)
    plain = model(ids, shift_labels=targets, skip_logits=False, num_items_in_batch=torch.tensor(48)).loss
    fused = model(ids, shift_labels=targets, skip_logits=True, num_items_in_batch=torch.tensor(48)).loss
    assert abs(fused.item() - plain.item()) <= 1e-5
    mean = model(ids, shift_labels=targets, skip_logits=True).loss
    assert abs(fused.item() - mean.item() * 24 / 48) <= 1e-5


def test_fused_loss_under_bf16_autocast_is_close():
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    ids = random_ids(2, 16)
    reference = model(ids, labels=ids, skip_logits=False).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(ids, labels=ids, skip_logits=True).loss
    fused.backward()
    assert fused.dtype == torch.float32
    assert abs(fused.item() - reference) <= 2e-2
    assert model.transformer.wte.weight.grad.dtype == torch.float32


def test_a_wrapped_lm_head_is_called_by_the_training_loss():
    """A PEFT/LoRA layer or a hook on `lm_head` changes what it computes: the fused loss must not bypass it."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    ids = random_ids(2, 12)
    plain = model(ids, labels=ids).loss.item()
    model.lm_head.register_forward_hook(lambda module, args, output: output * 0.5)
    hooked = model(ids, labels=ids)
    assert hooked.logits is not None  # the head was called, so its logits come back
    hooked.loss.backward()
    with torch.no_grad():
        reference = model.eval()(ids, labels=ids).loss.item()
    assert abs(hooked.loss.item() - reference) <= 1e-5 and abs(hooked.loss.item() - plain) > 1e-3


def test_a_lm_head_under_accelerate_hooks_is_called_by_the_training_loss():
    """accelerate's hooks (`device_map` offloading loads the weight in one) replace `forward` instead of registering
    torch hooks: the fused loss must call the head then too, not read its (possibly offloaded, meta) weight."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Halve(ModelHook):
        def post_forward(self, module, output):
            return output * 0.5

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).train()
    ids = random_ids(2, 12)
    plain = model(ids, labels=ids).loss.item()
    add_hook_to_module(model.lm_head, Halve())
    hooked = model(ids, labels=ids)
    assert hooked.logits is not None
    with torch.no_grad():
        reference = model.eval()(ids, labels=ids).loss.item()
    assert abs(hooked.loss.item() - reference) <= 1e-5 and abs(hooked.loss.item() - plain) > 1e-3
    remove_hook_from_module(model.lm_head)
    assert modeling.called_plainly(model.lm_head, modeling.Linear)


def test_trainer_evaluation_gets_the_loss_logits_and_metrics(tmp_path):
    """`Trainer` takes every forward parameter named like a label for one each batch must hold; `shift_labels` is
    read from `**kwargs` so that evaluation finds `labels` alone (else: no eval_loss, no compute_metrics)."""
    from transformers import Trainer, TrainingArguments
    from transformers.utils import find_labels

    assert find_labels(GPT2ScratchForCausalLM) == ["labels"]
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL))
    ids = random_ids(4, 16)
    seen = []

    def compute_metrics(prediction):
        seen.append((prediction.predictions.shape, prediction.label_ids.shape))
        return {"rows": len(prediction.label_ids)}

    args = TrainingArguments(tmp_path, per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    result = Trainer(model=model, args=args, eval_dataset=dataset, compute_metrics=compute_metrics).evaluate()
    with torch.no_grad():
        expected = sum(model.eval()(ids[i : i + 2], labels=ids[i : i + 2]).loss.item() for i in (0, 2)) / 2
    assert result["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert seen == [((4, 16, GPT2_VOCAB), (4, 16))] and result["eval_rows"] == 4
    fused = model.train()(ids, shift_labels=ids.roll(-1, dims=1), skip_logits=True).loss  # the keyword still works
    plain = model(ids, shift_labels=ids.roll(-1, dims=1), skip_logits=False).loss
    assert abs(fused.item() - plain.item()) <= 1e-5


def test_trainer_with_gradient_accumulation_logs_the_token_mean_of_the_step(tmp_path):
    """`Trainer` divides each micro-batch's summed loss by `num_items_in_batch`, the targets of the whole optimizer
    step, counted over `labels[..., 1:]` for a model whose `loss_type` is `ForCausalLM` (this one, by its class
    name). `GPT2LMHeadModel` has no `loss_type`, so `Trainer` counts its `labels` whole, one target too many per
    row that has a label at position 0: its loss and gradients come out (T - 1) / T of the mean on full rows."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL))
    ids = random_ids(4, 12)
    labels = ids.clone()
    labels[0, :7], labels[3, :3] = -100, -100  # micro-batches with different numbers of targets
    with torch.no_grad():
        expected = model.eval()(ids, labels=labels).loss.item()  # the mean over the step's 4 rows
    counts = []
    model.register_forward_hook(
        lambda _, args, kwargs, out: counts.append(kwargs["num_items_in_batch"]), with_kwargs=True
    )
    args = TrainingArguments(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    dataset = [{"input_ids": row, "labels": row_labels} for row, row_labels in zip(ids, labels, strict=True)]
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    assert [int(count) for count in counts] == [int((labels[:, 1:] != -100).sum())] * 2  # 36 targets, at each call
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([expected], abs=1e-5)


def test_trainer_with_label_smoothing_shifts_the_labels_as_for_gpt2(tmp_path):
    """`Trainer` computes a smoothed loss itself, shifting the labels only for the class names it lists as causal LMs;
    this one was not listed (`AutoModelForCausalLM.register` does not list it), so each position was scored against
    its own input token: 10.49 where `GPT2LMHeadModel` had 10.81."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    hf, model = make_pair()
    ids = random_ids(2, 16)
    args = TrainingArguments(tmp_path, label_smoothing_factor=0.1, report_to="none", use_cpu=True)
    losses = []
    for network in (hf.eval(), model.eval()):
        with torch.no_grad():
            losses.append(Trainer(model=network, args=args).compute_loss(network, {"input_ids": ids, "labels": ids}))
            shifted = LabelSmoother(epsilon=0.1)(network(ids), ids, shift_labels=True)
    assert losses[1].item() == pytest.approx(losses[0].item(), abs=1e-5)
    assert losses[1].item() == pytest.approx(shifted.item(), abs=1e-5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_ignore_index_keyword_works_as_for_gpt2(mode):
    """`ignore_index=` reaches `transformers`' loss in `GPT2LMHeadModel`; here the label check refused any other
    value, and the training loss (fused) ignored -100 only: another loss and other gradients, without a word."""
    hf, model = make_pair(**SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train mode: no dropout
    ids = random_ids(3, 10)
    for ignore_index in (-1, 7):
        labels = ids.clone()
        labels[0, :5] = ignore_index
        results = []
        for network in (hf, model):
            network.train(mode == "train")
            network.zero_grad(set_to_none=True)
            loss = network(ids, labels=labels, ignore_index=ignore_index).loss
            loss.backward()
            results.append((loss.item(), network.transformer.h[0].mlp.c_fc.bias.grad.clone()))
        assert results[1][0] == pytest.approx(results[0][0], abs=1e-5)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


# --- resizing the vocabulary -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resized_tokens_that_were_padding_rows_are_initialised_like_transformers_does(mean_resizing):
    """A converted GPT-2's padding rows hold zeros (a scratch-trained one's, an untrained initialisation): tokens
    that take those ids get rows drawn as `transformers` draws added rows (near the old rows' mean, or N(0, 0.02))."""
    hf, model = make_pair()
    assert model.transformer.wte.weight[GPT2_VOCAB:].abs().max() == 0
    torch.manual_seed(1)
    hf.resize_token_embeddings(GPT2_VOCAB + 2, mean_resizing=mean_resizing)
    model.resize_token_embeddings(GPT2_VOCAB + 2, mean_resizing=mean_resizing)
    ours, theirs = model.transformer.wte.weight[GPT2_VOCAB:], hf.transformer.wte.weight[GPT2_VOCAB:]
    assert ours.abs().min() > 0
    if mean_resizing:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)  # the mean, plus 1e-9-scaled noise
        ids = torch.cat([random_ids(1, 6), torch.tensor([[GPT2_VOCAB, GPT2_VOCAB + 1]])], dim=1)
        with torch.no_grad():
            assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-3
    else:
        assert ours.std().item() == pytest.approx(model.config.initializer_range, rel=0.3)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_untied_resize_initialises_the_heads_new_rows_too():
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL, tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight[GPT2_VOCAB:] = 0
    model.resize_token_embeddings(GPT2_VOCAB + 3)
    head, real = model.lm_head.weight, model.lm_head.weight[:GPT2_VOCAB]
    torch.testing.assert_close(head[GPT2_VOCAB:], real.mean(0).expand(3, -1), rtol=0, atol=1e-4)


def test_resize_token_embeddings_makes_new_tokens_real_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL)).eval()  # 50304 rows, 50257 real tokens
    new_id = GPT2_VOCAB  # e.g. a pad token added to the tokenizer
    model.resize_token_embeddings(GPT2_VOCAB + 1)
    assert model.config.tokenizer_vocab_size == model.config.vocab_size == GPT2_VOCAB + 1
    ids = torch.cat([random_ids(1, 6), torch.tensor([[new_id]])], dim=1)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape[-1] == GPT2_VOCAB + 1 and torch.isfinite(out.logits[..., new_id]).all()
    assert torch.isfinite(out.loss)
    model.train()
    model(ids, labels=ids).loss.backward()  # the fused loss trains the new token's row
    assert model.transformer.wte.weight.grad[new_id].abs().sum() > 0
    model.eval()

    model.resize_token_embeddings(GPT2_VOCAB + 2, pad_to_multiple_of=128)  # keeps the aligned width
    assert (model.config.vocab_size, model.config.tokenizer_vocab_size) == (50304, GPT2_VOCAB + 2)
    model.resize_token_embeddings(1000)  # shrinking
    model.save_pretrained(tmp_path / "shrunk")
    reloaded = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "shrunk").eval()
    assert (reloaded.config.vocab_size, reloaded.config.tokenizer_vocab_size) == (1000, 1000)
    small_ids = ids % 1000
    with torch.no_grad():
        assert torch.equal(reloaded(small_ids).logits, model(small_ids).logits)


def test_fused_loss_weight_gradient_does_not_overflow_in_float16():
    """Under fp16 the fused loss sums a chunk's rows into the head's weight gradient in fp16, before any loss scaling:
    a frequent target times large activations (GPT-2's outlier dimensions after `ln_f`) passed 65,504, and the `inf`
    came before the loss scale, so no `GradScaler` scale could cure it: every step was skipped."""
    torch.manual_seed(0)
    n, width, vocab = 4096, 16, 64
    hidden = torch.randn(n, width)
    hidden[:, 0] += 20  # one sign throughout, as an outlier dimension
    hidden.requires_grad_()
    weight = (0.02 * torch.randn(vocab, width)).requires_grad_()
    targets = torch.full((n,), 3)  # one frequent token: its row sums n x (p - 1) x ~20, about -8e4
    targets[::7] = 11
    with torch.autocast("cpu", dtype=torch.float16):
        loss = modeling.LinearCrossEntropy.apply(
            hidden, weight, targets, vocab, torch.tensor(float(n)), -100, ((0, n),), None, True
        )
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(h64 @ w64.t(), targets).backward()
    assert torch.isfinite(weight.grad).all()
    error = (
        (weight.grad.double() - w64.grad).abs().amax(0)
    )  # per column: the outlier's scaling costs the others nothing
    assert (error <= 1e-2 * w64.grad.abs().amax(0)).all()
    assert (hidden.grad.double() - h64.grad).abs().max().item() <= 1e-2 * h64.grad.abs().max().item()
