"""Training helpers for `train_accelerate.py`: arguments, presets, optimizer, schedule, checkpoints, metrics.

Each hyperparameter lives once, in the dataclasses below (defaults: the GPT-2 124M / GPT-3 small recipe) and in the
YAML presets under `configs/`; the trainer reads them from there.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import SCALER_NAME
from transformers import HfArgumentParser
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

from .data import DataArguments, fsync_dir, local_corpus_root, one_line_parse_errors, unrecognized_arguments

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRI_STATE_VALUES = ("auto", "true", "false", "1", "0", "yes", "no")  # --compile, --fused_adamw, --malloc_tuning
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
RUN_CONFIG_NAME = "run_config.json"
RUN_SUMMARY_NAME = "run_summary.json"
METRICS_NAME = "metrics.jsonl"

# Dense bf16 tensor-core peaks (datasheets), for MFU. Matched in this order against torch.cuda.get_device_name(),
# as whole words ("L4" is not "NVIDIA L40"): the more specific names come first.
GPU_PEAK_BF16_FLOPS = {
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


@dataclass
class ModelArguments:
    """The GPT-2 to train (see `GPT2ScratchConfig`); defaults are GPT-2 124M."""

    n_layer: int = field(default=12, metadata={"help": "Transformer blocks."})
    n_head: int = field(default=12, metadata={"help": "Attention heads per block (must divide n_embd)."})
    n_embd: int = field(default=768, metadata={"help": "Width of the residual stream."})
    n_positions: int = field(default=1024, metadata={"help": "Longest context the model supports (>= seq_len)."})
    vocab_size: int = field(
        default=50304, metadata={"help": "Embedding rows: GPT-2's 50257 tokens padded to a multiple of 128 for speed."}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on embeddings, attention and residuals (--init_from models too)."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernel: sdpa (fused F.scaled_dot_product_attention), eager, flash_attention_2."},
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Start from pretrained weights instead of random ones: Hugging Face GPT-2 (a Hub id like gpt2, or "
            "a local GPT2LMHeadModel folder) or a gpt2-scratch model (a run's final/ folder, or a repository "
            "push_to_hub.py made); the size arguments are then taken from that checkpoint, --dropout from this run."
        },
    )

    def __post_init__(self) -> None:
        """Reject a `--dropout` no dropout layer takes, naming the flag: the config named its own field
        (`resid_pdrop`), and an `--init_from` model, whose layers are set directly, failed at its first forward."""
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}.")


@dataclass
class TrainArguments:
    """How to train: the optimizer, schedule and batch of GPT-3 small, speed switches, evaluation and checkpoints."""

    config: str | None = field(
        default=None,
        metadata={
            "help": "A YAML preset (e.g. configs/quickstart.yaml); flags given on the command line override it."
        },
    )
    output_dir: str = field(default="runs/gpt2-124m", metadata={"help": "Run folder: checkpoints, metrics, final/."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the token shards go (reused across runs); default: data/<dataset name>[-<dataset_config>], "
            "e.g. data/fineweb-edu-sample-10BT."
        },
    )
    overwrite_data: bool = field(
        default=False,
        metadata={"help": "Rebuild --data_dir when it holds shards of another source, tokenizer or settings."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an --output_dir that holds another run's checkpoints or finished run "
            "(final/, run_summary.json): they are deleted (once the data and model are ready). Without it, that is "
            "an error."
        },
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "Continue a run: 'latest' (newest checkpoint in output_dir) or a path (another folder's "
            "checkpoint: into a new or empty output_dir). Optimizer, schedule and "
            "batch flags given now (max_lr, min_lr_ratio, betas, eps, weight_decay, grad_clip, warmup_steps, "
            "max_steps, total_batch_tokens, micro_batch_size, fused_adamw), --dropout and --seed (the samples') apply "
            "from the next step; the model's size flags and the data flags that change the token stream must be "
            "the checkpoint's."
        },
    )
    seed: int = field(
        default=1337, metadata={"help": "Seed for the weights, dropout (seed + process index) and samples."}
    )
    # batch
    micro_batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass on each process (B)."})
    seq_len: int = field(default=1024, metadata={"help": "Tokens per sequence (T)."})
    total_batch_tokens: int = field(
        default=524288,
        metadata={
            "help": "Tokens per optimizer step (2**19, GPT-3 small's 0.5M), reached by gradient accumulation; "
            "must be a multiple of micro_batch_size * seq_len * processes."
        },
    )
    max_steps: int = field(
        default=19073, metadata={"help": "Optimizer steps (19073 x 2**19 tokens = 10B tokens, FineWeb-Edu 10BT)."}
    )
    # AdamW and schedule
    max_lr: float = field(default=6e-4, metadata={"help": "Peak learning rate."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "The cosine decays to max_lr * min_lr_ratio."})
    warmup_steps: int = field(default=715, metadata={"help": "Linear warmup steps (375M tokens, as GPT-3)."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay, on matrices and embeddings only (not biases/LayerNorm)."}
    )
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this (0: off)."})
    # speed
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "bf16, fp16 (CUDA), no, or auto: bf16 where the device has it (CUDA Ampere+, CPUs with bf16)."
        },
    )
    compile: str = field(
        default="auto", metadata={"help": "torch.compile the model: true, false, or auto (on for CUDA only)."}
    )
    compile_mode: str = field(
        default="default",
        metadata={
            "help": "torch.compile mode when compiling: default, reduce-overhead (CUDA graphs), max-autotune "
            "(matmul autotuning + CUDA graphs) or max-autotune-no-cudagraphs; the last two compile for longer.",
            "choices": COMPILE_MODES,
        },
    )
    tf32: bool = field(
        default=True,
        metadata={"help": "TF32 float32 matmuls on CUDA (set_float32_matmul_precision('high')); --no_tf32: off."},
    )
    fused_adamw: str = field(
        default="auto", metadata={"help": "Fused AdamW kernel: true, false, or auto (CUDA and CPU)."}
    )
    cpu_threads: int = field(
        default=0,
        metadata={
            "help": "Torch threads per process on CPU; 0: the cores available divided by the processes on this "
            "machine (accelerate launch otherwise leaves OMP_NUM_THREADS=1 unless given --cpu)."
        },
    )
    malloc_tuning: str = field(
        default="auto",
        metadata={
            "help": "Keep freed memory in glibc's heap instead of unmapping it after every step (Linux): true, false, "
            "or auto (on for CPU, where the page faults it avoids made steps 1.4x slower)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each block's activations in the backward pass: less memory for one more forward of "
            "the blocks (124M on a CPU: 15-19%% slower steps)."
        },
    )
    loss_chunk_elements: int = field(
        default=0,
        metadata={
            "help": "Logits per chunk of the fused LM-head loss: fewer for less memory, more for speed; 0: the "
            "model's default, 2**26 (256 MB in fp32), or 2**30 on a CUDA GPU (a 16 x 1024 micro-batch in one chunk: "
            "1.05x faster 124M steps on an H200 for 2.5 GB more memory)."
        },
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds the processes of a run on several processes or machines wait for one another "
            "(torch.distributed's timeout, as Trainer's --ddp_timeout): in a collective, and at the start for the "
            "slowest machine's data preparation."
        },
    )
    # evaluation, samples, logging
    eval_every: int = field(
        default=250, metadata={"help": "Evaluate the val loss every N steps (0: only at the end)."}
    )
    eval_batches: int = field(default=20, metadata={"help": "Val batches per process per evaluation."})
    sample_every: int = field(default=250, metadata={"help": "Log text samples every N steps (0: off)."})
    sample_prompt: str = field(
        default="Hello, I'm a language model,",
        metadata={"help": "Prompt of the samples (empty: <|endoftext|>, a document's start)."},
    )
    num_samples: int = field(default=4, metadata={"help": "Samples per sampling step."})
    sample_tokens: int = field(default=32, metadata={"help": "New tokens per sample (top-k 50 sampling)."})
    log_every: int = field(
        default=10,
        metadata={
            "help": "Write a log line and a metrics.jsonl record every N steps (and at the first step, the last and "
            "each evaluation)."
        },
    )
    report_to: str = field(
        default="none",
        metadata={"help": "accelerate trackers: none, all, or a comma list (tensorboard, wandb, trackio, ...)."},
    )
    # checkpoints
    save_every: int = field(default=1000, metadata={"help": "Save a resumable checkpoint every N steps (0: off)."})
    keep_last: int = field(default=3, metadata={"help": "Checkpoints to keep, 1 or more (older ones are deleted)."})

    def __post_init__(self) -> None:
        """Reject values the run could not use, before any data is prepared or a step is taken.

        Raises:
            ValueError: one line naming the flag, the value and what it accepts.
        """
        for name in ("micro_batch_size", "seq_len", "total_batch_tokens", "max_steps", "eval_batches", "num_samples",
                     "sample_tokens", "log_every", "keep_last", "ddp_timeout"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("warmup_steps", "eval_every", "sample_every", "save_every", "cpu_threads", "grad_clip",
                     "weight_decay"):  # fmt: skip
            if not getattr(self, name) >= 0:  # nan too: --grad_clip nan clipped nothing, --weight_decay nan gave nan
                raise ValueError(f"--{name} must be 0 or more, got {getattr(self, name)}.")
            if getattr(self, name) == math.inf:
                raise ValueError(f"--{name} must be a finite number, got inf.")
        if not 0 <= self.seed < 2**32:  # numpy's range (set_seed seeds numpy too); was its error, after the data
            raise ValueError(f"--seed must be between 0 and {2**32 - 1}, got {self.seed}.")
        if self.loss_chunk_elements < 0:
            raise ValueError(
                f"--loss_chunk_elements must be 0 (the model's default) or a positive count of logits, got "
                f"{self.loss_chunk_elements}."
            )
        for name in ("max_lr", "eps"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"--{name} must be a positive number, got {getattr(self, name)}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"--min_lr_ratio must be between 0 and 1 (a fraction of max_lr), got {self.min_lr_ratio}."
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}.")
        check_trackers(self.report_to)
        if str(self.mixed_precision).lower() not in ("auto", "bf16", "fp16", "no"):
            raise ValueError(f"--mixed_precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}.")
        for name in ("compile", "fused_adamw", "malloc_tuning"):
            resolve_flag(getattr(self, name), name, auto=False)
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}.")


ALL_ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)


def resolve_flag(value: str | bool, name: str, auto: bool) -> bool:
    """A true/false/auto flag (`--compile`, `--fused_adamw`, `--malloc_tuning`) as a bool; auto gives `auto`.

    Raises:
        ValueError: for any other value, naming the flag.
    """
    value = str(value).lower()  # a YAML preset gives true/false as bools
    if value not in TRI_STATE_VALUES:
        raise ValueError(f"--{name} must be true, false or auto, got {value!r}.")
    return auto if value == "auto" else value in ("true", "1", "yes")


def _flag_names() -> set[str]:
    return {f.name for cls in ALL_ARGUMENT_CLASSES for f in dataclasses.fields(cls)}


def _scalars_as_written(mapping: yaml.MappingNode) -> dict[str, str]:
    """The text of each scalar value of a YAML mapping, by key, merge keys (`<<: *defaults`) included: the mapping's
    own keys win over merged ones, and earlier merged mappings over later ones, as YAML merges them."""
    own, merged = {}, []
    for key, node in mapping.value:
        if key.tag == "tag:yaml.org,2002:merge":
            merged += node.value if isinstance(node, yaml.SequenceNode) else [node]
        else:
            own[key.value] = node.value if isinstance(node, yaml.ScalarNode) else None
    for node in merged:
        if isinstance(node, yaml.MappingNode):
            for key, text in _scalars_as_written(node).items():
                own.setdefault(key, text)
    return {key: text for key, text in own.items() if text is not None}


def load_preset(path: str | os.PathLike) -> dict[str, Any]:
    """The flat `{flag: value}` mapping of a YAML preset.

    Raises:
        FileNotFoundError: the preset does not exist.
        ValueError: it is not valid YAML, not a mapping, or it has keys that are not flags of the trainer (listed).
    """
    preset_path = Path(path)
    if not preset_path.is_file():
        raise FileNotFoundError(f"Preset {path} not found: pass a YAML file such as configs/quickstart.yaml.")
    text = preset_path.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(
            f"Preset {path} is not valid YAML{line}: {problem}; fix it or pass the flags instead."
        ) from err
    if not isinstance(values, dict):
        raise ValueError(f"Preset {path} must be a YAML mapping of flag: value.")
    unknown = sorted(set(values) - _flag_names() - {"config"}, key=str)  # keys may be numbers, booleans or null
    if unknown:
        raise ValueError(
            f"Preset {path} has unknown keys {unknown}: use the trainer's flags (python train_accelerate.py --help)."
        )
    text_flags = {f.name for cls in ALL_ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.type in (str, "str")}
    root = yaml.compose(text)
    written = _scalars_as_written(root) if root else {}
    for key, value in values.items():
        if key in ("output_dir", "data_dir", "resume") and isinstance(value, str):
            values[key] = os.path.expanduser(value)  # a folder's ~/, as the shell expands the command line's
        if key not in text_flags:
            continue
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false and yes/on/true as booleans
            values[key] = "true" if value else ("no" if key == "mixed_precision" else "false")
        elif isinstance(value, (int, float)):  # ... and 0123456 as an octal number, 1:30 as 90: the text as written
            values[key] = written[key]
    return values


_PRESET_KINDS = {int: "an integer", float: "a number"}  # what a flag of each type takes (bools: true or false)


def _preset_value(path: str, action: argparse.Action, value: Any) -> Any:
    """A preset's `value` for `action`'s flag, read as the command line reads the flag's text (`action.type`).

    argparse converts a default only when it is text, so YAML's numbers, booleans, lists and nulls reached the run as
    they were: `seq_len: true` trained on 1-token sequences, `max_steps: 2.5` ran 3 steps.

    Raises:
        ValueError: a value the flag's text could not be (naming the preset, the key and what it takes); a null for a
            flag that has a value unless unset.
    """
    if value is None:
        if action.default is None and not action.required:
            return None  # an optional flag (--init_from, --val_split, ...) left unset
        raise ValueError(f"Preset {path}: {action.dest} is empty (null); give it a value or leave the key out.")
    if isinstance(value, (list, dict)):
        raise ValueError(f"Preset {path}: {action.dest}: {value!r} is not one value; give it one (see --help).")
    try:
        return action.type(str(value))
    except (ValueError, argparse.ArgumentTypeError) as err:
        kind = _PRESET_KINDS.get(action.type, "true or false")
        raise ValueError(f"Preset {path}: {action.dest}: {value!r} is not {kind}; fix it (see --help).") from err


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Parse the command line: the `--config` preset's values first, then the flags given, which win."""
    parser = HfArgumentParser(ALL_ARGUMENT_CLASSES, description="Pretrain GPT-2 from scratch with accelerate.")
    one_line_parse_errors(parser)  # a flag's bad value or choice, a missing --dataset: not below the 40-line usage
    for action in parser._actions:  # HfArgumentParser's --no_X of a flag that defaults to true
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"The same as --{action.dest} false."  # not --X's help again, with "(default: False)"
            action.default = argparse.SUPPRESS  # the default stays --X's
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    config_path = config_only.parse_known_args(argv)[0].config
    if config_path:
        preset = load_preset(config_path)
        actions = {action.dest: action for action in reversed(parser._actions) if action.type is not None}
        preset = {key: _preset_value(config_path, actions[key], value) for key, value in preset.items()}
        parser.set_defaults(**preset)
        for action in parser._actions:  # a preset value satisfies a required flag
            if action.dest in preset:
                action.required = False
    model_args, data_args, train_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:  # was "Some specified arguments are not used by the HfArgumentParser: [...]"
        raise ValueError(f"{unrecognized_arguments(parser, unknown)} (see --help)")
    return model_args, data_args, train_args


