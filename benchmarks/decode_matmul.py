"""Decoding's matmuls at a few rows: which way of writing `x @ W.T` this machine's BLAS runs fastest.

    python benchmarks/decode_matmul.py                          # 124M's shapes, rows 1 2 4 8 16 32 64
    python benchmarks/decode_matmul.py --rows 1 8 --repeats 10

A decoding step of GPT-2 multiplies a few rows (the batch) by every weight matrix. The cost is streaming the
weights, and which BLAS kernel runs depends on how the product is written, so it differs between ways that compute
the same numbers:

- `F.linear`: `F.linear(x, W, b)` with `W` stored `(out, in)`, as `nn.Linear` (the scratch model, and both models'
  LM head) does it;
- `W @ x.T`: `(W @ x.T).T + b`, the same product with the weight on the left;
- `Conv1D`: `addmm(b, x, W_in_out)` with a transposed copy of the weight stored `(in, out)`, as GPT-2's `Conv1D`
  (Hugging Face's blocks) does it;
- `MKL packed` (where torch has MKL): MKL's packed GEMM with the weight packed for that row count, as the scratch
  model's `generate()` decodes from 4 rows up (`packed_decoding`); packing is done before the timing.

Two groups of weights, fp32, random: the 48 block matrices of 124M (`c_attn`, `attn.c_proj`, `c_fc`, `mlp.c_proj`
x 12 layers; 340 MB, so they stream from memory as in decoding), and the tied LM head `(50304, 768)`. Each cell is
the fastest of `--repeats` passes over the group, in ms, after one warm-up pass; the ways run interleaved. Checks,
on each group's first matrix at each row count, that the ways agree to float32 rounding. BENCHMARKS.md (machine B,
generation) holds a run and what it means for the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import positive_int  # noqa: E402  (this folder is on sys.path when run as a script)

from modeling_gpt2_scratch.modeling_gpt2_scratch import mkl_packing_available  # noqa: E402
from modeling_gpt2_scratch.training import describe_device  # noqa: E402

# each way: (x, W, W (in, out), b, W packed by MKL for x's rows) -> x @ W.T + b
WAYS = {
    "F.linear": lambda x, w, w_in_out, b, packed: F.linear(x, w, b),
    "W @ x.T": lambda x, w, w_in_out, b, packed: torch.mm(w, x.t()).t() + b,
    "Conv1D": lambda x, w, w_in_out, b, packed: torch.addmm(b, x, w_in_out),
}
if mkl_packing_available():
    WAYS["MKL packed"] = lambda x, w, w_in_out, b, packed: torch.ops.mkl._mkl_linear(x, packed, w, b, x.shape[0])


def pack(w: torch.Tensor, rows: int) -> torch.Tensor | None:
    return torch.ops.mkl._mkl_reorder_linear_weight(w, rows) if mkl_packing_available() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed passes per cell (the fastest counts)")
    parser.add_argument("--n_layer", type=positive_int, default=12)
    parser.add_argument("--n_embd", type=positive_int, default=768)
    parser.add_argument("--vocab_size", type=positive_int, default=50304)
    return parser.parse_args(argv)


def weight_groups(n_layer: int, n_embd: int, vocab_size: int) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """`{group: [(W (out, in), W (in, out) contiguous, bias), ...]}`."""
    C = n_embd
    blocks = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * n_layer

    def entry(out_features: int, in_features: int, bias: bool = True) -> tuple[torch.Tensor, ...]:
        w = torch.randn(out_features, in_features) * 0.02
        b = torch.randn(out_features) * 0.02 if bias else torch.zeros(out_features)
        return w, w.t().contiguous(), b

    return {
        f"{len(blocks)} block matrices": [entry(o, i) for o, i in blocks],
        f"LM head ({vocab_size}, {C})": [entry(vocab_size, C, bias=False)],
    }


def check_agreement(group: list[tuple[torch.Tensor, ...]], rows: int) -> None:
    w, w_in_out, b = group[0]
    x = torch.randn(rows, w.shape[1])
    reference = F.linear(x, w, b)
    for name, way in WAYS.items():
        torch.testing.assert_close(way(x, w, w_in_out, b, pack(w, rows)), reference, rtol=1e-4, atol=1e-5, msg=name)


def time_cells(group: list[tuple[torch.Tensor, ...]], rows: int, repeats: int) -> dict[str, float]:
    """Fastest pass over the whole group per way, in ms (the ways interleaved, one pass each per round)."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w, _, _ in group}
    packs = [pack(w, rows) for w, _, _ in group]
    best = dict.fromkeys(WAYS, float("inf"))
    for round_idx in range(repeats + 1):
        for name, way in WAYS.items():
            start = time.perf_counter()
            for (w, w_in_out, b), packed in zip(group, packs, strict=True):
                way(inputs[w.shape[1]], w, w_in_out, b, packed)
            if round_idx:  # round 0 warms up
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    groups = weight_groups(args.n_layer, args.n_embd, args.vocab_size)
    print(
        f"## Decoding matmuls: {describe_device(torch.device('cpu'))}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    command = " ".join(["python benchmarks/decode_matmul.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: `{command}`\n")
    print(
        "Fastest pass over the group, ms; in brackets, F.linear's time over the way's (> 1: faster than F.linear).\n"
    )
    print("| weights | rows | " + " | ".join(WAYS) + " |")
    print("|---|---:|" + "---:|" * len(WAYS))
    for group_name, group in groups.items():
        for rows in args.rows:
            check_agreement(group, rows)
            cells = time_cells(group, rows, args.repeats)
            linear = cells["F.linear"]
            shown = [
                f"{ms:.2f}" if name == "F.linear" else f"{ms:.2f} ({linear / ms:.2f}x)" for name, ms in cells.items()
            ]
            print(f"| {group_name} | {rows} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main()
