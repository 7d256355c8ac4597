"""Time to loss on CPU: the quickstart preset vs `transformers.Trainer` on the same tokens with the same recipe.

Both train a GPT-2 of the quickstart's size on the quickstart's token shards (tiny Shakespeare) with the same batch,
AdamW settings, warmup + cosine-to-10% schedule, clipping, seed, mixed precision and torch thread count (our
trainer's `cpu_threads`: the cores the process may use, where torch's own default may count physical cores only),
for at most the same wall-clock budget (default 5 minutes, start-up and data preparation excluded for both), then
measure the loss on the same validation batches:

- ours: `train_accelerate.py --config configs/quickstart.yaml` (a subprocess on the CPU, `ACCELERATE_USE_CPU`, with
  its default speed settings), stopped with SIGTERM so that its last step is the first to end past the budget, as
  the Trainer's (`run_within_budget`; it saves a checkpoint, whose model is then evaluated); "train seconds" says
  where it stopped;
- reference: `transformers.Trainer` training a `GPT2LMHeadModel` (sdpa attention) on the CPU, cut off by a callback
  after the first step that ends past the budget.

    python benchmarks/time_to_loss.py --dataset ../shared/data/tinyshakespeare.txt [--budget_minutes 5]
    python benchmarks/time_to_loss.py --same_time   # Trainer gets the seconds ours took: the loss at equal time

Prints a markdown table. Run it on a quiet machine: both runs are timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from cli import positive_float, positive_int, random_seed  # noqa: E402  (on sys.path when run as a script)
from transformers import (  # noqa: E402
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from modeling_gpt2_scratch import GPT2ScratchConfig  # noqa: E402
from modeling_gpt2_scratch.conversion import hf_config_from_scratch  # noqa: E402
from modeling_gpt2_scratch.data import ShardedTokenLoader, prepare_dataset  # noqa: E402
from modeling_gpt2_scratch.training import (  # noqa: E402
    checkpoint_dir,
    cpu_supports_bf16,
    describe_device,
    gradient_accumulation_steps,
    parse_arguments,
    resolve_data_dir,
)
from train_accelerate import cpu_threads  # noqa: E402

PRESET = REPO / "configs" / "quickstart.yaml"


class ShardDataset(torch.utils.data.Dataset):
    """The training loader's batches in order, one sequence per item, as `Trainer` wants them.

    `shift_labels` are the next tokens (as our trainer uses them); `GPT2LMHeadModel`'s loss takes them as they are.
    `Trainer` keeps them only with `remove_unused_columns=False` (`trainer_arguments`): by default it drops the
    batch keys `forward` does not name, and `GPT2LMHeadModel` would shift the already shifted `labels` again.
    """

    def __init__(self, data_dir: Path, batch_size: int, seq_len: int, num_batches: int, batches_per_step: int):
        loader = ShardedTokenLoader(data_dir, "train", batch_size, seq_len, batches_per_step=batches_per_step)
        xs, ys = zip(*(loader.next_batch() for _ in range(num_batches)), strict=True)
        self.x, self.y = torch.cat(xs), torch.cat(ys)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i], "shift_labels": self.y[i]}


class TimeBudget(TrainerCallback):
    """Stops training once the wall-clock budget is spent (checked after every optimizer step).

    `elapsed` is the training loop's time up to the end of the last step, counted as our trainer's `elapsed`: from
    `on_train_begin`, so without the set-up before it (data loader, optimizer, `accelerator.prepare`) or the wrap-up
    after the loop.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None
        self.steps = 0
        self.elapsed = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step
        self.elapsed = time.time() - self.start
        if self.elapsed > self.seconds:
            control.should_training_stop = True


def val_loss(model: torch.nn.Module, data_dir: Path, batch_size: int, seq_len: int, batches: int, bf16: bool):
    """Mean loss over the first `batches` val batches (what the trainer's evaluation uses)."""
    loader = ShardedTokenLoader(data_dir, "val", batch_size, seq_len)
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(batches):
            x, y = loader.next_batch()
            logits = model(x).logits.float()
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    return torch.stack(losses).mean().item()


OURS_ENV = {"ACCELERATE_USE_CPU": "true"}  # the Trainer runs on the CPU (`use_cpu=True`): ours too, on a GPU machine


