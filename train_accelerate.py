"""Pretrain GPT-2 from scratch with accelerate: one CPU, one GPU, or many machines.

    accelerate launch train_accelerate.py --config configs/quickstart.yaml
    accelerate launch --multi_gpu --num_processes 8 train_accelerate.py --config configs/gpt2-124m.yaml

GPT-3 small's recipe (AdamW, warmup + cosine, 0.5M-token batches by gradient accumulation, clipping), bf16 mixed
precision, TF32, torch.compile, fused attention and AdamW, exact resume (`--resume latest`), SIGTERM-safe
checkpoints, metrics.jsonl / loss.png / trackers, and a Hub-ready `final/` folder. `--help` lists every flag.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from accelerate.utils.memory import should_reduce_batch_size
from safetensors import SafetensorError
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.dynamic_module_utils import custom_object_save

from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from modeling_gpt2_scratch.conversion import cannot_be_a_hub_id
from modeling_gpt2_scratch.data import (
    DataArguments,
    PrepareError,
    ShardedTokenLoader,
    configure_cli_logging,
    die_with_parent,
    fsync_dir,
    one_line,
    prepare_dataset,
    read_manifest,
)
from modeling_gpt2_scratch.tokenization import get_encoding, get_hf_tokenizer, save_tokenizer
from modeling_gpt2_scratch.training import (
    RUN_CONFIG_NAME,
    RUN_SUMMARY_NAME,
    MetricsWriter,
    ModelArguments,
    TrainArguments,
    TrainState,
    apply_optimizer_flags,
    build_optimizer,
    build_scheduler,
    cannot_write_output_dir,
    check_branch_into_a_folder_of_its_own,
    check_checkpoint_fits,
    check_no_checkpoints_ahead,
    check_no_finished_run,
    check_output_dir_not_a_file,
    check_output_dir_not_the_corpus,
    check_output_dir_writable,
    check_overwrite_keeps_inputs,
    checkpoint_dir,
    cpu_supports_bf16,
    describe_device,
    device_peak_flops,
    finished_run_files,
    flops_per_token,
    flush_run_folder,
    format_seconds,
    fsync_tree,
    gradient_accumulation_steps,
    gradient_norm,
    list_checkpoints,
    load_checkpoint,
    match_weights_permissions,
    micro_batch_hint,
    parse_arguments,
    peak_memory_mib,
    prune_checkpoints,
    resolve_data_dir,
    resolve_flag,
    resolve_resume,
    restore_interrupted_replaces,
    run_folder_of,
    tune_cpu_malloc,
    write_json_atomic,
)

logger = logging.getLogger("train_accelerate")


ANOTHER_PROCESS_STOPPED = "a stop signal to another process"  # why a process stops that got no signal itself
MID_STEP_STOP_AFTER_S = 10.0  # steps longer than this (and the first) look for a stop signal between micro-steps


class TrainingError(RuntimeError):
    """A fault during training (e.g. a non-finite loss) that stops the run without saving."""


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # what writing a checkpoint raises when the disk is full


class StepInterrupted(Exception):
    """A stop signal arrived within a step; the partial step was undone (gradients, data position, RNG)."""


def speed_flags(train_args: TrainArguments, device: torch.device) -> tuple[bool, bool]:
    """`(compile, fused_adamw)` resolved for `device` from `--compile` and `--fused_adamw`.

    auto compiles on CUDA only: on a CPU, compilation takes about a minute, and for it a 124M step ran 4.5% faster
    and a quickstart-sized one slower (BENCHMARKS.md). auto uses torch's fused AdamW on CUDA and on CPUs (as
    `transformers.Trainer`'s default `adamw_torch_fused` does): one pass over each parameter and its states instead of
    the seven of torch's default AdamW (foreach on CUDA, a for-loop on a CPU), 1.09x faster 124M steps on 2 CPU
    cores.
    """
    use_compile = resolve_flag(train_args.compile, "compile", auto=device.type == "cuda")
    fused = resolve_flag(train_args.fused_adamw, "fused_adamw", auto=device.type in ("cuda", "cpu"))
    return use_compile, fused


def compile_forward(
    model: torch.nn.Module, train_args: TrainArguments, device: torch.device
) -> tuple[torch.nn.Module, bool]:
    """`torch.compile(model)` in `--compile_mode`, and whether its steps run as CUDA graphs.

    CUDA graphs (reduce-overhead and max-autotune, on CUDA) replay each step into the same memory, so the training
    step marks the start of every micro-step (`torch.compiler.cudagraph_mark_step_begin`) and the gradients live in
    buffers of their own: zeroed here, before the first backward, and zeroed again (not freed) after each optimizer
    step. A gradient left in the backward graph's memory would be overwritten by the next micro-step's replay.
    """
    mode = train_args.compile_mode  # one of COMPILE_MODES (TrainArguments checks it)
    cudagraphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    if cudagraphs:
        for param in model.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
    return torch.compile(model, mode=None if mode == "default" else mode), cudagraphs


def malloc_tuning_on(train_args: TrainArguments, device: torch.device) -> bool:
    """Whether `--malloc_tuning` (auto: on CPU) applies glibc's `tune_cpu_malloc` on `device`."""
    return resolve_flag(train_args.malloc_tuning, "malloc_tuning", auto=device.type == "cpu")


