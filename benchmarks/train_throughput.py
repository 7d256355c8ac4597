"""Training throughput (tokens/s), peak memory and MFU: the scratch GPT-2 vs Hugging Face `GPT2LMHeadModel`.

    python benchmarks/train_throughput.py                                   # CPU: 124M 4x256 and quickstart 16x256
    python benchmarks/train_throughput.py --runs 124m:16x1024 124m:64x1024  # what a GPU runs by default
    python benchmarks/train_throughput.py --runs 124m:4x256 --profile 25    # plus a torch.profiler table per variant

A step is what `train_accelerate.py` does per optimizer step without accumulation: forward with the loss
(`input_ids=x, shift_labels=y`, the trainer's call; HF gets the same targets as `labels`/`shift_labels`), backward,
gradient clipping (the trainer's default `grad_clip`), AdamW (`build_optimizer`: GPT-3's betas, eps, decay
groups), `zero_grad`.
Variants (all with the same weights, shape, batch and AdamW settings; dropout as the trainer's default, 0); the
first four are the default set:

- `hf-fp32`: `GPT2LMHeadModel` (sdpa), fp32, eager: what a user has today.
- `hf-defaults-compile`: HF with our speed settings plus `torch.compile`: the trainer's defaults for this device
  (mixed precision: bf16 where the device has it, else fp32; TF32; fused AdamW) and compile.
- `ours-fp32`: the scratch model, fp32, eager.
- `ours-defaults`: the scratch model with exactly `train_accelerate.py`'s default speed settings for this device:
  its own `build_accelerator` (mixed precision), compile / fused AdamW / TF32 / glibc malloc tuning resolved from
  `TrainArguments()` defaults, and its step (`accelerator.accumulate`, `accelerator.backward`, its
  `clip_gradients`, its `guarded_optimizer_step`: the finite checks of the loss and the gradient norm, and its one
  read of the device).
- `hf-defaults`: HF under exactly the trainer's defaults for this device (on CPU: no compile; on CUDA the same as
  `hf-defaults-compile`).
- `ours-defaults-compile`: ours with the trainer's defaults plus `torch.compile` (on CUDA the same as
  `ours-defaults`).

Other combinations can be named with `--variants`: `{hf,ours}-{defaults,fp32,bf16}[-compile][-cudagraphs]
[-autotune][-fused][-malloc][-ckpt][-logits|-chunkK][-denseemb][-torchclip][-math|-flash|-efficient|-cudnn]`
(`-cudagraphs` and `-autotune` compile in the trainer's `--compile_mode` reduce-overhead and
max-autotune-no-cudagraphs, both together max-autotune, with its CUDA-graph step (`compile_forward`); `-fused`: fused
AdamW kernel; `-malloc`: the trainer's glibc malloc tuning; `-ckpt`: gradient checkpointing, as the trainer's
`--gradient_checkpointing true` (`activation_checkpointing_enable()`: each block's activations recomputed in the
backward); `-logits`, ours only: the plain LM head + `F.cross_entropy` on materialised logits, `skip_logits=False`,
instead of the chunked `LinearCrossEntropy`; `-chunkK`, ours only: the fused loss in chunks of 2**K logits
(`model.loss_chunk_elements`; the model's default is 2**26, 2**30 on a CUDA GPU); `-denseemb`, ours only: the token
embedding's dense gradient, summed with the head's by autograd, instead of `TiedEmbedding`'s rows added in place
(`add_embedding_gradient_in_place = False`); `-torchclip`, with `defaults`: `accelerator.clip_grad_norm_` instead of
the trainer's `clip_gradients`; the last pins `F.scaled_dot_product_attention` to one kernel with
`torch.nn.attention.sdpa_kernel`, where the device has it), e.g. `ours-bf16-compile` to see what other trainer
defaults would give, or `ours-defaults-flash` against `ours-defaults-cudnn` on an H100. The fp32 variants use torch's
and glibc's defaults (no TF32; torch's default AdamW: foreach on CUDA, the for-loop one on a CPU; glibc's malloc)
unless named; the bf16 ones the trainer's choices for this device.

On a CPU every process of the script (workers and memory children too) uses the trainer's torch thread count
(`cpu_threads`: the cores this process may use, where torch's own default may count physical cores only); it is
process-wide, so it holds for every variant and for the measured matmul peak.

The trainer's glibc malloc tuning on CPU (`--malloc_tuning`, `tune_cpu_malloc`) is one of its speed settings, so
the `defaults` and `bf16` variants get it (as the trainer's choice for the device: on CPU) and the `fp32` ones do not,
as a user's own process would not; `--malloc tuned|default` forces one setting on every variant. The setting is
process-wide, and a heap shared by several models behaves like none of them alone, so on a CPU each variant runs in
a worker process of its own (`--processes`, default `auto`: per variant on CPU, all in this one on CUDA), and this
process still interleaves their steps one at a time (timed in the worker): every step follows a switch of process
alike. All the variants' models are alive at once (124M: 2-4.5 GB each on CPU), so on a 24 GB machine name at most
four 124M variants per run: a worker short of free memory pages its fresh allocations in slower, and the
variants without the malloc tuning allocate afresh every step. The tuning's effect alone is measured in fresh
processes by `benchmarks/malloc_tuning.py`.

The variants run interleaved, one step each per round (the order rotates every round), so a shared machine's load
hits them alike; compilation happens in the warm-up rounds. Tokens/s come from the median step time. Below each
table, paired speed-ups divide the two steps of the same round and take the median over the rounds: a slow drift in
the machine's speed (common on shared machines) moves a round's steps together, so it leaves these ratios alone
where it shifts the medians. Peak memory is
measured per variant in a fresh child process running the same steps, after the timing (`--memory_jobs` of them at
once: 4 on CUDA, 1 on CPU; CPU: the process's resident-set high-water mark, and what the run added over the RSS
after imports; CUDA: `torch.cuda.max_memory_allocated`, per process). MFU = model
FLOPs per token (`flops_per_token`: 6N + 12*L*C*T, N = parameters without the position embedding, the LM head at the
padded vocabulary) x tokens/s / peak FLOP/s, with the peak measured in this process (the best of several large
matmuls in the variant's matmul dtype: fp32 for the fp32 variants, bf16 for the mixed-precision ones) and, on a known
GPU, the datasheet dense bf16 figure. Prints markdown tables at the end; a progress line per round and per memory
child goes to stderr as the run goes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function
from transformers import GPT2LMHeadModel

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from cli import non_negative_int, positive_int  # noqa: E402  (this folder is on sys.path when run as a script)

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM  # noqa: E402
from modeling_gpt2_scratch.conversion import hf_config_from_scratch  # noqa: E402
from modeling_gpt2_scratch.training import (  # noqa: E402
    ModelArguments,
    TrainArguments,
    build_optimizer,
    describe_device,
    device_peak_flops,
    flops_per_token,
    load_preset,
    proc_status_mib,
    tune_cpu_malloc,
)
from train_accelerate import (  # noqa: E402
    build_accelerator,
    clip_gradients,
    compile_forward,
    cpu_threads,
    guarded_optimizer_step,
    malloc_tuning_on,
    speed_flags,
)

VARIANTS = ("hf-fp32", "hf-defaults-compile", "ours-fp32", "ours-defaults")  # the default set
HF_FP32, HF_FAST = "hf-fp32", "hf-defaults-compile"
SDPA_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
VARIANT_BASES = ("defaults", "fp32", "bf16")
COMPILE_MODE_EXTRAS = {"cudagraphs": "reduce-overhead", "autotune": "max-autotune-no-cudagraphs"}  # -> --compile_mode
VARIANT_EXTRAS = (
    "compile",
    *COMPILE_MODE_EXTRAS,
    "fused",
    "malloc",
    "ckpt",
    "logits",
    "denseemb",
    "torchclip",
    *SDPA_BACKENDS,
)
CHUNK_EXTRA = re.compile(r"chunk(\d+)")  # -chunkK: the fused loss in chunks of 2**K logits
PHASES = ("phase: forward", "phase: backward", "phase: clip", "phase: AdamW")  # profiler labels of a step
QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a variant trains."""

    mixed_precision: str  # "bf16" (autocast) or "no"
    compile: bool
    fused_adamw: bool
    tf32: bool
    accelerator: bool = False  # the trainer's own Accelerator and step
    logits: bool = False  # ours: materialise the logits (skip_logits=False) instead of the chunked fused loss
    sdpa_backend: str | None = None  # pin F.scaled_dot_product_attention to one kernel (SDPA_BACKENDS)
    malloc_tuning: bool = False  # glibc malloc tuned (tune_cpu_malloc; process-wide)
    checkpointing: bool = False  # gradient checkpointing (activation_checkpointing_enable, as the trainer's flag)
    compile_mode: str = "default"  # the trainer's --compile_mode (COMPILE_MODE_EXTRAS)
    dense_embedding: bool = False  # ours: no `TiedEmbedding` (add_embedding_gradient_in_place off)
    loss_chunk_elements: int | None = None  # ours: logits per chunk of the fused loss (None: the model's default)
    torch_clip: bool = False  # the `accelerator` step: `accelerator.clip_grad_norm_`, not the trainer's

    def describe(self, device_type: str) -> str:
        """The settings in words; `device_type` names torch's default AdamW there (foreach only on CUDA)."""
        parts = ["bf16 autocast" if self.mixed_precision == "bf16" else "fp32"]
        parts.append(
            ("compile" if self.compile_mode == "default" else f"compile {self.compile_mode}")
            if self.compile
            else "eager"
        )
        if self.fused_adamw:
            parts.append("fused AdamW")
        else:  # torch's default (fused=None, foreach=None): foreach on CUDA tensors, the for-loop one on a CPU
            parts.append("foreach AdamW" if device_type == "cuda" else "for-loop AdamW")
        if self.tf32:
            parts.append("TF32")
        if self.malloc_tuning:
            parts.append("malloc tuned")
        if self.checkpointing:
            parts.append("gradient checkpointing")
        if self.logits:
            parts.append("plain LM head + cross-entropy")
        if self.sdpa_backend:
            parts.append(f"sdpa {self.sdpa_backend} only")
        if self.loss_chunk_elements:
            parts.append(f"loss chunks of 2**{self.loss_chunk_elements.bit_length() - 1} logits")
        if self.dense_embedding:
            parts.append("dense embedding gradient")
        if self.torch_clip:
            parts.append("accelerate's clip_grad_norm_")
        return ", ".join(parts)


