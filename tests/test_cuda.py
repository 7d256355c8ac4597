"""Parity on a CUDA GPU: the paths that only run there (cuDNN/flash sdpa, the fused loss in one chunk, inductor's
Triton kernels under bf16 autocast, `generate()`'s own compilation with a static cache). Skipped without CUDA, so CI
(CPU only) skips them; on a GPU machine: `python -m pytest tests/test_cuda.py -q`."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPT2_VOCAB = 50257
SHAPE = dict(n_embd=256, n_layer=4, n_head=4, n_positions=512)  # 64-wide heads, as GPT-2's
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 matmuls and convolutions while a test runs (TF32 would round to 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_pair(seed: int = 0, **overrides) -> tuple[GPT2LMHeadModel, GPT2ScratchForCausalLM]:
    """A random HF GPT-2 and the scratch model with its weights, both on the GPU in eval mode."""
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**(SHAPE | overrides))).eval()
    return hf.to(CUDA), GPT2ScratchForCausalLM.from_hf_gpt2(hf).to(CUDA).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, GPT2_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(CUDA)


def grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}


def compare_with_hf_grads(ours: dict, hf: dict, rtol: float, atol: float) -> None:
    for name, grad in ours.items():
        ref = hf[name]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            ref = ref.t()  # HF's Conv1D holds (in, out)
        if name == "transformer.wte.weight":
            assert grad[GPT2_VOCAB:].abs().max().item() == 0  # the padded rows get no gradient
            grad = grad[:GPT2_VOCAB]
        torch.testing.assert_close(grad, ref, rtol=rtol, atol=atol, msg=name)


def test_float32_logits_loss_and_gradients_match_hf_on_cuda():
    hf, model = make_pair(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = random_ids(2, 256)
    with torch.no_grad():
        ref, out = hf(ids, labels=ids), model(ids, labels=ids)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5

    hf.train(), model.train()  # training mode: the fused loss in one chunk (CUDA's default) against HF's logits
    hf(ids, labels=ids).loss.backward()
    loss = model(ids, labels=ids).loss
    assert model(ids, labels=ids).logits is None  # the fused path ran, not the plain head
    loss.backward()
    compare_with_hf_grads(grads(model), grads(hf), rtol=1e-3, atol=1e-5)


def test_conversion_keeps_the_models_device_on_cuda():
    """from_hf_gpt2 and to_hf_gpt2 built the new model on the CPU whatever the source's device."""
    hf, _ = make_pair()
    ours = GPT2ScratchForCausalLM.from_hf_gpt2(hf)
    back = ours.to_hf_gpt2()
    assert {p.device.type for p in ours.parameters()} == {"cuda"}
    assert {p.device.type for p in back.parameters()} == {"cuda"}
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("chunk_rows", [None, 100])  # None: CUDA's one chunk; 100: six chunks of 2 x 300 rows
def test_fused_loss_on_cuda_matches_the_plain_head(chunk_rows):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = model.to(CUDA).train()
    if chunk_rows:
        model.loss_chunk_elements = chunk_rows * model.config.vocab_size
    ids, labels = random_ids(2, 300), random_ids(2, 300, seed=2)
    labels[0, :50] = -100
    results = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, skip_logits=fused)
        out.loss.backward()
        results[fused] = out.loss.item(), grads(model)
    assert abs(results[True][0] - results[False][0]) <= 1e-5
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_bf16_training_step_matches_float32_eager_on_cuda():
    """The trainer's CUDA settings (bf16 autocast, torch.compile, sdpa's causal path, the fused loss) give the loss
    and gradients of HF's float32 eager step, to bf16 rounding."""
    hf, model = make_pair(seed=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf.train(), model.train()
    ids = random_ids(4, 512, seed=3)
    reference = hf(ids, labels=ids).loss
    reference.backward()
    compiled = torch.compile(model)
    for _ in range(2):  # the second call runs the compiled graph without recompiling
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(ids, labels=ids).loss
        loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference.item()) <= 2e-2
    ours, ref = grads(model), grads(hf)
    for name, grad in ours.items():  # bf16 matmuls: compare the gradients' directions and sizes
        theirs = ref[name].t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else ref[name]
        if name == "transformer.wte.weight":
            grad = grad[:GPT2_VOCAB]
        cosine = F.cosine_similarity(grad.flatten().double(), theirs.flatten().double(), dim=0).item()
        assert cosine >= 0.99, (name, cosine)
        assert grad.norm().item() == pytest.approx(theirs.norm().item(), rel=0.05), name