def cpu_threads(train_args: TrainArguments, num_processes: int) -> int:
    """Torch threads per process on a CPU: `--cpu_threads`, else the cores this process may use divided by the
    processes on this machine (torchrun's `LOCAL_WORLD_SIZE`, else `num_processes`)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))  # set by torchrun
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return train_args.cpu_threads or max(1, cores // local_processes)


def build_accelerator(train_args: TrainArguments) -> Accelerator:
    """The Accelerator with the resolved mixed precision, gradient accumulation and trackers."""
    for engine, variable in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"), ("Megatron-LM", "ACCELERATE_USE_MEGATRON_LM")):
        if os.environ.get(variable, "false").lower() in ("true", "1"):  # what `accelerate launch` sets from its config
            raise ValueError(
                f"accelerate launch asked for {engine} ({variable}), whose engine steps the optimizer inside the "
                f"backward pass; this trainer clips, checks and steps AdamW itself after it: launch with a config "
                f"without {engine} (multi-GPU DDP: `accelerate config`, or `accelerate launch --multi_gpu`)."
            )
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() not in ("true", "1")
    precision = train_args.mixed_precision.lower()
    # bf16 tensor cores (Ampere+): torch's default also says True for GPUs that only emulate bf16 (V100, T4)
    bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False) if cuda else cpu_supports_bf16()
    if precision == "auto":
        precision = "bf16" if bf16_ok else "no"
    elif precision == "bf16" and not bf16_ok and cuda:
        raise ValueError("--mixed_precision bf16: this GPU has no bf16 support; use --mixed_precision fp16 or no.")
    elif precision == "bf16" and not bf16_ok:
        logger.warning(
            "--mixed_precision bf16: this CPU has no bf16 instructions (AVX512-BF16/AMX); bf16 autocast works but is "
            "emulated and slower than fp32 here (--mixed_precision auto picks fp32)."
        )
    elif precision == "fp16" and not cuda:
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this device.")
    # the world size as torchrun and MPI give it (accelerate reads these)
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if "MASTER_PORT" in os.environ and not any(map(os.getenv, sizes)) and _set_by_the_launcher("MASTER_PORT"):
        # accelerate's simple launcher, asked for several processes or machines, starts this one process alone
        raise ValueError(
            "accelerate launch asked for several processes or machines (MASTER_PORT is set) but started this one "
            "alone, which would train on its own into the shared --output_dir: launch with --multi_gpu "
            "--num_processes N (CPUs too: torchrun processes joined by gloo), or under mpirun (distributed_type "
            "MULTI_CPU), or --cpu for one process (and unset MASTER_PORT)."
        )
    # Accelerator reads it; the trainer sets its own accumulation over it
    asked = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if asked != "1":
        logger.warning(
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=%s is not used: the accumulation follows from --total_batch_tokens "
            "(total_batch_tokens / (micro_batch_size x seq_len x processes)).",
            asked,
        )
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()  # `accelerate launch --mixed_precision`
    if launcher != "no" and launcher != precision:  # its "no" is also its default: not told from no choice
        logger.warning(
            "accelerate launch asked for mixed precision %s, but this script's --mixed_precision %s decides (%s)%s",
            launcher,
            train_args.mixed_precision,
            precision,
            f": pass --mixed_precision {launcher} to the script instead." if launcher != "fp16" or cuda else ".",
        )
    dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()  # `accelerate launch --dynamo_backend`
    if dynamo != "no":
        logger.warning(
            "accelerate launch asked for dynamo backend %s, but this script's --compile decides (%s): pass --compile "
            "true (and --compile_mode) to the script instead.",
            dynamo,
            train_args.compile,
        )
    report_to = [t.strip() for t in train_args.report_to.split(",") if t.strip() and t.strip() != "none"]
    return Accelerator(
        cpu=not cuda,  # also what makes torchrun-launched CPU processes join a gloo group (MULTI_CPU)
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the process count
        log_with=(report_to[0] if report_to == ["all"] else report_to) or None,
        project_dir=train_args.output_dir,
        dynamo_backend="no",  # `prepare` compiles nothing: `compile_forward` does, per --compile, and it is recorded
        # the process group's timeout, and its store's (`exchange`); torch's own is 10 minutes for NCCL, 30 for gloo
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train_args.ddp_timeout))],
    )


def build_dataloaders(
    accelerator: Accelerator, data_args: DataArguments, train_args: TrainArguments
) -> tuple[ShardedTokenLoader, ShardedTokenLoader | None]:
    """Prepare the token shards once per machine (reused if already there), then this rank's loaders.

    Every process calls `prepare_dataset`: the first to take the folder's lock tokenizes, the others wait on the lock
    and then reuse its shards. No collective waits meanwhile, so an hours-long first prepare cannot run into the
    process group's timeout (`--ddp_timeout`), as a barrier would. Across machines it can: `train` waits for the
    slowest machine's prepare after it, within that timeout (`stop_together`; README: prepare beforehand). Each
    machine's first process says when its machine starts and is done (`main_process_only`).
    """
    data_dir = resolve_data_dir(data_args, train_args)
    machines = several_machines(accelerator)
    if machines:
        logger.info(
            "preparing the data in %s on this machine (or reusing them)", data_dir, extra={"every_machine": True}
        )
    started = time.monotonic()
    prepare_dataset(data_args, output_dir=data_dir, overwrite=train_args.overwrite_data)
    if machines:
        logger.info(
            "the data in %s are ready on this machine (%s); waiting for every machine's setup",
            data_dir,
            format_seconds(time.monotonic() - started),
            extra={"every_machine": True},
        )
    kwargs = dict(
        batch_size=train_args.micro_batch_size,
        seq_len=train_args.seq_len,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    # an epoch of whole optimizer steps: N processes read what one process with N times the accumulation reads
    accumulation = gradient_accumulation_steps(train_args, accelerator.num_processes)
    train_loader = ShardedTokenLoader(data_dir, "train", **kwargs, batches_per_step=accumulation)
    has_val = any(entry["tokens"] for entry in read_manifest(data_dir)["splits"].get("val", []))
    val_loader = ShardedTokenLoader(data_dir, "val", **kwargs) if has_val else None
    return train_loader, val_loader


def dataset_source(data_args: DataArguments, train_args: TrainArguments) -> str:
    """`"hub"` or `"local"`: where the prepared shards came from (their manifest says), for the model card."""
    source = read_manifest(resolve_data_dir(data_args, train_args)).get("source") or {}
    return "hub" if "hub" in source else "local"


def init_from_source(model_args: ModelArguments) -> str | None:
    """`"local"` or `"hub"`: where `--init_from` was read, for the model card (a folder here, as `from_pretrained`
    decides, else a Hub id); None without `--init_from`."""
    if not model_args.init_from:
        return None
    return "local" if Path(os.path.expanduser(model_args.init_from)).is_dir() else "hub"


def load_init_from(source: str) -> GPT2ScratchForCausalLM:
    """`--init_from`'s model: a gpt2-scratch model (this trainer's `final/`, or a repository `push_to_hub.py` made in
    the scratch format) as it is, else Hugging Face GPT-2 weights converted (`from_hf_gpt2`); in float32, the
    master weights mixed precision trains, whatever dtype the folder was saved in.

    Raises:
        FileNotFoundError: `source` is a file, or a path (`./x`, `/x`, `~/x`, `a/b/c`: no Hub id) that is not there.
        OSError: what `transformers` says (offline, no such repository, a folder without weights), on one line.
        ValueError: a folder that is neither model (another architecture), or a GPT-2 without some of its weights.
    """
    path = Path(os.path.expanduser(source))  # a preset's ~/ (the shell expands the command line's)
    if path.is_file() or (not path.exists() and cannot_be_a_hub_id(source)):
        what = "a file" if path.is_file() else "no such folder"
        raise FileNotFoundError(
            f"--init_from {source}: {what}; pass a model folder (a run's final/, a GPT2LMHeadModel folder) or a Hub "
            "id such as gpt2."
        )
    source = str(path) if path.exists() else source
    # float32 whatever the folder was saved in: transformers loads a bf16/fp16 folder in its own dtype, and AdamW then
    # stepped half-precision weights (most updates rounded away; fp16 LayerNorms failed under bf16 autocast)
    try:
        if isinstance(transformers.AutoConfig.from_pretrained(source), GPT2ScratchConfig):  # the package registers it
            return GPT2ScratchForCausalLM.from_pretrained(source, dtype=torch.float32)
        return GPT2ScratchForCausalLM.from_hf_gpt2(source, dtype=torch.float32)
    except OSError as err:  # transformers' message spans lines
        raise OSError(f"--init_from {source}: {one_line(err)}") from err
    except ValueError as err:  # from_hf_gpt2: not a GPT-2 checkpoint (a Llama's), or one without some weights
        raise ValueError(f"--init_from {source}: {one_line(err)}") from err


def build_seeded_model(
    model_args: ModelArguments, train_args: TrainArguments, process_index: int
) -> GPT2ScratchForCausalLM:
    """`build_model` from `--seed`, the same weights on every process; then the RNG at `--seed` + process index, so
    each process draws its own dropout masks (nanoGPT's seed offset), not the same positions as every other one. A
    resume then restores each process's own RNG state (`random_states_<rank>.pkl`)."""
    set_seed(train_args.seed)
    model = build_model(model_args, train_args)
    set_seed((train_args.seed + process_index) % 2**32)
    return model


@contextlib.contextmanager
def attn_implementation_errors(name: str):
    """transformers' error for an attention kernel it does not know (a `ValueError` listing them), or one whose package
    is not installed (flash-attn, `kernels`: an `ImportError` traceback), as one line naming the flag."""
    try:
        yield
    except (ImportError, ValueError) as err:
        message = f"--attn_implementation {name}: {one_line(err) or type(err).__name__}"
        if isinstance(err, ImportError):  # transformers' message names the package, not the way on
            message += f"{'' if message.endswith('.') else '.'} Install it, or pass sdpa (the default) or eager."
        raise ValueError(message) from err


def check_attention_trains_on(name: str, device: torch.device) -> None:
    """Refuse, before any data is prepared, an attention kernel that cannot train on `device`: torch's flex attention
    has no backward on a CPU (torch 2.13: "FlexAttention does not support backward on CPU"), which failed the first
    step with a traceback. Asked of torch on a tiny input (it refuses at once, before compiling anything), so a
    torch that adds the backward is let through."""
    if name != "flex_attention" or device.type != "cpu":
        return
    from torch.nn.attention.flex_attention import flex_attention

    x = torch.zeros(1, 1, 16, 16, requires_grad=True)
    try:
        flex_attention(x, x, x)
    except NotImplementedError as err:
        raise ValueError(
            f"--attn_implementation {name}: {one_line(err)} Pass sdpa (the default) or eager to train on a CPU."
        ) from err


def build_model(model_args: ModelArguments, train_args: TrainArguments) -> GPT2ScratchForCausalLM:
    """A random GPT-2 of the requested size, or pretrained weights (`--init_from`: `load_init_from`)."""
    if model_args.init_from:
        model = load_init_from(model_args.init_from)
        with attn_implementation_errors(model_args.attn_implementation):
            model.set_attn_implementation(model_args.attn_implementation)
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):  # a training choice, not the checkpoint's
            setattr(model.config, name, model_args.dropout)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = model_args.dropout
    else:
        config = GPT2ScratchConfig(
            n_layer=model_args.n_layer,
            n_head=model_args.n_head,
            n_embd=model_args.n_embd,
            n_positions=model_args.n_positions,
            vocab_size=model_args.vocab_size,
            resid_pdrop=model_args.dropout,
            embd_pdrop=model_args.dropout,
            attn_pdrop=model_args.dropout,
        )
        with attn_implementation_errors(model_args.attn_implementation):
            model = GPT2ScratchForCausalLM._from_config(config, attn_implementation=model_args.attn_implementation)
    if train_args.seq_len > model.config.n_positions:
        raise ValueError(
            f"--seq_len {train_args.seq_len} is longer than the model's context n_positions="
            f"{model.config.n_positions}: lower --seq_len or raise --n_positions."
        )
    prompt_tokens = len(sample_prompt_ids(train_args.sample_prompt)) if train_args.sample_every else 0
    most = model.config.n_positions + 1 - prompt_tokens  # the last new token is never fed back
    if train_args.sample_every and most < 1:
        raise ValueError(
            f"--sample_prompt is {prompt_tokens} tokens, longer than the model's context n_positions="
            f"{model.config.n_positions}: shorten it, or pass --sample_every 0."
        )
    if train_args.sample_every and train_args.sample_tokens > most:
        raise ValueError(
            f"--sample_tokens {train_args.sample_tokens} after the {prompt_tokens}-token --sample_prompt run past the "
            f"model's context n_positions={model.config.n_positions}: lower --sample_tokens (at most {most}), shorten "
            "--sample_prompt, or pass --sample_every 0."
        )
    if train_args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.loss_chunk_elements = train_args.loss_chunk_elements or None
    return model


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    val_loader: ShardedTokenLoader,
    batches: int,
    cudagraphs: bool = False,
    stop_requested: Callable[[], bool] | None = None,
) -> float | None:
    """Mean val loss over the first `batches` val batches of every process (the same batches at every evaluation).

    At most one pass over the split: a smaller split than `batches` is not counted twice.

    `cudagraphs` (`compile_forward`): each batch starts a new CUDA-graph step. `stop_requested` (collective) is asked
    after each batch but the last: when it says stop, the evaluation is dropped (None), so that a long one cannot
    outlast a launcher's grace period (torchrun kills its processes 30 s after passing a SIGTERM on).
    """
    batches = min(batches, val_loader.batches_per_epoch)
    model.eval()
    val_loader.reset()
    total = torch.zeros((), device=accelerator.device)
    try:
        with torch.no_grad():
            for i in range(batches):
                x, y = val_loader.next_batch()
                x, y = x.to(accelerator.device), y.to(accelerator.device)
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last batch's loss is consumed
                total += model(input_ids=x, shift_labels=y, use_cache=False, skip_logits=True).loss.float()
                if stop_requested is not None and i + 1 < batches and stop_requested():
                    return None
    finally:
        model.train()
    return accelerator.reduce(total / batches, reduction="mean").item()


def sample_prompt_ids(prompt: str) -> list[int]:
    """`--sample_prompt`'s token ids; an empty prompt is `<|endoftext|>`, where every document starts."""
    enc = get_encoding()
    return enc.encode_ordinary(prompt) or [enc.eot_token]


def generate_samples(model: GPT2ScratchForCausalLM, train_args: TrainArguments, device: torch.device) -> list[str]:
    """`num_samples` continuations of the fixed prompt, top-k 50, seeded, without touching the training RNG."""
    enc = get_encoding()
    prompt = torch.tensor([sample_prompt_ids(train_args.sample_prompt)], device=device)
    prompt = prompt.repeat(train_args.num_samples, 1)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(train_args.seed)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=train_args.sample_tokens,
            do_sample=True,
            top_k=50,
        )
    model.train(was_training)
    return [enc.decode(row.tolist()) for row in out]


def write_failure_reason(err: BaseException) -> str:
    """The first line of a failed write's error (torch.save's "unexpected pos", safetensors' "os error 28")."""
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


