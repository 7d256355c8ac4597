"""The benchmarks: training throughput compares like with like (variants name what they run and agree on the loss),
generation rows give HF's ids, and a bad number on any script's command line is a one-line usage error."""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import train_throughput  # noqa: E402

from modeling_gpt2_scratch.modeling_gpt2_scratch import mkl_packing_available  # noqa: E402
from modeling_gpt2_scratch.training import TrainArguments  # noqa: E402


def assert_names_its_run(out: str, command: str) -> None:
    """BENCHMARKS.md pastes a printed table under its command, machine, date and torch version: it must print them."""
    import time

    from modeling_gpt2_scratch.training import describe_device

    assert f"Command: `python benchmarks/{command}`" in out
    assert describe_device(torch.device("cpu")) in out and f"torch {torch.__version__}" in out
    assert time.strftime("%Y-%m-%d") in out


def test_variant_names_resolve_to_settings(tmp_path):
    args = TrainArguments(output_dir=str(tmp_path))
    names = ["hf-fp32", "ours-defaults", "ours-bf16-compile-fused", "ours-fp32-logits-math", "hf-fp32-malloc"]
    settings = train_throughput.variant_settings(names, torch.device("cpu"), args)
    assert settings["hf-fp32"] == train_throughput.Settings("no", compile=False, fused_adamw=False, tf32=False)
    defaults = settings["ours-defaults"]
    assert defaults.accelerator and defaults.fused_adamw and not defaults.compile  # the trainer's CPU defaults
    assert defaults.malloc_tuning and settings["ours-bf16-compile-fused"].malloc_tuning  # ... and its malloc tuning
    assert settings["hf-fp32-malloc"] == dataclasses.replace(settings["hf-fp32"], malloc_tuning=True)
    assert "malloc tuned" in defaults.describe("cpu") and "malloc" not in settings["hf-fp32"].describe("cpu")
    # torch's default AdamW (fused=None, foreach=None) is foreach on CUDA tensors only, the for-loop one on a CPU
    assert settings["hf-fp32"].describe("cpu") == "fp32, eager, for-loop AdamW"
    assert settings["hf-fp32"].describe("cuda") == "fp32, eager, foreach AdamW"
    assert "fused AdamW" in defaults.describe("cpu")
    forced = train_throughput.variant_settings(names, torch.device("cpu"), args, malloc="default")
    assert not any(s.malloc_tuning for s in forced.values())
    cuda = train_throughput.variant_settings(["ours-defaults"], torch.device("cuda"), args)
    assert not cuda["ours-defaults"].malloc_tuning  # the trainer tunes malloc on CPU only
    assert (
        settings["ours-bf16-compile-fused"].mixed_precision == "bf16" and settings["ours-bf16-compile-fused"].compile
    )
    assert settings["ours-fp32-logits-math"].logits and settings["ours-fp32-logits-math"].sdpa_backend == "math"
    checkpointed = train_throughput.variant_settings(["hf-fp32-ckpt", "ours-defaults-ckpt"], torch.device("cpu"), args)
    assert checkpointed["hf-fp32-ckpt"] == dataclasses.replace(settings["hf-fp32"], checkpointing=True)
    assert checkpointed["ours-defaults-ckpt"] == dataclasses.replace(defaults, checkpointing=True)
    assert not any(s.checkpointing for s in settings.values())
    assert "gradient checkpointing" in checkpointed["hf-fp32-ckpt"].describe("cpu")
    modes = train_throughput.variant_settings(
        ["ours-defaults-cudagraphs", "hf-bf16-autotune"], torch.device("cpu"), args
    )
    assert modes["ours-defaults-cudagraphs"] == dataclasses.replace(
        defaults, compile=True, compile_mode="reduce-overhead"
    )
    assert modes["hf-bf16-autotune"].compile and modes["hf-bf16-autotune"].compile_mode == "max-autotune-no-cudagraphs"
    assert "compile reduce-overhead" in modes["ours-defaults-cudagraphs"].describe("cpu")
    assert all(s.compile_mode == "default" for s in settings.values())  # the trainer's default --compile_mode
    both = train_throughput.variant_settings(["ours-defaults-cudagraphs-autotune"], torch.device("cpu"), args)
    assert both["ours-defaults-cudagraphs-autotune"].compile_mode == "max-autotune"
    chunked = train_throughput.variant_settings(["ours-defaults-chunk30"], torch.device("cpu"), args)
    assert chunked["ours-defaults-chunk30"] == dataclasses.replace(defaults, loss_chunk_elements=2**30)
    assert "loss chunks of 2**30 logits" in chunked["ours-defaults-chunk30"].describe("cpu")
    assert all(s.loss_chunk_elements is None for s in settings.values())
    for bad in (
        "hf-fp32-logits",
        "ours-fast",
        "ours-fp32-math-flash",
        "hf-fp32-chunk26",
        "ours-fp32-logits-chunk26",
        "ours-fp32-chunk26-chunk28",
        "ours-fp32-chunk50",
        "ours-fp32-chunk",
    ):
        with pytest.raises(SystemExit, match=re.escape(repr(bad))):
            train_throughput.variant_settings([bad], torch.device("cpu"), args)


