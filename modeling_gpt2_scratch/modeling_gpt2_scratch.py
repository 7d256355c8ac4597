"""GPT-2, written from scratch as a `transformers` model.

Read top to bottom: attention (eager fallback, then the module), MLP, block, the pretrained-model base
(flags, initialisation), the base model, the LM-head model. Module names are GPT-2's own
(`wte, wpe, h.{i}.ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f, lm_head`), so a Hugging Face
GPT-2 checkpoint loads key for key; only GPT-2's `Conv1D` weights are stored transposed (see `conversion.py`).

This file travels to the Hub with the model: it imports nothing but `torch`, `transformers` and the config
(relative import), so `trust_remote_code=True` works on a machine that has never seen this repository.
"""

from __future__ import annotations

# First: importing the config checks the transformers version, so an older one stops with its one-line error, not
# with an ImportError from the imports below (under 4.x no `transformers.initialization`, under 5.18 no
# `slice_logits_to_keep`), where this file is imported without the config (`config=` a plain `PretrainedConfig`).
from .configuration_gpt2_scratch import GPT2ScratchConfig

# isort: split
import importlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
from transformers.generation.logits_process import LogitsProcessorList, WatermarkLogitsProcessor
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # label value that contributes no loss (transformers' convention)
LOSS_CHUNK_ELEMENTS = 2**26  # logits per chunk of the fused LM-head loss (256 MB in float32)
CUDA_LOSS_CHUNK_ELEMENTS = 2**30  # on a CUDA GPU: 16 x 1024 rows in one chunk, steps 1.05x faster (BENCHMARKS.md)
MIN_PACKED_ROWS = 4  # decoding rows from which MKL's packed GEMM beats its small-row kernels (BENCHMARKS.md)


class Linear(nn.Linear):
    """`nn.Linear`, which can multiply decoding steps by an MKL-packed copy of its weight (`packed_decoding`).

    A decoding step multiplies a few rows (one position per sequence) by every weight. On a CPU, MKL's packed GEMM
    (the weight re-laid out once for a given row count, as `torch.compile`'s CPU freezing does it) runs those
    products 1.3-2.7x faster than `F.linear` from 4 rows up; below that both are as fast. Only when enabled (by
    `packed_decoding`), without autograd or autocast, in float32 on a CPU with MKL; otherwise `F.linear`.
    """

    decoding_pack: dict | None = None  # {} while `packed_decoding` is on, then {"current": (key, the pack)}

    def __getstate__(self) -> dict:
        """What `deepcopy`, `pickle` and `torch.save` copy: all but the decoding pack. A copy taken while `generate()`
        runs (another thread, a streamer's callback) failed on MKL's pack, an opaque tensor, or kept packing on for
        good (an empty pack dict reads as an outer `packed_decoding` block); the copy starts without one."""
        state = super().__getstate__()
        state.pop("decoding_pack", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pack = None if torch.compiler.is_compiling() else self.decoding_pack  # compiled code never reads the pack
        if (
            pack is not None  # read once: another thread's `packed_decoding` may end meanwhile
            and x.dim() == 3
            and x.shape[1] == 1  # one position per sequence: a decoding step
            and x.shape[0] >= MIN_PACKED_ROWS
            and x.dtype == self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
        ):
            rows, weight = x.shape[0], self.weight
            # packed for these rows, from this weight as it is now (inference tensors have no version counter)
            key = (rows, weight.data_ptr(), None if weight.is_inference() else weight._version)
            current = pack.get("current")  # one (key, pack) tuple, replaced whole: safe to share between threads
            if current is None or current[0] != key:
                pack.pop("current", None)  # one pack at a time: free the old one before making the new one
                current = (key, torch.ops.mkl._mkl_reorder_linear_weight(weight, rows))
                pack["current"] = current
            return torch.ops.mkl._mkl_linear(x, current[1], weight, self.bias, rows)
        return F.linear(x, self.weight, self.bias)


def check_label_ids(labels: torch.Tensor | None, real_vocab: int, name: str, ignore_index: int = IGNORE_INDEX) -> None:
    """Refuse a label outside the tokenizer's ids (`0 .. real_vocab - 1`, or `ignore_index`), on a CPU and in eager
    mode only: where reading the labels costs nothing. One in the padded ids would give an infinite loss, one past
    them an index error from the loss. On a GPU the check would wait for the device every step, so it is not made
    there (`transformers`' GPT-2 fails with a device-side assert instead)."""
    if labels is None or labels.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= real_vocab))]
    if bad.numel():
        raise ValueError(
            f"{name}: id {bad[0].item()} is outside the model's {real_vocab} token ids (0-{real_vocab - 1}, or "
            f"{ignore_index} for a position without a target); were they made with another tokenizer?"
        )


def check_input_shape(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    """`input_ids` of shape `(B, T)` or `inputs_embeds` of shape `(B, T, C)`, else a one-line `ValueError` saying
    how to get there: one sequence of shape `(T,)` needs a batch dimension, and `(B, N, T)` (`GPT2Model` flattens
    it, for its multiple-choice head) needs flattening. Other shapes failed deep inside with a size mismatch."""
    tensor, name, dims = (input_ids, "input_ids", 2) if input_ids is not None else (inputs_embeds, "inputs_embeds", 3)
    if tensor.dim() == dims:
        return
    expected = "(batch, seq_len)" if dims == 2 else "(batch, seq_len, n_embd)"
    fix = f"{name}[None] for one sequence" if tensor.dim() == dims - 1 else "flatten the leading dimensions first"
    raise ValueError(f"{name} has shape {tuple(tensor.shape)}; the model takes {expected}: pass {fix}.")


def called_plainly(module: nn.Module, *classes: type[nn.Module]) -> bool:
    """Whether `module` is exactly one of `classes`, without forward hooks (its own or global ones) and with its
    class's own `forward`.

    Only then may the model read its weight directly instead of calling it: a PEFT/LoRA layer in its place, hooks
    (DeepSpeed ZeRO-3 gathers partitioned weights in one), or a replaced `forward` (accelerate's `add_hook_to_module`,
    which `device_map` offloading uses to load the weight first) change what the call computes.
    """
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
    )
    forward = vars(module).get("forward")  # set on the instance: its class's own, bound (a removed hook), or another
    replaced = forward is not None and getattr(forward, "__func__", None) is not type(module).forward
    return type(module) in classes and not any(hooks) and not replaced and getattr(module, "_hf_hook", None) is None


