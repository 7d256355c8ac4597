"""The parts of a CPU training step besides the matmuls that the scratch model and trainer do their own way.

    python benchmarks/step_overheads.py                 # 124M's shapes, 1,024 tokens (4 x 256)
    python benchmarks/step_overheads.py --repeats 21

Each part is timed both ways, interleaved, on tensors of the model's shapes (random values), in steady state (the
trainer's glibc malloc tuning on, one untimed call first); each cell is the median of `--repeats` calls, in ms:

- `tied embedding gradient`: torch's way, the lookup's dense `vocab x n_embd` gradient (`embedding_dense_backward`)
  added to the LM head's, against `TiedEmbedding`'s: the looked-up rows added to the head's gradient in place
  (`index_add_`).
- `gradient norm`: torch's CPU way, one `linalg.vector_norm` per gradient (what `clip_grad_norm_` takes on a CPU),
  against `gradient_norm` (the norms of each gradient's rows, then of those). The error column is each one's
  relative distance to the float64 norm.
- `clip below the limit` / `clip above the limit`: `accelerator.clip_grad_norm_` against the trainer's
  `clip_gradients`, with `max_norm` above and below the gradients' norm (the gradients are put back, untimed,
  before each call).
- `tanh-GELU, compiled, forward + backward`: only for `torch.compile`d runs (the trainer's CPU default is eager).
  `F.gelu(x, approximate="tanh")` compiled, against the MLP's own activation compiled (its `x * sigmoid(2u)` form;
  the `MLP` module with its two linears taken out), on `tokens x 4 n_embd` activations, four of them in turn (a
  step's come from memory, not the cache).

Checks that both ways of each part give the same result: to float32 rounding, but for torch's clipping, which
is off by its norm's error. BENCHMARKS.md (machine B, "Training:
the tied embedding's gradient and the clipping") holds a run and what it means for a step.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import positive_int  # noqa: E402  (this folder is on sys.path when run as a script)

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM  # noqa: E402
from modeling_gpt2_scratch.modeling_gpt2_scratch import MLP  # noqa: E402
from modeling_gpt2_scratch.training import describe_device, gradient_norm, tune_cpu_malloc  # noqa: E402
from train_accelerate import clip_gradients  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--tokens", type=positive_int, default=1024, help="tokens per step (looked-up rows)")
    parser.add_argument("--repeats", type=positive_int, default=11, help="timed calls per cell (the median counts)")
    parser.add_argument("--n_layer", type=positive_int, default=12)
    parser.add_argument("--n_embd", type=positive_int, default=768)
    parser.add_argument("--vocab_size", type=positive_int, default=50304)
    return parser.parse_args(argv)


Way = tuple[Callable[[], object] | None, Callable[[], object]]  # (untimed setup or None, the timed call)


def median_ms(ways: dict[str, Way], repeats: int) -> dict[str, float]:
    """Each way's median time in ms over `repeats` calls, interleaved, each after its untimed setup (one untimed
    call of each first)."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_idx in range(repeats + 1):
        for name, (setup, call) in ways.items():
            if setup is not None:
                setup()
            start = time.perf_counter()
            call()
            if round_idx:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def tied_embedding_gradient(args, generator: torch.Generator) -> tuple[float, float]:
    """Torch's and `TiedEmbedding`'s way of adding the lookup's gradient to the head's: ms each."""
    head = torch.randn(args.vocab_size, args.n_embd, generator=generator)
    rows = torch.randn(args.tokens, args.n_embd, generator=generator)
    ids = torch.randint(0, args.vocab_size, (args.tokens,), generator=generator)
    grads = {"torch": head.clone(), "ours": head.clone()}

    def fresh(name: str) -> Callable[[], None]:  # each step has a new head gradient
        return lambda: grads[name].copy_(head)

    def dense() -> None:  # what autograd does for an `nn.Embedding` tied to the head
        grads["torch"].add_(torch.ops.aten.embedding_dense_backward(rows, ids, args.vocab_size, -1, False))

    def in_place() -> None:  # what `TiedEmbedding.backward` does
        grads["ours"].index_add_(0, ids, rows)

    times = median_ms({"torch": (fresh("torch"), dense), "ours": (fresh("ours"), in_place)}, args.repeats)
    torch.testing.assert_close(grads["ours"], grads["torch"], rtol=1e-6, atol=1e-6)
    return times["torch"], times["ours"]