def run_within_budget(cmd: list[str], env: dict, metrics: Path, seconds: float, poll: float = 0.1) -> int:
    """Run our trainer's `cmd` to its end, or stop it where the Trainer's `TimeBudget` stops: after the first step
    that ends past `seconds`. Its `metrics` (`metrics.jsonl`, a record per step with `--log_every 1`) give each
    step's `elapsed`; once the next step would end past the budget at the last step's pace, it gets SIGTERM, and
    `train_accelerate.py` stops after the step it is in, saving a checkpoint. (A step that runs faster than the last
    one may then end inside the budget: never a step more than the Trainer's rule.) Returns the exit code."""
    # in this process's directory: relative --dataset and --data_dir name what this process prepared and evaluates
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []  # the last may be half written
        if lines:
            elapsed = [json.loads(line)["elapsed"] for line in lines[-2:]]
            pace = elapsed[-1] - elapsed[-2] if len(elapsed) == 2 else elapsed[-1]
            if elapsed[-1] + pace > seconds:
                proc.send_signal(signal.SIGTERM)
                return proc.wait()
        time.sleep(poll)
    return proc.returncode


def run_ours(args, workdir: Path) -> dict:
    out = workdir / "ours"
    cmd = [
        sys.executable, str(REPO / "train_accelerate.py"), "--config", str(PRESET), "--dataset", args.dataset,
        "--data_dir", str(args.data_dir), "--output_dir", str(out), "--sample_every", "0",
        "--eval_every", "0", "--save_every", "0", "--log_every", "1", *args.seed,
    ]  # fmt: skip
    code = run_within_budget(cmd, os.environ | OURS_ENV, out / "metrics.jsonl", args.budget_minutes * 60)
    if code:
        raise SystemExit(f"time_to_loss.py: train_accelerate.py exited with {code}: run {' '.join(cmd)} to see why")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])  # the last step's record
    from transformers import AutoModelForCausalLM

    # the exported model, or (stopped at the budget) the checkpoint of the last step
    saved = out / "final" if (out / "final").is_dir() else checkpoint_dir(out, last["step"])
    model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    return {
        "steps": last["step"],
        "tokens": last["tokens"],
        "seconds": last["elapsed"],  # the training loop's time, start-up and export excluded
        "val_loss": val_loss(model, args.data_dir, args.micro_batch_size, args.seq_len, args.eval_batches, args.bf16),
    }