def mkl_packing_available() -> bool:
    """Whether this torch has MKL and its packed-GEMM ops (x86 builds do; e.g. ARM builds do not)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


@contextmanager
def packed_decoding(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, `model`'s `Linear`s run decoding steps of >= 4 rows with MKL-packed weights on a CPU.

    Each `Linear` packs its weight at its first such step (for that row count; again if the rows change, or the
    weight: another tensor, or an in-place change autograd counts, such as an optimizer step or `copy_`) and drops
    the pack when the block ends, so decoding holds one more copy of the weights meanwhile (0.5 GB for 124M in
    float32). The products equal `F.linear`'s to float32 rounding. Changes autograd does not count (through
    `weight.data`, or to an inference tensor) are not seen within the block: make them outside it, or between
    `generate()` calls. A no-op where MKL is missing or `enabled` is False. `GPT2ScratchForCausalLM.generate` runs
    inside it.
    """
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    if not (enabled and mkl_packing_available()) or any(m.decoding_pack is not None for m in linears):
        yield  # off, or already on (a nested call): leave the packs to the outer block
        return
    for module in linears:
        module.decoding_pack = {}
    try:
        yield
    finally:
        for module in linears:
            module.decoding_pack = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; `attention_mask` is the additive 4D causal (+ padding) mask built by the model."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1).to(value.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)  # (B, T, nh, hs)
    return attn_output, attn_weights


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q, k, v projection."""

    def __init__(self, config: GPT2ScratchConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # read by transformers' sdpa/flash attention functions
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # scaled init, see `_init_weights`
        self.attn_dropout = nn.Dropout(config.attn_pdrop)  # applied inside the attention function
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = hidden_states.size()
        q, k, v = self.c_attn(hidden_states).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # (B, nh, S, hs), S = past + T; the attention kwargs go along, as in HF's GPT-2 (the paged cache of
            # continuous batching, `generate_batch`, reads its batch layout from them)
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        y, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attn_dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        y = y.reshape(B, T, C)  # (B, T, nh, hs) -> (B, T, C): re-assemble the heads side by side
        y = self.resid_dropout(self.c_proj(y))
        return y, attn_weights


GELU_2C = 2 * math.sqrt(2 / math.pi)  # tanh-GELU(x) = 0.5 x (1 + tanh(C (x + 0.044715 x^3))) = x sigmoid(2C (...))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> tanh-GELU (GPT-2's `gelu_new`) -> Linear."""

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__()
        n_inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, n_inner)
        self.c_proj = Linear(n_inner, config.n_embd)
        self.c_proj.is_residual_projection = True  # scaled init, see `_init_weights`
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        if torch.compiler.is_compiling():
            # tanh-GELU as 0.5 x (1 + tanh(u)) = x sigmoid(2u), equal to float32 rounding: inductor's CPU kernels
            # for this form run 2.7x faster than for `F.gelu`'s tanh forward, 2x forward and backward (BENCHMARKS.md)
            x = x * torch.sigmoid(x * (GELU_2C + GELU_2C * 0.044715 * x * x))
        else:
            x = F.gelu(x, approximate="tanh")  # the exact GELU differs by ~5e-4 and breaks parity
        return self.dropout(self.c_proj(x))