# the store exchanges of this process (`exchange`), made in the same order by every process: their keys are numbered
# by it, so a second run in the same processes never reads the answers of the first
_EXCHANGES = itertools.count()


# a setup step across machines (`stop_together`): every process adds 1 to its heartbeat key in the store each
# HEARTBEAT_S seconds, and one that the others wait for and that has not for SILENT_S seconds was killed outright
# (SIGKILL, the OOM killer: it could tell no one), where they would have waited out the process group's timeout
HEARTBEAT_S = 2.0
SILENT_S = 30.0  # 15 heartbeats: a thread on a loaded machine is late by seconds, not by half a minute
POLL_S = 1.0  # how often a process that waits looks at the others' answers and heartbeats
# what a process does during each setup step with heartbeats, for the guess of a silent process's message, and what a
# process not done within the store's timeout there is told ({within}: that timeout)
HEARTBEAT_STEPS = {
    "setup": (
        ", while it prepared its data",
        "has not finished its setup within {within} (--ddp_timeout: a first preparation of its data?): prepare the "
        "data on each machine beforehand (python -m modeling_gpt2_scratch.data prepare with the run's data flags, "
        "--output_dir the folder its log names), or raise --ddp_timeout, then start every machine again.",
    ),
    "the data check": (
        "",
        "has not finished the data check within {within}, though it only reads its data folder's manifest.json there "
        "(a hung network file system?): see its machine's log, then start every machine again.",
    ),
    "the shared folder check": (
        "",
        "has not finished the shared folder check within {within}, though it only looks for a file in its "
        "--output_dir (a hung network file system?): see its machine's log, then start every machine again.",
    ),
    "the checkpoint load": (
        ", while it loaded the checkpoint",
        "has not loaded the checkpoint within {within} (a slow network file system?): see its machine's log, then "
        "raise --ddp_timeout, or start every machine again.",
    ),
    "the checkpoint check": (
        "",
        "has not finished the checkpoint check within {within}, though it only hashes the weights it loaded (a hung "
        "device?): see its machine's log, then start every machine again.",
    ),
}


def process_name(rank: int) -> str:
    return "the main process" if rank == 0 else f"process {rank}"