def test_greedy_generation_matches_hf_on_cuda():
    hf, model = make_pair(seed=2)
    prompt = random_ids(1, 16)
    ref = hf.generate(prompt, max_new_tokens=48, do_sample=False, pad_token_id=50256)
    assert torch.equal(model.generate(prompt, max_new_tokens=48, do_sample=False), ref)

    ids = random_ids(3, 20, seed=4)  # a left-padded batch
    mask = torch.ones_like(ids)
    mask[0, :6], mask[2, :13] = 0, 0
    ids = ids.masked_fill(mask == 0, 50256)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=50256)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False), ref)


def test_static_cache_generation_compiled_by_generate_matches_eager_on_cuda():
    """On CUDA, `generate()` compiles the decoding forward itself when the cache is static."""
    _, model = make_pair(seed=3)
    prompt = random_ids(2, 16, seed=5)
    eager = model.generate(prompt, max_new_tokens=32, do_sample=False)
    for _ in range(2):  # the second call reuses the compiled forward
        static = model.generate(prompt, max_new_tokens=32, do_sample=False, cache_implementation="static")
        assert torch.equal(static, eager)


def test_an_eager_forward_with_default_positions_does_not_wait_for_the_gpu():
    """The context-length check reads default positions from their length: no device sync per eager forward (given
    position ids are data, and are read from the device)."""
    _, model = make_pair()
    ids = random_ids(2, 64)
    with torch.no_grad():
        model(ids)  # lazy initialisation out of the way
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model(ids).logits
        finally:
            torch.cuda.set_sync_debug_mode("default")
        with pytest.raises(ValueError, match="position 600 is outside"):
            model(ids[:, :2], position_ids=torch.tensor([[0, 600]], device=CUDA))
    assert logits.shape == (2, 64, GPT2_VOCAB)