def check_output_dir_not_the_corpus(output_dir: str | os.PathLike, dataset: str) -> None:
    """Refuse an `--output_dir` that is the local corpus folder (`--dataset`, or a glob's fixed folder): the run's
    own files (`run_config.json`, `metrics.jsonl`, checkpoints) would be read as data by its next start. A run
    folder inside the corpus folder is left out of it (`data.py`), and a corpus inside the run folder is read.

    Raises:
        ValueError: naming both flags and the fix.
    """
    root = local_corpus_root(dataset)
    if dataset and root.is_dir() and root.resolve() == Path(output_dir).resolve():
        raise ValueError(
            f"--output_dir {output_dir} is the corpus folder of --dataset {dataset}: the run's own files would be read "
            "as data; put the run in another folder (e.g. runs/NAME)."
        )


def resolve_data_dir(data_args: DataArguments, train_args: TrainArguments) -> Path:
    """`--data_dir`, or `data/<dataset name>[-<config>]` so prepared shards are shared by runs on the same corpus.

    A glob is named by its whole pattern (`a/*.jsonl` and `b/*.jsonl` differ). Where that folder would be the local
    corpus itself, or hold it, or lie inside it (`--dataset data/mine`), it gets a `-tokens` suffix.
    """
    if train_args.data_dir:
        return Path(train_args.data_dir)
    dataset = data_args.dataset
    name = dataset if glob.has_magic(dataset) else (Path(dataset.rstrip("/")).name or "dataset")
    if data_args.dataset_config:
        name += f"-{data_args.dataset_config}"
    data_dir = Path("data") / re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")
    local = local_corpus_root(dataset)
    if local.exists():
        ours, theirs = data_dir.resolve(), local.resolve()
        if ours == theirs or ours.is_relative_to(theirs) or theirs.is_relative_to(ours):
            data_dir = data_dir.with_name(data_dir.name + "-tokens")
    return data_dir