class Block(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2ScratchConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attn(self.ln_1(hidden_states), attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, attn_weights


def _conversion():
    """The `gpt2-scratch` package's conversion module (not shipped to the Hub with this file)."""
    try:
        return importlib.import_module("modeling_gpt2_scratch.conversion")
    except ImportError as err:
        raise ImportError(
            "Converting to or from Hugging Face GPT-2 needs the gpt2-scratch package: `pip install -e .` in a clone "
            "of its repository (or run from the clone)."
        ) from err


def in_compiled_autograd() -> bool:
    """Whether a backward runs under compiled autograd (`torch._dynamo.compiled_autograd`: traced by dynamo, or run
    by the graph it captured). That graph is captured before any backward runs, with a gradient for every input
    that needs one: the `TiedEmbedding` handoff (the head's weight gradient returned as None, then by the lookup's
    backward) gave `add(None, tensor)` there. Under it the head and the lookup return their own gradients and the
    graph sums them, as with `add_embedding_gradient_in_place = False`. The flag is torch's private one: read
    with a default, so a torch without it keeps eager backwards working (the compiled-autograd test would fail)."""
    if torch.compiler.is_compiling():
        return True
    return getattr(getattr(torch._dynamo, "compiled_autograd", None), "in_compiled_autograd_region", False)


def is_exporting() -> bool:
    """`torch.compiler.is_exporting()`, or False on a torch without it (it is from about the time of 2.6-2.7, and
    `transformers`' floor is 2.6): there `torch.export` of the training loss fails, as it did on every torch before
    the fused loss stepped aside under export."""
    return getattr(torch.compiler, "is_exporting", lambda: False)()


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` without holding the `(N, V)` logits: chunk by chunk of rows.

    Each chunk's logits (`chunks`: `(start, rows)` pairs, from `chunks()`) are made, reduced to the loss and turned
    into the gradients of `hidden` and `weight` at once, then dropped; the backward only scales the stored gradients.
    Same FLOPs as
    the plain head + `F.cross_entropy`, but nothing `(N, V)` kept for the backward and at most one chunk's
    logits at a time (the model's `loss_chunk_rows`: 2**26 logits, or 2**30 on a CUDA GPU). Columns `>= real_vocab`
    (the padded ids) are `-inf`; targets equal to `ignore_index` count for nothing. Returns the summed loss divided by
    `normalizer`. With `gradients=False` (the model passes it where autograd records nothing, e.g. an evaluation under
    `torch.no_grad()`) it computes the loss alone: one matmul per chunk instead of three, nothing stored.

    Per chunk, besides the three matmuls, the `(n, V)` work is one `log_softmax` (as `F.cross_entropy` computes it;
    on a CPU, eager, written over the logits) and one in-place `exp_` (its softmax), written back into tensors
    already allocated; ignored rows are zeroed on the `(n, C)` side and the float32 weight gradient is accumulated
    in place. On a CPU those passes over memory and fresh allocations, not the FLOPs, are what this costs beyond the
    matmuls, so chunks are equal and large.

    The weight gradient is a sum over a chunk's rows made before any loss scaling. Under fp16 it could overflow (a
    frequent target times an outlier activation), and no `GradScaler` scale would cure that. So under fp16 it is
    summed with `hidden`'s columns scaled down by powers of two and scaled back in float32.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        real_vocab: int,
        normalizer,
        ignore_index: int,
        chunks: tuple[tuple[int, int], ...],
        tied_gradient: dict | None = None,
        gradients: bool = True,
    ):
        want_hidden, want_weight = gradients and ctx.needs_input_grad[0], gradients and ctx.needs_input_grad[1]
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        with torch.autocast(device_type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            valid = (targets != ignore_index).unsqueeze(1)  # (N, 1)
            targets = targets.unsqueeze(1).masked_fill(~valid, 0)  # (N, 1), ignored rows point at id 0
            grad_hidden = torch.empty_like(h_all) if want_hidden else None
            grad_weight = None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            previous_done = torch.zeros((), dtype=dtype, device=hidden.device)
            for start, length in chunks:
                h, t, keep = (x.narrow(0, start, length) for x in (h_all, targets, valid))
                h = h + previous_done
                logits_lp = h @ w.t()  # (n, V) in the matmul dtype
                logits = logits_lp.float()  # (n, V); the same tensor when that is float32
                logits[:, real_vocab:] = float("-inf")
                if logits.device.type == "cpu" and not torch.compiler.is_compiling():
                    # (n, V), as F.cross_entropy computes it, written over the logits: ATen's CPU kernel reads each
                    # row before it writes it: no second (n, V) tensor, up to 256 MiB less at the peak (BENCHMARKS.md)
                    log_probs = torch.ops.aten._log_softmax.out(logits, -1, False, out=logits)
                else:
                    log_probs = torch.log_softmax(logits, dim=-1)  # (n, V), as F.cross_entropy computes it
                del logits
                target_log_probs = log_probs.gather(1, t)  # (n, 1)
                loss -= (target_log_probs * keep).sum()
                last = loss
                if want_hidden or want_weight:
                    # d(sum loss)/d(logits) = softmax - onehot, in the matmul dtype; written over the tensors already
                    # made (a fresh (n, V) allocation costs more than the pass that fills it on a CPU)
                    grad = log_probs.exp_()
                    if grad.dtype != dtype:
                        grad = logits_lp.copy_(grad)
                    del log_probs, logits_lp
                    grad.scatter_(1, t, (target_log_probs.exp() - 1).to(dtype))
                    if want_hidden:
                        torch.mul(grad @ w, keep, out=grad_hidden.narrow(0, start, length))  # ignored rows: zero
                        last = grad_hidden[start, 0]
                    if want_weight:
                        h = h * keep
                        if dtype == torch.float16:
                            # a sum over the chunk's rows can pass fp16's 65,504 (a frequent target times a large
                            # activation), and before any loss scaling: so each column of h is scaled down by a power
                            # of two under which none of its sums can (|softmax - onehot| <= 1), the result back up
                            bound = h.abs().amax(0).float() * length  # (C,)
                            power = torch.exp2(torch.floor(torch.log2(2.0**15 / bound.clamp_min(1.0))).clamp(max=0.0))
                            part = (grad.t() @ (h * power.to(dtype))).float() / power
                            grad_weight = part if grad_weight is None else grad_weight.add_(part)
                        elif grad_weight is None:
                            grad_weight = (grad.t() @ h).float()  # accumulated in float32
                        elif grad.dtype == torch.float32:
                            grad_weight.addmm_(grad.t(), h)
                        else:
                            grad_weight += grad.t() @ h
                        last = grad_weight[0, 0]
                # A zero made from this chunk's last result, added to the next chunk's rows: under torch.compile it
                # keeps the chunks in order. Without it inductor runs every chunk's logits matmul first and holds
                # all their (n, V) logits at once (3x the memory, see BENCHMARKS.md); a plain `x * 0` does not do it.
                previous_done = torch.where(last.isnan(), 0.0, 0.0).to(dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, normalizer)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.tied_gradient = tied_gradient
        return loss / normalizer

    @staticmethod
    def chunks(n_rows: int, max_rows: int) -> tuple[tuple[int, int], ...]:
        """`(start, length)` of each chunk of `n_rows` rows: as few as fit `max_rows`, of equal lengths (no small last
        one). The forward takes them as an argument: under `torch.compile` with dynamic shapes, sizes computed inside
        an `autograd.Function` fail to compile on torch 2.11 (dynamo's "Expected subgraph_vt to be a tensor")."""
        size = math.ceil(n_rows / math.ceil(n_rows / max_rows))
        return tuple((start, min(size, n_rows - start)) for start in range(0, n_rows, size))

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # `create_graph=True`: the stored gradients have no derivatives of their own
            raise ValueError(
                "The fused LM-head loss cannot differentiate twice (create_graph=True); pass skip_logits=False to "
                "the forward for a loss with second derivatives."
            )
        grad_hidden, grad_weight, normalizer = ctx.saved_tensors
        # no target at all: the loss is 0 / 0 (nan, as F.cross_entropy's mean) and the gradients zero, as there
        scale = torch.where(normalizer == 0, 0.0, grad_output / normalizer)
        grad_h = (grad_hidden * scale).to(ctx.hidden_dtype) if grad_hidden is not None else None
        grad_w = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        if ctx.tied_gradient is not None and grad_w is not None and not in_compiled_autograd():
            # `TiedEmbedding.backward` adds its rows and returns it, in this backward only (the graph task's id)
            ctx.tied_gradient["weight"], grad_w = (torch._C._current_graph_task_id(), grad_w), None
        return grad_h, grad_w, None, None, None, None, None, None, None


class TiedEmbedding(torch.autograd.Function):
    """`F.embedding(input_ids, weight)` whose backward adds its rows to the tied LM head's weight gradient in place.

    With the head tied to the token embedding, autograd gets two gradients of the one weight: the head's, and the
    lookup's, as dense though only the looked-up rows are non-zero. Zeroing that `vocab x n_embd` tensor and adding
    it to the head's cost 25 ms a 124M step on 2 CPU cores, against 0.6 ms for the rows alone (BENCHMARKS.md). Here
    `LinearCrossEntropy` leaves its weight gradient in `tied_gradient` (a dict this forward made) instead of
    returning it. Autograd runs this backward after that one (the head's input depends on the lookup), so the rows
    are added to it with `index_add_` and this backward returns the sum: `.grad` gets the same sum, rounded in
    another order. (Added in place to a gradient the head returned, they were lost when autograd had already summed
    it with another forward's, as for two losses added before one backward.) Without the head's gradient (not
    computed in this backward) it returns the dense gradient as `F.embedding` does.
    """

    @staticmethod
    def forward(ctx, input_ids: torch.Tensor, weight: torch.Tensor, tied_gradient: dict) -> torch.Tensor:
        ctx.save_for_backward(input_ids)
        ctx.tied_gradient, ctx.weight_shape = tied_gradient, weight.shape
        return F.embedding(input_ids, weight)

    @staticmethod
    def backward(ctx, grad_output):
        (input_ids,) = ctx.saved_tensors
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        # dropped here: autograd can then move it into .grad; one an earlier backward left (it stopped short of this
        # one, `retain_graph=True`) is not this backward's; under compiled autograd the head returned its own
        task, head_gradient = (None, None) if in_compiled_autograd() else ctx.tied_gradient.pop("weight", (None, None))
        if head_gradient is None or task != torch._C._current_graph_task_id():
            return None, rows.new_zeros(ctx.weight_shape).index_add_(0, input_ids.reshape(-1), rows), None
        return None, head_gradient.index_add_(0, input_ids.reshape(-1), rows.to(head_gradient.dtype)), None


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that writes each step's keys and values in place instead of concatenating.

    `DynamicLayer.update` concatenates, so every decoding step copies the whole cache of every layer: the copies grow
    with the square of the length (0.95 s of a 7.1 s, 128-token, batch-8 call at 124M on 2 CPU cores). Here keys and
    values are views of the first `S` positions of larger buffers ("rooms", with a quarter of their length, at least
    64 positions, to spare), and a step writes its positions into them. The other `DynamicLayer` methods work as
    they are: a crop leaves shorter views of the rooms (the next update writes over what was cropped); a reorder,
    batch selection or offload leaves new tensors, which the next update copies into new rooms. An update
    concatenates, as `DynamicLayer` does, where writing in place would be wrong (`_concatenates`): under autograd,
    under `torch.compile`, and for new states of another dtype. Rooms made under `torch.inference_mode()` are
    replaced by new ones outside it (inference tensors cannot be written there).
    """

    _rooms: tuple[torch.Tensor, torch.Tensor] | None = None  # the buffers behind `keys` and `values`
    _views: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # the `keys`, `values` they last gave

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._rooms, self._views = None, (None, None)

    def _in_rooms(self) -> bool:
        return self._rooms is not None and self.keys is self._views[0] and self.values is self._views[1]

    def _concatenates(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether this update must concatenate, as `DynamicLayer` does, instead of writing into the rooms."""
        if torch.compiler.is_compiling():  # a compiled graph would keep the rooms' writes and views of this call
            return True
        past = (self.keys, self.values) if self.is_initialized else ()
        if torch.is_grad_enabled() and any(t.requires_grad for t in (key_states, value_states, *past)):
            # autograd keeps earlier steps' views for the backward: writing into their buffers would corrupt them
            return True
        return bool(past) and (self.keys.dtype, self.values.dtype) != (key_states.dtype, value_states.dtype)

    def _check_continues(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Refuse, before anything is written, new states that cannot follow the cached ones: another batch size,
        number of heads or head size, or another device. `DynamicLayer`'s `torch.cat` fails there with the cache
        intact (a `RuntimeError`); a write into the rooms would broadcast a batch of 1 over every row of a batch of 4,
        or copy to the rooms' device, and leave the cache one position longer and wrong."""
        for name, past, new in (("keys", self.keys, key_states), ("values", self.values, value_states)):
            if past.dim() == 1:  # `lazy_initialization`'s empty placeholder: nothing cached yet
                continue
            if past.shape[:-2] != new.shape[:-2] or past.shape[-1] != new.shape[-1] or past.device != new.device:
                raise RuntimeError(
                    f"New {name} of shape {tuple(new.shape)} on {new.device} cannot follow the cache's, of shape "
                    f"{tuple(past.shape)} on {past.device} (batch, heads, seq_len, head_dim): a cache continues the "
                    "batch it was filled with; start a new one for another batch (or keep some of its rows with "
                    "cache.batch_select_indices)."
                )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._concatenates(key_states, value_states):
            return super().update(key_states, value_states, *args, **kwargs)  # concatenate, as DynamicLayer does
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_continues(key_states, value_states)
        start, n = self.get_seq_length(), key_states.shape[-2]
        writable = self._in_rooms() and not (self._rooms[0].is_inference() and not torch.is_inference_mode_enabled())
        if not (writable and start + n <= self._rooms[0].shape[-2]):  # first step, full, replaced, or read-only
            spare = max(64, (start + n) // 4)
            rooms = []
            for past, new in ((self.keys, key_states), (self.values, value_states)):
                room = new.new_empty((*new.shape[:-2], start + n + spare, new.shape[-1]))  # (B, nh, room, hs)
                if start:
                    room.narrow(-2, 0, start).copy_(past)
                rooms.append(room)
            self._rooms = tuple(rooms)
        key_room, value_room = self._rooms
        key_room.narrow(-2, start, n).copy_(key_states)
        value_room.narrow(-2, start, n).copy_(value_states)
        self.keys, self.values = key_room.narrow(-2, 0, start + n), value_room.narrow(-2, 0, start + n)
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        in_rooms = self._in_rooms()
        super().crop(tokens_to_remove)
        if in_rooms:  # shorter views of the same rooms
            self._views = (self.keys, self.values)


class GrowingCache(DynamicCache):
    """`transformers`' `DynamicCache` with one `GrowingLayer` per block: the cache `generate()` and `forward` make
    on a CPU when given none. On a GPU they keep `DynamicCache`: there a decoding step is bound by kernel launches
    and Python, and a `GrowingLayer` update runs more small operations than one `torch.cat` (unmeasured on a GPU; on
    a CPU it is faster even at batch 1: 24 us against 31-33 us per `(1, 12, 1, 64)` update, BENCHMARKS.md)."""

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__(config=config)
        self.layers = [GrowingLayer() for _ in self.layers]

    @staticmethod
    def is_default_on(device: torch.device) -> bool:
        """Whether `forward` and `generate()` make this cache, rather than `DynamicCache`, on `device`."""
        return device.type == "cpu"


class GPT2ScratchPreTrainedModel(PreTrainedModel):
    """Flags and weight initialisation shared by the base model and the LM-head model."""

    config_class = GPT2ScratchConfig
    config: GPT2ScratchConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"attn\.masked_bias"]  # buffers of old HF checkpoints

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, with `auto_map` naming all three Auto classes (remote code)."""
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_gpt2_scratch.GPT2ScratchConfig",
            "AutoModel": "modeling_gpt2_scratch.GPT2ScratchModel",
            "AutoModelForCausalLM": "modeling_gpt2_scratch.GPT2ScratchForCausalLM",
        }
        super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 initialisation: normal(0, 0.02), zero biases, residual projections scaled by (2 * n_layer) ** -0.5.

        Uses the `transformers.initialization` helpers, which skip tensors already loaded from a checkpoint.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                # two residual additions per block: keep the residual stream's variance independent of depth
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class GPT2ScratchModel(GPT2ScratchPreTrainedModel):
    """The GPT-2 trunk: token + position embeddings, `n_layer` blocks, final LayerNorm. Returns hidden states."""

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__(config)
        config.validate_architecture()  # again: a field set after the config was made (`add_cross_attention`, ...)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """
        The positional order is `GPT2Model.forward`'s; the arguments after `inputs_embeds` are keyword-only.

        Args:
            input_ids: `(B, T)` token ids; with a `cache`, only the tokens not yet in it. Another rank is a
                `ValueError` (`check_input_shape`; `GPT2Model` flattens `(B, N, T)`, this model does not).
            cache: a `transformers` `Cache` (e.g. `DynamicCache`, `StaticCache`) holding past keys and values.
            attention_mask: `(B, S)` with 1 for tokens to attend to and 0 for padding (left or right), S = past + T.
            token_type_ids: `(B, T)` segment ids, embedded with the token embedding and added (as GPT-2 does).
            position_ids: `(B, T)` positions; default: `past + arange(T)`, or from `cache_position` if given.
            use_cache: create a cache when none is given (a `GrowingCache` on a CPU, else a `DynamicCache`) and
                return it.
            encoder_hidden_states (keyword, read from `kwargs`): a `ValueError`, as in `GPT2Model` without
                cross-attention layers: this model has none.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # the backward replay would write the cache a second time; said as `GPT2LMHeadModel` says it
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`."
            )
            use_cache = False
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        check_input_shape(input_ids, inputs_embeds)
        if kwargs.get("encoder_hidden_states") is not None:  # else ignored in `**kwargs`, as if there were no encoder
            raise ValueError(
                "encoder_hidden_states: this model has no cross-attention layers (GPT-2's add_cross_attention is "
                "not implemented), so it cannot attend to an encoder's output; for a GPT-2 decoder over an encoder, "
                "use transformers' GPT2LMHeadModel(GPT2Config(add_cross_attention=True))."
            )

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        if use_cache and cache is None:
            growing = GrowingCache.is_default_on(inputs_embeds.device)
            cache = GrowingCache(self.config) if growing else DynamicCache(config=self.config)
        default_positions = position_ids is None  # 0..T-1 (after any past): no packed sequences in them
        last_position = None  # known on the host, without reading a device tensor
        if position_ids is None:
            cache_position = kwargs.pop("cache_position", None)  # older callers pass absolute positions this way
            if cache_position is None:
                past_seen_tokens = cache.get_seq_length() if cache is not None else 0
                if isinstance(past_seen_tokens, int):
                    last_position = past_seen_tokens + inputs_embeds.shape[1] - 1
                cache_position = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = cache_position.unsqueeze(0)  # (1, T)
        else:
            kwargs.pop("cache_position", None)
        # Given positions are data: checking them is a device sync (and a graph break under torch.compile, so eager
        # mode only); the default ones are checked from their length, on the host.
        if last_position is None and not torch.compiler.is_compiling():
            last_position = int(position_ids.max())
        if last_position is not None and last_position >= self.config.n_positions:
            raise ValueError(
                f"position {last_position} is outside the model's context (n_positions="
                f"{self.config.n_positions}): pass at most {self.config.n_positions} tokens."
            )

        # None for plain causal attention under sdpa/flash (their `is_causal` fast path), else a 4D mask.
        if (
            attention_mask is None
            and cache is None
            and default_positions
            and self.config._attn_implementation == "sdpa"
        ):
            # Training's case (no padding, no cache, no packed sequences in given position ids). `create_causal_mask`
            # gives None here too, except under torch.compile, where it builds a (B, 1, T, T) mask (it cannot tell
            # traced position ids from packed ones): that rules out the flash kernels and makes every kernel compute
            # the whole T x T square instead of its causal half.
            causal_mask = None
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )

        hidden_states = inputs_embeds + self.wpe(position_ids)  # (B, T, C)
        if token_type_ids is not None:  # GPT-2's segment embeddings are rows of the token embedding
            hidden_states = hidden_states + self.wte(token_type_ids.view(-1, inputs_embeds.shape[1]))
        hidden_states = self.drop(hidden_states)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            # position_ids go along to the attention function, as in HF's GPT-2: flash attention gets no mask
            # without padding and tells packed sequences apart by their restarting positions alone
            hidden_states, attn_weights = block(
                hidden_states, causal_mask, cache=cache, position_ids=position_ids, **kwargs
            )
            if output_attentions and attn_weights is not None:  # sdpa/flash give none: `()`, as transformers' models
                all_attentions += (attn_weights,)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()


