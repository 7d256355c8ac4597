"""The training-throughput benchmark compares like with like: its variants name what they run and agree on the loss."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import train_throughput  # noqa: E402

from modeling_gpt2_scratch.training import TrainArguments  # noqa: E402


def test_variant_names_resolve_to_settings(tmp_path):
    args = TrainArguments(output_dir=str(tmp_path))
    names = ["hf-fp32", "ours-defaults", "ours-bf16-compile-fused", "ours-fp32-logits-math"]
    settings = train_throughput.variant_settings(names, torch.device("cpu"), args)
    assert settings["hf-fp32"] == train_throughput.Settings("no", compile=False, fused_adamw=False, tf32=False)
    defaults = settings["ours-defaults"]
    assert defaults.accelerator and defaults.fused_adamw and not defaults.compile  # the trainer's CPU defaults
    assert (
        settings["ours-bf16-compile-fused"].mixed_precision == "bf16" and settings["ours-bf16-compile-fused"].compile
    )
    assert settings["ours-fp32-logits-math"].logits and settings["ours-fp32-logits-math"].sdpa_backend == "math"
    for bad in ("hf-fp32-logits", "ours-fast", "ours-fp32-math-flash"):
        with pytest.raises(SystemExit, match=re.escape(repr(bad))):
            train_throughput.variant_settings([bad], torch.device("cpu"), args)


def test_variants_agree_on_the_first_loss_and_report_missing_kernels(tmp_path):
    """A run of the script (in its own process: it sets process-wide state) on a tiny shape."""
    variants = ["hf-fp32", "ours-fp32", "ours-fp32-logits", "ours-defaults", "ours-fp32-math", "ours-fp32-efficient"]
    cmd = [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--runs", "quickstart:2x32", "--variants"]
    cmd += [*variants, "--warmup", "1", "--steps", "1", "--no_memory"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    losses = {name: float(value) for name, value in re.findall(r"([\w-]+) (\d+\.\d+)", out.split("First-step")[1])}
    assert set(losses) == set(variants) - {"ours-fp32-efficient"}  # CPUs have no memory-efficient kernel
    defaults = train_throughput.variant_settings(
        ["ours-defaults"], torch.device("cpu"), TrainArguments(output_dir=str(tmp_path))
    )["ours-defaults"]
    fp32 = [v for name, v in losses.items() if name != "ours-defaults"]
    assert max(fp32) - min(fp32) <= 1e-4
    tolerance = 2e-2 if defaults.mixed_precision == "bf16" else 1e-4  # bf16 autocast where the CPU has bf16
    assert abs(losses["ours-defaults"] - losses["ours-fp32"]) <= tolerance
    assert "| ours-fp32-efficient |" in out and "no efficient attention kernel here" in out
    assert f"| ours-defaults | {defaults.describe()} |" in out