def gradient_accumulation_steps(train_args: TrainArguments, num_processes: int) -> int:
    """Micro-steps per optimizer step: total_batch_tokens / (micro_batch_size * seq_len * processes).

    Raises:
        ValueError: when it does not divide, with the nearest valid totals.
    """
    per_micro_step = train_args.micro_batch_size * train_args.seq_len * num_processes
    if train_args.total_batch_tokens <= 0 or train_args.total_batch_tokens % per_micro_step:
        lower = max(per_micro_step, train_args.total_batch_tokens // per_micro_step * per_micro_step)
        raise ValueError(
            f"--total_batch_tokens {train_args.total_batch_tokens} is not a multiple of micro_batch_size x seq_len "
            f"x processes = {train_args.micro_batch_size} x {train_args.seq_len} x {num_processes} = "
            f"{per_micro_step}: use e.g. {lower} or {lower + per_micro_step}, or change the micro-batch."
        )
    return train_args.total_batch_tokens // per_micro_step


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and embeddings (dim >= 2), none on biases and LayerNorm (dim < 2).

    The tied LM head shares the token embedding's tensor, so it is counted once.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a shared tensor once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, train_args: TrainArguments, fused: bool) -> torch.optim.AdamW:
    """GPT-3's AdamW: betas (0.9, 0.95), eps 1e-8, decoupled weight decay on matrices and embeddings only."""
    return torch.optim.AdamW(
        decay_parameter_groups(model, train_args.weight_decay),
        lr=train_args.max_lr,
        betas=(train_args.beta1, train_args.beta2),
        eps=train_args.eps,
        fused=fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, train_args: TrainArguments) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to max_lr over `warmup_steps`, then cosine decay to `max_lr * min_lr_ratio` at `max_steps`.

    `transformers`' `get_cosine_with_min_lr_schedule_with_warmup_lr_rate`: its warmup is the seed's
    `max_lr * (step + 1) / warmup_steps` exactly; its cosine runs one step ahead of the seed's
    `min_lr + 0.5 * (1 + cos(pi * decay_ratio)) * (max_lr - min_lr)` (a difference below one step of decay:
    at most `max_lr * pi / (2 * (max_steps - warmup_steps))`, 5e-8 for the 124M preset).
    """
    return get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        optimizer,
        num_warmup_steps=train_args.warmup_steps,
        num_training_steps=train_args.max_steps,
        min_lr_rate=train_args.min_lr_ratio,
    )


def check_trackers(report_to: str) -> None:
    """`--report_to`'s trackers must be ones accelerate knows and whose package is installed: accelerate itself only
    warns and logs nowhere (`none` and `all`, whatever is installed, are always accepted)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    names = [name.strip() for name in str(report_to).split(",") if name.strip()]
    if names in ([], ["none"], ["all"]):
        return
    available = {str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()}
    available |= set(LOGGER_TYPE_TO_CLASS) - {tracker.value for tracker in LoggerType}  # registered by the user
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"--report_to {name}: not one of accelerate's trackers ({', '.join(sorted(LOGGER_TYPE_TO_CLASS))}); "
                "pass none, all, or a comma list of them."
            )
        if name not in available:
            raise ValueError(
                f"--report_to {name}: its package is not installed: pip install {name.replace('_', '-')}, or pass "
                "--report_to none."
            )