def pad_with_eos(generation_config: GenerationConfig | None, eos_token_id: int | list[int] | None) -> None:
    """GPT-2 has no pad token: where `generation_config` has none, `generate()` pads with eos (the first id, where
    several end a text: it takes one pad id)."""
    if generation_config is not None and generation_config.pad_token_id is None:
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0] if eos_token_id else None
        generation_config.pad_token_id = eos_token_id


class GPT2ScratchForCausalLM(GPT2ScratchPreTrainedModel, GenerationMixin):
    """GPT-2 with its language-modelling head (tied to the token embedding).

    The padded vocabulary: `config.vocab_size` (50304) rows exist so the LM-head matmul runs at an aligned width,
    but only the first `config.tokenizer_vocab_size` (50257) ids are real tokens. The forward masks the padded
    columns to `-inf` before the loss (so the loss equals an unpadded model's and the padded rows get no gradient)
    and returns `logits[..., :tokenizer_vocab_size]` (a view, shape `(B, T, 50257)` like Hugging Face GPT-2), so the
    padded ids carry no probability and `generate()` can never produce them; sampling with a fixed seed draws the
    same ids as `GPT2LMHeadModel`.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    pack_decoding_weights = True  # `generate()` on a CPU: decode with MKL-packed weights (`packed_decoding`)
    add_embedding_gradient_in_place = True  # training on a CPU: the lookup's gradient rows go into the head's
    loss_chunk_elements: int | None = None  # logits per chunk of the fused loss; None: `loss_chunk_rows`' default

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__(config)
        self.transformer = GPT2ScratchModel(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()
        pad_with_eos(self.generation_config, config.eos_token_id)

    @classmethod
    def from_hf_gpt2(cls, source: str | Path | nn.Module, **kwargs) -> GPT2ScratchForCausalLM:
        """The scratch model with the weights of a Hugging Face GPT-2 (`GPT2LMHeadModel`).

        `source` is a Hub id (e.g. `"gpt2"`, needs the Hub), a local directory of a `GPT2LMHeadModel` checkpoint,
        or a `GPT2LMHeadModel` instance. Keyword arguments: see `modeling_gpt2_scratch.conversion.from_hf_gpt2`.
        """
        return _conversion().from_hf_gpt2(source, **kwargs)

    def to_hf_gpt2(self) -> nn.Module:
        """A `transformers.GPT2LMHeadModel` with the same weights and logits, over the real tokens only
        (`tokenizer_vocab_size`: GPT-2's 50257, or as many as `resize_token_embeddings` made): no padding rows."""
        return _conversion().to_hf_gpt2(self)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """`PreTrainedModel.resize_token_embeddings`, which also makes `new_num_tokens` the real tokens.

        After `resize_token_embeddings(len(tokenizer))` every id the tokenizer gives has a logit and can be trained
        and generated (`config.tokenizer_vocab_size = new_num_tokens`); rows past it (`pad_to_multiple_of=128`
        keeps the aligned width) are padding, masked as before. Every new token's row is initialised as
        `transformers` initialises added rows, also where it was a padding row before (those held zeros or an
        untrained initialisation): with `mean_resizing`, around the mean of the old real tokens' rows (their
        covariance scaled by 1e-9, as `PreTrainedModel` does); without it, from `N(0, initializer_range)`.
        """
        old_real = self.config.tokenizer_vocab_size
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if new_num_tokens is not None:
            if new_num_tokens > old_real:
                weights = {id(w): w for w in (self.transformer.wte.weight, self.lm_head.weight)}  # once if tied
                for weight in weights.values():
                    self._init_new_token_rows(weight, old_real, new_num_tokens, mean_resizing)
            self.config.tokenizer_vocab_size = new_num_tokens
        return embeddings

    def _get_resized_lm_head(self, *args, **kwargs) -> nn.Linear:
        """`PreTrainedModel`'s new head for an untied model, as this file's `Linear` (it makes an `nn.Linear`, which
        never decodes with packed weights: see `packed_decoding`), holding the same parameters."""
        head = super()._get_resized_lm_head(*args, **kwargs)
        if type(head) is nn.Linear:
            ours = Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
            ours.weight, ours.bias = head.weight, head.bias
            head = ours
        return head

    @torch.no_grad()
    def _init_new_token_rows(self, weight: torch.Tensor, start: int, stop: int, mean_resizing: bool) -> None:
        """Rows `start:stop` of an embedding or head weight, drawn as `transformers` draws added tokens' rows."""
        if not mean_resizing:
            weight[start:stop].normal_(mean=0.0, std=self.config.initializer_range)
            return
        old = weight[:start].float()
        mean = old.mean(dim=0)
        covariance = 1e-9 * (old - mean).T @ (old - mean) / start
        if torch.distributions.constraints.positive_definite.check(covariance).all():
            rows = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((stop - start,))
        else:
            rows = mean.expand(stop - start, -1)
        weight[start:stop] = rows.to(weight.dtype)

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, with a `GrowingCache` and, on a CPU, MKL-packed weights (`packed_decoding`).

        - On a CPU, where `generate()` would make its default `DynamicCache` (no cache passed, no
          `cache_implementation`, `use_cache` on), it gets a `GrowingCache` instead: the same cache, without copying
          it at every step.
        - In float32 on a CPU, decoding steps of 4 or more rows (batch x beams) multiply by packed copies of the
          weights, made at the first step and dropped after the call: faster matmuls (BENCHMARKS.md) for one more
          copy of the weights in memory meanwhile. Set `model.pack_decoding_weights = False` to decode with
          `F.linear`.
        """
        generation_config = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)

        def setting(name: str):  # as `generate()` resolves it: keyword, the caller's config, then the model's
            if name in kwargs:
                return kwargs[name]
            value = getattr(generation_config, name, None)
            return value if value is not None else getattr(self.generation_config, name, None)

        if (
            GrowingCache.is_default_on(self.device)
            and kwargs.get("cache") is None
            and kwargs.get("past_key_values") is None
            and setting("cache_implementation") is None
            and setting("use_cache") is not False
        ):
            kwargs["cache"] = GrowingCache(self.config)
        with packed_decoding(self, enabled=self.pack_decoding_weights):
            return super().generate(*args, **kwargs)

    def _get_logits_processor(self, generation_config, *args, **kwargs) -> LogitsProcessorList:
        """`GenerationMixin`'s, with a watermark drawn over the tokens the logits hold (`tokenizer_vocab_size`): it
        would take `config.vocab_size`, the padded width, and pick green ids past the logits' last column."""
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        real_vocab = self.config.tokenizer_vocab_size
        for i, processor in enumerate(processors):
            if isinstance(processor, WatermarkLogitsProcessor) and processor.vocab_size != real_vocab:
                processors[i] = generation_config.watermarking_config.construct_processor(
                    real_vocab, processor.rng.device
                )
        return processors

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs) -> None:
        """`GenerationMixin`'s, taking an assistant with as many real token ids (`tokenizer_vocab_size`, or its
        `vocab_size`) as this model for one with the same tokenizer: it compares `config.vocab_size`, the padded
        width, and asked for two tokenizers with a Hugging Face GPT-2 assistant (e.g. distilgpt2)."""
        assistant = generation_mode_kwargs.get("assistant_model")
        if assistant is not None and "assistant_tokenizer" not in generation_mode_kwargs:
            assistant_config = assistant.config.get_text_config()
            assistant_vocab = getattr(assistant_config, "tokenizer_vocab_size", assistant_config.vocab_size)
            if assistant_vocab == self.config.tokenizer_vocab_size:  # the same tokenizer: its other checks only
                generation_mode_kwargs = {k: v for k, v in generation_mode_kwargs.items() if k != "assistant_model"}
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _get_candidate_generator(self, *args, **kwargs):
        """`GenerationMixin`'s, with prompt lookup's trial logits over the tokens the logits hold
        (`tokenizer_vocab_size`): it would take `config.vocab_size`, the padded width, and a logits processor that
        sizes itself at its first call (`bad_words_ids`, `sequence_bias`) would then fail on the model's logits."""
        candidate_generator = super()._get_candidate_generator(*args, **kwargs)
        if isinstance(candidate_generator, PromptLookupCandidateGenerator):
            candidate_generator.vocab_size = self.config.tokenizer_vocab_size
        return candidate_generator

    def compute_transition_scores(
        self,
        sequences: torch.Tensor,
        scores: tuple[torch.Tensor, ...],
        beam_indices: torch.Tensor | None = None,
        normalize_logits: bool = False,
    ) -> torch.Tensor:
        """`GenerationMixin.compute_transition_scores`: the score of each generated token (see its docstring).

        The same algorithm, over the scores' width (the `tokenizer_vocab_size` real tokens the logits hold) where
        `GenerationMixin` takes `config.vocab_size` (the padded width, which gave wrong rows past the first).
        """
        width = scores[0].shape[-1]
        if beam_indices is None:  # greedy or sampling: one "beam" per sequence, always chosen
            beam_indices = torch.arange(scores[0].shape[0], device=sequences.device).view(-1, 1)
            beam_indices = beam_indices.expand(-1, len(scores))
        stacked = torch.stack(scores).reshape(len(scores), -1).transpose(0, 1)  # (rows * width, steps)
        if normalize_logits:
            stacked = F.log_softmax(stacked.reshape(-1, width, stacked.shape[-1]), dim=1)
            stacked = stacked.reshape(-1, stacked.shape[-1])
        finished = beam_indices < 0  # beams that stopped early are padded with -1
        longest = (~finished).long().sum(-1).max()
        beam_indices, finished = beam_indices.clone()[:, :longest], finished[:, :longest]
        beam_indices[finished] = 0
        indices = sequences[:, sequences.shape[-1] - longest :] + beam_indices * width
        transition_scores = stacked.gather(0, indices)
        transition_scores[finished] = 0
        return transition_scores

    def _tied_embedding_gradient(self, input_ids, inputs_embeds, token_type_ids, fused_loss: bool) -> dict | None:
        """A `TiedEmbedding` channel for this forward where it is exact and pays off, else None.

        Where: the fused loss (`LinearCrossEntropy`) and the token embedding share one weight, autograd records,
        eager, on a CPU (on a GPU the dense embedding gradient costs next to nothing, and `index_add_` would sum
        repeated ids in a nondeterministic order), and `wte` is a plain `nn.Embedding` without hooks (the lookup
        bypasses the module call). `model.add_embedding_gradient_in_place = False` switches it off.
        """
        wte = self.transformer.wte
        if not (
            self.add_embedding_gradient_in_place
            and fused_loss
            and input_ids is not None
            and inputs_embeds is None
            and token_type_ids is None  # their lookup is a second use of the weight, through autograd
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and called_plainly(wte, nn.Embedding)
            and self.lm_head.weight is wte.weight
            and wte.weight.requires_grad
            and wte.weight.device.type == "cpu"
        ):
            return None
        plain = wte.padding_idx is None and wte.max_norm is None and not wte.scale_grad_by_freq and not wte.sparse
        return {} if plain else None

    def loss_chunk_rows(self, device: torch.device) -> int:
        """Rows per chunk of the fused loss (`LinearCrossEntropy`) on `device`: `loss_chunk_elements` logits.

        By default 2**26 logits (256 MB in float32) and 2**30 on a CUDA GPU: a 16 x 1024 micro-batch in one chunk,
        whose bf16 logits and float32 log-probabilities (5 GB) are held at once, for 1.05x faster 124M steps on an
        H200 than with 2**26. Set `model.loss_chunk_elements` to trade speed for memory.
        """
        elements = self.loss_chunk_elements or (
            CUDA_LOSS_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else LOSS_CHUNK_ELEMENTS
        )
        return max(1, elements // self.config.vocab_size)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """
        Args:
            labels: `(B, T)` targets, usually `input_ids`; shifted inside (position t predicts t+1), `-100` ignored.
                An id outside the tokenizer's is a `ValueError` on a CPU in eager mode (`check_label_ids`).
            shift_labels (keyword, read from `kwargs`): `(B, T)` targets already aligned with the positions
                (`shift_labels[:, t]` is the token after `input_ids[:, t]`), as the training loader yields them;
                used instead of `labels`. Not a named parameter, as in `transformers`' models: `Trainer` takes
                every forward parameter with "label" in its name for a label it must find in each batch.
            ignore_index (keyword, read from `kwargs`): the label value that counts for nothing (default `-100`), as
                `transformers`' causal-LM loss takes it.
            logits_to_keep: compute logits only for the last `n` positions (0 = all), or for the given positions
                (1-D: of every row; 2-D integer: per row; 2-D boolean mask: the logits of its `True` positions, flat),
                as `transformers`' `slice_logits_to_keep`.
            skip_logits: compute the loss chunk by chunk without materialising the logits (`LinearCrossEntropy`)
                and return `logits=None`. Default: in training mode when labels are given (what `Trainer` and
                `train_accelerate.py` need), unless `logits_to_keep` is given (HF's loss is then the kept logits')
                or `return_dict=False` (a tuple holds the logits at index 1, as `GPT2LMHeadModel`'s); pass `False`
                to get the logits too, or second derivatives (its backward refuses `create_graph=True`). Where
                `lm_head` has to be called as a module (a PEFT/LoRA layer in its place, or forward hooks), it is,
                and the logits are returned; so under `torch.func` transforms (`torch.func.grad`, `vmap`) and
                `torch.export` (its graph then holds the plain head and `transformers`' loss, as `GPT2LMHeadModel`'s).
            Other arguments: see `GPT2ScratchModel.forward`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        shift_labels = kwargs.pop("shift_labels", None)
        has_labels = labels is not None or shift_labels is not None
        if skip_logits is None:  # a tuple's positions are HF's only with logits in them: `loss, logits = out[:2]`
            # with `logits_to_keep`, HF's loss is the kept logits' (the fused loss takes every position's)
            keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
            skip_logits = self.training and has_labels and return_dict and keeps_all
        if skip_logits and not has_labels:
            raise ValueError("skip_logits=True needs labels or shift_labels (it only computes the loss).")
        if (input_ids is None) != (inputs_embeds is None):  # else the base model's error
            check_input_shape(input_ids, inputs_embeds)  # before the tied embedding's lookup, which would hide it
        ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)  # as `transformers`' ForCausalLMLoss takes it
        check_label_ids(labels, self.config.tokenizer_vocab_size, "labels", ignore_index)
        check_label_ids(shift_labels, self.config.tokenizer_vocab_size, "shift_labels", ignore_index)
        # the fused loss reads `lm_head.weight`; a wrapped head (PEFT/LoRA, hooks) is called as usual instead, and
        # so it is under `torch.func` transforms (`grad`, `vmap`), which cannot run its `autograd.Function`, and under
        # `torch.export`, whose default (non-strict) tracing runs that function's forward with autograd recording
        fused_loss = (
            skip_logits
            and called_plainly(self.lm_head, Linear, nn.Linear)
            and (torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active())
            and not is_exporting()
        )
        tied_gradient = self._tied_embedding_gradient(input_ids, inputs_embeds, token_type_ids, fused_loss)
        if tied_gradient is not None:
            inputs_embeds = TiedEmbedding.apply(input_ids, self.transformer.wte.weight, tied_gradient)
            input_ids = None
        outputs = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        real_vocab = self.config.tokenizer_vocab_size
        if fused_loss:
            given, name = (labels, "labels") if shift_labels is None else (shift_labels, "shift_labels")
            B, T = hidden_states.shape[:2]
            if given.numel() != B * T:  # else the chunks pair the targets with other positions, silently
                raise ValueError(
                    f"{name} of shape {tuple(given.shape)} holds {given.numel()} targets for the {B * T} positions "
                    f"of the input, of shape {(B, T)}: pass {name} of the input's shape."
                )
            if shift_labels is None:  # position t predicts token t+1; the last position has no target
                shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            shift_labels = shift_labels.reshape(-1).to(hidden_states.device)
            normalizer = kwargs.get("num_items_in_batch")  # Trainer's token count across accumulation steps
            if normalizer is None:
                normalizer = (shift_labels != ignore_index).sum()
            loss = LinearCrossEntropy.apply(
                hidden_states.reshape(-1, hidden_states.shape[-1]),
                self.lm_head.weight,
                shift_labels,
                real_vocab,
                torch.as_tensor(normalizer, dtype=torch.float32, device=hidden_states.device),
                ignore_index,
                LinearCrossEntropy.chunks(shift_labels.shape[0], self.loss_chunk_rows(hidden_states.device)),
                tied_gradient,
                torch.is_grad_enabled(),  # else the loss alone: no gradients computed for a backward that never runs
            )
            logits = None
        else:
            # (B, T, vocab_size), or (n, vocab_size) for a boolean mask: the padded width is faster
            logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
            logits[..., real_vocab:] = float("-inf")  # padded ids: zero probability in the loss, zero gradient
            loss = None
            if has_labels:
                loss = self.loss_function(
                    logits, labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels, **kwargs
                )
            logits = logits[..., :real_vocab]  # (B, T, tokenizer_vocab_size) view: only real tokens are returned

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


# `Trainer` with `label_smoothing_factor` computes the loss itself, and shifts the labels (position t predicts t+1)
# only for the classes it finds by name among transformers' causal LMs; `AutoModelForCausalLM.register` does not list
# a class there, and remote code registers nothing. Unlisted, each position was scored against its own input token.
# Listing the name changes nothing else: the Auto classes look the model type up in the config names first.
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(GPT2ScratchConfig.model_type, GPT2ScratchForCausalLM.__name__)