def trainer_defaults(device: torch.device, train_args: TrainArguments) -> Settings:
    """The speed settings `train_accelerate.train()` resolves from its default `TrainArguments` on `device`."""
    accelerator = build_accelerator(train_args)  # the trainer's mixed-precision resolution
    compile_on, fused = speed_flags(train_args, device)  # and its compile / fused-AdamW resolution
    return Settings(
        mixed_precision=accelerator.mixed_precision,
        compile=compile_on,
        fused_adamw=fused,
        tf32=train_args.tf32,
        accelerator=True,
        malloc_tuning=malloc_tuning_on(train_args, device),
    )


def defaults_note(setting: Settings, defaults: Settings) -> str:
    """The variant list's note on a variant's relation to the trainer's defaults (`trainer_defaults`)."""
    if setting == defaults:
        return " (train_accelerate.py defaults)"
    if setting.accelerator:  # e.g. hf-defaults-compile on a CPU, where the trainer does not compile
        return " (train_accelerate.py's Accelerator and step; other settings as listed, not all its defaults)"
    return ""


def variant_settings(
    names: list[str], device: torch.device, train_args: TrainArguments, malloc: str = "auto"
) -> dict[str, Settings]:
    """Each variant's settings: `{hf,ours}-{defaults,fp32,bf16}[-compile][-MODE][-fused][-malloc][-ckpt][-logits]
    [-chunkK][-denseemb][-torchclip][-KERNEL]` (MODE: cudagraphs, autotune; KERNEL: an sdpa backend; K: 2**K logits
    per chunk of the fused loss).

    `defaults`: the trainer's settings for this device (its Accelerator and step), the extras switched on. fp32: no
    TF32, torch's default AdamW (foreach on CUDA, for-loop on CPU) unless `-fused`, glibc's malloc unless `-malloc`
    (torch's and glibc's defaults). bf16: the trainer's TF32, fused-AdamW and malloc choices, `-fused` forcing the
    fused kernel. `malloc` `tuned` or `default` overrides every variant's malloc setting.
    """
    defaults = trainer_defaults(device, train_args)
    settings = {}
    for name in names:
        model, *parts = name.split("-")
        chunked = any(CHUNK_EXTRA.fullmatch(p) for p in parts[1:])
        if (
            model not in ("hf", "ours")
            or not parts
            or parts[0] not in VARIANT_BASES
            or any(p not in VARIANT_EXTRAS and not CHUNK_EXTRA.fullmatch(p) for p in parts[1:])
            or (model == "hf" and ("logits" in parts or "denseemb" in parts or chunked))
            or ("logits" in parts and chunked)
        ):
            raise SystemExit(
                f"--variants {name!r}: use hf|ours-defaults|fp32|bf16[-compile][-cudagraphs][-autotune][-fused]"
                "[-malloc][-ckpt][-logits (ours) | -chunkK (ours, K in 10-40)][-denseemb (ours)][-torchclip]"
                "[-math|-flash|-efficient|-cudnn]"
            )
        base, extras = parts[0], parts[1:]
        model_options = {
            "logits": "logits" in extras,
            "sdpa_backend": _backend(name, extras),
            "checkpointing": "ckpt" in extras,
            "dense_embedding": "denseemb" in extras,
            "loss_chunk_elements": _loss_chunk_elements(name, extras),
            "torch_clip": "torchclip" in extras,
            "compile_mode": _compile_mode(extras, train_args),
        }
        compile_named = "compile" in extras or any(e in COMPILE_MODE_EXTRAS for e in extras)
        if base == "defaults":
            settings[name] = dataclasses.replace(
                defaults,
                compile=defaults.compile or compile_named,
                fused_adamw=defaults.fused_adamw or "fused" in extras,
                malloc_tuning=defaults.malloc_tuning or "malloc" in extras,
                **model_options,
            )
        else:
            bf16 = base == "bf16"
            settings[name] = Settings(
                "bf16" if bf16 else "no",
                compile=compile_named,
                fused_adamw="fused" in extras or (bf16 and defaults.fused_adamw),
                tf32=bf16 and defaults.tf32,
                malloc_tuning="malloc" in extras or (bf16 and defaults.malloc_tuning),
                **model_options,
            )
        if malloc != "auto":
            settings[name] = dataclasses.replace(settings[name], malloc_tuning=malloc == "tuned")
    return settings