def trainer_arguments(train_args, accum: int, bf16: bool, output_dir: Path) -> TrainingArguments:
    """`Trainer`'s settings for our recipe: the same batch, AdamW, clipping, seed and precision; the trainer's
    schedule (`cosine_warmup_with_min_lr`: `get_cosine_with_min_lr_schedule_with_warmup_lr_rate`, as
    `build_scheduler`); the shards' batches in order; and the batch's `shift_labels` passed on to the model."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train_args.micro_batch_size,
        gradient_accumulation_steps=accum,
        max_steps=train_args.max_steps,
        learning_rate=train_args.max_lr,
        lr_scheduler_type="cosine_warmup_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": train_args.min_lr_ratio},
        warmup_steps=train_args.warmup_steps,
        weight_decay=train_args.weight_decay,
        adam_beta1=train_args.beta1,
        adam_beta2=train_args.beta2,
        adam_epsilon=train_args.eps,
        max_grad_norm=train_args.grad_clip,
        seed=train_args.seed,
        bf16=bf16,
        use_cpu=True,
        dataloader_drop_last=True,
        train_sampling_strategy="sequential",  # the shards' order, as our loader reads them
        remove_unused_columns=False,  # keep `shift_labels`: GPT2LMHeadModel.forward takes it through **kwargs
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def run_trainer(args, workdir: Path) -> dict:
    model_args, _, train_args = parse_arguments(["--config", str(PRESET), "--dataset", args.dataset, *args.seed])
    accum = gradient_accumulation_steps(train_args, 1)
    torch.set_num_threads(cpu_threads(train_args, num_processes=1))  # ours' count: torch's default may be fewer
    torch.manual_seed(train_args.seed)
    scratch = GPT2ScratchConfig(  # the quickstart's architecture, then its HF GPT-2 twin (unpadded vocabulary)
        n_layer=model_args.n_layer, n_head=model_args.n_head, n_embd=model_args.n_embd,
        n_positions=model_args.n_positions,
    )  # fmt: skip
    config = hf_config_from_scratch(scratch)
    model = GPT2LMHeadModel(config)
    dataset = ShardDataset(
        args.data_dir, train_args.micro_batch_size, train_args.seq_len, train_args.max_steps * accum, accum
    )
    budget = TimeBudget(args.budget_minutes * 60)
    trainer = Trainer(
        model=model,
        args=trainer_arguments(train_args, accum, args.bf16, workdir / "trainer"),
        train_dataset=dataset,
        callbacks=[budget],
    )
    trainer.train()
    return {
        "steps": budget.steps,
        "tokens": budget.steps * train_args.total_batch_tokens,
        "seconds": budget.elapsed,  # the training loop's time, as ours
        "val_loss": val_loss(model, args.data_dir, args.micro_batch_size, args.seq_len, args.eval_batches, args.bf16),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--dataset", default="../shared/data/tinyshakespeare.txt", help="Text for the quickstart.")
    parser.add_argument("--budget_minutes", type=positive_float, default=5.0, help="Wall-clock budget of each run.")
    parser.add_argument(
        "--eval_batches", type=positive_int, default=16, help="Val batches to compare on (at most the split's)."
    )
    parser.add_argument("--seed", type=random_seed, default=None, help="Both runs' seed (default: the preset's).")
    parser.add_argument(
        "--same_time",
        action="store_true",
        help="Give Trainer the training seconds ours took instead of --budget_minutes: which loss each reaches in "
        "the same time (Trainer stops after the first optimizer step past it).",
    )
    args = parser.parse_args(argv)
    args.seed = [] if args.seed is None else ["--seed", str(args.seed)]  # passed to both runs
    try:  # a bad --dataset or --seed: the library's message on one line
        _, data_args, train_args = parse_arguments(["--config", str(PRESET), "--dataset", args.dataset, *args.seed])
        args.data_dir = resolve_data_dir(data_args, train_args)
        prepare_dataset(data_args, output_dir=args.data_dir)
        args.micro_batch_size, args.seq_len = train_args.micro_batch_size, train_args.seq_len
        val = ShardedTokenLoader(args.data_dir, "val", args.micro_batch_size, args.seq_len)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"time_to_loss.py: {err}") from None
    args.eval_batches = min(args.eval_batches, val.batches_per_epoch)  # one pass at most, as the trainer's evaluate
    args.bf16 = train_args.mixed_precision == "bf16" or (train_args.mixed_precision == "auto" and cpu_supports_bf16())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(args, Path(tmp))
        if args.same_time:
            args.budget_minutes = ours["seconds"] / 60
        theirs = run_trainer(args, Path(tmp))
    budget = f"{args.budget_minutes:g}-minute budget"
    if args.same_time:
        budget = f"{args.budget_minutes * 60:.0f}-second budget (ours's time)"
    print(
        f"\n## Time to loss: {describe_device(torch.device('cpu'))}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {time.strftime('%Y-%m-%d')}\n"
    )
    print(f"Command: `python {' '.join(['benchmarks/time_to_loss.py', *(argv or sys.argv[1:])])}`\n")
    print(f"quickstart preset, seed {train_args.seed}, {budget}, bf16={args.bf16}; val loss on {args.eval_batches} x "
          f"{args.micro_batch_size} x {args.seq_len} val tokens\n")  # fmt: skip
    print("| run | optimizer steps | tokens | train seconds | tokens/s | val loss | val perplexity |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in (
        ("ours: train_accelerate.py (quickstart)", ours),
        ("transformers.Trainer + GPT2LMHeadModel", theirs),
    ):
        print(
            f"| {name} | {r['steps']} | {r['tokens']:,} | {r['seconds']:.0f} | {r['tokens'] / r['seconds']:,.0f} "
            f"| {r['val_loss']:.4f} | {math.exp(r['val_loss']):.1f} |"
        )


if __name__ == "__main__":
    main()
