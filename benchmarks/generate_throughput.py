"""Greedy generation throughput (new tokens/s): the scratch GPT-2 vs Hugging Face `GPT2LMHeadModel`, same weights.

    python benchmarks/generate_throughput.py                       # 124M, batch 1 and 8, 64-token prompt, 128 new
    python benchmarks/generate_throughput.py --modes eager --repeats 5

Both models come from one random HF GPT-2 (sdpa; `GPT2ScratchForCausalLM.from_hf_gpt2`, so the weights are
identical), in eval mode, fp32. Each call is `model.generate(prompt, attention_mask=ones, do_sample=False,
max_new_tokens=N, min_new_tokens=N)` on random prompt ids; new tokens/s = batch x N / wall time of the whole call
(prefill included). Modes:

- `eager`: `generate()`'s default, a `DynamicCache`, no compilation.
- `static-compile`: `cache_implementation="static"` and `generate()`'s own compilation of the decoding forward
  (`CompileConfig`; on CPU `mode="default"` and `_compile_all_devices=True`, which `generate()` needs to compile off
  CUDA; on CUDA its default `reduce-overhead`). Compilation happens in the warm-up call.

On a CPU the scratch model's `generate()` keeps its keys and values in a `GrowingCache` (written in place, where
`DynamicCache` concatenates every step) and decodes with MKL-packed weights (`packed_decoding`, from 4 rows up). In
`eager` mode more rows change one thing each: `scratch, DynamicCache` passes `cache=DynamicCache(...)` (on a GPU,
where `DynamicCache` is the default, `scratch, GrowingCache` passes a `GrowingCache`), and on a CPU with MKL
`scratch, F.linear` sets `pack_decoding_weights = False`.

For every batch size and mode the models run interleaved (one call each per round, after one warm-up call each; each
model goes first in turn), and the median is reported; every call's generated ids are checked against HF's. Prints
a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig, DynamicCache, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import positive_int, random_seed, torch_device  # noqa: E402  (on sys.path when run as a script)

from modeling_gpt2_scratch import GPT2ScratchForCausalLM  # noqa: E402
from modeling_gpt2_scratch.modeling_gpt2_scratch import GrowingCache, mkl_packing_available  # noqa: E402
from modeling_gpt2_scratch.training import describe_device  # noqa: E402

MODES = ("eager", "static-compile")
HF = "HF GPT2LMHeadModel"
CONTEXT = GPT2Config().n_positions  # 1024: prompt + new tokens must fit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--batch_sizes", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=positive_int, default=64)
    parser.add_argument("--new_tokens", type=positive_int, default=128)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed calls per model (the median is reported)"
    )
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=random_seed, default=0)
    args = parser.parse_args(argv)
    if args.prompt_len + args.new_tokens > CONTEXT:
        parser.error(
            f"--prompt_len {args.prompt_len} + --new_tokens {args.new_tokens} is longer than GPT-2's context, "
            f"{CONTEXT} tokens: lower one of them"
        )
    return args


def build_models(device: torch.device, seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel._from_config(GPT2Config(), attn_implementation="sdpa").eval()
    ours = GPT2ScratchForCausalLM.from_hf_gpt2(hf).eval()
    ours.set_attn_implementation("sdpa")
    return {HF: hf.to(device), "scratch": ours.to(device)}


def variants(models: dict[str, torch.nn.Module], mode: str, device: torch.device) -> dict[str, tuple]:
    """`{row name: (model, pack_decoding_weights or None, extra generate() kwargs or None)}`: HF and the scratch
    model as they come; in eager mode the scratch model with the other cache (`DynamicCache` on a CPU, where it
    makes a `GrowingCache`; the reverse elsewhere) and, on a CPU with MKL, decoding with `F.linear`."""
    scratch = models["scratch"]
    rows = {HF: (models[HF], None, None), "scratch": (scratch, True, None)}
    if mode == "eager":  # the cache the model does not make by default on this device
        if GrowingCache.is_default_on(device):
            rows["scratch, DynamicCache"] = (scratch, True, lambda: {"cache": DynamicCache(config=scratch.config)})
        else:
            rows["scratch, GrowingCache"] = (scratch, True, lambda: {"cache": GrowingCache(scratch.config)})
        if device.type == "cpu" and mkl_packing_available():
            rows["scratch, F.linear"] = (scratch, False, None)
    return rows


def generate_kwargs(mode: str, device: torch.device, new_tokens: int) -> dict:
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if mode == "static-compile":
        compile_config = CompileConfig(mode="default") if device.type != "cuda" else CompileConfig()
        if device.type != "cuda":
            compile_config._compile_all_devices = True  # generate() only compiles on CUDA-like devices otherwise
        kwargs |= dict(cache_implementation="static", compile_config=compile_config)
    return kwargs


def timed_generate(
    model, pack: bool | None, extra: Callable[[], dict] | None, prompt: torch.Tensor, kwargs: dict, device
) -> tuple[float, torch.Tensor]:
    if pack is not None:
        model.pack_decoding_weights = pack
    kwargs = kwargs | (extra() if extra is not None else {})  # a fresh cache for every call
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    models = build_models(device, args.seed)
    rows = []
    for mode in args.modes:
        kwargs = generate_kwargs(mode, device, args.new_tokens)
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(args.seed + batch)
            prompt = torch.randint(0, 50257, (batch, args.prompt_len), generator=gen).to(device)
            runs = variants(models, mode, device)
            times: dict[str, list[float]] = {name: [] for name in runs}
            outputs, warmups, errors = {}, {}, {}
            for name, (model, pack, extra) in runs.items():  # warm-up (compilation for static-compile)
                try:
                    warmups[name], outputs[name] = timed_generate(model, pack, extra, prompt, kwargs, device)
                except Exception as err:  # noqa: BLE001 - report why a mode does not work instead of stopping
                    errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            names = [name for name in runs if name not in errors]
            # any call's ids unlike HF's warm-up call's, the warm-up calls' own included
            differs = {name: HF in outputs and not torch.equal(outputs[HF], outputs[name]) for name in names}
            for round_ in range(args.repeats if names else 0):  # none left: the mode's rows say why each failed
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # each goes first in turn
                    seconds, out = timed_generate(*runs[name], prompt, kwargs, device)
                    times[name].append(seconds)
                    differs[name] |= HF in outputs and not torch.equal(outputs[HF], out)
            medians = {name: statistics.median(t) for name, t in times.items() if t}
            for name in runs:
                if name in errors:
                    rows.append((mode, batch, name, None, None, None, None, errors[name]))
                    continue
                same = "-" if HF not in outputs else ("no" if differs[name] else "yes")
                tok_s = batch * args.new_tokens / medians[name]
                ratio = medians[HF] / medians[name] if HF in medians else float("nan")
                rows.append((mode, batch, name, medians[name], tok_s, ratio, warmups[name], same))

    print(
        f"\n## Generation throughput: {describe_device(device)}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {time.strftime('%Y-%m-%d')}\n"
    )
    print(f"Command: `python {' '.join(['benchmarks/generate_throughput.py', *(argv or sys.argv[1:])])}`\n")
    print(
        f"GPT-2 124M (random weights, identical in both), fp32, greedy, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens; median of {args.repeats} interleaved calls after 1 warm-up call per row.\n"
    )
    print("| mode | batch | model | s / call | new tokens/s | vs HF | warm-up call s | same ids as HF |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for mode, batch, name, seconds, tok_s, ratio, warm, same in rows:
        if seconds is None:
            print(f"| {mode} | {batch} | {name} | - | - | - | - | failed: {same} |")
        else:
            print(f"| {mode} | {batch} | {name} | {seconds:.2f} | {tok_s:,.1f} | {ratio:.2f}x | {warm:.1f} | {same} |")


if __name__ == "__main__":
    main()