def apply_optimizer_flags(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, train_args: TrainArguments
) -> list[str]:
    """Give a resumed optimizer and schedule this run's flags; return what changed (`--flag old -> new`).

    `accelerator.load_state` brings back the checkpoint's learning rate, betas, eps and weight decay, so without this
    flags changed on resume would be ignored. With the same flags nothing changes: the lr is recomputed exactly as
    the scheduler computes it (`max_lr * schedule(step)`), so resume stays bitwise exact.

    `load_state_dict` also takes the checkpoint's kernel choice (`fused`, `foreach`) with its groups; the optimizer
    was built with this run's (`--fused_adamw`, in `defaults`), so where they differ the state is loaded again under
    it, and torch puts the step counts where that kernel wants them.
    """
    changes = []
    built = {key: optimizer.defaults.get(key) for key in ("fused", "foreach")}
    if any(group.get(key) != value for group in optimizer.param_groups for key, value in built.items()):
        was, now = bool(optimizer.param_groups[0].get("fused")), bool(built["fused"])
        state = optimizer.state_dict()
        for group in state["param_groups"]:
            group.update(built)
        optimizer.load_state_dict(state)
        if was != now:
            changes.append(f"--fused_adamw {str(was).lower()} -> {str(now).lower()}")
    wanted = {"betas": (train_args.beta1, train_args.beta2), "eps": train_args.eps}
    for index, group in enumerate(optimizer.param_groups):
        decay = {"weight_decay": train_args.weight_decay} if index == 0 else {}  # group 1: biases, LayerNorm
        for key, value in (wanted | decay).items():
            current = tuple(group[key]) if key == "betas" else group[key]
            if current != value:
                flag = "--beta1/--beta2" if key == "betas" else f"--{key}"
                changes.append(f"{flag} {current} -> {value}")
                group[key] = value
    if any(base != train_args.max_lr for base in scheduler.base_lrs):
        changes.append(f"--max_lr {scheduler.base_lrs[0]} -> {train_args.max_lr}")
    scheduler.base_lrs = [train_args.max_lr] * len(optimizer.param_groups)
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = train_args.max_lr * lr_lambda(scheduler.last_epoch)  # this run's max_steps and warmup too
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return sorted(set(changes))


def gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads` (float32), from the norms of their rows: accurate and, on a CPU, fast.

    torch's CPU `vector_norm` of one large tensor (what `clip_grad_norm_` takes per gradient there) sums it in a few
    long runs: 3e-3 off for a 38.6M-entry float32 vector (the tied embedding's gradient), and 2x slower than the
    norms of its rows and then of those (5e-8 off; BENCHMARKS.md). The norms of the rows are summed in float64: an
    embedding's gradient has a few large rows (the batch's tokens) and 50k tiny ones, whose share a float32 run over
    the row norms lost (1e-5 to 4e-5 off). The trainer clips by it on CPUs (`clip_gradients`), and measures by it on
    any device when clipping is off.
    """
    if not grads:
        return torch.zeros(())
    f32 = torch.float32
    f64 = torch.float64 if grads[0].device.type != "mps" else f32  # Apple's MPS has no float64
    norms = [
        torch.linalg.vector_norm(torch.linalg.vector_norm(g.reshape(-1, g.shape[-1]), dim=-1, dtype=f32), dtype=f64)
        if g.dim() > 1 and g.shape[-1] > 0
        else torch.linalg.vector_norm(g, dtype=f64)
        for g in grads
    ]
    return torch.linalg.vector_norm(torch.stack(norms)).to(f32)


def flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs per token, PaLM's estimate: 6N + 12 * n_layer * n_embd * seq_len.

    N counts the parameters a token's matmuls touch: everything but the position embedding (a lookup); the tied
    token embedding counts once, as the LM head (padded width).
    """
    C, L = config.n_embd, config.n_layer
    inner = config.n_inner or 4 * C
    per_block = (C * 3 * C + 3 * C) + (C * C + C) + (C * inner + inner) + (inner * C + C) + 4 * C
    n = config.vocab_size * C + L * per_block + 2 * C
    return 6 * n + 12 * L * C * seq_len


def device_peak_flops(device: torch.device) -> float | None:
    """The datasheet dense bf16 peak of a known GPU, else None (CPUs: unknown)."""
    if device.type != "cuda":
        return None
    return gpu_peak_bf16_flops(torch.cuda.get_device_name(device))


def gpu_peak_bf16_flops(name: str) -> float | None:
    """`GPU_PEAK_BF16_FLOPS`' figure for a device name (`torch.cuda.get_device_name`), else None."""
    for key, peak in GPU_PEAK_BF16_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return peak
    return None


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with its core and torch-thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        name = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            name,
        )
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def proc_status_mib(field: str) -> float:
    """`VmRSS` (resident now) or `VmHWM` (its high-water mark) of this process, in MiB (Linux; NaN elsewhere).

    Not `ru_maxrss`: Linux keeps that across fork + exec, so a child started by a large parent (`accelerate launch`'s
    launcher, a benchmark's parent) would report the parent's peak; `VmHWM` belongs to the process's own address space.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mib(device: torch.device) -> float | None:
    """This process's peak memory so far, in MiB: on a CUDA GPU the most its tensors took at once
    (`torch.cuda.max_memory_allocated`), on a CPU its peak resident size (`VmHWM`, Linux); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "cpu":
        peak = proc_status_mib("VmHWM")
        return None if math.isnan(peak) else peak
    return None


MEASURED_MICRO_BATCH_TOKENS = 64 * 1024  # the largest micro-batch measured on a GPU (BENCHMARKS.md)


def micro_batch_hint(
    peak_mib: float, total_mib: float, micro_batch_size: int, seq_len: int, accumulation_steps: int
) -> str | None:
    """A suggestion of a larger `--micro_batch_size`, or None: the largest of 2x, 4x, ... the current one that the
    total batch still divides, that is no larger than the largest measured (64 x 1024 tokens), and that would use at
    most 80% of the GPU's memory by a proportional estimate (k times the micro-batch, k times the peak). The estimate
    is an upper bound: weights, gradients, AdamW state and the fused loss's logits chunk do not grow (on an H200,
    4x the micro-batch took 2.4x the memory). The same total batch in fewer, larger micro-steps ran faster there
    (1.04x at 32 x 1024, 1.08x at 64, against 16)."""
    factor = 1
    while (
        accumulation_steps % (2 * factor) == 0
        and 2 * factor * micro_batch_size * seq_len <= MEASURED_MICRO_BATCH_TOKENS
        and 2 * factor * peak_mib <= 0.8 * total_mib
    ):
        factor *= 2
    if factor == 1:
        return None
    steps = accumulation_steps // factor
    fewer = "one micro-step (no accumulation)" if steps == 1 else str(steps)
    return (
        f"GPU memory peaked at {peak_mib / 1024:.1f} of {total_mib / 1024:.1f} GiB: --micro_batch_size "
        f"{factor * micro_batch_size} would likely fit (at most about {factor * peak_mib / 1024:.0f} GiB), with the "
        f"same total batch in {fewer} instead of {accumulation_steps} accumulation steps, and "
        "larger micro-batches ran faster on an H200 (BENCHMARKS.md); --resume latest takes a new --micro_batch_size."
    )


def tune_cpu_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of giving large blocks back to the kernel (process-wide).

    By default glibc serves each allocation above its mmap threshold (which grows to at most 32 MiB) with a fresh
    `mmap` and unmaps it on `free`. A CPU training step allocates and frees its large tensors every step (the LM
    head's logits chunk, `(V, C)` weight gradients, activations, AdamW's temporaries), so every step page-faults
    them in again, zero-filled by the kernel: on 2 cores a step ran 1.4x faster without that (BENCHMARKS.md).
    Here no allocation is mmapped (`M_MMAP_MAX=0`) and the heap is trimmed only above 2 GiB of free memory at its
    top, so freed blocks are reused. The cost: memory freed during a step stays with the process for the next one,
    so its resident size can be higher (quickstart on CPU: 1.2-1.6 GB instead of 1.1 GB peak).
    Returns False (and changes nothing) where the C library has no `mallopt` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 instructions (AVX512-BF16 or AMX), so bf16 autocast is worth it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# --- checkpoints -----------------------------------------------------------------------------------------------------


# what `accelerator.save_state` writes besides weights and optimizer: the main process's RNG states, and the trainer's
# scheduler, train loader and TrainState (`register_for_checkpointing`, in that order)
RNG_STATE = "random_states_{}.pkl"  # each process's, by its rank
CHECKPOINT_STATE_FILES = (RNG_STATE.format(0), *(f"custom_checkpoint_{i}.pkl" for i in range(3)))


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoints/step_N`, never the temporary folders of a save in progress), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path:
    """The checkpoint folder `--resume` names: 'latest' in `output_dir`, or a path.

    Raises:
        FileNotFoundError: nothing to resume, with what was looked at.
    """
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume latest: no checkpoint in {Path(output_dir) / 'checkpoints'}; start without --resume or "
                "pass a checkpoint folder."
            )
        missing = [
            n
            for n in ("model.safetensors", "optimizer.bin", *CHECKPOINT_STATE_FILES)
            if not (checkpoints[-1] / n).is_file()
        ]
        if missing:  # a deletion cut short (--overwrite_output_dir, --keep_last), or a copy missing files
            raise FileNotFoundError(
                f"--resume latest: the newest checkpoint {checkpoints[-1]} is incomplete (no {', '.join(missing)}); "
                "move it out of the checkpoints folder to resume from the one before."
            )
        return checkpoints[-1]
    path = Path(resume)
    if path.name.startswith(".tmp-old-"):  # replace_folder's old copy: restore_interrupted_replaces moves it back
        raise FileNotFoundError(
            f"--resume {resume}: a checkpoint that a replacing save set aside, not one to resume from; pass 'latest' "
            f"or {path.with_name(path.name.removeprefix('.tmp-old-'))} (a crashed replace's old copy moves back "
            "there when the run starts)."
        )
    if path.name.startswith(".tmp-"):  # save_checkpoint's folder before its rename: any file may be cut short
        raise FileNotFoundError(
            f"--resume {resume}: an unfinished save (the run stopped while writing it), not a checkpoint; pass "
            f"'latest' (the newest complete one) or a {Path(output_dir) / 'checkpoints' / 'step_N'} folder."
        )
    if not (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a checkpoint folder (no model.safetensors); pass 'latest' or a "
            f"{Path(output_dir) / 'checkpoints' / 'step_N'} folder."
        )
    if not any(path.glob("optimizer*.bin")):  # an export (final/, a pushed model) has weights but no training state
        raise FileNotFoundError(
            f"--resume {resume}: a model without the optimizer and data state a resume needs (an export such as "
            f"final/?); pass a {Path(output_dir) / 'checkpoints' / 'step_N'} folder, or start a new run from these "
            "weights with --init_from."
        )
    missing = [name for name in CHECKPOINT_STATE_FILES if not (path / name).is_file()]
    if missing:  # load_state would fail on them in a traceback, or (RNG states) resume inexactly without a word
        raise FileNotFoundError(
            f"--resume {resume}: an incomplete checkpoint (no {', '.join(missing)}); pass another "
            f"{Path(output_dir) / 'checkpoints' / 'step_N'} folder, or start a new run from its weights with "
            "--init_from."
        )
    return path