def compiled_gelu(args, config: GPT2ScratchConfig, generator: torch.Generator) -> tuple[float, float]:
    """Forward and backward of tanh-GELU under torch.compile, `F.gelu`'s form and the MLP's: ms each."""
    inputs = [torch.randn(args.tokens, 4 * args.n_embd, generator=generator) * 3 for _ in range(4)]
    grad = torch.randn(args.tokens, 4 * args.n_embd, generator=generator)
    activation = MLP(config)
    activation.c_fc = activation.c_proj = activation.dropout = torch.nn.Identity()  # the MLP's activation alone
    functions = {
        "torch": torch.compile(lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
        "ours": torch.compile(activation),
    }
    turns = {name: itertools.cycle(inputs) for name in functions}
    current, results = {}, {}  # each way's input this call, and its last output and input gradient

    def forward_backward(name: str) -> Callable[[], None]:
        def call() -> None:
            x = current[name].requires_grad_()
            y = functions[name](x)
            y.backward(grad)
            results[name] = (y.detach(), x.grad)

        return call

    ways = {
        name: (lambda n=name: current.update({n: next(turns[n]).detach()}), forward_backward(name))
        for name in functions
    }
    times = median_ms(ways, args.repeats)
    (y_torch, dx_torch), (y_ours, dx_ours) = results["torch"], results["ours"]
    torch.testing.assert_close(y_ours, y_torch, rtol=1e-5, atol=2e-6)  # float32 rounding apart
    torch.testing.assert_close(dx_ours, dx_torch, rtol=1e-5, atol=2e-5)
    return times["torch"], times["ours"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from accelerate import Accelerator

    tune_cpu_malloc()
    generator = torch.Generator().manual_seed(0)
    config = GPT2ScratchConfig(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=1,
        vocab_size=args.vocab_size,
        tokenizer_vocab_size=min(50257, args.vocab_size),
    )
    model = GPT2ScratchForCausalLM(config)
    grads = [torch.randn(p.shape, generator=generator) * 1e-4 for p in model.parameters()]
    for param, grad in zip(model.parameters(), grads, strict=True):
        param.grad = grad.clone()
    exact = sum(g.double().square().sum().item() for g in grads) ** 0.5
    accelerator = Accelerator(cpu=True)

    rows = []
    emb_torch, emb_ours = tied_embedding_gradient(args, generator)
    rows.append(("tied embedding gradient", emb_torch, emb_ours, ""))

    norms = {}

    def torch_norm() -> None:
        norms["torch"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def our_norm() -> None:
        norms["ours"] = gradient_norm(grads)

    times = median_ms({"torch": (None, torch_norm), "ours": (None, our_norm)}, args.repeats)
    errors = {name: abs(norm.item() - exact) / exact for name, norm in norms.items()}
    assert errors["ours"] < 1e-5, f"gradient_norm is {errors['ours']:.1e} off the float64 norm"
    rows.append(("gradient norm", times["torch"], times["ours"], f"{errors['torch']:.1e} / {errors['ours']:.1e}"))

    def restore() -> None:
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad.copy_(grad)

    def torch_clip(max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm), model.lm_head.weight.grad

    def our_clip(max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        return clip_gradients(accelerator, model, max_norm), model.lm_head.weight.grad

    for label, max_norm in (("below", exact * 2), ("above", exact / 2)):
        coefficient = min(1.0, max_norm / (exact + 1e-6))  # torch's, from the float64 norm
        expected = grads[0] * coefficient  # the token embedding's (= LM head's) gradient, clipped
        restore()
        _, clipped = torch_clip(max_norm)  # off by torch's norm error (the error column above)
        torch.testing.assert_close(clipped, expected, rtol=2 * errors["torch"] + 1e-5, atol=1e-12)
        restore()
        norm, clipped = our_clip(max_norm)
        assert abs(norm.item() - exact) <= 1e-5 * exact
        torch.testing.assert_close(clipped, expected, rtol=1e-5, atol=1e-12)
        ways = {
            "torch": (restore, lambda m=max_norm: torch_clip(m)),
            "ours": (restore, lambda m=max_norm: our_clip(m)),
        }
        times = median_ms(ways, args.repeats)
        rows.append((f"clip {label} the limit", times["torch"], times["ours"], ""))

    gelu_torch, gelu_ours = compiled_gelu(args, config, generator)
    rows.append(("tanh-GELU, compiled, forward + backward", gelu_torch, gelu_ours, ""))

    print(
        f"\n## Step overheads: {describe_device(torch.device('cpu'))}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(f"Command: `python benchmarks/step_overheads.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(
        f"\n{args.n_layer} layers, {args.n_embd} wide, vocabulary {args.vocab_size}, {args.tokens} tokens; "
        f"median of {args.repeats} interleaved calls, ms\n"
    )
    print("| part | torch / accelerate | ours | speed-up | relative error (torch / ours) |")
    print("|---|---:|---:|---:|---|")
    for part, torch_ms, ours_ms, note in rows:
        print(f"| {part} | {torch_ms:.2f} | {ours_ms:.2f} | {torch_ms / max(ours_ms, 1e-3):.1f}x | {note} |")


if __name__ == "__main__":
    main()