def _compile_mode(extras: list[str], train_args: TrainArguments) -> str:
    """The `--compile_mode` of `-cudagraphs` (reduce-overhead), `-autotune` (max-autotune-no-cudagraphs), both
    (max-autotune), or neither (the trainer's)."""
    named = {e for e in extras if e in COMPILE_MODE_EXTRAS}
    if len(named) == 2:
        return "max-autotune"
    return COMPILE_MODE_EXTRAS[named.pop()] if named else train_args.compile_mode


def _loss_chunk_elements(name: str, extras: list[str]) -> int | None:
    """2**K for a `-chunkK` extra (K in 10-40), else None (the model's default)."""
    chunks = [int(m.group(1)) for m in map(CHUNK_EXTRA.fullmatch, extras) if m]
    if len(chunks) > 1 or any(not 10 <= k <= 40 for k in chunks):
        raise SystemExit(f"--variants {name!r}: name one -chunkK at most, with K from 10 to 40 (2**K logits)")
    return 2 ** chunks[0] if chunks else None


def _backend(name: str, extras: list[str]) -> str | None:
    backends = [e for e in extras if e in SDPA_BACKENDS]
    if len(backends) > 1:
        raise SystemExit(f"--variants {name!r}: name one attention backend at most")
    return backends[0] if backends else None


def attention_backend(backend: str | None):
    """`torch.nn.attention.sdpa_kernel` pinned to `backend` (a key of SDPA_BACKENDS), or nothing."""
    return contextlib.nullcontext() if backend is None else sdpa_kernel(SDPA_BACKENDS[backend])


@dataclasses.dataclass
class Run:
    """One shape to benchmark: a model size and a micro-batch."""

    name: str
    model: dict
    batch_size: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def model_shapes() -> dict[str, dict]:
    """`124m` from the trainer's `ModelArguments` defaults, `quickstart` from configs/quickstart.yaml."""
    defaults = ModelArguments()
    shapes = {"124m": {k: getattr(defaults, k) for k in ("n_layer", "n_head", "n_embd", "n_positions")}}
    if QUICKSTART.is_file():
        preset = load_preset(QUICKSTART)
        shapes["quickstart"] = {k: preset[k] for k in ("n_layer", "n_head", "n_embd", "n_positions")}
    return shapes