def load_checkpoint(accelerator, checkpoint: str | os.PathLike) -> list[str]:
    """`accelerator.load_state(checkpoint)`, across a change of `--mixed_precision` to or from fp16.

    Only fp16 has a gradient scaler, and only its checkpoints hold its state (`scaler.pt`). Resumed in fp16, a
    checkpoint saved in bf16 or fp32 has none, which `load_state` failed on (a `FileNotFoundError` traceback): the
    scaler starts at its initial scale instead, as a new fp16 run does. The other way, an fp16 checkpoint's scaler
    state is left unused. Returns what changed, for the resume's log line (empty when nothing did).
    """
    has_scaler_state = (Path(checkpoint) / SCALER_NAME).is_file()
    scaler = accelerator.scaler
    if scaler is not None and not has_scaler_state:
        accelerator.scaler = None  # load_state loads the scaler only when the accelerator has one
        try:
            accelerator.load_state(str(checkpoint))
        finally:
            accelerator.scaler = scaler
        scale = scaler.get_scale()
        return [f"--mixed_precision fp16: no loss scale in the checkpoint (not saved in fp16), starting at {scale:g}"]
    accelerator.load_state(str(checkpoint))
    if scaler is None and has_scaler_state:
        return [f"--mixed_precision {accelerator.mixed_precision}: the checkpoint's fp16 loss scale is not used"]
    return []


def check_no_checkpoints_ahead(output_dir: str | os.PathLike, step: int) -> None:
    """Refuse to train from `step` where `output_dir` holds checkpoints past it (another run's, or a later branch).

    This run's saves would mix with them: `--keep_last` would delete the new ones (it keeps the highest steps) and
    `--resume latest` would pick the old ones.

    Raises:
        ValueError: naming the checkpoints and the ways out.
    """
    ahead = [p.name for p in list_checkpoints(output_dir) if int(CHECKPOINT_PATTERN.match(p.name).group(1)) > step]
    if ahead:
        start = "a new run" if step == 0 else f"a run from step {step}"
        way_out = "--overwrite_output_dir true to delete them" if step == 0 else "move them away"
        raise ValueError(
            f"--output_dir {output_dir} already holds checkpoints past step {step} ({', '.join(ahead)}), which "
            f"{start} would mix with: continue them with --resume latest, or use another --output_dir (or "
            f"{way_out})."
        )


FINISHED_RUN_FILES = ("final", RUN_SUMMARY_NAME)  # what a run leaves when it ends: its export and its summary


def cannot_write_output_dir(output_dir: str | os.PathLike, err: OSError) -> str:
    """The one line for an `--output_dir` the run cannot write to."""
    return f"--output_dir {output_dir}: cannot write there ({err.strerror or err}); pass a folder you can write to."


def check_output_dir_not_a_file(output_dir: str | os.PathLike) -> None:
    """Refuse an `--output_dir` that is a file, on every process. One `stat` (`is_file`): meanwhile the main process
    may create the folder and remove it again (`check_output_dir_writable`), and `exists() and not is_dir()` saw it
    in between on another process ("is a file", once in a CI run of two processes)."""
    if Path(output_dir).is_file():
        raise ValueError(f"--output_dir {output_dir} is a file: pass a folder for the run (new or not).")


def check_output_dir_writable(output_dir: str | os.PathLike) -> None:
    """Refuse an `--output_dir` the run cannot write to (read-only storage, a file on its path), before any data is
    prepared: the run failed after the data, with a bare "[Errno 30] Read-only file system". The folders created to
    find out are removed again, so a run that fails later on leaves none behind.

    Raises:
        ValueError: naming the folder and the reason.
    """
    folder = Path(output_dir)
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-writable-"):
            pass
    except OSError as err:
        raise ValueError(cannot_write_output_dir(output_dir, err)) from err
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()


def finished_run_files(output_dir: str | os.PathLike) -> list[Path]:
    """The end-of-run files in `output_dir` (`final/`, `run_summary.json`), which describe the run that wrote them."""
    return [Path(output_dir) / name for name in FINISHED_RUN_FILES if (Path(output_dir) / name).exists()]


