"""Forward + backward seconds per step: the scratch GPT-2 vs Hugging Face `GPT2LMHeadModel` (sdpa), same weights.

    python benchmarks/forward_backward.py            # 124M, batch 4 x 256, fp32 eager, on CPU
    python benchmarks/forward_backward.py --device cuda --batch_size 16 --seq_len 1024

Both models are built from one random HF GPT-2 (`GPT2ScratchForCausalLM.from_hf_gpt2`, so the weights are identical),
in training mode with dropout 0 and `labels=input_ids`. One step is `model(input_ids, labels=input_ids).loss`
then `.backward()` (gradients zeroed outside the timed region). The scratch model's training-mode forward computes
the loss with its fused chunked LM head + cross-entropy (no logits); the row "scratch, plain head" forces the
logits path (`skip_logits=False`) to show what that is worth. The variants run interleaved (one step of each per
round), so a shared machine's load hits them alike; each time is the median over `--steps` rounds after `--warmup`
rounds. The first step of each model also checks that the two losses agree. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import non_negative_int, positive_int, random_seed, torch_device  # noqa: E402  (on sys.path as a script)

from modeling_gpt2_scratch import GPT2ScratchForCausalLM  # noqa: E402
from modeling_gpt2_scratch.training import describe_device  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=positive_int, default=4, help="sequences per step (B)")
    parser.add_argument("--seq_len", type=positive_int, default=256, help="tokens per sequence (T)")
    parser.add_argument("--n_layer", type=positive_int, default=12, help="model size (default: GPT-2 124M)")
    parser.add_argument("--n_head", type=positive_int, default=12)
    parser.add_argument("--n_embd", type=positive_int, default=768)
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds first")
    parser.add_argument("--steps", type=positive_int, default=7, help="timed rounds (the median is reported)")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_plain_head", action="store_true", help="skip the scratch plain-head row")
    parser.add_argument("--seed", type=random_seed, default=0)
    args = parser.parse_args(argv)
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} is not a multiple of --n_head {args.n_head}: heads split it evenly")
    return args


def build_models(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(args.seed)
    hf_config = GPT2Config(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        n_positions=max(1024, args.seq_len),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    ours = GPT2ScratchForCausalLM.from_hf_gpt2(hf)
    ours.set_attn_implementation("sdpa")
    return {"hf": hf.to(device).train(), "ours": ours.to(device).train()}


def step_fn(model: torch.nn.Module, ids: torch.Tensor, **kwargs):
    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss
        loss.backward()
        return loss.item()

    return step


def timed(fn, device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    transformers.logging.set_verbosity_error()
    models = build_models(args, device)
    ids = torch.randint(0, 50257, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    variants = {
        "HF GPT2LMHeadModel (sdpa)": (models["hf"], step_fn(models["hf"], ids)),
        "scratch (fused chunked loss)": (models["ours"], step_fn(models["ours"], ids)),
    }
    if not args.no_plain_head:
        variants["scratch, plain head (skip_logits=False)"] = (
            models["ours"],
            step_fn(models["ours"], ids, skip_logits=False),
        )

    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    for round_idx in range(args.warmup + args.steps):
        for name, (model, fn) in variants.items():
            model.zero_grad(set_to_none=True)
            seconds, loss = timed(fn, device)
            losses.setdefault(name, loss)
            if round_idx >= args.warmup:
                times[name].append(seconds)
    reference = losses["HF GPT2LMHeadModel (sdpa)"]
    for name, loss in losses.items():
        if abs(loss - reference) > 1e-3 * max(1.0, abs(reference)):
            raise SystemExit(f"loss mismatch: {name} {loss} vs HF {reference}")

    tokens = args.batch_size * args.seq_len
    hf_median = statistics.median(times["HF GPT2LMHeadModel (sdpa)"])
    n_params = sum(p.numel() for p in models["hf"].parameters())
    print(
        f"\n## Forward + backward: {describe_device(device)}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {time.strftime('%Y-%m-%d')}\n"
    )
    command = " ".join(["python benchmarks/forward_backward.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: `{command}`\n")
    print(
        f"fp32 eager, {n_params / 1e6:.0f}M parameters (HF count), batch {args.batch_size} x {args.seq_len}, "
        f"{device.type}; median of {args.steps} interleaved rounds after {args.warmup} warm-up; "
        f"first-step losses agree (HF {reference:.5f})\n"
    )
    print("| model | s / step (median) | min | max | tokens/s | throughput vs HF |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {tokens / median:,.0f} | "
            f"{hf_median / median:.2f}x |"
        )


if __name__ == "__main__":
    main()