class Heartbeats:
    """The heartbeats of the processes at one setup `step` across machines, in torch.distributed's store.

    `with heartbeats.beating():` around the step, then `heartbeats.exchange` (through `first_failure`) to wait for the
    others. No collective, for `exchange`'s reason: a daemon thread adds to this process's count in the store, which
    it shares with the main thread (the store's client takes one request at a time; the wait polls, so none holds it
    long). Each process compares the counts on its own clock: the machines' clocks need not agree.
    """

    def __init__(self, accelerator: Accelerator, step: str) -> None:
        import torch.distributed as dist

        self.accelerator, self.step = accelerator, step
        self.killed_while, self.not_finished = HEARTBEAT_STEPS[step]
        self.store = dist.distributed_c10d._get_default_store()
        self.prefix = f"gpt2_scratch/alive/{step}/{next(_EXCHANGES)}"

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    @contextlib.contextmanager
    def beating(self):
        """Keep this process's heartbeat going while the `with` body runs."""
        import torch.distributed as dist

        done = threading.Event()

        def beat() -> None:
            while True:
                try:
                    self.store.add(self._key(self.accelerator.process_index), 1)
                except dist.DistError:  # the store went with the main machine: the wait after the step says so
                    return
                if done.wait(HEARTBEAT_S):
                    return

        thread = threading.Thread(target=beat, name="setup-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def exchange(self, keys: list[str], value: str) -> list[str]:
        """`exchange`'s answers under `keys`, this process's `value` among them, waiting as `wait` does. A process that
        gives up, with no failure of its own, leaves its reason as its answer, for a process still at its step to read
        when it comes to answer.

        Raises:
            ValueError: `wait`'s, or the store gone (the main machine's launcher stopped, and its processes with it).
        """
        import torch.distributed as dist

        index = self.accelerator.process_index
        mine = keys[index]
        try:
            self.store.set(mine, value)
            self.wait(keys)
            return [self.store.get(key).decode() for key in keys]
        except ValueError as err:
            if not value:  # this process's own failure, if it had one, stays its answer
                with contextlib.suppress(dist.DistError):
                    self.store.set(mine, str(err) if index == 0 else f"on process {index}: {err}")
            raise
        except dist.DistError as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(
                f"lost the main machine during {self.step} ({reason}): it stopped (its log says why: it may have "
                "stopped waiting for this machine, or been killed outright); start every machine again."
            ) from None

    def wait(self, keys: list[str]) -> None:
        """Wait until every process has answered under `keys`, looking every POLL_S seconds.

        Raises:
            ValueError: a process that has not answered and whose heartbeat stopped SILENT_S seconds ago (killed
                outright), or one that has not answered within the store's timeout (the process group's: a first
                preparation of its data, say, much longer than the other machines').
        """
        deadline = time.monotonic() + self.store.timeout.total_seconds()
        heard: dict[int, tuple[int, float]] = {}  # a process's last heartbeat count, and when it was first seen
        while True:
            waiting_for = [rank for rank, key in enumerate(keys) if not self.store.check([key])]
            if not waiting_for:
                return
            now = time.monotonic()
            for rank in waiting_for:
                count = self.store.add(self._key(rank), 0)
                if rank not in heard or heard[rank][0] != count:
                    heard[rank] = (count, now)
                elif now - heard[rank][1] > SILENT_S:
                    raise ValueError(
                        f"{process_name(rank)} stopped answering during {self.step} (no heartbeat for "
                        f"{SILENT_S:g} s): killed outright (by the OOM killer, say{self.killed_while})? See its "
                        "machine's log, then start every machine again."
                    )
            if now > deadline:
                timeout = self.store.timeout.total_seconds()
                within = f"{timeout / 60:g} minutes" if timeout >= 60 else f"{timeout:g} s"
                raise ValueError(f"{process_name(waiting_for[0])} {self.not_finished.format(within=within)}")
            time.sleep(POLL_S)


def exchange(accelerator: Accelerator, topic: str, value: str, heartbeats: Heartbeats | None = None) -> list[str]:
    """Every process's `value`, in process order, on every process (a barrier as well).

    Through torch.distributed's store (the launcher's rendezvous), like `shown_by_another_process`, and not by a
    collective: gloo's worker thread frees a gather's tensors only later, taking the GIL, and a gather late in a run
    deadlocked its process group's teardown at exit (the main thread, holding the GIL, joins that thread). Keys are
    named by the exchange's number, the same on every process, not by a path: a shared --output_dir may be mounted at
    another path on each machine, and keys named by it were keys the other machines never set (a hang). With
    `heartbeats` (a setup step across machines) the wait gives up early, with one line: `Heartbeats.wait`.
    """
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    prefix = f"gpt2_scratch/{topic}/{next(_EXCHANGES)}"
    keys = [f"{prefix}/{rank}" for rank in range(accelerator.num_processes)]
    if heartbeats is not None:
        return heartbeats.exchange(keys, value)
    store.set(keys[accelerator.process_index], value)
    store.wait(keys)  # within the store's timeout, the process group's
    return [store.get(key).decode() for key in keys]


def several_machines(accelerator: Accelerator) -> bool:
    """Whether the processes span machines (torchrun's `LOCAL_WORLD_SIZE`, this machine's, below their number)."""
    return accelerator.num_processes > int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def first_failure(
    accelerator: Accelerator, failure: str | None, target: Path, heartbeats: Heartbeats | None = None
) -> str | None:
    """The failure of the first process that had one (or None), on every process: a write of `target` (a folder a run
    writes once) that failed on one process stops them all with its message, where a barrier would have left the
    others waiting (`exchange`).
    """
    if accelerator.num_processes == 1:
        return failure
    answers = exchange(accelerator, f"write_failure/{target.name}", failure or "", heartbeats)
    return next((text for text in answers if text), None)


# flags that may differ from machine to machine: paths (a folder's mount point, each machine's own data folder) and
# this machine's own resources; `--resume` and `--init_from` are compared as given or not
PER_MACHINE_FLAGS = (
    "config", "output_dir", "data_dir", "dataset", "num_proc", "cpu_threads", "malloc_tuning", "overwrite_data",
)  # fmt: skip
PATH_FLAGS = ("resume", "init_from")


def check_same_flags(accelerator: Accelerator, *arguments) -> None:
    """Refuse processes started with other flags (another command on one machine): they must take the same steps.

    Another `--max_lr` trained on without a word, each machine moving its own copy of the weights (DDP averages the
    gradients, never the weights); another `--max_steps` or `--total_batch_tokens` ran into a collective the others
    never made (a crash, or a hang until the process group's timeout). Every process sends its flags through
    torch.distributed's store, as `first_failure` does, and all raise the same error, which the main process prints.

    `--mixed_precision` is compared as resolved (`auto`: bf16 where the device has it), so machines whose devices
    differ in bf16 (an A100 beside a V100) do not train in two precisions, the run's files recording the main one's.

    Raises:
        ValueError: the first flag that differs, with the main process's value and another's.
    """
    if accelerator.num_processes == 1:
        return
    flags = {
        name: (value is not None) if name in PATH_FLAGS else value
        for section in arguments
        for name, value in asdict(section).items()
        if name not in PER_MACHINE_FLAGS
    }
    raw = {name: value for section in arguments for name, value in asdict(section).items()}
    # as each process resolved it: `auto` picks bf16 where the device has it, which machines may differ in
    flags["mixed_precision"] = accelerator.mixed_precision
    (main_flags, main_raw), *others = map(json.loads, exchange(accelerator, "flags", json.dumps([flags, raw])))
    for rank, (other_flags, other_raw) in enumerate(others, start=1):
        differ = [name for name in main_flags if other_flags.get(name) != main_flags[name]]
        if differ:
            name = differ[0]
            if name == "mixed_precision" and other_raw[name] == main_raw[name]:  # the same flag, other devices
                raise ValueError(
                    f"--mixed_precision {main_raw[name]} resolved to {other_flags[name]} on process {rank} and to "
                    f"{main_flags[name]} on the main process (their devices differ in bf16 support): pass the same "
                    "explicit --mixed_precision (no, say) on every machine."
                )
            if name in PATH_FLAGS:  # compared as given or not (a path may differ)
                theirs, main = ("given" if flags[name] else "not given" for flags in (other_flags, main_flags))
            else:
                theirs, main = other_raw[name], main_raw[name]
            raise ValueError(
                f"the processes run with other flags: --{name} {theirs} on process {rank}, "
                f"{main} on the main process; start every machine with the same flags (only paths, "
                "--num_proc, --cpu_threads, --malloc_tuning and --overwrite_data may differ)."
            )


# seconds another machine looks for the main process's file: NFS may answer from a cached directory for up to
# acdirmin, 30 s by default (say, after the machine found --output_dir missing at the start of a new run)
SHARED_FOLDER_WAIT = 40.0


def check_shared_output_dir(accelerator: Accelerator, output_dir: Path) -> None:
    """Refuse machines whose `--output_dir` is not one shared folder (it may be mounted at another path on each).

    Every process adds its RNG state to each checkpoint, which the main process renames: a machine with a folder of
    its own trained on without a word, its RNG states left in unfinished saves there, and no checkpoint could be
    resumed. The main process leaves a file of a new name in its folder, and every other machine looks for it in its
    own for up to `SHARED_FOLDER_WAIT` seconds. One machine (all of its processes see its folders): nothing to check.

    Raises:
        ValueError: on every process, naming the first process that did not find the file, and both folders.
    """
    if not several_machines(accelerator):
        return
    import uuid

    failure, name = None, ""
    marker = output_dir / f".tmp-shared-{uuid.uuid4().hex}"
    # heartbeats: a process stopped meanwhile (Ctrl-C in the wait below, SIGKILL) is not waited for until the timeout
    heartbeats = Heartbeats(accelerator, "the shared folder check")
    try:
        with heartbeats.beating():
            if accelerator.is_main_process:
                try:
                    output_dir.mkdir(parents=True, exist_ok=True)
                    marker.touch()
                    name = marker.name
                except OSError as err:  # a folder it may not write: the main process's message, not the others'
                    failure = cannot_write_output_dir(output_dir, err)
            answers = exchange(accelerator, "shared_output_dir", json.dumps([str(output_dir), name]), heartbeats)
            main_output_dir, name = json.loads(answers[0])
            if not accelerator.is_main_process:
                found = output_dir / name  # no name: the main process failed, and says why below
                deadline = time.monotonic() + SHARED_FOLDER_WAIT
                while name and not found.is_file() and time.monotonic() < deadline:  # a network file system is late
                    time.sleep(1.0)
                    with contextlib.suppress(OSError):
                        os.listdir(output_dir)  # opening the folder asks an NFS server for its attributes again
                if name and not found.is_file():
                    failure = (
                        f"--output_dir {output_dir} of process {accelerator.process_index} is not the main "
                        f"process's {main_output_dir}: every machine must reach one shared folder (a network file "
                        "system), where each process adds its RNG state to the checkpoints."
                    )
            # after every process looked
            failure = first_failure(accelerator, failure, output_dir / ".tmp-shared", heartbeats)
    finally:
        if accelerator.is_main_process:
            with contextlib.suppress(OSError):
                marker.unlink(missing_ok=True)
    if failure is not None:
        raise ValueError(failure)


# what `main` prints on one line
USER_ERRORS = (ValueError, OSError, TrainingError, PrepareError)


@contextlib.contextmanager
def stop_together(accelerator: Accelerator, step: str):
    """Run the setup `step` on every process, and stop them all if it fails on any, with the first failure's message.

    A failure of one machine alone (its --dataset not there, its --data_dir not writable, an --init_from it cannot
    read) stopped that machine with its error, and left the others in DDP's first collective: gloo's traceback on
    them ("Connection closed by peer"), NCCL's wait until the process group's timeout. Every process posts its
    failure, or none, to torch.distributed's store (`first_failure`) after the step: a process whose step takes
    longer (a first prepare of the data) is waited for as long as that collective waited, the store's timeout being
    the process group's. An error of another process than the main one is named by it ("on process 1: ...").

    Across machines, every process also keeps a heartbeat in the store during the step (`Heartbeats`), and those that
    wait give up with one line: on a process silent for `SILENT_S` seconds (killed outright, by SIGKILL or the OOM
    killer, it posts nothing, and they waited out that timeout, 30 minutes by default), on the main machine gone (the
    store with it: a `DistNetworkError` traceback), and on a process not done within the store's timeout (a first
    prepare of its data much longer than the others': a `DistStoreError` traceback). The slow process reads why when
    it comes to answer. On one machine the launcher stops every process when one dies, and the wait is as it was.
    """
    heartbeats = Heartbeats(accelerator, step) if several_machines(accelerator) else None
    failure = None
    try:
        with heartbeats.beating() if heartbeats else contextlib.nullcontext():
            yield
    except BaseException as err:  # a Ctrl-C too: the others must not wait for it
        failure = err
    text = None
    if failure is not None:
        text = str(failure) or type(failure).__name__
        text = text if accelerator.is_main_process else f"on process {accelerator.process_index}: {text}"
    try:
        reason = first_failure(accelerator, text, Path(step), heartbeats)
    except ValueError:  # another machine silent or gone (`Heartbeats`): this process's own failure comes first
        if failure is None:
            raise
        raise failure from None
    if failure is None:
        if reason is not None:
            raise ValueError(reason)
        return
    if reason == text and text != str(failure) and isinstance(failure, USER_ERRORS):
        raise ValueError(reason) from failure  # the same line on every process: printed once
    raise failure


def check_same_data(accelerator: Accelerator, data_args: DataArguments, data_dir: Path) -> None:
    """Refuse machines that prepared other data: `--dataset` is a path of each machine, so the same flags may name
    another corpus on each, and each machine trained on its own without a word. Compares the token counts and the
    source's fingerprint (its files' contents, wherever they lie) of each machine's manifest, through the store, with
    heartbeats as in the setup (`Heartbeats`), so that a process killed since the setup is not waited for until the
    timeout.

    Raises:
        ValueError: on every process, naming the first process whose data differ from the main process's; on the
            others, a process silent for `SILENT_S` seconds, or the main machine gone.
    """
    if not several_machines(accelerator):
        return  # one machine: the same command, the same files
    heartbeats = Heartbeats(accelerator, "the data check")  # a process killed since the setup is not waited out
    with heartbeats.beating():
        manifest = read_manifest(data_dir)
        train, val = (sum(e["tokens"] for e in manifest["splits"].get(split, [])) for split in ("train", "val"))
        prepared = f"{train:,} train and {val:,} val tokens (source {manifest['source']['fingerprint'][:12]})"
        answers = exchange(accelerator, "data", json.dumps([data_args.dataset, prepared]), heartbeats)
    (main_dataset, main_prepared), *others = map(json.loads, answers)
    for rank, (dataset, other) in enumerate(others, start=1):
        if other != main_prepared:
            raise ValueError(
                f"the machines prepared other data: --dataset {dataset} gave process {rank} {other}, the main "
                f"process's --dataset {main_dataset} gave {main_prepared}; pass the same corpus on every machine "
                "(each may hold its copy at another path)."
            )


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of the model's tensors' bytes (names, shapes, dtypes and values): the same weights give the same digest
    on every machine, whatever the device."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def check_same_checkpoint(accelerator: Accelerator, resume_from: Path, step: int, model: torch.nn.Module) -> None:
    """Refuse machines that resumed other checkpoints: `--resume` is a path of each machine (checked only as given or
    not, `check_same_flags`), and `--resume latest` reads each machine's listing of a shared folder, which a network
    file system may serve stale. DDP makes the weights the same only when it wraps the model, before the checkpoint
    is loaded: each machine trained its own weights without a word (at another step, its collectives failed against
    the others'). Compares the step and a digest of the weights (`weights_digest`), through the store, with heartbeats
    as in the setup.

    Raises:
        ValueError: on every process, naming the first process whose checkpoint differs from the main process's.
    """
    if not several_machines(accelerator):
        return  # one machine: the same command, the same folder
    heartbeats = Heartbeats(accelerator, "the checkpoint check")
    with heartbeats.beating():
        mine = json.dumps([str(resume_from), step, weights_digest(accelerator.unwrap_model(model))])
        answers = exchange(accelerator, "checkpoint", mine, heartbeats)
    (main_path, *main_state), *others = map(json.loads, answers)
    for rank, (path, *state) in enumerate(others, start=1):
        if state != main_state:
            what = "other weights" if state[0] == main_state[0] else f"step {state[0]}"
            raise ValueError(
                f"the machines resumed other checkpoints: process {rank} {path} ({what}), the main process "
                f"{main_path} (step {main_state[0]}); resume the same checkpoint on every machine (pass its path: "
                "--resume latest reads each machine's listing of the folder)."
            )


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` at `final` by renames alone: an existing `final` moves to `.tmp-old-<name>` first
    and is deleted last, so a crash leaves one of the two whole (the `.tmp-` names are cleaned by the next save; an old
    folder left alone under its `.tmp-old-` name is moved back by the next start: `restore_interrupted_replaces`). The
    parent folder is flushed after the rename, so the new name is on disk before the old folder goes (a power cut
    could otherwise keep neither name)."""
    old = final.with_name(f".tmp-old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def delete_folder(folder: Path) -> None:
    """Delete `folder` after a rename to `.tmp-<name>` (an unfinished one's name, which the next save or export of
    that name deletes first), so that a crash midway never leaves part of it under its own name: a `final/` without
    its tokenizer or code, which `from_pretrained` fails on and `push_to_hub.py RUN` would publish."""
    if folder.is_symlink():  # a link to a folder elsewhere: the link goes, not what it points to
        folder.unlink()
        return
    doomed = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def save_checkpoint(accelerator: Accelerator, model: GPT2ScratchForCausalLM, train_args: TrainArguments, step: int):
    """`accelerator.save_state` into a temporary folder, then an atomic rename to `checkpoints/step_N`.

    A crash mid-save leaves only a `.tmp-*` folder (ignored by `--resume latest`, cleaned at the next save). The
    files are flushed to disk before the rename, with `metrics.jsonl` and the run folder (`flush_run_folder`), and a
    checkpoint of the same step is replaced by renames only.
    """
    final = checkpoint_dir(train_args.output_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    failure = None  # caught on each process, so that one failing never leaves the others waiting at a barrier
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except WRITE_ERRORS as err:  # a full disk, or the folder gone read-only: the save stops on every process
            failure = err
    accelerator.wait_for_everyone()
    if failure is None:
        try:
            accelerator.save_state(str(tmp))  # each process its own RNG state, the main one the rest
        except WRITE_ERRORS as err:  # a full disk: torch.save says "unexpected pos", safetensors "os error 28"
            failure = err
    accelerator.wait_for_everyone()  # every process's files are written before the main one flushes the folder
    if accelerator.is_main_process and failure is None:
        try:
            # a checkpoint is self-describing: the config and, as `save_pretrained` writes them, the code files and
            # `auto_map`, so `AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)` opens it
            unwrapped = accelerator.unwrap_model(model)
            if unwrapped._auto_class is not None:
                custom_object_save(unwrapped, tmp, config=unwrapped.config)
            unwrapped.config.save_pretrained(tmp)
            match_weights_permissions(tmp)
            fsync_tree(tmp)
            flush_run_folder(train_args.output_dir)  # the metrics up to this step, and checkpoints/, on disk first
        except WRITE_ERRORS as err:
            failure = err
    reason = first_failure(accelerator, None if failure is None else write_failure_reason(failure), final)
    if reason is not None:  # on every process
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # its space back; the last checkpoint is untouched
        raise TrainingError(
            f"saving checkpoint {final} failed ({reason}): is its disk full? Free space there, "
            f"{_how_to_go_on(train_args)}"
        ) from failure
    if accelerator.is_main_process:
        replace_folder(tmp, final)  # the same step again (a run branched from an earlier one): never without one
        prune_checkpoints(train_args.output_dir, train_args.keep_last)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()


def export_final(accelerator: Accelerator, model: GPT2ScratchForCausalLM, output_dir: str) -> Path:
    """`output_dir/final/`: `save_pretrained` (config with auto_map, code, safetensors, generation config) and the
    tokenizer.

    Written as a checkpoint is (`save_checkpoint`): into a temporary folder, flushed, then renamed, so a crash never
    leaves a partial `final/` (which `push_to_hub.py RUN` would publish), nor breaks the one a re-export replaces.
    """
    final = Path(output_dir) / "final"
    tmp = final.with_name(".tmp-final")
    accelerator.wait_for_everyone()
    failure = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed export
        unwrapped = accelerator.unwrap_model(model)
        try:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            save_tokenizer(get_hf_tokenizer(model_max_length=unwrapped.config.n_positions), tmp)
            match_weights_permissions(tmp)
            fsync_tree(tmp)
        except WRITE_ERRORS as err:  # a full disk; the last checkpoint (and an earlier final/) stay as they were
            shutil.rmtree(tmp, ignore_errors=True)
            way = (
                "--resume latest (a run at --max_steps only exports)"
                if list_checkpoints(output_dir)
                else "train again"
            )
            failure = f"exporting {final} failed ({write_failure_reason(err)}): is its disk full? Free space there, "
            failure += f"then {way}."
        else:
            replace_folder(tmp, final)
    # every process learns of a failure, instead of waiting for a main process that left
    failure = first_failure(accelerator, failure, final)
    if failure is not None:
        raise TrainingError(failure)
    return final


class StopSignal(contextlib.AbstractContextManager):
    """Turns SIGTERM/SIGINT into a flag the loop checks after each optimizer step (then: checkpoint and exit).

    The loop shares it across processes (`accelerator.set_trigger`/`check_trigger`), so a signal to one rank stops
    every rank after the same step.

    Preemptible machines send SIGTERM before they go. The trainer keeps these handlers until it returns, so a second
    signal (or a third) cannot kill the stop's checkpoint or the final export halfway; the previous handlers come
    back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


RESUME_SCHEDULE_FLAGS = (
    "max_steps",
    "warmup_steps",
    "min_lr_ratio",
    "total_batch_tokens",
    "micro_batch_size",
    "grad_clip",
)


def flag_changes(
    previous_config: Path, section: str, now: dict, names: tuple[str, ...], same: dict[str, Callable] | None = None
) -> list[str]:
    """The flags `names` of `section` ("training", "data") that this resumed run changes (`--flag old -> new`),
    against the `run_config.json` of the run it continues; `same[name](old, new)` may call two values of a flag
    equal."""
    try:
        previous = json.loads(previous_config.read_text()).get(section, {})
    except (OSError, ValueError, AttributeError):
        return []  # no earlier configuration to compare with (a checkpoint copied elsewhere)
    return [
        f"--{name} {previous[name]} -> {now[name]}"
        for name in names
        if name in previous
        and previous[name] != now[name]
        and not (name in (same or {}) and same[name](previous[name], now[name]))
    ]


def schedule_flag_changes(previous_config: Path, training: dict) -> list[str]:
    """The schedule and batch flags (`RESUME_SCHEDULE_FLAGS`) a resume changes; they take effect through the flags
    themselves."""
    return flag_changes(previous_config, "training", training, RESUME_SCHEDULE_FLAGS)


RESUME_DATA_FLAGS = (
    "dataset",
    "dataset_config",
    "dataset_revision",
    "split",
    "val_split",
    "text_column",
    "val_fraction",
)


def data_flag_changes(previous_config: Path, data_args: DataArguments) -> list[str]:
    """The data flags (`RESUME_DATA_FLAGS`) a resume changes. Each gives another token stream, which the checkpoint's
    data position does not fit; a local `--dataset` counts as changed only when both paths exist here and are
    different files (not a relative path from another folder, or an archived corpus)."""

    def same_dataset(old: str, new: str) -> bool:
        old_path, new_path = (Path(os.path.expanduser(str(d))) for d in (old, new))
        return not (old_path.exists() and new_path.exists()) or old_path.resolve() == new_path.resolve()

    return flag_changes(previous_config, "data", asdict(data_args), RESUME_DATA_FLAGS, {"dataset": same_dataset})


def _parent_is_accelerate() -> bool:
    """Whether the parent process is `accelerate launch` (its command line names accelerate), not a shell that has
    accelerate's variables exported (a plain `python train_accelerate.py` must outlive its shell)."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()  # `accelerate launch`, `-m accelerate...launch`
    except OSError:
        return False
    return b"accelerate" in parent and b"launch" in parent


def _set_by_the_launcher(variable: str) -> bool:
    """Whether `accelerate launch` (the parent) set `variable` for this process: the parent's own environment lacks
    it. accelerate's simple launcher sets `MASTER_PORT` only when asked for several processes or machines; one a
    cluster's job script exports reaches its own environment too."""
    if not _parent_is_accelerate():
        return False
    try:
        entries = Path(f"/proc/{os.getppid()}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return not any(entry.startswith(f"{variable}=".encode()) for entry in entries)


def signal_when_the_launcher_dies() -> signal.Signals | None:
    """Have Linux signal this process when the launcher that started it dies; returns the signal (None: not set).

    accelerate's one-process launcher waits on the trainer and passes no signal on, so a SIGTERM to the launcher
    alone (a scheduler signalling the process it started) ended the launcher and left the trainer running, orphaned,
    until something killed it without a checkpoint. With `PR_SET_PDEATHSIG` the launcher's death is a SIGTERM here,
    which `StopSignal` turns into a checkpoint (Linux sends it again each time the launcher thread it was passed to
    ends, so it may come twice or more).

    torchrun (several processes, `TORCHELASTIC_RUN_ID`) passes a SIGTERM or Ctrl-C on itself and waits for the save.
    A torchrun that dies without doing so (SIGKILL) takes along the store its processes exchange through at every save
    (`first_failure`): they trained on, orphaned (writing `metrics.jsonl` beside a resume, holding their devices),
    until their next checkpoint or export failed with a `DistNetworkError` traceback. They get SIGKILL instead and stop
    with it, like a kill of the whole job: a resume continues from the last complete checkpoint.
    """
    if sys.platform != "linux":
        return None
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's processes: their parent is its agent
        sig = signal.SIGKILL
    elif "ACCELERATE_DYNAMO_BACKEND" in os.environ and _parent_is_accelerate():  # accelerate's one-process launcher
        sig = signal.SIGTERM
    else:  # no launcher: the parent is a shell, whose exit must not stop the run
        return None
    return sig if die_with_parent(sig) else None


def _how_to_go_on(train_args: TrainArguments) -> str:
    """The end of a fault's message: resume where a checkpoint is, else start again."""
    if list_checkpoints(train_args.output_dir):
        return "then --resume latest (the last good checkpoint stays)."
    return "then start the run again (it has no checkpoint yet)."


def out_of_memory_message(err: RuntimeError, train_args: TrainArguments) -> str:
    """The one line for a device (or CPU allocator) out of memory: what ran out, at which batch, and the ways on."""
    text = str(err)
    if "DefaultCPUAllocator" in text:  # "[enforce fail at ...] err == 0. DefaultCPUAllocator: can't allocate ..."
        what = text[text.index("DefaultCPUAllocator") :].split(" Error code")[0].rstrip(". ")
    else:  # "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..."
        what = text.split(". ")[0].rstrip(". ")
    fixes = "lower --micro_batch_size (the total batch stays, with more accumulation steps)"
    if train_args.micro_batch_size == 1:
        fixes = "lower --seq_len or use a smaller model"
    if not train_args.gradient_checkpointing:
        fixes += " or add --gradient_checkpointing true"
    return (
        f"{what[:200]} at --micro_batch_size {train_args.micro_batch_size} x --seq_len {train_args.seq_len}: "
        f"{fixes}, {_how_to_go_on(train_args)}"
    )


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (`> 0`, else only measure it); return the norm before clipping.

    On a CPU, one process or DDP (whose gradients are already all-reduced here): `gradient_norm` (accurate, and
    faster than torch's CPU norm), then `torch.nn.utils.clip_grads_with_norm_` only where torch's coefficient
    `max_norm / (norm + 1e-6)` is below 1. Otherwise torch's `clip_grad_norm_` multiplies every gradient by exactly
    1, a pass over all of them (26 ms of a 124M step on 2 cores) that changes nothing; it does so to spare a GPU a
    device sync. Elsewhere (GPUs, FSDP, DeepSpeed, XLA): `accelerator.clip_grad_norm_`.
    """
    cpu_step = accelerator.device.type == "cpu" and accelerator.distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
    )
    if max_norm > 0 and not cpu_step:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    accelerator.unscale_gradients()  # a no-op without fp16's gradient scaler
    params = [p for p in model.parameters() if p.grad is not None]
    total_norm = gradient_norm([p.grad for p in params])
    if max_norm > 0 and max_norm / (total_norm + 1e-6) < 1:  # torch's coefficient, below 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
    return total_norm


# one device or DDP: parameters are plain tensors, which torch's fused AdamW flags with a plain `found_inf`
PLAIN_TENSOR_PARAMETERS = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def guarded_optimizer_step(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    train_args: TrainArguments,
    step: int,
    also_read: torch.Tensor | None = None,
) -> list[float]:
    """`optimizer.step()` unless the loss or the gradient norm (device scalars) is not finite, which raises
    `TrainingError` with the weights unmoved (under fp16 a non-finite norm is the gradient scaler's to skip instead).
    Returns `[loss, grad_norm, *also_read]` (`also_read`: more device values the caller wants), read from the device
    in one transfer.

    With torch's fused AdamW (the trainer's default on GPUs and CPUs) the check runs on the device: the optimizer gets
    the flag `found_inf` (as fp16's gradient scaler passes it), its kernel skips a flagged update (weights, moments and
    step count) itself, and the host reads the values once, after launching AdamW. So a GPU does not wait idle for
    the host between the backward pass and AdamW, as it did with two reads before AdamW (about 9 ms of a 34 ms 124M
    step of one micro-step on an H200, BENCHMARKS.md). Elsewhere (unfused AdamW, fp16's scaler, FSDP's sharded
    parameters) the host reads first and steps only when both values are finite.
    """
    checked = torch.stack([loss.float().reshape(()), grad_norm.to(loss.device).float().reshape(())])
    values = checked if also_read is None else torch.cat([checked, also_read.float().reshape(-1)])
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
    on_device = (
        accelerator.scaler is None
        and getattr(inner, "_step_supports_amp_scaling", False)  # torch's fused AdamW
        and accelerator.distributed_type in PLAIN_TENSOR_PARAMETERS
    )
    if on_device:
        inner.found_inf = (~torch.isfinite(checked)).any().float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    read = values.tolist()
    train_loss, norm = read[:2]
    if not math.isfinite(train_loss):
        raise TrainingError(
            f"non-finite loss ({train_loss}) at step {step}; nothing was saved: lower --max_lr, check the data, "
            f"{_how_to_go_on(train_args)}"
        )
    if not math.isfinite(norm) and accelerator.mixed_precision != "fp16":  # fp16's scaler skips such steps
        precision = "" if accelerator.mixed_precision == "no" else " or use --mixed_precision no"
        raise TrainingError(
            f"non-finite gradient norm ({norm}) at step {step}, with a finite loss; nothing was saved: lower "
            f"--max_lr{precision}, {_how_to_go_on(train_args)}"
        )
    if not on_device:
        optimizer.step()
    return read


def train_step(
    accelerator: Accelerator,
    forward: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: ShardedTokenLoader,
    train_args: TrainArguments,
    step: int,
    cudagraphs: bool = False,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """One optimizer step: `gradient_accumulation_steps` micro-batches, clip, AdamW, schedule.

    `accelerator.accumulate` skips the gradient all-reduce on all but the last micro-step and `accelerator.backward`
    divides each micro-loss by the accumulation steps, so the update is the mean over the whole batch, the same for
    1 process x 2k micro-steps as for 2 processes x k. A non-finite loss or gradient norm raises with the weights
    unmoved (`guarded_optimizer_step`; under fp16 the gradient scaler skips such a step instead, and the schedule
    waits with it).
    `cudagraphs` (`compile_forward`): the gradients stay in their buffers, zeroed instead of freed.

    `stop_requested` (a collective check, asked on every rank alike) is asked between micro-steps. When it answers
    yes, the partial step is undone (gradients zeroed; the loader, the torch RNG and accelerate's micro-step count
    back where the step began) and `StepInterrupted` is raised: the checkpoint saved next is the last complete
    step's, and resuming from it is exact. (`torchrun` kills the processes 30 s after passing on a SIGTERM, so a
    long step must not be waited for.) The returned `step_seconds` is the mean over the processes, the same on all.
    """
    grad_accum = accelerator.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=accelerator.device)
    started = time.perf_counter()
    if stop_requested is not None:
        cuda = accelerator.device.type == "cuda"
        at_start = (train_loader.state_dict(), torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
        micro_steps_before = accelerator.step
    for micro_step in range(grad_accum):
        x, y = train_loader.next_batch()
        x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last micro-step's outputs are consumed
            loss = forward(input_ids=x, shift_labels=y, use_cache=False).loss
            loss_sum += loss.detach().float()
            accelerator.backward(loss)
        if stop_requested is not None and micro_step < grad_accum - 1 and stop_requested():
            model.zero_grad(set_to_none=not cudagraphs)  # the optimizer's does nothing off the last micro-step
            train_loader.load_state_dict(at_start[0])
            torch.set_rng_state(at_start[1])
            if at_start[2] is not None:
                torch.cuda.set_rng_state_all(at_start[2])
            accelerator.step = micro_steps_before
            raise StepInterrupted
    seconds = torch.tensor(time.perf_counter() - started, dtype=torch.float32, device=accelerator.device)
    loss, seconds = accelerator.reduce(torch.stack([loss_sum / grad_accum, seconds]), reduction="mean")
    grad_norm = clip_gradients(accelerator, model, train_args.grad_clip)
    lr = scheduler.get_last_lr()[0]
    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None  # fp16's loss scale
    train_loss, grad_norm, step_seconds = guarded_optimizer_step(
        accelerator, optimizer, loss, grad_norm, train_args, step, also_read=seconds
    )
    # fp16: an overflowing step moves neither the weights nor the schedule. Fused AdamW skips it in its own kernel, so
    # accelerate's `step_was_skipped` stays False (accelerate issue 4242); the scaler backs its scale off only then.
    if not (optimizer.step_was_skipped or (scale is not None and accelerator.scaler.get_scale() < scale)):
        scheduler.step()
    optimizer.zero_grad(set_to_none=not cudagraphs)
    return {"train_loss": train_loss, "lr": lr, "grad_norm": grad_norm, "step_seconds": step_seconds}


def tracker_values(record: dict) -> dict:
    """A logged record as the trackers get it: without `step` (their own argument) and without non-finite numbers
    (the `grad_norm` of a step fp16's scaler skipped), which `metrics.jsonl` writes as null and which would stretch
    TensorBoard's chart or be refused by a tracker."""
    return {k: v for k, v in record.items() if k != "step" and not (isinstance(v, float) and not math.isfinite(v))}


# accelerate trackers that take no text (they drop it with a warning, or reject it)
_NO_TEXT_TRACKERS = frozenset({"aim", "clearml", "dvclive", "mlflow", "swanlab"})


def log_samples(accelerator: Accelerator, samples: list[str], step: int) -> None:
    """The samples as one text value `samples` to each tracker that takes text (TensorBoard's TEXT tab, W&B, ...)."""
    text = "\n\n".join(f"{i}: {sample}" for i, sample in enumerate(samples))
    for tracker in accelerator.trackers:
        if tracker.name not in _NO_TEXT_TRACKERS:
            tracker.log({"samples": text}, step=step)


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> dict:
    """The whole run: set up, loop (log, evaluate, sample, checkpoint), export; returns the run summary."""
    start_time = time.time()
    accelerator = build_accelerator(train_args)
    check_same_flags(accelerator, model_args, data_args, train_args)  # before anything acts on them
    device = accelerator.device
    if train_args.tf32:
        torch.set_float32_matmul_precision("high")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(train_args, accelerator.num_processes))
    if malloc_tuning_on(train_args, device) and not tune_cpu_malloc():
        logger.warning("--malloc_tuning: this C library has no mallopt (not glibc); left as it is.")
    accelerator.gradient_accumulation_steps = gradient_accumulation_steps(train_args, accelerator.num_processes)
    check_output_dir_not_a_file(train_args.output_dir)  # every process alike
    check_output_dir_not_the_corpus(train_args.output_dir, data_args.dataset)
    failure = None
    if accelerator.is_main_process:  # before anything reads the run folder, or prepares the data
        try:
            check_output_dir_writable(train_args.output_dir)
            restore_interrupted_replaces(train_args.output_dir)
        except ValueError as err:
            failure = str(err)
    failure = first_failure(accelerator, failure, Path(train_args.output_dir) / ".tmp-old-restore")  # a barrier too
    if failure is not None:  # on every process, where a barrier would have left the others waiting
        raise ValueError(failure)
    check_shared_output_dir(accelerator, Path(train_args.output_dir))
    # before DDP's first collective (`accelerator.prepare`): a failure of one machine alone stops them all
    with stop_together(accelerator, "setup"):
        resume_from = resolve_resume(train_args.resume, train_args.output_dir) if train_args.resume else None
        if resume_from is None and not train_args.overwrite_output_dir:
            check_no_checkpoints_ahead(train_args.output_dir, 0)
            check_no_finished_run(train_args.output_dir)
        elif resume_from is None:  # what it deletes must not hold this run's own inputs
            inputs = {"init_from": model_args.init_from, "data_dir": resolve_data_dir(data_args, train_args)}
            check_overwrite_keeps_inputs(train_args.output_dir, inputs | {"dataset": data_args.dataset})
        model = build_seeded_model(model_args, train_args, accelerator.process_index)  # before the data: fails at once
        check_attention_trains_on(model.config._attn_implementation, device)
        if resume_from is not None:
            check_branch_into_a_folder_of_its_own(resume_from, train_args.output_dir)
            check_checkpoint_fits(resume_from, model.config, accelerator.num_processes)
            # the configuration of the run the checkpoint is from, which the resume's flags are checked against
            resumed_config = run_folder_of(resume_from, train_args.output_dir) / RUN_CONFIG_NAME
            changed = data_flag_changes(resumed_config, data_args)
            if changed:  # before any data is prepared: --overwrite_data would otherwise rebuild the shards for nothing
                raise ValueError(
                    f"--resume {resume_from}: the run trained on other data ({'; '.join(changed)}); resume with the "
                    "run's data flags (its run_config.json), or start a new run in another --output_dir."
                )
        train_loader, val_loader = build_dataloaders(accelerator, data_args, train_args)
    check_same_data(accelerator, data_args, resolve_data_dir(data_args, train_args))
    if val_loader is None and train_args.eval_every > 0:
        logger.info("no validation split (--val_fraction 0, or a dataset without one): no evaluations, no val loss.")
    if val_loader is not None and train_args.eval_batches > val_loader.batches_per_epoch:
        logger.warning(
            "--eval_batches %d: the val split holds %d batches per process; each evaluation reads those once.",
            train_args.eval_batches,
            val_loader.batches_per_epoch,
        )
    if train_args.warmup_steps >= train_args.max_steps:
        logger.warning(
            "--warmup_steps %d is not below --max_steps %d: the learning rate only warms up, to %g at the last step "
            "(--max_lr %g), and never decays; lower --warmup_steps for GPT-3's schedule.",
            train_args.warmup_steps,
            train_args.max_steps,
            train_args.max_lr * train_args.max_steps / train_args.warmup_steps,
            train_args.max_lr,
        )
    use_compile, fused = speed_flags(train_args, device)
    optimizer = build_optimizer(model, train_args, fused=fused)
    scheduler = build_scheduler(optimizer, train_args)
    model, optimizer = accelerator.prepare(model, optimizer)
    forward, cudagraphs = (  # same parameters; checkpoints use the plain model
        compile_forward(model, train_args, device) if use_compile else (model, False)
    )
    if train_args.compile_mode != "default" and not use_compile:
        logger.warning(
            "--compile_mode %s has no effect: the model is not compiled (--compile).", train_args.compile_mode
        )
    if cudagraphs and accelerator.num_processes > 1:
        logger.warning(
            "--compile_mode %s: CUDA graphs were measured on one GPU only; with %d processes, use "
            "--compile_mode default if a step fails.",
            train_args.compile_mode,
            accelerator.num_processes,
        )
    unwrapped = accelerator.unwrap_model(model)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, train_loader, state)

    output_dir = Path(train_args.output_dir)
    run_config = {
        "model": unwrapped.config.to_diff_dict()
        | {
            "n_params": sum(p.numel() for p in unwrapped.parameters()),
            "init_from": model_args.init_from,
            "init_from_source": init_from_source(model_args),
        },
        "data": asdict(data_args) | {"dataset_source": dataset_source(data_args, train_args)},
        "training": asdict(train_args)
        | {
            "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "compile": use_compile,
            "cuda_graphs": cudagraphs,
            "fused_adamw": fused,
        },
    }
    saved_step = None  # the step of the checkpoint on disk that holds this run's state
    if resume_from is not None:
        # every process's load, then the check: a slower machine's load is not taken for a silent one, and an error
        # of one machine's load (a file its listing lacks) reaches the others as that error
        with stop_together(accelerator, "the checkpoint load"):
            precision_changes = load_checkpoint(accelerator, resume_from)
        check_same_checkpoint(accelerator, resume_from, state.step, model)
        accelerator.step = 0  # accelerate's micro-step count: restart at a step boundary (the accumulation may differ)
        if Path(resume_from).resolve() == checkpoint_dir(output_dir, state.step).resolve():
            saved_step = state.step  # a branch into another --output_dir has no checkpoint of its own yet
        if state.step > train_args.max_steps:
            raise ValueError(
                f"--resume {resume_from}: the checkpoint is at step {state.step}, past --max_steps "
                f"{train_args.max_steps}: raise --max_steps, or resume an earlier checkpoint."
            )
        check_no_checkpoints_ahead(train_args.output_dir, state.step)
        changes = precision_changes + apply_optimizer_flags(optimizer, scheduler, train_args)
        changes += schedule_flag_changes(resumed_config, run_config["training"])
        changes += [  # weights and dropout continue from the checkpoint's RNG states: the seed reaches the samples
            f"{change} (the samples' seed only)"
            for change in flag_changes(resumed_config, "training", run_config["training"], ("seed",))
        ]
        saved_config = Path(resume_from) / "config.json"
        saved_dropout = json.loads(saved_config.read_text()).get("resid_pdrop") if saved_config.is_file() else None
        if saved_dropout is not None and saved_dropout != unwrapped.config.resid_pdrop:  # applies, as at --init_from
            changes.append(f"--dropout {saved_dropout} -> {unwrapped.config.resid_pdrop}")
        # the weights descend from what the run started from (--init_from), whatever this start's flag says: the
        # record stays, for the model card's base model (a resume without the flag had erased it)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            started = json.loads(resumed_config.read_text())["model"]
            start = {key: started.get(key) for key in ("init_from", "init_from_source")}
            if model_args.init_from is not None and start["init_from"] != model_args.init_from:
                changes.append(
                    f"--init_from {model_args.init_from} (the weights are the checkpoint's: the run stays recorded as "
                    f"started from {start['init_from'] or 'scratch'})"
                )
            run_config["model"] |= start
        logger.info("resumed from %s at step %d", resume_from, state.step)
        if changes:
            logger.info("resume: this run's flags replace the checkpoint's: %s", "; ".join(changes))
    # on every process: an --output_dir that is a file fails them all alike, instead of the main process alone (the
    # others then died in their first collective, a traceback below its one-line error)
    output_dir.mkdir(parents=True, exist_ok=True)
    earlier_peak = None
    if accelerator.is_main_process:  # after a resume that worked: a failed one leaves the run's files as they were
        if resume_from is None and train_args.overwrite_output_dir and list_checkpoints(output_dir):
            logger.info("--overwrite_output_dir: deleting the checkpoints in %s", output_dir / "checkpoints")
            shutil.rmtree(output_dir / "checkpoints")
        # the peak of a resumed run's earlier starts, also what came after their last logged step (evaluation,
        # checkpoint, export), which only their run_summary.json holds
        if resume_from is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                earlier_peak = json.loads((output_dir / RUN_SUMMARY_NAME).read_text()).get("peak_memory_mib")
        # the end-of-run files of a run replaced (--overwrite_output_dir), or of one that goes on past its export
        stale = finished_run_files(output_dir) if resume_from is None or state.step < train_args.max_steps else []
        # first, an older export a re-export's crash kept aside: it would take final/'s free name at the next start
        # (restore_interrupted_replaces), also beside the .tmp-final that a crash while final/ is deleted leaves
        if stale:
            shutil.rmtree(output_dir / ".tmp-old-final", ignore_errors=True)
        for path in stale:
            logger.info("deleting %s: it describes the run %s", path, "replaced" if resume_from is None else "so far")
            delete_folder(path) if path.is_dir() else path.unlink()
        write_json_atomic(output_dir / RUN_CONFIG_NAME, run_config)
        logger.info("configuration:\n%s", _format_config(run_config))
    # the main process alone owns metrics.jsonl (it trims or removes the old file here: one writer, no race)
    metrics = (
        MetricsWriter(output_dir, resume_step=state.step if resume_from else None)
        if accelerator.is_main_process
        else None
    )
    if train_args.report_to != "none":
        # TensorBoard hides what an earlier run in this folder logged from the next step on (on resume, the steps past
        # the checkpoint, which come again; on a new start, all), as metrics.jsonl drops it: SummaryWriter's purge_step
        purge = {"tensorboard": {"purge_step": state.step + 1}}
        accelerator.init_trackers(output_dir.name, config=_flat(run_config), init_kwargs=purge)

    tokens_per_step = train_args.total_batch_tokens
    flops_per_step = flops_per_token(unwrapped.config, train_args.seq_len) * tokens_per_step
    peak = device_peak_flops(device)
    val_loss = None
    progress = tqdm(
        total=train_args.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process
    )
    model.train()
    loop_start, elapsed_before = time.time(), state.elapsed
    first_step, step_seconds = state.step + 1, 0.0
    # an error's line starts below the bar, not on it; a line logged meanwhile ("saved checkpoint") goes through tqdm,
    # which clears the bar first, instead of after the bar's text on its line
    with StopSignal() as stop, contextlib.closing(progress), logging_redirect_tqdm(tqdm_class=tqdm):

        def stop_requested() -> bool:  # collective: every process asks, and all get the same answer
            if accelerator.num_processes == 1:
                return stop.received is not None  # no collective needed (and no device sync)
            if stop.received:
                accelerator.set_trigger()
            return accelerator.check_trigger()

        while state.step < train_args.max_steps:
            step_start = time.time()
            check_mid_step = state.step + 1 == first_step or step_seconds > MID_STEP_STOP_AFTER_S  # same on all ranks
            try:
                record = train_step(
                    accelerator, forward, model, optimizer, scheduler, train_loader, train_args, state.step + 1,
                    cudagraphs, stop_requested if check_mid_step else None,
                )  # fmt: skip
            except StepInterrupted:
                stop.received = stop.received or ANOTHER_PROCESS_STOPPED
                break
            step_seconds = record.pop("step_seconds")
            state.step += 1
            state.tokens += tokens_per_step
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_time = time.time() - step_start
            state.elapsed = elapsed_before + time.time() - loop_start
            record |= {
                "step": state.step,
                "tokens": state.tokens,
                "tokens_per_sec": tokens_per_step / step_time,
                "elapsed": state.elapsed,  # training seconds of the run so far, resumes included (setup excluded)
            }
            if peak:
                record["mfu"] = flops_per_step / step_time / (peak * accelerator.num_processes)
            if state.step == first_step and device.type == "cuda" and accelerator.is_main_process:
                hint = micro_batch_hint(
                    peak_memory_mib(device),
                    torch.cuda.get_device_properties(device).total_memory / 2**20,
                    train_args.micro_batch_size,
                    train_args.seq_len,
                    accelerator.gradient_accumulation_steps,
                )
                if hint:
                    logger.info(hint)
            progress.update(1)
            progress.set_postfix_str(_postfix(record))

            last = state.step == train_args.max_steps
            evaluate_now = last or (train_args.eval_every and state.step % train_args.eval_every == 0)
            if val_loader is not None and evaluate_now:
                loss = evaluate(  # dropped on a stop signal, which the check below then acts on
                    accelerator,
                    forward,
                    val_loader,
                    train_args.eval_batches,
                    cudagraphs,
                    None if last else stop_requested,
                )
                if loss is not None:
                    val_loss = record["val_loss"] = loss
            if state.step % train_args.log_every == 0 or state.step == 1 or last or "val_loss" in record:
                memory = peak_memory_mib(device)  # read when logged (evaluation included), not every step
                if memory is not None:
                    record["peak_memory_mib"] = round(memory)  # the main process's
                if accelerator.is_main_process:
                    metrics.write(record)
                    write_line(_log_line(record, train_args.max_steps))
                    if "val_loss" in record:
                        metrics.plot()
                accelerator.log(tracker_values(record), step=state.step)
            if train_args.sample_every and (state.step % train_args.sample_every == 0 or last):
                if accelerator.is_main_process:
                    samples = generate_samples(unwrapped, train_args, device)
                    for i, text in enumerate(samples):
                        write_line(f"sample {i} (step {state.step}): {text!r}")
                    log_samples(accelerator, samples, state.step)
            if not last:  # a checkpoint of this step (saved below) holds its evaluation and samples, as step + 1 does
                state.elapsed = elapsed_before + time.time() - loop_start
            if stop.received:
                accelerator.set_trigger()
            # a signal to any process stops them all after the same step; after the last one, the run just ends
            if accelerator.check_trigger() and not last:
                stop.received = stop.received or ANOTHER_PROCESS_STOPPED
                break
            if train_args.save_every and state.step % train_args.save_every == 0 and not last:
                save_checkpoint(accelerator, model, train_args, state.step)
                saved_step = state.step
        progress.close()

        if state.step < train_args.max_steps:  # stopped by a signal
            # still under StopSignal: a repeated signal cannot cut this save short (a launcher dying with several
            # threads sends one per thread through PR_SET_PDEATHSIG; schedulers resend their notice)
            if saved_step != state.step:
                save_checkpoint(accelerator, model, train_args, state.step)
            logger.info(
                "%s received: saved step %d; continue with --resume latest",
                stop.received,
                state.step,
                extra={"every_process": stop.received != ANOTHER_PROCESS_STOPPED},  # which process got the signal
            )
            accelerator.end_training()
            return {"stopped_by": stop.received, "steps": state.step}
        # the run ends here (a signal in the last step included); a signal now changes nothing: it only finishes
        if train_args.save_every and saved_step != state.step:
            save_checkpoint(accelerator, model, train_args, state.step)
        final = export_final(accelerator, model, train_args.output_dir)
        # from metrics.jsonl: also right when a resume had no step left to run
        logged = metrics.read() if accelerator.is_main_process else []
        train_losses = [r["train_loss"] for r in logged if r.get("train_loss") is not None]
        val_losses = [r["val_loss"] for r in logged if r.get("val_loss") is not None]
        memory = peak_memory_mib(device)  # this process's; a resumed run's earlier processes logged theirs
        peaks = [r["peak_memory_mib"] for r in logged if r.get("peak_memory_mib") is not None]
        peaks += [] if memory is None else [round(memory)]
        peaks += [earlier_peak] if isinstance(earlier_peak, (int, float)) else []
        summary = {
            "steps": state.step,
            "tokens_seen": state.tokens,
            "final_train_loss": train_losses[-1] if train_losses else None,
            "final_val_loss": val_loss if val_loss is not None else (val_losses[-1] if val_losses else None),
            "training_seconds": round(state.elapsed, 1),  # the training loop's, over every resume
            "wall_clock_seconds": round(time.time() - start_time, 1),  # this process's, setup included
            "num_processes": accelerator.num_processes,
            "device": device.type,
            "device_name": describe_device(device),
            "mixed_precision": accelerator.mixed_precision,
            "compile": use_compile,
            "peak_memory_mib": max(peaks, default=None),  # the main process's, over every resume
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
        if accelerator.is_main_process:
            write_json_atomic(output_dir / RUN_SUMMARY_NAME, summary)
            if metrics.read():
                metrics.plot()
            logger.info(
                "done: %d steps, %s tokens, val loss %s, %s; model in %s",
                state.step,
                f"{state.tokens:,}",
                f"{summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else "n/a",
                format_seconds(summary["wall_clock_seconds"]),
                final,
            )
        accelerator.end_training()
        return summary


def write_line(text: str) -> None:
    """A line on stdout, above the progress bar, flushed at once: in a file (nohup, a scheduler's log, `| tee`) stdout
    is block-buffered, and the step lines came 8 KB at a time, behind the stderr lines logged since."""
    tqdm.write(text)
    sys.stdout.flush()


def _postfix(record: dict) -> str:
    text = (
        f"loss={record['train_loss']:.4f}, lr={record['lr']:.2e}, norm={record['grad_norm']:.3f}, "
        f"tok/s={record['tokens_per_sec']:,.0f}"
    )
    return text + (f", mfu={100 * record['mfu']:.1f}%" if "mfu" in record else "")


def _flat(config: dict) -> dict:
    """Tracker-friendly flat config: section.key -> scalar."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                flat[f"{section}.{key}"] = value if value is not None else "None"
    return flat


def _format_config(config: dict) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"  {key} = {value!r}" for key, value in values.items())
    return "\n".join(lines)


def _log_line(record: dict, max_steps: int) -> str:
    line = f"step {record['step']:>6}/{max_steps} | loss {record['train_loss']:.4f} | tokens {record['tokens']:,}"
    if "lr" in record:
        line += f" | lr {record['lr']:.3e} | norm {record['grad_norm']:.4f} | tok/s {record['tokens_per_sec']:,.0f}"
    if "mfu" in record:
        line += f" | mfu {100 * record['mfu']:.1f}%"
    if "val_loss" in record:
        line += f" | val {record['val_loss']:.4f}"
    return line


def tied_head_save_notice(record: logging.LogRecord) -> bool:
    """A `logging` filter: False for accelerate's warning at every checkpoint that the tied `lm_head.weight` was
    left out ("Removed shared tensor {'lm_head.weight'} while saving"). It is the token embedding, which `load_state`
    and `from_pretrained` tie back: expected, not a problem. Any other removed tensor still warns."""
    return "Removed shared tensor {'lm_head.weight'} while saving" not in record.getMessage()  # after "[RANK 0] "


ERROR_STORE_KEY = "gpt2_scratch/error"  # the main process's error message, in torch.distributed's store
ERROR_WAIT_S = 5.0  # how long another process waits for the main process's message before printing its own


def shown_by_another_process(message: str) -> bool:
    """Whether another process of this run prints the error `message` (the same one), so this one need not.

    Most errors are the same on every process (a bad flag, a checkpoint of another process count): each process
    printing its own showed it once per process. One process alone (no launcher, or `accelerate launch` of one):
    False. Before the processes join (arguments, presets: the same on every process of a machine), only each
    machine's first process (`LOCAL_RANK` 0) prints. Once they have joined, the main process prints and leaves its
    message in torch.distributed's store, and each other machine's first process prints too (its machine's log,
    which may be all its user sees, shows the error); another prints its own unless the main process's is the same,
    or when none comes within `ERROR_WAIT_S` seconds (a fault of its own, while the main process waits for it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        return int(os.environ.get("LOCAL_RANK", "0")) != 0
    try:
        store = dist.distributed_c10d._get_default_store()  # the launcher's rendezvous store: no collective
        if dist.get_rank() == 0:
            store.set(ERROR_STORE_KEY, message)
            return False
        if os.environ.get("LOCAL_RANK", "0") == "0":  # another machine's first process: that machine's log shows it
            return False
        store.wait([ERROR_STORE_KEY], datetime.timedelta(seconds=ERROR_WAIT_S))
        return store.get(ERROR_STORE_KEY).decode() == message
    except Exception:  # no message in time, or the store went with the main process: print this one
        return False


def main_process_only(record: logging.LogRecord) -> bool:
    """A `logging` filter for the trainer's loggers (its own, the data's and the tokenizer's): under several processes
    only the main one logs what they all would (a resume, a stop, a flag's warning), as accelerate's `get_logger`
    does. Errors, and records logged with `extra={"every_process": True}` (the stop signal a process received
    itself), pass on every process. The data's records (its prepare's progress, the shards reused), and those logged
    with `extra={"every_machine": True}`, pass on each machine's first process (`LOCAL_RANK` 0): every machine
    prepares its own data, and the other machines' terminals showed nothing while they did (on one machine, that
    process is the main one)."""
    if record.levelno >= logging.ERROR or getattr(record, "every_process", False):
        return True
    if record.name == "modeling_gpt2_scratch.data" or getattr(record, "every_machine", False):
        return os.environ.get("LOCAL_RANK", "0") == "0"  # each machine prepares its own data: its first process
    return os.environ.get("RANK", "0") == "0"  # torchrun's, per process


def main(argv: list[str] | None = None) -> int:
    configure_cli_logging("%(asctime)s %(levelname)s %(name)s: %(message)s", logger.name, "modeling_gpt2_scratch")
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate.utils.other").addFilter(tied_head_save_notice)
    for name in (logger.name, "modeling_gpt2_scratch.data", "modeling_gpt2_scratch.tokenization"):
        logging.getLogger(name).addFilter(main_process_only)  # e.g. "Reusing the shards in ...": once, not per process
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):  # 7 INFO lines per checkpoint, one per file
        logging.getLogger(name).setLevel(logging.WARNING)  # (ours says "saved checkpoint"); warnings still show
    signal_when_the_launcher_dies()
    train_args = None
    try:
        model_args, data_args, train_args = parse_arguments(argv)
        train(model_args, data_args, train_args)
    except USER_ERRORS as err:  # OSError: e.g. a folder it cannot write
        if not shown_by_another_process(str(err)):
            print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, (TrainingError, PrepareError)) else 2
    except RuntimeError as err:  # torch.OutOfMemoryError (CUDA) or the CPU allocator's RuntimeError
        if train_args is None or not should_reduce_batch_size(err):
            raise
        message = out_of_memory_message(err, train_args)
        if not shown_by_another_process(message):  # the same micro-batch runs out on every GPU alike
            print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
