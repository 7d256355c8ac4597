"""What the trainer's glibc malloc tuning (`--malloc_tuning`, on by default on CPU) does to a CPU training step.

    python benchmarks/malloc_tuning.py                          # quickstart 16x256 and 124M 4x256, 3 processes each
    python benchmarks/malloc_tuning.py --runs quickstart:16x256 --repeats 5

Each measurement is a fresh process (malloc settings and the heap they leave are process-wide, so the two settings
cannot share one), alternating `default` and `tuned`: the scratch model at the given shape, the trainer's optimizer
(`build_optimizer` without the fused kernel: torch's default AdamW, on a CPU the for-loop one; the trainer's CPU
default when the BENCHMARKS.md table was made), fp32, eager; forward with the loss, backward, clip, AdamW step,
`zero_grad`. A process runs `--warmup` steps, then `--steps` timed ones, and reports its median seconds per step
and, per step, the kernel (system) CPU seconds and minor page faults (`getrusage`), and its peak RSS. The table
gives the median over the processes of each setting. `default` is glibc as a process starts; `tuned` calls
`tune_cpu_malloc()` first, as `train_accelerate.py` does on CPU. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from cli import non_negative_int, positive_int  # noqa: E402  (this folder is on sys.path when run as a script)
from train_throughput import parse_run  # noqa: E402  (this folder is on sys.path when run as a script)

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM  # noqa: E402
from modeling_gpt2_scratch.training import (  # noqa: E402
    TrainArguments,
    build_optimizer,
    describe_device,
    proc_status_mib,
    tune_cpu_malloc,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--runs", nargs="+", default=["quickstart:16x256", "124m:4x256"], help="MODEL:BxT shapes")
    parser.add_argument("--repeats", type=positive_int, default=3, help="fresh processes per setting and shape")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("RUN", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for spec in args.runs:
        try:
            parse_run(spec)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    return args


def child(run: str, setting: str, warmup: int, steps: int) -> dict:
    """One process: `warmup` + `steps` training steps under `setting`; its per-step numbers."""
    if setting == "tuned" and not tune_cpu_malloc():
        raise SystemExit("this C library has no mallopt (not glibc)")
    shape = parse_run(run)
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**shape.model)).train()
    train_args = TrainArguments(output_dir="unused")
    optimizer = build_optimizer(model, train_args, fused=False)
    generator = torch.Generator().manual_seed(1)
    times, sys_s, faults = [], [], []
    for i in range(warmup + steps):
        seq = torch.randint(0, 50257, (shape.batch_size, shape.seq_len + 1), generator=generator)
        x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        model(input_ids=x, shift_labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        if i >= warmup:
            times.append(elapsed)
            sys_s.append(after.ru_stime - before.ru_stime)
            faults.append(after.ru_minflt - before.ru_minflt)
    return {
        "s_per_step": statistics.median(times),
        "sys_per_step": statistics.mean(sys_s),
        "faults_per_step": statistics.mean(faults),
        "peak_rss_mib": proc_status_mib("VmHWM"),  # its own: ru_maxrss carries the parent's peak over the exec
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.warmup, args.steps)))
        return
    results: dict[tuple[str, str], list[dict]] = {}
    for run in args.runs:
        for _ in range(args.repeats):
            for setting in ("default", "tuned"):
                cmd = [sys.executable, __file__, "--child", run, setting]
                cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
                result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
                if result.returncode:  # its stderr is captured: say why here, on one line
                    why = (result.stderr.strip().splitlines() or ["no message (killed: out of memory?)"])[-1]
                    raise SystemExit(
                        f"malloc_tuning.py: the {setting} run of {run} exited with {result.returncode}: {why}"
                    )
                results.setdefault((run, setting), []).append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(
        f"\n## glibc malloc tuning: {describe_device(torch.device('cpu'))}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(f"Command: `python {' '.join(['benchmarks/malloc_tuning.py', *(argv or sys.argv[1:])])}`\n")
    print(
        f"Scratch model, fp32, eager; median over {args.repeats} fresh processes per setting, each the median of "
        f"{args.steps} steps after {args.warmup} warm-up steps.\n"
    )
    print("| shape | malloc | s/step | speed-up | kernel CPU s/step | minor page faults/step | peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run in args.runs:
        base = statistics.median(r["s_per_step"] for r in results[(run, "default")])
        for setting in ("default", "tuned"):
            rows = results[(run, setting)]
            s = statistics.median(r["s_per_step"] for r in rows)
            print(
                f"| {run} | {setting} | {s:.3f} | {base / s:.2f}x "
                f"| {statistics.median(r['sys_per_step'] for r in rows):.3f} "
                f"| {statistics.median(r['faults_per_step'] for r in rows):,.0f} "
                f"| {statistics.median(r['peak_rss_mib'] for r in rows):,.0f} |"
            )


if __name__ == "__main__":
    main()