def test_variants_agree_on_the_first_loss_and_report_missing_kernels(tmp_path):
    """Runs of the script (in processes of their own: it sets process-wide state) on a tiny shape, side by side: the
    trainer's defaults beside HF's in worker processes (their malloc settings differ), with profiles; the other
    variants all in one process (one malloc setting)."""
    script = [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--runs", "quickstart:2x32"]
    timing = ["--warmup", "1", "--steps", "1", "--no_memory"]
    workers = ["hf-fp32", "ours-defaults"]
    in_one = ["hf-fp32", "ours-fp32", "ours-fp32-logits", "ours-fp32-math", "ours-fp32-efficient"]
    in_one += ["hf-fp32-ckpt", "ours-fp32-ckpt"]
    runs = [  # both at once: each spends most of its time importing and starting processes
        subprocess.Popen([*script, "--variants", *variants, *timing, *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for variants, extra in ((workers, ["--profile", "3"]), (in_one, ["--processes", "one", "--malloc", "default"]))
    ]  # fmt: skip
    (out, err), (one_out, one_err) = (run.communicate(timeout=300) for run in runs)
    assert runs[0].returncode == 0, err[-2000:]
    assert runs[1].returncode == 0, one_err[-2000:]
    # --profile: per variant, ms per phase and op kind, and the floor (matmul + sdpa + clip + AdamW) under the step
    for name in workers:
        header, _, row = re.search(rf"(\| variant \|.*)\n(.*)\n(\| {name} \|.*)", out).groups()
        columns, values = ([c.strip() for c in line.strip("|").split("|")] for line in (header, row))
        cells = dict(zip(columns, values, strict=True))
        number = {k: float(v.replace(",", "")) for k, v in cells.items() if re.fullmatch(r"[\d,.]+", v)}
        floor = number["matmul"] + number.get("attention (sdpa)", 0.0) + number["clip"] + number["AdamW"]
        assert number["floor"] == pytest.approx(floor, abs=2.5)  # from the rounded cells
        assert 0 < number["floor"] < number["step"] and cells["step / floor"].endswith("x")
        assert f"#### {name}: top 3 ops by self time" in out
    assert "step / floor: how much faster the step would be if everything else were free." in out
    assert "N without the position embedding, the tied LM head at the padded 50304-token vocabulary" in out

    def first_losses(text: str) -> dict[str, float]:
        return {name: float(value) for name, value in re.findall(r"([\w-]+) (\d+\.\d+)", text.split("First-step")[1])}

    losses, fp32 = first_losses(out), first_losses(one_out)
    assert set(fp32) == set(in_one) - {"ours-fp32-efficient"}  # CPUs have no memory-efficient kernel
    assert max(fp32.values()) - min(fp32.values()) <= 1e-4
    assert losses["hf-fp32"] == fp32["hf-fp32"]  # the same batch and weights in every process
    defaults = train_throughput.variant_settings(
        ["ours-defaults"], torch.device("cpu"), TrainArguments(output_dir=str(tmp_path))
    )["ours-defaults"]
    tolerance = 2e-2 if defaults.mixed_precision == "bf16" else 1e-4  # bf16 autocast where the CPU has bf16
    assert abs(losses["ours-defaults"] - fp32["ours-fp32"]) <= tolerance
    assert "| ours-fp32-efficient |" in one_out and "no efficient attention kernel here" in one_out
    assert f"| ours-defaults | {defaults.describe('cpu')} |" in out
    assert "quickstart:2x32: round 1/2 (warm-up) done" in err  # progress, for a run cut off by a limit
    assert "quickstart:2x32: round 2/2 (timed) done" in err and "peak memory" not in err
    assert re.search(r"Paired speed-ups .*: ours-defaults vs hf-fp32 \d+\.\d\dx\n", out)  # one round: no quartiles
    # The trainer's malloc tuning is for ours-defaults only: the two settings ran in two worker processes
    assert "glibc malloc: tuned (tune_cpu_malloc) for ours-defaults; glibc's default for hf-fp32. Each variant" in out
    assert "glibc malloc: default, for every variant, all in one process." in one_out


def test_step_floor_counts_matmul_attention_clip_and_adamw():
    phases = {"phase: forward": 50.0, "phase: backward": 80.0, "phase: clip": 3.0, "phase: AdamW": 7.0}
    categories = {"matmul": 90.0, "attention (sdpa)": 10.0, "GELU": 12.0, "other": 18.0}
    assert train_throughput.step_floor_ms(phases, categories) == 110.0
    assert train_throughput.step_floor_ms({"phase: forward": 5.0}, {"other": 5.0}) == 0.0


def test_profile_counts_ops_of_the_backward_thread_in_the_backward_phase():
    """On CUDA, autograd runs the backward on a thread of its own: its ops have no phase label above them."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, start, end, ms, parent=None, device=DeviceType.CPU):
        time_range = SimpleNamespace(start=start, end=end)
        us = ms * 1e3
        return SimpleNamespace(name=name, time_range=time_range, device_type=device, cpu_parent=parent,
                               self_device_time_total=us, self_cpu_time_total=0.0)  # fmt: skip

    forward, backward = event("phase: forward", 0, 100, 0.0), event("phase: backward", 100, 300, 0.0)
    engine = event("autograd::engine::evaluate_function: MmBackward0", 150, 200, 0.5)  # the autograd thread's root
    events = [forward, backward, event("aten::mm", 10, 20, 4.0, parent=forward), engine]
    events += [event("aten::mm", 160, 190, 8.0, parent=engine), event("triton_poi_fused_gelu", 210, 220, 2.0)]
    events += [event("some kernel", 160, 190, 8.0, device=DeviceType.CUDA)]  # counted through its op
    events += [event("aten::copy_", 400, 410, 1.0)]  # after the step: no phase
    phases, categories = train_throughput.split_by_phase(events, cuda=True)
    assert phases == {"phase: forward": 4.0, "phase: backward": 10.5}
    assert categories == {"matmul": 12.0, "inductor kernels": 2.0}


def test_paired_speedups_compare_steps_of_the_same_round():
    # the machine slowed down 2x halfway: the medians' ratio says 1.25x, each round says 1.5x
    times = {"hf": {3: 1.5, 4: 1.5, 5: 3.0, 6: 3.0, 7: 3.0}, "ours": {3: 1.0, 4: 1.0, 5: 2.0, 6: 2.0, 7: 2.0}}
    assert train_throughput.paired_speedup(times, "ours", "hf") == "1.50x [1.50-1.50]"
    times["ours"] = {4: 1.0, 6: 3.0}  # rounds where only one ran (a failure) are left out
    assert train_throughput.paired_speedup(times, "ours", "hf") == "1.25x [1.12-1.38]"
    assert train_throughput.paired_speedup({"hf": {3: 2.0}, "ours": {3: 1.0}}, "ours", "hf") == "2.00x"


@pytest.mark.parametrize(
    "message",
    [
        "No viable backend for scaled_dot_product_attention was found.",  # eager
        "RuntimeError when making fake tensor call ... got RuntimeError('No available kernel. Aborting execution.')",
    ],
)
def test_a_missing_pinned_kernel_fails_that_variant_only(message):
    """Eager and compiled (on CUDA: flash pinned with a mask) say it differently; any other error still raises."""

    def missing(x, y):
        raise RuntimeError(message)

    def broken(x, y):
        raise RuntimeError("shape mismatch")

    steps = object.__new__(train_throughput.LocalSteps)
    run = train_throughput.parse_run("quickstart:1x8")
    settings = train_throughput.Settings("no", compile=True, fused_adamw=False, tf32=False, sdpa_backend="flash")
    steps.run, steps.device, steps.batch = run, torch.device("cpu"), None
    steps.settings, steps.steps = {"a": settings, "b": settings}, {"a": missing, "b": broken}
    assert steps.step("a", 0) == {"failed": "no flash attention kernel here"} and "a" not in steps.steps
    with pytest.raises(RuntimeError, match="shape mismatch"):
        steps.step("b", 0)


def test_variants_run_in_worker_processes_on_cpu_and_where_malloc_differs(tmp_path):
    args = TrainArguments(output_dir=str(tmp_path))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    names = ["hf-fp32", "ours-defaults"]  # glibc's default malloc, the trainer's tuned one

    def workers(device, processes, variants=names, malloc="auto"):
        options = train_throughput.parse_args(["--processes", processes, "--variants", *variants])
        return train_throughput.use_workers(
            options, variants, train_throughput.variant_settings(variants, device, args, malloc), device
        )

    assert workers(cpu, "auto") and workers(cpu, "auto", ["hf-fp32", "ours-fp32"])  # CPU: always isolated
    assert not workers(cuda, "auto", ["hf-fp32", "ours-fp32"]) and workers(
        cuda, "per_variant", ["hf-fp32", "ours-fp32"]
    )
    assert not workers(cpu, "auto", ["ours-defaults"])  # one variant: nothing to isolate
    assert not workers(cpu, "one", malloc="tuned")  # one setting forced: one process may hold them all
    with pytest.raises(SystemExit, match="--processes one: these variants differ in glibc malloc tuning"):
        workers(cpu, "one")


def test_a_worker_killed_mid_run_is_a_one_line_error():
    """The kernel's out-of-memory killer sends SIGKILL: the run stops with a message naming the variant and the fix."""
    worker = train_throughput.WorkerSteps.__new__(train_throughput.WorkerSteps)
    worker.name = "ours-fp32"
    handshake = f"print({train_throughput.PROTOCOL!r} + '{{}}', flush=True)"
    worker.proc = subprocess.Popen(
        [sys.executable, "-c", f"import os, signal, sys; {handshake}; sys.stdin.readline(); os.kill(os.getpid(), 9)"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker._reply() == {}
    with pytest.raises(SystemExit, match=r"the worker for ours-fp32 exited with -9 \(killed: out of memory\?.*fewer"):
        worker.step("ours-fp32", 0)
    with pytest.raises(SystemExit, match="exited with -9"):  # writing to the dead worker: a broken pipe
        worker.step("ours-fp32", 1)
    worker.proc.stdout.close()
    with contextlib.suppress(BrokenPipeError):  # what the dead worker never read: closed all the same
        worker.proc.stdin.close()


def test_decode_matmul_times_ways_that_agree(capsys):
    """The ways of writing decoding's product agree (the script checks), and each gets a timed cell."""
    import decode_matmul

    argv = ["--rows", "1", "3", "--repeats", "1", "--n_layer", "1", "--n_embd", "32", "--vocab_size", "96"]
    decode_matmul.main(argv)
    out = capsys.readouterr().out
    assert_names_its_run(out, f"decode_matmul.py {' '.join(argv)}")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    ways = ["F.linear", "W @ x.T", "Conv1D"] + (["MKL packed"] if mkl_packing_available() else [])
    assert rows[0] == "| weights | rows | " + " | ".join(ways) + " |"
    cells = [row.strip("| ").split(" | ") for row in rows[1:]]
    assert [(c[0], c[1]) for c in cells] == [
        ("4 block matrices", "1"), ("4 block matrices", "3"), ("LM head (96, 32)", "1"), ("LM head (96, 32)", "3")
    ]  # fmt: skip
    assert all(re.fullmatch(r"\d+\.\d\d", c[2]) for c in cells)  # F.linear, the reference
    assert all(re.fullmatch(r"\d+\.\d\d \(\d+\.\d\dx\)", cell) for c in cells for cell in c[3:])
    assert all(len(c) == 2 + len(ways) for c in cells)


def test_step_overheads_times_both_ways_of_each_part(capsys):
    """Each part's two ways agree (the script checks: our norm to float64, torch's to its own error; the compiled
    GELUs to float32 rounding) and are timed."""
    import step_overheads

    argv = ["--n_layer", "1", "--n_embd", "32", "--vocab_size", "96", "--tokens", "8", "--repeats", "1"]
    step_overheads.main(argv)
    out = capsys.readouterr().out
    assert_names_its_run(out, f"step_overheads.py {' '.join(argv)}")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| part | torch / accelerate | ours | speed-up | relative error (torch / ours) |"
    cells = [row.strip("| ").split(" | ") for row in rows[1:]]
    parts = ["tied embedding gradient", "gradient norm", "clip below the limit", "clip above the limit"]
    parts.append("tanh-GELU, compiled, forward + backward")
    assert [c[0] for c in cells] == parts
    assert all(re.fullmatch(r"\d+\.\d\d", cell) for c in cells for cell in c[1:3])
    assert all(re.fullmatch(r"\d+\.\dx", c[3]) for c in cells)
    assert re.fullmatch(r"\d\.\de-\d\d / \d\.\de-\d\d", cells[1][4].rstrip(" |"))


def test_generate_throughput_rows_give_hf_ids(capsys):
    import generate_throughput

    generate_throughput.main(
        ["--batch_sizes", "4", "--prompt_len", "4", "--new_tokens", "3", "--modes", "eager", "--repeats", "1"]
    )
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| eager | 4 |")]
    expected = ["HF GPT2LMHeadModel", "scratch", "scratch, DynamicCache"]
    expected += ["scratch, F.linear"] if mkl_packing_available() else []
    assert [row[2] for row in rows] == expected
    assert [row[-1] for row in rows] == ["yes |"] * len(expected)  # each row's ids equal HF's


def test_generate_throughput_checks_every_call_and_rotates_the_order(capsys, monkeypatch):
    import generate_throughput

    real, calls = generate_throughput.timed_generate, []

    def timed(model, pack, extra, *args):
        seconds, out = real(model, pack, extra, *args)
        key = (type(model).__name__, extra is not None)
        calls.append(key)
        if key == ("GPT2ScratchForCausalLM", True) and calls.count(key) == 3:  # its second timed call goes wrong
            out = out.clone()
            out[0, -1] += 1
        return seconds, out

    monkeypatch.setattr(generate_throughput, "timed_generate", timed)
    argv = ["--batch_sizes", "1", "--prompt_len", "4", "--new_tokens", "2", "--modes", "eager", "--repeats", "3"]
    generate_throughput.main(argv)
    rows = {r.split(" | ")[2]: r for r in capsys.readouterr().out.splitlines() if r.startswith("| eager | 1 |")}
    assert rows.pop("scratch, DynamicCache").endswith("| no |")
    assert all(row.endswith("| yes |") for row in rows.values())
    n = len(rows) + 1
    firsts = [calls[n + round_ * n] for round_ in range(3)]  # the first call of each timed round
    assert firsts == [calls[0], calls[1], calls[2]]  # HF, then the second model, then the third go first


def test_generate_throughput_reports_a_mode_where_every_row_fails(capsys, monkeypatch):
    """A mode none of the rows can run (static-compile without a C compiler for inductor) is a table of failed rows,
    not a traceback from the timed rounds."""
    import generate_throughput
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling_gpt2_scratch import GPT2ScratchForCausalLM

    def tiny_models(device, seed):
        hf = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2)).eval()
        return {generate_throughput.HF: hf, "scratch": GPT2ScratchForCausalLM.from_hf_gpt2(hf).eval()}

    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C compiler found")

    monkeypatch.setattr(generate_throughput, "build_models", tiny_models)
    monkeypatch.setattr(generate_throughput, "timed_generate", no_compiler)
    argv = ["--batch_sizes", "1", "--prompt_len", "4", "--new_tokens", "2", "--modes", "static-compile"]
    generate_throughput.main([*argv, "--repeats", "2"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| static-compile | 1 |")]
    assert [r.split(" | ")[2] for r in rows] == [generate_throughput.HF, "scratch"]
    assert all(r.endswith("| failed: RuntimeError: InvalidCxxCompiler: No working C compiler found |") for r in rows)


def test_time_to_loss_trainer_gets_the_next_tokens_and_our_schedule(tmp_path, scheduled_lrs):
    """The `Trainer` side must train on `shift_labels` (by default it dropped them, and `GPT2LMHeadModel` shifted the
    already shifted labels again: it learnt the token after next) with our learning rates, step by step."""
    import time_to_loss
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

    from modeling_gpt2_scratch.training import parse_arguments

    train_args = parse_arguments(["--dataset", "x", "--max_steps", "6", "--warmup_steps", "2", "--max_lr", "1e-3"])[2]
    train_args.micro_batch_size = 2
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=64))
    seen, lrs = [], []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    x = torch.randint(0, 64, (12, 8), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row.roll(-1), "shift_labels": row.roll(-1)} for row in x]

    class Rates(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            lrs.append(optimizer.param_groups[0]["lr"])

    arguments = time_to_loss.trainer_arguments(train_args, 1, False, tmp_path)
    Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[Rates()]).train()
    assert seen and all("shift_labels" in keys for keys in seen)
    assert lrs == pytest.approx(scheduled_lrs(train_args, 6), rel=1e-9)


def test_bad_numbers_are_one_line_usage_errors(capsys):
    import decode_matmul
    import forward_backward
    import generate_throughput
    import tokenizer_throughput
    from cli import non_negative_int, positive_float, positive_int

    assert positive_int("3") == 3 and non_negative_int("0") == 0 and positive_float("0.5") == 0.5
    for parse, text in ((positive_int, "0"), (positive_int, "x"), (non_negative_int, "-1"), (positive_float, "0"),
                        (positive_float, "nan"), (positive_float, "inf")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
            parse(text)
    bad = [
        (train_throughput.parse_args, ["--steps", "0"], "argument --steps: '0' is not an integer >= 1"),
        (train_throughput.parse_args, ["--runs", "quickstart:2x512"], "T between 1 and quickstart's context, 256"),
        (train_throughput.parse_args, ["--runs", "124m:0x256"], "B must be >= 1"),
        (generate_throughput.parse_args, ["--batch_sizes", "1", "0"], "argument --batch_sizes: '0' is not"),
        (generate_throughput.parse_args, ["--prompt_len", "1000"], "longer than GPT-2's context, 1024 tokens"),
        (decode_matmul.parse_args, ["--rows", "8", "0"], "argument --rows: '0' is not an integer >= 1"),
        (generate_throughput.parse_args, ["--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
        (forward_backward.parse_args, ["--device", "cuda:x"], "argument --device: 'cuda:x' is not a torch device"),
        (tokenizer_throughput.parse_args, ["--corpus", "no/such.txt"], "--corpus: 'no/such.txt': no such file"),
        (generate_throughput.parse_args, ["--seed", str(2**70)], f"--seed: '{2**70}' is not an integer from 0 to"),
        (forward_backward.parse_args, ["--seed", "-1"], "argument --seed: '-1' is not an integer from 0 to 42949"),
    ]
    if not torch.cuda.is_available():
        bad.append((generate_throughput.parse_args, ["--device", "cuda"], "'cuda': this machine has no such device"))
    for parse_args, argv, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[-1]


def test_warmup_0_with_a_compiled_variant_is_a_one_line_error():
    """The first timed round would compile; fine for eager variants (the thread test above runs one with 0)."""
    argv = ["--runs", "quickstart:1x8", "--variants", "ours-fp32", "ours-bf16-compile", "--warmup", "0"]
    with pytest.raises(
        SystemExit, match=r"--warmup 0 would time the compilation of ours-bf16-compile: use --warmup 1"
    ):
        train_throughput.main([*argv, "--no_memory"])


def test_cuda_graph_variants_are_recorded_in_the_warm_up(tmp_path):
    """torch's CUDA-graph trees run a compiled graph's first call without a graph and record it in the second: on
    CUDA a `-cudagraphs` variant needs two warm-up rounds, or the first timed one records."""
    args = TrainArguments(output_dir=str(tmp_path))
    names = ["ours-fp32", "ours-defaults-compile", "ours-defaults-cudagraphs", "hf-bf16-cudagraphs-autotune"]
    names += ["ours-defaults-autotune"]  # max-autotune-no-cudagraphs: autotuned while compiling
    for device, rounds in (("cuda", [0, 1, 2, 2, 1]), ("cpu", [0, 1, 1, 1, 1])):  # no CUDA graphs on a CPU
        settings = train_throughput.variant_settings(names, torch.device(device), args)
        assert [train_throughput.warmup_rounds(settings[n], torch.device(device)) for n in names] == rounds


def test_ckpt_and_loss_chunks_reach_the_model(tmp_path):
    args, cpu = TrainArguments(output_dir=str(tmp_path)), torch.device("cpu")
    run = train_throughput.parse_run("quickstart:2x32")
    settings = train_throughput.variant_settings(["ours-fp32", "ours-fp32-ckpt", "ours-fp32-chunk20"], cpu, args)
    built, build_model = [], train_throughput.build_model

    def keep_model(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_throughput, "build_model", keep_model)
        for name in settings:
            step = train_throughput.make_step(name, settings[name], run, cpu, args, accelerator=None)
            assert 10 < step(*train_throughput.round_batch(run, 0, cpu)) < 12  # a step ran: ln(50257) = 10.8
    plain, checkpointed, chunked = built
    assert not any(block.gradient_checkpointing for block in plain.transformer.h)
    assert all(block.gradient_checkpointing for block in checkpointed.transformer.h)
    assert plain.loss_chunk_elements is None and chunked.loss_chunk_elements == 2**20
    assert chunked.loss_chunk_rows(cpu) == 2**20 // chunked.config.vocab_size  # 20 rows: 64 tokens in 4 chunks


def test_time_to_loss_runs_ours_on_the_cpu_as_the_trainer(tmp_path, monkeypatch):
    """`Trainer` runs with `use_cpu=True`: on a GPU machine our trainer's subprocess must not take the GPU."""
    import time_to_loss

    class Started(Exception):
        pass

    def capture(cmd, **kwargs):
        raise Started(kwargs.get("env"))

    monkeypatch.setattr(time_to_loss.subprocess, "run", capture)
    monkeypatch.setattr(time_to_loss.subprocess, "Popen", capture)
    args = argparse.Namespace(dataset="x.txt", data_dir=tmp_path, seed=[], budget_minutes=5.0)
    with pytest.raises(Started) as started:
        time_to_loss.run_ours(args, tmp_path)
    env = started.value.args[0]
    assert env is not None and env["ACCELERATE_USE_CPU"] == "true"
    assert time_to_loss.trainer_arguments(
        time_to_loss.parse_arguments(["--dataset", "x"])[2], 1, False, tmp_path
    ).use_cpu


def test_time_to_loss_gives_ours_the_paths_it_prepared(tmp_path, monkeypatch):
    """`--dataset` and the shards' folder (`data/<name>` by default) are relative to the caller's directory, where
    this process prepared the shards and evaluates: our trainer's subprocess must read them from there too."""
    import time_to_loss

    class Started(Exception):
        pass

    def capture(cmd, **kwargs):
        raise Started(cmd, kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time_to_loss.subprocess, "Popen", capture)
    data_dir = Path("data") / "corpus.txt"
    args = argparse.Namespace(dataset="corpus.txt", data_dir=data_dir, seed=[], budget_minutes=5.0)
    with pytest.raises(Started) as started:
        time_to_loss.run_ours(args, tmp_path / "work")
    cmd, kwargs = started.value.args
    child_cwd = Path(kwargs.get("cwd") or Path.cwd()).resolve()
    flag = {name: cmd[cmd.index(name) + 1] for name in ("--dataset", "--data_dir")}
    assert child_cwd / flag["--dataset"] == tmp_path.resolve() / "corpus.txt"
    assert child_cwd / flag["--data_dir"] == tmp_path.resolve() / data_dir


def test_time_to_loss_a_missing_dataset_is_a_one_line_error(tmp_path, monkeypatch):
    import time_to_loss

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["time_to_loss.py", "--dataset", "missing.txt"])
    with pytest.raises(SystemExit, match=r"^time_to_loss.py: Dataset path 'missing.txt' not found; pass an existing"):
        time_to_loss.main()


@pytest.fixture
def stubbed_time_to_loss(tmp_path, monkeypatch):
    """`time_to_loss.main` with both runs stubbed out (each returns the same result and records the `args` it got)
    and a prepared val split of 3 batches, in `tmp_path`. Returns the recorded `args`."""
    import time_to_loss

    class ValSplit:
        def __init__(self, data_dir, split, batch_size, seq_len):
            self.batches_per_epoch = 3

    runs = []

    def run(args, workdir):
        runs.append(args)
        return {"steps": 2, "tokens": 8192, "seconds": 4.0, "val_loss": 7.0}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time_to_loss, "prepare_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(time_to_loss, "ShardedTokenLoader", ValSplit)
    monkeypatch.setattr(time_to_loss, "run_ours", run)
    monkeypatch.setattr(time_to_loss, "run_trainer", run)
    return runs


def test_time_to_loss_table_names_the_command_machine_date_and_versions(stubbed_time_to_loss, capsys):
    """BENCHMARKS.md pastes the printed table under its command, machine, date and versions: it must print them."""
    import time

    import time_to_loss
    import transformers

    from modeling_gpt2_scratch.training import describe_device

    time_to_loss.main(["--dataset", "corpus.txt", "--budget_minutes", "0.5"])
    out = capsys.readouterr().out
    assert f"{describe_device(torch.device('cpu'))}; torch {torch.__version__}" in out
    assert f"transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}" in out
    assert "Command: `python benchmarks/time_to_loss.py --dataset corpus.txt --budget_minutes 0.5`" in out
    assert "| ours: train_accelerate.py (quickstart) | 2 | 8,192 | 4 | 2,048 | 7.0000 | 1096.6 |" in out


def test_time_to_loss_evaluates_each_val_batch_once(stubbed_time_to_loss, capsys):
    """As the trainer's `evaluate`: `--eval_batches` beyond the val split's batches reads the split once (the loader
    would wrap and count its first batches twice), and the table says how many batches it used."""
    import time_to_loss

    time_to_loss.main(["--dataset", "corpus.txt", "--eval_batches", "20"])
    assert [args.eval_batches for args in stubbed_time_to_loss] == [3, 3]  # the split's 3 batches, for both runs
    assert "val loss on 3 x 8 x 256 val tokens" in capsys.readouterr().out


def test_time_to_loss_help_shows_what_is_compared_and_how_to_run_it(capsys):
    """As `generate_throughput.py --help`: the module docstring (both sides' settings, example commands)."""
    import time_to_loss

    with pytest.raises(SystemExit) as exit_info:
        time_to_loss.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "start-up and data preparation excluded for both" in out
    assert "python benchmarks/time_to_loss.py --same_time # Trainer gets the seconds ours took" in out


def test_time_to_loss_stops_ours_after_the_first_step_past_the_budget(tmp_path):
    """As the Trainer's `TimeBudget`: our trainer (here a stand-in logging 1 s steps) ends with the first step that
    ends past the budget, not at the preset's last step."""
    import time_to_loss

    metrics = tmp_path / "metrics.jsonl"
    trainer = f"""
import json, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
for step in range(1, 100):
    time.sleep(0.3)  # the step
    with open({str(metrics)!r}, "a") as f:
        f.write(json.dumps({{"step": step, "elapsed": float(step)}}) + "\\n")
    if stop:
        sys.exit(0)
"""
    code = time_to_loss.run_within_budget([sys.executable, "-c", trainer], None, metrics, 4.5, poll=0.01)
    assert code == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1] == 5  # 5 s: past 4.5


@pytest.fixture
def tiny_trainer_run(monkeypatch, tmp_path):
    """`time_to_loss.run_trainer` on a tiny GPT-2 and 16 random sequences (the preset's batch and schedule), stopped
    after its first optimizer step; `trainer` replaces `transformers.Trainer`. Returns its result dict."""
    import time_to_loss
    from transformers import GPT2Config

    def run(trainer=None) -> dict:
        x = torch.randint(0, 64, (16, 256), generator=torch.Generator().manual_seed(0))
        rows = [{"input_ids": r, "labels": r.roll(-1), "shift_labels": r.roll(-1)} for r in x]
        monkeypatch.setattr(time_to_loss, "ShardDataset", lambda *args: rows)
        tiny = GPT2Config(
            n_embd=16, n_layer=1, n_head=2, n_positions=256, vocab_size=64, bos_token_id=0, eos_token_id=0
        )
        monkeypatch.setattr(time_to_loss, "hf_config_from_scratch", lambda config: tiny)
        monkeypatch.setattr(time_to_loss, "val_loss", lambda *args: 0.0)
        if trainer is not None:
            monkeypatch.setattr(time_to_loss, "Trainer", trainer)
        args = argparse.Namespace(
            dataset="x.txt", data_dir=tmp_path, seed=[], budget_minutes=1e-6, micro_batch_size=8, seq_len=256,
            eval_batches=1, bf16=False,
        )  # fmt: skip
        return time_to_loss.run_trainer(args, tmp_path)

    return run


def test_time_to_loss_trainer_runs_with_our_trainers_thread_count(monkeypatch, tiny_trainer_run):
    """Our trainer sets torch's threads to the cores it may use (`cpu_threads`); torch's own default, which the
    `Trainer` in this process would keep, can be fewer (physical cores only)."""
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # record, without changing this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert tiny_trainer_run()["steps"] == 1
    assert threads == [3]  # our trainer's count for 3 usable cores and one process


def test_time_to_loss_trainer_seconds_are_its_training_loops(tiny_trainer_run):
    """As ours' (its last step's `elapsed`, from the loop's start): the Trainer's set-up before `on_train_begin`
    (data loader, optimizer, `accelerator.prepare`) and its wrap-up after the last step are not training seconds."""
    import time

    from transformers import Trainer

    class SlowSetUp(Trainer):
        def get_train_dataloader(self):
            time.sleep(2.0)
            return super().get_train_dataloader()

    result = tiny_trainer_run(SlowSetUp)
    assert result["steps"] == 1
    assert result["seconds"] < 2.0, result  # one step of a tiny model (0.7 s: its first)


def test_only_the_trainers_exact_defaults_are_labelled_so(tmp_path):
    """On a CPU the trainer does not compile: `hf-defaults-compile` runs its Accelerator and step, not its defaults."""
    args, cpu = TrainArguments(output_dir=str(tmp_path)), torch.device("cpu")
    names = ["ours-defaults", "hf-defaults", "hf-defaults-compile", "ours-defaults-ckpt", "ours-bf16", "hf-fp32"]
    settings = train_throughput.variant_settings(names, cpu, args)
    defaults = train_throughput.trainer_defaults(cpu, args)
    notes = {name: train_throughput.defaults_note(settings[name], defaults) for name in names}
    assert notes["ours-defaults"] == notes["hf-defaults"] == " (train_accelerate.py defaults)"
    for name in ("hf-defaults-compile", "ours-defaults-ckpt"):
        assert "not all its defaults" in notes[name]
    assert notes["ours-bf16"] == notes["hf-fp32"] == ""


def test_cpu_variants_run_with_the_trainers_thread_count(monkeypatch, capsys):
    """`train_accelerate.py` sets torch's threads to the cores it may use (`cpu_threads`); torch's own default can be
    fewer (physical cores only), so every process of the benchmark sets the trainer's count too."""
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # record, without changing this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    argv = ["--runs", "quickstart:1x8", "--variants", "ours-fp32", "--warmup", "0", "--steps", "1"]
    train_throughput.main([*argv, "--no_memory", "--malloc", "default", "--peak_size", "64"])
    assert threads == [3]  # the trainer's count for 3 usable cores and one process
    assert "| ours-fp32 |" in capsys.readouterr().out


def test_a_memory_child_whose_variant_runs_out_of_memory_fails(monkeypatch, capsys):
    """Memory children share the GPU: one that ran out of memory must fail (and be run again alone), not report the
    peak it reached before the failure as the variant's."""

    def out_of_memory(*args, **kwargs):
        def step(x, y):
            raise torch.OutOfMemoryError("CUDA out of memory")

        return step

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this process's threads as they are
    monkeypatch.setattr(train_throughput, "make_step", out_of_memory)
    argv = ["--json", "--no_memory", "--runs", "quickstart:1x8", "--variants", "ours-fp32", "--malloc", "default"]
    with pytest.raises(SystemExit, match="ours-fp32: out of memory"):
        train_throughput.main([*argv, "--warmup", "0", "--steps", "1"])
    assert "peak_mib" not in capsys.readouterr().out


def test_the_memory_children_start_after_this_process_freed_its_variants(monkeypatch, capsys):
    """On a GPU the memory children share its memory with this process: the timed variants' models must be gone and
    the allocator's cache emptied first (an hf-fp32 child at 64x1024 ran out of memory alone on an H200 beside the
    parent's ~100 GB cache)."""
    import gc
    import weakref

    built, alive_at_children, emptied = [], [], []
    build_model = train_throughput.build_model
    monkeypatch.setattr(
        train_throughput, "build_model", lambda *a: built.append(weakref.ref(m := build_model(*a))) or m
    )

    def child_memory(runs, names, args):
        alive_at_children.extend(ref() is not None for ref in built)
        return {(run.name, name): {"peak_mib": 1.0, "baseline_mib": 0.0} for run in runs for name in names}

    monkeypatch.setattr(train_throughput, "child_memory", child_memory)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    was_enabled = gc.isenabled()
    gc.disable()  # only an explicit collection frees cycles: none runs by chance between the timing and the children
    try:
        argv = ["--runs", "quickstart:1x8", "--variants", "ours-defaults", "hf-fp32", "--processes", "one"]
        train_throughput.main([*argv, "--warmup", "0", "--steps", "1", "--malloc", "default", "--peak_size", "64"])
    finally:
        if was_enabled:
            gc.enable()
    assert len(built) == 2 and alive_at_children == [False, False]
    assert "| ours-defaults |" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    train_throughput.release_memory(torch.device("cuda"))
    assert emptied == [True]


def test_the_trainer_step_waits_for_the_device_where_train_step_does(tmp_path, monkeypatch):
    """`ours-defaults` times the trainer's step: with fused AdamW, `train_step` checks the loss and the gradient norm
    on the device and reads them once (a wait for the device, on a GPU), after launching AdamW; the benchmark's
    accelerator step must do the same, in the same order."""
    import train_accelerate
    from modeling_gpt2_scratch.training import build_optimizer, build_scheduler

    events = []
    for method in ("item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda t, _f=original: events.append("read") or _f(t))
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda opt, *a, **k: events.append("AdamW") or adamw_step(opt))
    args, cpu = TrainArguments(output_dir=str(tmp_path), max_steps=10, warmup_steps=2), torch.device("cpu")
    run = train_throughput.parse_run("quickstart:2x32")
    x, y = train_throughput.round_batch(run, 0, cpu)
    settings = train_throughput.variant_settings(["ours-defaults"], cpu, args, malloc="default")["ours-defaults"]
    accelerator = train_accelerate.build_accelerator(args)
    step = train_throughput.make_step("ours-defaults", settings, run, cpu, args, accelerator)
    events.clear()
    step(x, y)
    benchmark = list(events)

    model = train_throughput.build_model("ours", run, cpu).train()
    optimizer = build_optimizer(model, args, fused=settings.fused_adamw)
    scheduler = build_scheduler(optimizer, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = type("OneBatch", (), {"next_batch": lambda self: (x, y)})()
    events.clear()
    train_accelerate.train_step(accelerator, model, model, optimizer, scheduler, loader, args, 1)
    assert events == ["AdamW", "read"]  # the optimizer launched, then the loss and the gradient norm read at once
    assert benchmark == events


@pytest.fixture
def large_parent_peak() -> int:
    """This process's resident high-water mark raised above 1.5 GiB (pages touched, then freed); returns the MiB. A
    child it starts must not report that as its own peak: Linux carries `ru_maxrss` across fork + exec."""
    mib = 1536
    buffer = bytearray(mib * 2**20)
    buffer[:: 2**12] = bytes(len(buffer) // 2**12)  # touch every page (bytearray's zeros are not yet resident)
    del buffer
    return mib


def test_data_throughput_reports_the_preparing_process_own_memory(tmp_path, shared_dir, large_parent_peak):
    import data_throughput

    corpus = data_throughput.write_corpus(tmp_path / "corpus", 1_000, shared_dir / "data" / "tinyshakespeare.txt")
    result = data_throughput.run_prepare(corpus, tmp_path / "out", shard_size=20_000, num_proc=1, repeats=1)
    assert 0 < result["baseline_mib"] <= result["peak_mib"] < large_parent_peak


def test_forward_backward_table_names_its_run(capsys):
    import forward_backward

    argv = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--batch_size", "1", "--seq_len", "8"]
    argv += ["--warmup", "0", "--steps", "1", "--device", "cpu"]
    forward_backward.main(argv)
    out = capsys.readouterr().out
    assert_names_its_run(out, f"forward_backward.py {' '.join(argv)}")
    assert re.search(r"\| scratch \(fused chunked loss\) \| \d+\.\d{3} \|", out)


def test_tokenizer_throughput_runs_as_a_script_without_an_install():
    """As the other scripts: `python benchmarks/tokenizer_throughput.py` stopped with "No module named
    'modeling_gpt2_scratch'" after `pip install -r requirements.txt` (README's install), without `pip install -e .`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(BENCHMARKS / "tokenizer_throughput.py"), "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=BENCHMARKS, env=env)
    assert result.returncode == 0 and "--repeats" in result.stdout, result.stderr[-2000:]


def test_tokenizer_throughput_table_names_its_run(tmp_path, capsys, monkeypatch):
    import tokenizer_throughput

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First Citizen:\nSpeak.\n\nAll:\nSpeak, speak.\n\n" * 20, encoding="utf-8")
    tokenizer_throughput.main(["--corpus", str(corpus), "--repeats", "1"])
    out = capsys.readouterr().out
    assert_names_its_run(out, f"tokenizer_throughput.py --corpus {corpus} --repeats 1")
    assert "| tiktoken `encode_ordinary`, a loop | whole corpus |" in out


def test_tokenizer_throughput_parallel_rows_run_the_threads_they_print(tmp_path, capsys, monkeypatch):
    """tiktoken's batch gets `num_threads=2`; the Rust tokenizer's pool (rayon) takes every core unless
    `RAYON_NUM_THREADS` says otherwise, so on a larger machine its "2 threads" rows ran on all of them."""
    import tokenizer_throughput

    monkeypatch.setenv("RAYON_NUM_THREADS", "16")  # restored after the test
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First Citizen:\nSpeak.\n\n" * 20, encoding="utf-8")
    tokenizer_throughput.main(["--corpus", str(corpus), "--repeats", "1"])
    rows = [row.split(" | ") for row in capsys.readouterr().out.splitlines() if row.startswith("| ")]
    threads = {int(row[3]) for row in rows[1:]}  # under the header
    assert threads - {1} == {int(os.environ["RAYON_NUM_THREADS"])}


def test_data_throughput_table_names_its_run(tmp_path, monkeypatch, capsys):
    """Its prepares and loader stubbed out: the heading and the rows they give."""
    import data_throughput

    result = {"seconds": 2.0, "tokens": 1000, "documents": 10, "baseline_mib": 400.0, "peak_mib": 450.0}
    result |= {"worker_peak_mib": 0.0, "main_cpu_s": 1.5, "worker_cpu_s": 0.0}
    monkeypatch.setattr(data_throughput, "write_corpus", lambda folder, *args: folder)
    monkeypatch.setattr(data_throughput, "run_prepare", lambda *args: result)
    monkeypatch.setattr(data_throughput, "time_loader", lambda *args: 10.0)
    argv = ["--shard_size", "100", "--num_proc", "1", "--repeats", "1"]
    data_throughput.main(argv)
    out = capsys.readouterr().out
    assert_names_its_run(out, f"data_throughput.py {' '.join(argv)}")
    assert "| 1 | 1,000 | 10 | 2.00 | 500 | 1.50 | - | 400 | 450 | - |" in out


def test_malloc_tuning_a_failed_child_is_a_one_line_error(monkeypatch):
    """A child that fails (no glibc to tune, out of memory) stops the run with its own last line, not a traceback of
    `CalledProcessError` that hides it (the child's stderr is captured)."""
    import malloc_tuning

    def child(cmd, **kwargs):  # as `subprocess.run` would, `check=True` included
        if "default" in cmd:
            return subprocess.CompletedProcess(cmd, 0, stdout='{"s_per_step": 1.0}\n', stderr="")
        err = "this C library has no mallopt (not glibc)\n"  # the child's SystemExit
        if kwargs.get("check"):
            raise subprocess.CalledProcessError(1, cmd, output="", stderr=err)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=err)

    monkeypatch.setattr(malloc_tuning.subprocess, "run", child)
    with pytest.raises(
        SystemExit,
        match=r"^malloc_tuning.py: the tuned run of quickstart:1x8 exited with 1: this C library has no mallopt",
    ):
        malloc_tuning.main(["--runs", "quickstart:1x8", "--repeats", "1"])


def test_malloc_tuning_reports_the_child_process_own_peak(large_parent_peak):
    cmd = [sys.executable, str(BENCHMARKS / "malloc_tuning.py"), "--child", "quickstart:1x8", "default"]
    result = subprocess.run([*cmd, "--warmup", "0", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0 < json.loads(result.stdout.splitlines()[-1])["peak_rss_mib"] < large_parent_peak