def parse_run(spec: str) -> Run:
    shapes = model_shapes()
    try:
        name, batch = spec.split(":")
        batch_size, seq_len = (int(v) for v in batch.lower().split("x"))
        shape = shapes[name]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"--runs {spec!r}: use MODEL:BxT with MODEL one of {sorted(shapes)}, e.g. 124m:4x256"
        ) from None
    if batch_size < 1 or not 1 <= seq_len <= shape["n_positions"]:
        raise argparse.ArgumentTypeError(
            f"--runs {spec!r}: B must be >= 1 and T between 1 and {name}'s context, {shape['n_positions']}"
        )
    return Run(spec, shape, batch_size, seq_len)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    cuda = torch.cuda.is_available()
    parser.add_argument(
        "--runs",
        nargs="+",
        type=parse_run,
        help="MODEL:BxT shapes (default: CPU 124m:4x256 quickstart:16x256; CUDA 124m:16x1024 124m:64x1024)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help="hf|ours-defaults|fp32|bf16[-compile][-cudagraphs][-autotune][-fused][-malloc][-ckpt][-logits|-chunkK]"
        "[-denseemb][-torchclip][-math|-flash|-efficient|-cudnn] (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=3,
        help="untimed rounds first (compilation happens here: at least 1 with a compiled variant, 2 with CUDA graphs)",
    )
    parser.add_argument("--steps", type=positive_int, default=7, help="timed rounds (the median is reported)")
    parser.add_argument("--no_memory", action="store_true", help="skip the per-variant peak-memory child runs")
    parser.add_argument(
        "--profile", type=non_negative_int, default=0, metavar="ROWS", help="print a torch.profiler table per variant"
    )
    parser.add_argument(
        "--peak_size", type=positive_int, default=8192 if cuda else 2048, help="square matmul size for the peak"
    )
    parser.add_argument(
        "--malloc",
        choices=("auto", "tuned", "default"),
        default="auto",
        help="glibc malloc: auto = per variant (the trainer's choice, tuned on CPU, for defaults and bf16; glibc's "
        "default for fp32); tuned or default: that for every variant",
    )
    parser.add_argument(
        "--processes",
        choices=("auto", "per_variant", "one"),
        default="auto",
        help="per_variant: each variant in a worker process of its own; one: all in this process (needs one malloc "
        "setting); auto: per variant on CPU, one on CUDA",
    )
    parser.add_argument(
        "--memory_jobs",
        type=positive_int,
        default=4 if cuda else 1,
        help="peak-memory child runs at once (default: 4 on CUDA, where each has its own peak; 1 on CPU)",
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child runs: one JSON line
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # WorkerSteps' process
    args = parser.parse_args(argv)
    if args.runs is None:
        specs = ["124m:16x1024", "124m:64x1024"] if cuda else ["124m:4x256", "quickstart:16x256"]
        args.runs = [parse_run(spec) for spec in specs]
    return args


# --- models and steps ------------------------------------------------------------------------------------------------


def build_model(kind: str, run: Run, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A random HF GPT-2 (sdpa), or the scratch model with its weights; dropout as the trainer's default (0)."""
    model_args = ModelArguments()
    dropout = dict(resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout, attn_pdrop=model_args.dropout)
    torch.manual_seed(seed)
    hf_config = hf_config_from_scratch(GPT2ScratchConfig(**run.model, **dropout))
    hf = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    if kind == "hf":
        return hf.to(device)
    ours = GPT2ScratchForCausalLM.from_hf_gpt2(hf)
    ours.set_attn_implementation(model_args.attn_implementation)  # as train_accelerate.build_model
    return ours.to(device)


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def make_step(
    name: str, settings: Settings, run: Run, device: torch.device, train_args: TrainArguments, accelerator
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """A closure doing one full training step of the variant `name` on `(x, y)`; returns the loss."""
    model = build_model(name.split("-")[0], run, device).train()
    if settings.dense_embedding:
        model.add_embedding_gradient_in_place = False
    if settings.loss_chunk_elements:
        model.loss_chunk_elements = settings.loss_chunk_elements
    if settings.checkpointing:
        model.activation_checkpointing_enable()  # as train_accelerate.build_model with --gradient_checkpointing
    optimizer = build_optimizer(model, train_args, fused=settings.fused_adamw)
    is_hf = name.startswith("hf")
    if settings.accelerator:
        model, optimizer = accelerator.prepare(model, optimizer)
    forward, cudagraphs = (  # as train_accelerate.train
        compile_forward(model, dataclasses.replace(train_args, compile_mode=settings.compile_mode), device)
        if settings.compile
        else (model, False)
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if settings.mixed_precision == "bf16" and not settings.accelerator
        else contextlib.nullcontext()
    )

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            if is_hf:
                return forward(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
            return forward(input_ids=x, shift_labels=y, use_cache=False, skip_logits=not settings.logits).loss

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with matmul_precision(settings.tf32), attention_backend(settings.sdpa_backend):
            if settings.accelerator:  # train_accelerate.train_step without accumulation, the logging, the schedule
                with accelerator.accumulate(model):
                    with record_function(PHASES[0]):
                        loss = loss_of(x, y)
                    with record_function(PHASES[1]):
                        accelerator.backward(loss)
                with record_function(PHASES[2]):
                    if settings.torch_clip:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.grad_clip)
                    else:
                        grad_norm = clip_gradients(accelerator, model, train_args.grad_clip)
                with record_function(PHASES[3]):  # train_step's checks and its one read of the device
                    value = guarded_optimizer_step(accelerator, optimizer, loss.detach(), grad_norm, train_args, 1)[0]
                    optimizer.zero_grad(set_to_none=not cudagraphs)
                return value
            else:
                with record_function(PHASES[0]):
                    loss = loss_of(x, y)
                with record_function(PHASES[1]):
                    loss.backward()
                with record_function(PHASES[2]):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train_args.grad_clip)
                with record_function(PHASES[3]):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=not cudagraphs)
            return loss.item()

    return step


def warmup_rounds(settings: Settings, device: torch.device) -> int:
    """The warm-up steps that leave no compilation for the timed ones: 0 eager, 1 compiled, and 2 where the steps
    run as CUDA graphs (`compile_forward`'s modes on CUDA): torch's CUDA-graph trees run a compiled graph's first
    call without a graph and record it in the second."""
    if not settings.compile:
        return 0
    return 2 if device.type == "cuda" and settings.compile_mode in ("reduce-overhead", "max-autotune") else 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` `size x size` matmuls in `dtype` (after one warm-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    with matmul_precision(False):
        for i in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            if i:
                best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# --- timing: the variants' steps, interleaved (in this process, or each in a worker process) ------------------------

PROTOCOL = "@@train_throughput "  # prefix of a worker's replies on its stdout (other output passes through)


def round_batch(run: Run, round_idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Round `round_idx`'s random batch, the same in every process."""
    seq = torch.randint(
        0, 50257, (run.batch_size, run.seq_len + 1), generator=torch.Generator().manual_seed(1000 + round_idx)
    )
    return seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)


class LocalSteps:
    """Some variants' training steps, built in this process."""

    def __init__(self, args, run: Run, names: list[str], settings: dict[str, Settings], device, train_args):
        accelerator = build_accelerator(train_args) if any(settings[n].accelerator for n in names) else None
        self.steps = {name: make_step(name, settings[name], run, device, train_args, accelerator) for name in names}
        self.args, self.run, self.settings, self.device = args, run, settings, device
        self.batch: tuple[int, tuple] | None = None

    def step(self, name: str, round_idx: int) -> dict:
        """One timed step of `name`: `{"seconds", "loss"}`, or `{"failed": why}` for a variant this device can't
        run."""
        if self.batch is None or self.batch[0] != round_idx:
            self.batch = (round_idx, round_batch(self.run, round_idx, self.device))
        x, y = self.batch[1]
        synchronize(self.device)
        start = time.perf_counter()
        try:
            loss = self.steps[name](x, y)
        except torch.OutOfMemoryError:  # e.g. an fp32 variant at a large GPU batch: report it, keep the others
            del self.steps[name]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return {"failed": "out of memory"}
        except RuntimeError as err:  # a pinned attention kernel this device (or shape, dtype, mask) lacks
            if not any(why in str(err) for why in ("No viable backend", "No available kernel")):  # eager, compiled
                raise
            del self.steps[name]
            return {"failed": f"no {self.settings[name].sdpa_backend} attention kernel here"}
        synchronize(self.device)
        return {"seconds": time.perf_counter() - start, "loss": loss}

    def profile(self) -> str:
        """The profiler tables of the variants that still run (markdown)."""
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            profile_variants(self.args, self.steps, self.run, self.device)
        return buffer.getvalue()

    def close(self) -> None:
        self.steps.clear()


class WorkerSteps:
    """One variant's training steps in a worker process (`--worker`) with its own glibc malloc setting.

    The worker builds the variant as `LocalSteps` does and runs one step per request, timed there; this process
    keeps the order of the rounds, so steps in different workers still run one at a time, interleaved. The workers
    start together (each spends seconds importing and building), and `ready` waits for one's first reply.
    """

    def __init__(self, args, run: Run, name: str, malloc_tuning: bool):
        cmd = [sys.executable, __file__, "--worker", "--runs", run.name, "--variants", name]
        cmd += ["--malloc", "tuned" if malloc_tuning else "default", "--profile", str(args.profile)]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        self.malloc_tuned: bool | None = None

    def ready(self) -> WorkerSteps:
        """Waits until the worker has built its variant (its first reply says whether its malloc is tuned)."""
        self.malloc_tuned = self._reply()["malloc_tuned"]
        return self

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
            sys.stderr.write(line)  # a library's own output
        raise self._died()

    def _died(self) -> SystemExit:
        code = self.proc.wait()
        hint = ""
        if code == -signal.SIGKILL:  # what the kernel's out-of-memory killer sends
            hint = (
                " (killed: out of memory? every variant's model is alive at once; name fewer --variants or a smaller"
                " --runs shape)"
            )
        return SystemExit(f"train_throughput.py: the worker for {self.name} exited with {code}{hint}")

    def _call(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None
        return self._reply()

    def step(self, name: str, round_idx: int) -> dict:
        return self._call({"step": name, "round": round_idx})

    def profile(self) -> str:
        return self._call({"profile": True})["text"]

    def close(self) -> None:
        """Ends the worker (its stdin closes); `time_variants` then waits for every worker's exit at once."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()


def serve(args, run: Run, names: list[str], settings: dict[str, Settings], device, train_args, malloc_tuned: bool):
    """`--worker`: build the variants, then answer `WorkerSteps`' requests (one JSON line each) until stdin ends."""
    local = LocalSteps(args, run, names, settings, device, train_args)

    def reply(message: dict) -> None:
        print(PROTOCOL + json.dumps(message), flush=True)

    reply({"malloc_tuned": malloc_tuned})
    for line in sys.stdin:
        request = json.loads(line)
        reply(local.step(request["step"], request["round"]) if "step" in request else {"text": local.profile()})


def use_workers(args, names: list[str], settings: dict[str, Settings], device: torch.device) -> bool:
    """Whether the variants run each in a worker process (`--processes`; needed where their malloc differs)."""
    if len(names) < 2:  # a worker (or a memory child) holds one variant
        return False
    if len({settings[n].malloc_tuning for n in names}) > 1:
        if args.processes == "one":
            raise SystemExit(
                "--processes one: these variants differ in glibc malloc tuning, a process-wide setting; "
                "use --malloc tuned or --malloc default, or --processes per_variant"
            )
        return True
    return args.processes == "per_variant" or (args.processes == "auto" and device.type == "cpu")


STARTED = time.perf_counter()


def progress(args, message: str) -> None:
    """A progress line on stderr (the tables go to stdout at the end), so a run cut off by a time limit still shows
    how far it got; the script's own child processes stay quiet."""
    if not (args.json or args.worker):
        print(f"[train_throughput +{time.perf_counter() - STARTED:.0f}s] {message}", file=sys.stderr, flush=True)


def time_variants(args, run: Run, names: list[str], settings: dict[str, Settings], device, train_args) -> dict:
    """Seconds per step of each variant, run interleaved: each in a worker process of its own (`use_workers`), or
    all in this process (whose malloc setting `main` applied)."""
    if not use_workers(args, names, settings, device):
        executors = [LocalSteps(args, run, names, settings, device, train_args)]
        owner = dict.fromkeys(names, executors[0])
        malloc_tuned = {}
    else:
        # one worker per variant (every timed step comes after a switch of process alike), all started at once
        executors = [WorkerSteps(args, run, name, settings[name].malloc_tuning) for name in names]
        owner, malloc_tuned = {}, {}
        try:
            for name, worker in zip(names, executors, strict=True):
                owner[name], malloc_tuned[name] = worker, worker.ready().malloc_tuned
        except BaseException:
            for worker in executors:  # the others, still building, would wait on their stdin for ever
                worker.proc.kill()
                worker.proc.wait()
            raise
    times: dict[str, dict[int, float]] = {name: {} for name in names}  # seconds per timed round
    first_loss: dict[str, float] = {}
    failed: dict[str, str] = {}
    try:
        for round_idx in range(args.warmup + args.steps):
            order = names[round_idx % len(names) :] + names[: round_idx % len(names)]
            for name in order:
                if name in failed:
                    continue
                result = owner[name].step(name, round_idx)
                if "failed" in result:
                    failed[name] = result["failed"]
                    continue
                first_loss.setdefault(name, result["loss"])
                if round_idx >= args.warmup:
                    times[name][round_idx] = result["seconds"]
            kind = "warm-up" if round_idx < args.warmup else "timed"
            progress(args, f"{run.name}: round {round_idx + 1}/{args.warmup + args.steps} ({kind}) done")
        profiles = [executor.profile() for executor in executors] if args.profile else []
    finally:
        for executor in executors:
            executor.close()
        for executor in executors:  # each worker takes a second or more to exit: they do so side by side
            if isinstance(executor, WorkerSteps):
                executor.proc.wait()
    for text in profiles:
        print(text, end="")
    return {"times": times, "first_loss": first_loss, "failed": failed, "malloc_tuned": malloc_tuned}


def op_category(name: str) -> str | None:
    """Coarse kind of a profiled op, for the per-category summary (None: a wrapper whose children are counted)."""
    if name.startswith(("phase:", "## ", "Optimizer.", "autograd::", "Torch-Compiled", "LinearCrossEntropy")):
        return None
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul"
    if "scaled_dot_product" in name or "_attention_" in name:  # CUDA: the flash/cuDNN kernel's own aten op
        return "attention (sdpa)"
    if name.startswith(("graph_", "triton_")):  # inductor's C++ (CPU) or Triton (CUDA) kernels
        return "inductor kernels"
    if name in ("aten::copy_", "aten::_to_copy"):
        return "casts, copies"
    if (
        "softmax" in name
        or "nll_loss" in name
        or name in ("aten::exp", "aten::exp_", "aten::scatter_", "aten::gather")
    ):
        return "softmax, loss"
    if "gelu" in name or name in ("aten::tanh", "aten::tanh_backward", "aten::pow"):
        return "GELU"
    return "other"


FLOOR_KINDS = ("matmul", "attention (sdpa)")  # with the clip and AdamW phases: a step's floor (`step_floor_ms`)


def step_floor_ms(phases: dict[str, float], categories: dict[str, float]) -> float:
    """The profiled ms of a step's matmuls, sdpa attention, clipping and AdamW: what no rewrite of the model removes.

    Every variant runs the same matmul FLOPs, and the other three the same kernels for the same settings; the rest
    of the step (activations, LayerNorm, the loss's softmax, copies) is what the implementations differ in. So step /
    floor bounds how much faster a variant could get with all of that free, and another variant's step / this floor
    how much faster than that variant this one could ever be (BENCHMARKS.md).
    """
    return sum(categories.get(kind, 0.0) for kind in FLOOR_KINDS) + sum(phases.get(p, 0.0) for p in PHASES[2:])


def split_by_phase(events, cuda: bool) -> tuple[dict[str, float], dict[str, float]]:
    """ms per phase, and ms per op kind inside forward + backward, from a profiled step's events.

    An op belongs to the phase label it runs under. On CUDA, autograd runs the backward on a thread of its own, whose
    ops have no parent on the main thread's stack: they belong to the phase whose time span holds their start (the
    main thread waits inside `phase: backward` meanwhile).
    """
    from torch.autograd import DeviceType

    cpu_events = [event for event in events if event.device_type == DeviceType.CPU]  # kernels: through their op
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in cpu_events if e.name in PHASES]
    phases: dict[str, float] = {}
    categories: dict[str, float] = {}
    for event in cpu_events:
        parent = event
        while parent is not None and parent.name not in PHASES:
            parent = parent.cpu_parent
        if parent is not None:
            phase = parent.name
        else:
            start = event.time_range.start
            phase = next((name for first, last, name in spans if first <= start <= last), None)
            if phase is None:
                continue
        ms = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3
        phases[phase] = phases.get(phase, 0.0) + ms
        category = op_category(event.name)
        if phase in PHASES[:2] and category:
            categories[category] = categories.get(category, 0.0) + ms
    return phases, categories


def profile_variants(args, steps: dict, run: Run, device: torch.device) -> None:
    """Per variant: ms per phase, forward + backward self time per op kind, and the top ops (best of 2 steps).

    Times are CPU time on a CPU and GPU kernel time on CUDA (each CPU-side op's `self_device_time_total`: the
    kernels it launched itself), so a phase is the sum over the ops inside it.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    seq = torch.randint(0, 50257, (run.batch_size, run.seq_len + 1), generator=torch.Generator().manual_seed(2))
    x, y = seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"

    summary, tables = {}, {}
    for name, step in steps.items():
        profiles = []
        for _ in range(2):  # keep the faster of two profiled steps: the other may have met a load spike
            with profile(activities=activities) as prof:
                step(x, y)
            synchronize(device)
            profiles.append((prof, *split_by_phase(prof.events(), cuda)))
        prof, phases, categories = min(profiles, key=lambda p: sum(p[1].values()))
        summary[name] = (phases, categories)
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=60)
    kinds = sorted({k for _, cats in summary.values() for k in cats}, key=lambda k: (k == "other", k))
    print(
        f"\n### torch.profiler, {run.name}: one step (the faster of two), {'GPU kernel' if cuda else 'CPU'} ms; "
        "forward + backward split by op kind (self time)\n"
    )
    header = ["variant", "step", *(p.split(": ")[1] for p in PHASES), *kinds, "floor", "step / floor"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for name, (phases, cats) in summary.items():
        step_ms, floor_ms = sum(phases.values()), step_floor_ms(phases, cats)
        cells = [f"{step_ms:,.0f}"] + [f"{phases.get(p, 0):,.0f}" for p in PHASES]
        cells += [f"{cats[k]:,.0f}" if k in cats else "-" for k in kinds]
        cells += [f"{floor_ms:,.0f}", f"{step_ms / floor_ms:.2f}x" if floor_ms else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "\nfloor: matmul + attention (sdpa) + clip + AdamW, the work no rewrite of the model removes; step / floor: "
        "how much faster the step would be if everything else were free."
    )
    for name, table in tables.items():
        print(f"\n#### {name}: top {args.profile} ops by self time\n\n```\n{table}\n```")


def paired_speedup(times: dict[str, dict[int, float]], name: str, ref: str) -> str:
    """`ref`'s step time over `name`'s, round by round: the median and quartiles over the rounds both timed."""
    ratios = [times[ref][r] / times[name][r] for r in times[name].keys() & times[ref].keys()]
    if len(ratios) < 2:
        return f"{ratios[0]:.2f}x" if ratios else "-"
    low, mid, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{mid:.2f}x [{low:.2f}-{high:.2f}]"


def release_memory(device: torch.device) -> None:
    """Free what the timed variants left in this process before the memory children start: on a GPU they share its
    memory with this process, and torch's caching allocator keeps freed blocks reserved. On an H200 (143 GB) the
    hf-fp32 child at 64x1024, run alone, ran out of memory beside the ~100 GB this process still held after timing
    that variant. The models are collected (the accelerator that prepared them and its state form cycles), then
    inductor's compiled graphs and CUDA-graph pools dropped, then the allocator's cache returned to the driver."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def child_memory(runs: list[Run], names: list[str], args) -> dict:
    """Peak memory of each (run, variant) alone: a fresh process running warm-up + 2 steps of it.

    Up to `--memory_jobs` children run at once (their peaks are per process: `max_memory_allocated` on CUDA,
    `VmHWM` on CPU); one that fails among others is run again alone (on an H200, one of four concurrent children
    once died in compilation and passed alone), and one that fails alone reports the last line of its error. A
    child whose variant fails a step (out of memory: the children share the GPU's memory) fails too: the peak it
    reached by then is not the variant's.
    """
    results = _child_memory([(run, name) for run in runs for name in names], args, args.memory_jobs)
    if args.memory_jobs > 1:
        failed = [(run, name) for run in runs for name in names if "error" in results[(run.name, name)]]
        results.update(_child_memory(failed, args, 1))
    return results


def _child_memory(jobs: list[tuple[Run, str]], args, max_jobs: int) -> dict:
    results: dict = {}
    running: list = []

    def finish(job, proc) -> None:
        out, err = proc.communicate()
        if proc.returncode:
            last = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
            results[job] = {"error": last}
        else:
            results[job] = json.loads(out.strip().splitlines()[-1])
        progress(args, f"{job[0]}: peak memory of {job[1]}: {'failed' if proc.returncode else 'measured'}")

    if jobs:
        progress(args, f"peak memory: {len(jobs)} child process(es), {max_jobs} at a time")
    for run, name in jobs:
        cmd = [sys.executable, __file__, "--json", "--no_memory", "--runs", run.name, "--variants", name]
        cmd += ["--warmup", str(min(args.warmup, 2)), "--steps", "2", "--malloc", args.malloc]
        if len(running) >= max_jobs:
            finish(*running.pop(0))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        running.append(((run.name, name), proc))
    for job, proc in running:
        finish(job, proc)
    return results


def malloc_summary(names: list[str], results: dict, malloc_tuned: bool) -> str:
    """One line: which variants ran with glibc malloc tuned, and in which processes."""
    workers = next(iter(results.values()))["malloc_tuned"]
    if not workers:
        how = "tuned (tune_cpu_malloc)" if malloc_tuned else "default"
        return f"glibc malloc: {how}, for every variant, all in one process."
    tuned = [n for n in names if workers.get(n)]
    default = [n for n in names if not workers.get(n)]
    groups = []
    if tuned:
        groups.append(f"tuned (tune_cpu_malloc) for {', '.join(tuned)}")
    if default:
        groups.append(f"glibc's default for {', '.join(default)}")
    return (
        f"glibc malloc: {'; '.join(groups)}. Each variant ran in a worker process of its own, their steps "
        "interleaved one at a time."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.profile and device.type == "cpu":  # name inductor's C++ kernels in the profile (set before compiling)
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    with tempfile.TemporaryDirectory() as tmp:
        train_args = TrainArguments(output_dir=tmp)
        if device.type == "cpu":  # the trainer's thread count (process-wide: every variant, the matmul peak too)
            torch.set_num_threads(cpu_threads(train_args, num_processes=1))
        settings = variant_settings(args.variants, device, train_args, args.malloc)
        needed = {name: warmup_rounds(variant, device) for name, variant in settings.items()}
        short = [name for name, rounds in needed.items() if rounds > args.warmup]
        if short:  # a timed round would compile, or record CUDA graphs
            raise SystemExit(
                f"train_throughput.py: --warmup {args.warmup} would time the compilation of {', '.join(short)}: use "
                f"--warmup {max(needed.values())} or more (compilation, and the recording of CUDA graphs, happen in "
                "the warm-up rounds)."
            )
        defaults = trainer_defaults(device, train_args)  # what the variant list calls train_accelerate.py's defaults
        names = list(settings)  # the variants in the order named (once each)
        in_process = not use_workers(args, names, settings, device)  # else each worker sets its own malloc
        malloc_tuned = in_process and settings[names[0]].malloc_tuning and tune_cpu_malloc()
        baseline_rss = proc_status_mib("VmRSS")

        if args.worker:
            serve(args, args.runs[0], names, settings, device, train_args, malloc_tuned)
            return

        if args.json:  # child: one run, one variant; report its peak memory
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            failed = time_variants(args, args.runs[0], names, settings, device, train_args)["failed"]
            if failed:  # e.g. out of memory beside other children: the peak so far is not the variant's
                raise SystemExit(f"train_throughput.py: {', '.join(f'{n}: {why}' for n, why in failed.items())}")
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else proc_status_mib("VmHWM")
            print(json.dumps({"peak_mib": peak, "baseline_mib": 0.0 if device.type == "cuda" else baseline_rss}))
            return

        dtypes = {"no": torch.float32, "bf16": torch.bfloat16}
        peaks = {
            p: measure_peak(device, dtypes[p], args.peak_size) for p in {settings[n].mixed_precision for n in names}
        }
        datasheet = device_peak_flops(device)
        results = {run.name: time_variants(args, run, names, settings, device, train_args) for run in args.runs}
        for p in peaks:  # the machine may have been busier at the start: keep the best of two measurements
            peaks[p] = max(peaks[p], measure_peak(device, dtypes[p], args.peak_size))
        memory = {}
        if not args.no_memory:
            release_memory(device)
            memory = child_memory(args.runs, names, args)

    print(
        f"\n## Training throughput: {describe_device(device)}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {time.strftime('%Y-%m-%d')}\n"
    )
    print(f"Command: `python {' '.join(['benchmarks/train_throughput.py', *(argv or sys.argv[1:])])}`\n")
    print(f"Median of {args.steps} interleaved steps after {args.warmup} warm-up (compilation) steps per variant.")
    if device.type == "cpu":
        print(malloc_summary(names, results, malloc_tuned))
    print("Variants:")
    for name in names:
        print(f"- `{name}`: {settings[name].describe(device.type)}{defaults_note(settings[name], defaults)}")
    peak_text = ", ".join(f"{dtypes[p]}: {v / 1e9:,.0f} GFLOP/s" for p, v in peaks.items())
    print(f"\nMeasured matmul peak ({args.peak_size}^2 x {args.peak_size}, best of 5, twice): {peak_text}")
    if datasheet:
        print(f"Datasheet dense bf16 peak: {datasheet / 1e12:,.0f} TFLOP/s")
    vocab = GPT2ScratchConfig()
    print(
        "MFU = flops_per_token (6N + 12*L*C*T; N without the position embedding, the tied LM head at the padded "
        f"{vocab.vocab_size}-token vocabulary for every variant, though HF's has {vocab.tokenizer_vocab_size}) x "
        "tokens/s / peak of the matmul dtype\n"
    )

    for run in args.runs:
        times, failed = results[run.name]["times"], results[run.name]["failed"]
        median = {n: statistics.median(times[n].values()) for n in names if times[n]}
        tok_s = {n: run.tokens / median[n] for n in median}
        fpt = flops_per_token(GPT2ScratchConfig(**run.model), run.seq_len)
        print(
            f"### {run.name}: {run.model['n_layer']} layers, {run.model['n_head']} heads, {run.model['n_embd']} wide; "
            f"batch {run.batch_size} x {run.seq_len} = {run.tokens} tokens/step; {fpt / 1e6:,.1f} MFLOP/token\n"
        )
        header = "| variant | settings | s/step (median) | min | tokens/s |"
        sep = "|---|---|---:|---:|---:|"
        for ref in (HF_FP32, HF_FAST):
            if ref in tok_s:
                header += f" vs {ref} |"
                sep += "---:|"
        header += " peak mem (MiB) | MFU (measured peak) |"
        sep += "---:|---:|"
        if datasheet:
            header += " MFU (datasheet bf16) |"
            sep += "---:|"
        print(header)
        print(sep)
        for n in names:
            if n not in median:
                print(f"| {n} | {settings[n].describe(device.type)} | {failed.get(n, 'no timed step')} |")
                continue
            row = f"| {n} | {settings[n].describe(device.type)} | {median[n]:.3f} | {min(times[n].values()):.3f} |"
            row += f" {tok_s[n]:,.0f} |"
            for ref in (HF_FP32, HF_FAST):
                if ref in tok_s:
                    row += f" {tok_s[n] / tok_s[ref]:.2f}x |"
            mem = memory.get((run.name, n))
            if mem is None:
                row += " - |"
            elif "error" in mem:
                row += f" error: {mem['error'][:60]} |"
            elif device.type == "cuda":
                row += f" {mem['peak_mib']:,.0f} |"
            else:
                row += f" {mem['peak_mib']:,.0f} (+{mem['peak_mib'] - mem['baseline_mib']:,.0f}) |"
            row += f" {100 * fpt * tok_s[n] / peaks[settings[n].mixed_precision]:.1f}% |"
            if datasheet:
                row += f" {100 * fpt * tok_s[n] / datasheet:.1f}% |"
            print(row)
        paired = [
            f"{n} vs {ref} {paired_speedup(times, n, ref)}"
            for ref in (HF_FP32, HF_FAST)
            if ref in median
            for n in median
            if n not in (HF_FP32, HF_FAST)
        ]
        if paired:
            print(
                "\nPaired speed-ups (a round runs every variant's step back to back, so a drift in the machine's "
                f"speed hits a round's steps alike; median over the rounds [quartiles]): {'; '.join(paired)}"
            )
        losses = results[run.name]["first_loss"]
        print(f"\nFirst-step losses: {', '.join(f'{n} {v:.4f}' for n, v in losses.items())}")
        if device.type != "cuda" and memory:
            print("Peak memory: the child process's RSS high-water mark (in brackets: above its RSS after imports).")
        print()


if __name__ == "__main__":
    main()
