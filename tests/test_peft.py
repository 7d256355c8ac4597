"""PEFT (LoRA) on the scratch GPT-2: adapters made for Hugging Face's GPT-2 fit it, and train it the same way."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_gpt2_scratch import GPT2ScratchForCausalLM

GPT2_VOCAB = 50257
NO_DROPOUT = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TARGETS = ["c_attn", "c_proj", "c_fc"]  # every linear layer of the blocks, under GPT-2's own names


def lora_config(**overrides) -> LoraConfig:
    # init_lora_weights=False: B random too, so the adapter changes the outputs from the first step
    return LoraConfig(**(dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False) | overrides))


def ids(batch: int = 2, length: int = 24, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, GPT2_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def hf_and_ours_with_one_adapter(tmp_path):
    """HF's GPT-2 with a fresh LoRA adapter, and the scratch model (same weights) with that adapter loaded."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**NO_DROPOUT))
    ours = GPT2ScratchForCausalLM.from_hf_gpt2(hf)
    hf_lora = get_peft_model(hf, lora_config())
    hf_lora.save_pretrained(tmp_path / "adapter")
    return hf_lora, PeftModel.from_pretrained(ours, tmp_path / "adapter", is_trainable=True)


def test_an_adapter_made_for_hf_gpt2_gives_hf_logits_on_the_scratch_model(hf_and_ours_with_one_adapter):
    hf_lora, ours_lora = hf_and_ours_with_one_adapter
    x = ids()
    torch.testing.assert_close(ours_lora(x).logits[..., :GPT2_VOCAB], hf_lora(x).logits, atol=1e-5, rtol=1e-5)
    with ours_lora.disable_adapter():
        base_logits = ours_lora(x).logits
    assert (ours_lora(x).logits - base_logits).abs().max() > 1e-2  # the adapter counts


def test_an_adapter_on_hf_gpt2s_lm_head_loads_onto_a_model_converted_without_padding(tmp_path):
    """Such an adapter holds the head's 50,257 rows (its `lora_B`, and the base weight PEFT saves with it): onto the
    default model's 50,304 rows it fails on their shapes; `pad_vocab=False` keeps GPT-2's (README, PEFT)."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**NO_DROPOUT))
    padded, unpadded = (
        GPT2ScratchForCausalLM.from_hf_gpt2(hf),
        GPT2ScratchForCausalLM.from_hf_gpt2(hf, pad_vocab=False),
    )
    hf_lora = get_peft_model(hf, lora_config(target_modules=["c_attn", "lm_head"], fan_in_fan_out=True))
    hf_lora.save_pretrained(tmp_path / "adapter")
    with pytest.raises(RuntimeError, match=r"size mismatch for .*lm_head"):
        PeftModel.from_pretrained(padded, tmp_path / "adapter")
    ours_lora = PeftModel.from_pretrained(unpadded, tmp_path / "adapter")
    x = ids()
    torch.testing.assert_close(ours_lora(x).logits, hf_lora(x).logits, atol=1e-5, rtol=1e-5)
    with hf_lora.disable_adapter():
        assert (hf_lora(x).logits - ours_lora(x).logits).abs().max() > 1e-2  # the adapter counts


def test_lora_training_follows_hf_gpt2_step_by_step_and_moves_only_the_adapter(hf_and_ours_with_one_adapter):
    hf_lora, ours_lora = hf_and_ours_with_one_adapter
    frozen = {k: v.clone() for k, v in ours_lora.get_base_model().state_dict().items() if "lora" not in k}
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (hf_lora, ours_lora)
    ]
    x = ids()
    history = []
    for _ in range(4):
        losses = []
        for model, optimizer in zip((hf_lora, ours_lora), optimizers, strict=True):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], abs=1e-5)
        history.append(losses[1])
    assert history[-1] < history[0]  # it learned
    after = ours_lora.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    merged_hf, merged_ours = hf_lora.merge_and_unload(), ours_lora.merge_and_unload()
    torch.testing.assert_close(merged_ours(x).logits[..., :GPT2_VOCAB], merged_hf(x).logits, atol=1e-4, rtol=1e-4)


def test_the_training_loss_sees_a_lora_on_the_lm_head():
    """The fused LM-head loss must go through an adapter on `lm_head`, not around it to the frozen weight."""
    torch.manual_seed(0)
    model = get_peft_model(GPT2ScratchForCausalLM.from_hf_gpt2(GPT2LMHeadModel(GPT2Config(**NO_DROPOUT))),
                           lora_config(target_modules=["lm_head"]))  # fmt: skip
    x = ids()
    loss = model(input_ids=x, labels=x).loss
    logits = model(input_ids=x).logits[:, :-1, :GPT2_VOCAB]
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, GPT2_VOCAB), x[:, 1:].reshape(-1)))
    loss.backward()
    head = {n: p.grad for n, p in model.named_parameters() if "lm_head.lora" in n}
    assert len(head) == 2 and all(g is not None and g.abs().sum() > 0 for g in head.values())


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_under_a_frozen_base_gives_the_adapters_the_same_gradients(use_reentrant):
    """PEFT makes the embedding output require grad so that re-entrant checkpointing of frozen blocks
    back-propagates."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = GPT2ScratchForCausalLM.from_hf_gpt2(GPT2LMHeadModel(GPT2Config(**NO_DROPOUT)))
        if checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model = get_peft_model(base, lora_config())
        model.train()
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    # 2 blocks x 4 layers (c_proj twice) x (A, B)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 4 * 2
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)