def check_no_finished_run(output_dir: str | os.PathLike) -> None:
    """Refuse a new run where another one finished: its `final/` and `run_summary.json` would stay beside the new
    run's files, and `push_to_hub.py RUN` would publish the old model with the new run's settings.

    Raises:
        ValueError: naming them and the ways out.
    """
    found = finished_run_files(output_dir)
    if found:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
        raise ValueError(
            f"--output_dir {output_dir} holds a finished run ({names}): continue it with --resume latest (and a "
            "higher --max_steps), replace it with --overwrite_output_dir true, or use another --output_dir."
        )


def run_folder_of(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """The folder of the run a checkpoint continues: the one it lies in (`RUN/checkpoints/step_N`), whose
    `run_config.json` a resume compares its flags with; `output_dir` for a checkpoint copied out of its run."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else Path(output_dir)


def check_branch_into_a_folder_of_its_own(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Refuse to continue a checkpoint of another folder (a branch, or a checkpoint copied elsewhere) in an
    `--output_dir` that holds a run of its own: checkpoints, a finished run, or a run's metrics and configuration
    (unless that run branched from the same checkpoint: then this is its retry). The resume would delete that run's
    `final/` (an export no checkpoint of this run holds) and keep its metrics up to the checkpoint's step beside the
    branch's.

    Raises:
        ValueError: naming what the folder holds and the ways on.
    """
    output_dir = Path(output_dir)
    if Path(checkpoint).resolve().parent == (output_dir / "checkpoints").resolve():
        return  # one of the folder's own checkpoints
    try:  # the folder's run branched from this very checkpoint: a retry (its later checkpoints are refused later)
        branched_from = json.loads((output_dir / RUN_CONFIG_NAME).read_text())["training"]["resume"]
        if branched_from not in (None, "latest") and Path(branched_from).resolve() == Path(checkpoint).resolve():
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = [output_dir / "checkpoints"] if list_checkpoints(output_dir) else []
    found += [output_dir / name for name in (*FINISHED_RUN_FILES, METRICS_NAME, RUN_CONFIG_NAME)]
    names = ", ".join(path.name + ("/" if path.is_dir() else "") for path in found if path.exists())
    if names:
        raise ValueError(
            f"--resume {checkpoint}: a checkpoint of another folder, and --output_dir {output_dir} holds a run of its "
            f"own ({names}), which the resumed run would mix with and replace: continue it in a new or empty "
            "--output_dir."
        )


def check_overwrite_keeps_inputs(output_dir: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse `--overwrite_output_dir` where an input of the new run (`{flag: path}`: `--init_from`, `--data_dir`, a
    local `--dataset`) lies in what it deletes: the checkpoints and a finished run's `final/` and `run_summary.json`.

    Raises:
        ValueError: naming the flag, the folder and the ways out.
    """
    deleted = [Path(output_dir) / "checkpoints", *finished_run_files(output_dir)]
    for flag, value in inputs.items():
        expanded = os.path.expanduser(str(value)) if value else ""
        # the path, or the files a glob (`--dataset 'RUN/final/*.txt'`) matches; none for a Hub id or a folder to be
        paths = glob.glob(expanded, recursive=True) if glob.has_magic(expanded) else [expanded] * bool(expanded)
        for path in (Path(p).resolve() for p in paths if Path(p).exists()):
            for doomed in deleted:
                if doomed.exists() and (path == doomed.resolve() or path.is_relative_to(doomed.resolve())):
                    raise ValueError(
                        f"--{flag} {value} lies in {doomed}, which --overwrite_output_dir true deletes: move it out "
                        f"of {output_dir} first, or use another --output_dir."
                    )


def check_checkpoint_fits(checkpoint: str | os.PathLike, config: Any, num_processes: int = 1) -> None:
    """Compare the architecture a checkpoint was saved from (its `config.json`) with this run's model, and the
    processes that saved it (one `random_states_<rank>.pkl` each) with this run's: each keeps its own place in the
    data, so a resume needs as many. Checked before the data is prepared (which can take hours on a new machine).

    Raises:
        ValueError: one line listing the differences, before `load_state` fails on the tensors' shapes.
        FileNotFoundError: a process's RNG state missing (a copy cut short): counted, the files had named another
            number of processes, whose resume the train loader's saved state then refused.
    """
    saved_processes = len(list(Path(checkpoint).glob("random_states_*.pkl")))
    loader_state = Path(checkpoint) / CHECKPOINT_STATE_FILES[2]  # the train loader's, with its world size
    with contextlib.suppress(Exception):  # unreadable: load_state names it
        saved_processes = int(torch.load(loader_state, weights_only=True)["world_size"])
    rng_states = [RNG_STATE.format(rank) for rank in range(saved_processes)]
    missing = [name for name in rng_states if not (Path(checkpoint) / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--resume {checkpoint}: an incomplete checkpoint (no {', '.join(missing)}); pass another step_N folder, "
            "or start a new run from its weights with --init_from."
        )
    if saved_processes and saved_processes != num_processes:
        launch = (
            f"accelerate launch --multi_gpu --num_processes {saved_processes}"
            if saved_processes > 1
            else "a plain accelerate launch, or python train_accelerate.py"
        )
        raise ValueError(
            f"--resume {checkpoint}: the checkpoint was saved by {saved_processes} process"
            f"{'es' if saved_processes > 1 else ''}, this run has {num_processes}; each keeps its own place in the "
            f"data: resume with {saved_processes} ({launch}), or start a new run from its weights with --init_from."
        )
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return  # an older checkpoint without its config: load_state checks the shapes
    saved = json.loads(path.read_text())
    keys = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "n_inner", "tie_word_embeddings")
    differ = [
        f"{k}={saved[k]} (this run: {getattr(config, k)})"
        for k in keys
        if k in saved and saved[k] != getattr(config, k)
    ]
    if differ:
        raise ValueError(
            f"--resume {checkpoint}: the checkpoint's model differs from this run's: {', '.join(differ)}; resume "
            "with the model flags it was trained with."
        )


def match_weights_permissions(folder: str | os.PathLike) -> None:
    """Give the weight files in `folder` (`*.safetensors`) the permissions of its `config.json`, written by `open()`
    under the umask. safetensors >= 0.8 writes through a temporary file it renames, so its files are 0600 whatever the
    umask (safetensors#782): another user of a shared machine could not load a run's `final/` or checkpoints."""
    root = Path(folder)
    mode = stat.S_IMODE((root / "config.json").stat().st_mode)
    for weights in root.glob("*.safetensors"):
        weights.chmod(mode)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under `path` and the folders themselves to disk (before a rename makes them a checkpoint)."""
    root = Path(path)
    for item in root.rglob("*"):
        if item.is_dir():
            fsync_dir(item)
        else:
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def flush_run_folder(output_dir: str | os.PathLike) -> None:
    """Flush `metrics.jsonl` (appended to line by line, unflushed) and the run folder's own entries (`checkpoints/`,
    `metrics.jsonl`, `run_config.json`) to disk. Called before a checkpoint's rename: a power cut must not keep a
    checkpoint and lose the metrics of the steps it holds (a resume keeps `metrics.jsonl` up to its step) or the
    folder's name for `checkpoints/`."""
    output_dir = Path(output_dir)
    with contextlib.suppress(FileNotFoundError), open(output_dir / METRICS_NAME, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(output_dir)


def restore_interrupted_replaces(output_dir: str | os.PathLike) -> list[Path]:
    """Undo the one moment of a replace that leaves no folder under its name: `replace_folder` (train_accelerate.py)
    moves an existing `final/` or `checkpoints/step_N` to `.tmp-old-<name>` before it renames the new folder in, so
    a crash between those two renames leaves the old, complete folder under the `.tmp-old-` name only (which
    `--resume latest` would pass over and the next save delete), beside the new one's `.tmp-<name>`. Each folder
    found in that state moves back, with a warning; one whose name is taken, or that has no `.tmp-<name>` beside it
    (its deletion was cut short after the new folder took the name), is left to the next save's cleanup. Returns the
    restored paths.

    Raises:
        ValueError: a rename that failed (a read-only run folder), naming the folder and what to do.
    """
    root = Path(output_dir)
    restored = []
    for old in [root / ".tmp-old-final", *sorted((root / "checkpoints").glob(".tmp-old-*"))]:
        target = old.with_name(old.name.removeprefix(".tmp-old-"))
        if not (target.name == "final" or CHECKPOINT_PATTERN.match(target.name)):
            continue
        if old.is_dir() and not target.exists() and target.with_name(f".tmp-{target.name}").is_dir():
            try:
                os.replace(old, target)
                fsync_dir(target.parent)
            except OSError as err:
                raise ValueError(
                    f"{old} holds the run's {target.name} that a crash left aside, and moving it back failed "
                    f"({err.strerror or err}): rename it to {target.name} yourself, then run again."
                ) from err
            logger.warning("restored %s: the run that replaced it stopped between two renames", target)
            restored.append(target)
    return restored


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (and leftovers of interrupted saves)."""
    root = Path(output_dir) / "checkpoints"
    for leftover in root.glob(".tmp-*"):  # first: a crash between the two loops must not leave an old copy aside
        shutil.rmtree(leftover, ignore_errors=True)
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class TrainState:
    """What the loop needs besides model, optimizer, scheduler and loader to continue exactly (saved with them)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all processes
    elapsed: float = 0.0  # training seconds up to `step` (and its evaluation), every resume (setup before it excluded)

    def state_dict(self) -> dict[str, int | float]:
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, int | float]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.elapsed = float(state.get("elapsed", 0.0))  # checkpoints from before 2026-11-26 lack it


# --- metrics ---------------------------------------------------------------------------------------------------------


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and draws `loss.png` (main process only).

    On resume, records after the checkpoint's step are dropped first, so the file reads as one uninterrupted run, and
    `loss.png` is redrawn without them; a new run (no `resume_step`) starts without the folder's earlier files.
    """

    def __init__(self, output_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / METRICS_NAME
        self.plot_path = Path(output_dir) / "loss.png"
        if resume_step is not None and self.path.exists():
            records = self.read()
            kept = [r for r in records if r["step"] <= resume_step]
            # replaced whole: a crash (or a power cut) meanwhile keeps the run's history
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            if len(kept) < len(records) and self.plot_path.exists():  # its curve went past the checkpoint
                self.plot() if kept else self.plot_path.unlink()
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
            self.plot_path.unlink(missing_ok=True)

    def read(self) -> list[dict[str, Any]]:
        """The records so far; a line cut short by a killed process (SIGKILL mid-write) is skipped."""
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d is incomplete (a killed run?); skipped.", self.path, number)
        return records

    def write(self, record: dict[str, Any]) -> None:
        """One line of strict JSON: a non-finite number (the `grad_norm` of a step fp16's scaler skipped, its
        gradients having overflowed) is written as `null`, not as Python's `Infinity`, which JSON has no word for.
        Not flushed to disk line by line: `flush_run_folder` does it before each checkpoint."""
        with naming_the_file(self.path), self.path.open("a") as f:
            f.write(json.dumps(finite_json(record), allow_nan=False) + "\n")

    def plot(self) -> None:
        """train and val loss against tokens seen, in `loss.png`."""
        plot_losses(self.read(), self.plot_path)


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Draw `metrics.jsonl` records' train and val loss against tokens seen into the PNG `path` (replaced whole)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    train = [(r["tokens"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def finite_json(obj: Any) -> Any:
    """`obj` with every non-finite float (at any depth of dicts and lists) as None: JSON's null, as `metrics.jsonl`
    writes a skipped fp16 step's `grad_norm`, where Python's `json` would write `NaN` or `Infinity`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


@contextlib.contextmanager
def naming_the_file(path: Path):
    """An `OSError` of a write that names no file (a full disk: a bare `[Errno 28] No space left on device`, the
    trainer's whole error line) raised again with `path` as its file name."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` in `path`, replaced whole and flushed to disk: a crash or a power cut leaves the old file or the new
    one, never a part; a failed write (a full disk) leaves `path` as it was, frees its temporary file and names
    `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with naming_the_file(path), tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the new text on disk before its name is: else a power cut may leave it empty
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as JSON in `path`, as `write_text_atomic` writes it (non-finite numbers as null)."""
    write_text_atomic(path, json.dumps(finite_json(obj), indent=2, default=str, allow_nan=False) + "\n")


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def is_finite(value: float) -> bool:
    return math.isfinite(value)