def test_compiled_training_forward_at_a_second_batch_shape_on_cuda():
    """inductor on the GPU, bf16 autocast, a second batch size (dynamo recompiles with dynamic shapes): the fused
    loss compiles and gives eager mode's loss. On torch 2.11 it failed to compile before the chunk plan was computed
    outside `LinearCrossEntropy` (BENCHMARKS.md, the 2026-11-27 lease). `fullgraph`: a graph break around the loss
    (dynamo running it eagerly, where the loss would match regardless) fails too. The reset: dynamo keeps compiled
    code and the shapes it saw per code object, across model instances, so after the earlier tests' compilations the
    first call here would already be a dynamic-shape recompilation (or reuse one); now it is static, the second not."""
    _, model = make_pair(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.train()
    model.loss_chunk_elements = 100 * model.config.vocab_size  # several chunks, their count depending on the shape
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for batch in (2, 4):
        ids = random_ids(batch, 128, seed=batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(ids, labels=ids).loss
            want = model(ids, labels=ids).loss
        loss.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=2e-3, atol=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_loss_weight_gradient_does_not_overflow_in_float16_on_cuda(compiled):
    """fp16 autocast on the GPU (a V100 or T4 fine-tuning pretrained GPT-2), at the trainer's CUDA chunk (one chunk
    of 16,384 rows): a frequent target times an outlier activation summed past 65,504 in the head's weight gradient
    before any loss scaling, and gave `inf` (the CPU test's case in `tests/test_modeling.py`, at GPT-2's width and
    vocabulary). With the columns scaled by powers of two, each column matches a float64 sum of the same fp16
    softmax, eager and compiled."""
    from modeling_gpt2_scratch import modeling_gpt2_scratch as modeling

    torch.manual_seed(0)
    n, width, vocab = 16384, 768, 50304
    hidden = torch.randn(n, width, device=CUDA)
    hidden[:, 0] += 20  # one sign throughout, as an outlier dimension
    hidden.requires_grad_()
    weight = (0.02 * torch.randn(vocab, width, device=CUDA)).requires_grad_()
    targets = torch.full((n,), 3, device=CUDA)  # one frequent token: its row sums n x (p - 1) x ~20, about -3e5
    targets[::7] = 11

    def loss_fn(h, w, t):
        return modeling.LinearCrossEntropy.apply(h, w, t, GPT2_VOCAB, torch.tensor(float(n)), -100, ((0, n),))

    fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
    with torch.autocast("cuda", dtype=torch.float16):
        loss = fn(hidden, weight, targets)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    logits[:, GPT2_VOCAB:] = float("-inf")
    reference = F.cross_entropy(logits, targets)
    reference.backward()
    assert abs(loss.item() - reference.item()) <= 1e-2 * reference.item()
    assert torch.isfinite(weight.grad).all()
    assert (hidden.grad.double() - h64.grad).abs().max().item() <= 1e-2 * h64.grad.abs().max().item()

    def column_errors(ref):  # each column's error over its norm: the outlier's scaling must cost the others nothing
        return ((weight.grad.double() - ref).norm(dim=0) / ref.norm(dim=0)).max().item()

    assert column_errors(w64.grad) <= 3e-2  # fp16's rounding of the softmax, mostly (about 1% at this size on a CPU)
    # the same softmax rounded to fp16, summed in float64: what the sum itself should give, to cuBLAS's fp16 output
    # and reduced-precision reductions (0.23% on an H100, eager and compiled alike; without the scaling: `inf`)
    with torch.no_grad():
        h16 = hidden.detach().half()
        logits = (h16 @ weight.detach().half().t()).float()
        logits[:, GPT2_VOCAB:] = float("-inf")
        grad = torch.softmax(logits, dim=-1).half().double()
        del logits
        grad[torch.arange(n, device=CUDA), targets] -= 1
        assert column_errors(grad.t() @ h16.double() / n) <= 5e-3


def test_a_training_step_waits_for_the_gpu_once_after_launching_adamw(tmp_path):
    """`train_step` with fused AdamW: the loss and the gradient norm are checked on the GPU (`found_inf`) and read in
    one transfer after AdamW is launched, so the GPU never idles between the backward pass and AdamW while the host
    waits (two reads before AdamW cost the benchmark about 9 ms of a 34 ms step on an H200)."""
    import math
    import warnings

    import train_accelerate
    from modeling_gpt2_scratch.training import TrainArguments, build_optimizer, build_scheduler

    args = TrainArguments(output_dir=str(tmp_path), max_steps=10, warmup_steps=2)
    accelerator = train_accelerate.build_accelerator(args)
    accelerator.gradient_accumulation_steps = 2
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SHAPE))
    optimizer = build_optimizer(model, args, fused=True)
    scheduler = build_scheduler(optimizer, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = random_ids(4, 64).cpu()
    batch = (x, torch.roll(x, -1, dims=1))
    loader = type("OneBatch", (), {"next_batch": lambda self: batch})()
    train_accelerate.train_step(accelerator, model, model, optimizer, scheduler, loader, args, 1)  # lazy state
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.optimizer.register_step_pre_hook(lambda *args: caught.append("AdamW launched"))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            record = train_accelerate.train_step(accelerator, model, model, optimizer, scheduler, loader, args, 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    events = [
        e if isinstance(e, str) else "sync" for e in caught if isinstance(e, str) or "synchronizing" in str(e.message)
    ]
    assert events == ["AdamW launched", "sync"]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["grad_norm"])
