"""A training run becomes a Hugging Face Hub repository: staging, model card, upload.

`push_to_hub.py` is the command line over this module. The flow:

1. `resolve_source(path)`: a run folder (uses its `final/`, else its latest checkpoint), a `final/` export, or a
   training checkpoint (`checkpoints/step_N`, written by `accelerator.save_state`).
2. `stage_folder(source, out_dir, repo_id, fmt)`: writes a Hub-ready folder: the model (`save_pretrained`: weights,
   `config.json` with `auto_map` and the two code files, `generation_config.json`), the tokenizer, `loss.png` when
   the run has one, and a `README.md` model card built from the run's `run_config.json`, `run_summary.json` and
   `metrics.jsonl`. `fmt="gpt2"` writes a plain `transformers` `GPT2LMHeadModel` instead (no remote code).
3. `upload_folder_to_hub(folder, repo_id, ...)`: `create_repo(exist_ok=True)` (for a pull request's `refs/pr/N`, a
   check that the repository exists instead), `create_branch` for a revision other than `main` (not for `refs/pr/N`),
   and `upload_folder`, with the token of `HF_TOKEN` or `hf auth login`.

`push_run_to_hub` chains the three. The token is only ever handed to `huggingface_hub`, which sends it in the
`Authorization` header; it is never logged, printed or written into the staged files.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Literal

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .configuration_gpt2_scratch import MIN_TRANSFORMERS_VERSION, GPT2ScratchConfig
from .data import one_line
from .modeling_gpt2_scratch import GPT2ScratchForCausalLM
from .tokenization import VOCAB_FILES, get_hf_tokenizer, save_tokenizer
from .training import (
    CHECKPOINT_PATTERN,
    METRICS_NAME,
    RUN_CONFIG_NAME,
    RUN_SUMMARY_NAME,
    TrainState,
    plot_losses,
    restore_interrupted_replaces,
)

logger = logging.getLogger(__name__)

Format = Literal["scratch", "gpt2"]
FORMATS: tuple[str, ...] = ("scratch", "gpt2")
DEFAULT_LANGUAGE = "en"  # the card's language: the presets' corpora (tiny Shakespeare, FineWeb-Edu) are English
DEFAULT_LICENSE = "mit"  # the model card's license for the weights: OpenAI's GPT-2 and this code are MIT
SourceKind = Literal["export", "checkpoint"]

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CODE_FILES = tuple(f"{cls.__module__.rsplit('.', 1)[-1]}.py" for cls in (GPT2ScratchConfig, GPT2ScratchForCausalLM))
STAGED_PATTERNS = (  # the kinds of file stage_folder writes, in either format: the only ones a push deletes
    "model.safetensors",
    "model-*-of-*.safetensors",  # save_pretrained's shards of a larger model, and their index
    "model.safetensors.index.json",
    CONFIG_NAME,
    "generation_config.json",
    *TOKENIZER_FILES,
    *VOCAB_FILES,  # GPT-2's BPE files next to tokenizer.json (`save_tokenizer`)
    *CODE_FILES,  # the remote code (scratch format), which save_pretrained copies next to the config
    "README.md",
    "loss.png",
)
HUB_LICENSES_URL = "https://huggingface.co/docs/hub/repositories-licenses"
HUB_LICENSES = frozenset(  # the license ids the Hub takes in a card's `license` (HUB_LICENSES_URL; huggingface.js's
    # `License` type, packages/hub/src/types/public.ts, lacks intel-research, llama4 and
    # fair-noncommercial-research-license); any other license is `other` with a name and a link
    """
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
    afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
    cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
    cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
    cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl
    gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc intel-research lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0
    postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3
    llama4 fair-noncommercial-research-license gemma apple-ascl apple-amlr unknown other
    """.split()
)
NO_TOKEN_MESSAGE = (
    "No Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access "
    "(https://huggingface.co/settings/tokens)."
)
RECIPE_KEYS = (  # the training settings the card's main table shows, in this order; the others go in a <details>
    "micro_batch_size",
    "seq_len",
    "total_batch_tokens",
    "gradient_accumulation_steps",
    "num_processes",
    "max_steps",
    "max_lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "eps",
    "grad_clip",
    "seed",
    "mixed_precision",
    "compile",
    "fused_adamw",
    "gradient_checkpointing",
)
CANONICAL_MODEL_IDS = {  # GPT-2's ids from before the Hub moved its "canonical" repositories under organizations
    # (2024, transformers PR #28795): the old ids still load (a redirect), the card names the repository itself
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")  # C:\ or C:/
TRAINER_TMP_PATTERN = re.compile(r"\.tmp-(old-)?(final|step_\d+)")  # a save before its rename; a replaced one aside
DATA_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".gz", ".zst", ".bin")


# --- what the user pointed at ----------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """The model folder to publish and the run it came from.

    Attributes:
        model_dir: a `save_pretrained` export (`kind="export"`) or an `accelerator.save_state` checkpoint.
        kind: `"export"` (e.g. `RUN/final`) or `"checkpoint"` (e.g. `RUN/checkpoints/step_0000100`).
        run_dir: the run folder holding `run_config.json`, `run_summary.json`, `metrics.jsonl`, `loss.png`, if known.
        step: the optimizer step of a checkpoint (from its folder name `step_N`), else None.
    """

    model_dir: Path
    kind: SourceKind
    run_dir: Path | None = None
    step: int | None = None


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHTS_NAMES)


def _is_model_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and _has_weights(folder)


def _is_checkpoint(folder: Path) -> bool:
    """An `accelerator.save_state` folder: optimizer/RNG state next to the weights, or named `step_N`."""
    state_files = ("optimizer.bin", "optimizer.safetensors", "random_states_0.pkl", "scheduler.bin")
    return bool(CHECKPOINT_PATTERN.fullmatch(folder.name)) or any((folder / name).is_file() for name in state_files)


def _looks_like_run(folder: Path) -> bool:
    markers = (RUN_CONFIG_NAME, RUN_SUMMARY_NAME, METRICS_NAME, "checkpoints", "final")
    return any((folder / name).exists() for name in markers)


def _checkpoint_step(folder: Path) -> int | None:
    match = CHECKPOINT_PATTERN.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def _saved_step(checkpoint: Path) -> int | None:
    """A checkpoint's step: from its folder name `step_N`, else (a copy renamed, e.g. `RUN/best`) from the trainer
    state saved in it (`read_trainer_state`); None when neither says."""
    step = _checkpoint_step(checkpoint)
    return step if step is not None else read_trainer_state(checkpoint).get("step")


def _latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [
        path
        for path in (run_dir / "checkpoints").glob("step_*")
        if _checkpoint_step(path) is not None and _is_model_folder(path)
    ]
    return max(checkpoints, key=_checkpoint_step, default=None)


def _run_dir_of(model_dir: Path) -> Path | None:
    """The run folder around `RUN/final` or `RUN/checkpoints/step_N`, if it looks like one."""
    candidates = [model_dir.parent]
    if model_dir.parent.name == "checkpoints":
        candidates.insert(0, model_dir.parent.parent)
    return next((folder for folder in candidates if _looks_like_run(folder)), None)


def _refuse_trainer_tmp(folder: Path) -> None:
    """Refuse the trainer's temporary folders, as `--resume` does: `.tmp-<name>`, a save of `final/` or
    `checkpoints/step_N` before its rename (any file may be cut short), and `.tmp-old-<name>`, the one a replacing
    save set aside. Either holds config.json and weights, and was published with the run's final numbers."""
    match = TRAINER_TMP_PATTERN.fullmatch(folder.name)
    if match is None:
        return
    target = folder.with_name(match.group(2))
    if match.group(1):
        raise ValueError(
            f"{folder} is a {target.name} that a replacing save set aside, not one to publish: pass {target}, or the "
            "run folder (a crashed replace's old copy moves back there when push_to_hub.py reads the run)."
        )
    raise ValueError(
        f"{folder} is an unfinished save (the run stopped while writing it), not a checkpoint or export: pass the "
        f"run folder (its final/, else its latest complete checkpoint) or a checkpoints/step_N folder."
    )


def resolve_source(path: str | Path) -> ModelSource:
    """Find the model to publish in a run folder, a `final/` export or a training checkpoint.

    A run folder resolves to its `final/` export; a run that has none (stopped early) resolves to its latest
    checkpoint, with a warning. A `final/` or checkpoint that a trainer's crash left under `.tmp-old-<name>` alone is
    moved back first (`restore_interrupted_replaces`; a dry run too), with a warning.

    Raises:
        FileNotFoundError: if `path` does not exist or is not a folder.
        ValueError: if `path` is neither a run, an export nor a checkpoint (no `config.json` + weights), is one of
            the trainer's temporary folders (`.tmp-step_N`, `.tmp-final`, `.tmp-old-<name>`), or a folder to move
            back could not be moved.
    """
    folder = Path(path).expanduser()
    _refuse_trainer_tmp(folder)
    # a crash mid-replace may have left final/ (or a checkpoint) as .tmp-old-<name>: in RUN, or RUN/final itself
    run = folder.parent if folder.name == "final" and not folder.exists() else folder
    restore_interrupted_replaces(run.resolve())
    if not folder.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder, its final/ folder or a checkpoint.")
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass a run folder, its final/ folder or a checkpoint.")
    folder = folder.resolve()
    if _is_model_folder(folder / "final"):
        return ModelSource(folder / "final", "export", run_dir=folder)
    if _is_model_folder(folder):
        if _is_checkpoint(folder):
            return ModelSource(folder, "checkpoint", run_dir=_run_dir_of(folder), step=_saved_step(folder))
        return ModelSource(folder, "export", run_dir=_run_dir_of(folder))
    latest = _latest_checkpoint(folder)
    if latest is not None:
        logger.warning("%s has no final/ export: publishing its latest checkpoint %s", folder, latest.name)
        return ModelSource(latest, "checkpoint", run_dir=folder, step=_checkpoint_step(latest))
    raise ValueError(
        f"{path} is not a gpt2-scratch run, export or checkpoint: expected a run folder (with final/ or "
        "checkpoints/step_N/), a final/ folder or a checkpoint folder, each holding config.json and model.safetensors."
    )


def validate_repo_id(repo_id: str) -> None:
    """Check that `repo_id` is a Hub model id of the form `USER/NAME` (or `ORG/NAME`).

    Raises:
        ValueError: naming the repo id and the expected form.
    """
    try:
        hf_validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid --repo-id {repo_id!r}: {err} Use USER/NAME, e.g. alice/gpt2-scratch.") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"Invalid --repo-id {repo_id!r}: use USER/NAME (or ORG/NAME), e.g. alice/gpt2-scratch.")


def _is_pull_request(revision: str | None) -> bool:
    """`refs/pr/N`: an open pull request's ref, not a branch (no branch is made for it; merged, it is `main`)."""
    return revision is not None and revision.startswith("refs/pr/")


def _other_branch(revision: str | None) -> bool:
    """A branch other than `main`: made if missing, and named in the card's usage snippets."""
    return revision not in (None, hf_constants.DEFAULT_REVISION) and not _is_pull_request(revision)


def describe_revision(revision: str | None) -> str:
    """`branch main`, `branch step-500` or `pull request refs/pr/3`: where a push goes, for messages."""
    revision = revision or hf_constants.DEFAULT_REVISION
    return f"pull request {revision}" if _is_pull_request(revision) else f"branch {revision}"


def validate_revision(revision: str | None) -> None:
    """Check that `revision` can be a branch (git's ref-name rules, `git check-ref-format --branch`, and no `refs/`
    prefix) or is an open pull request's `refs/pr/N`, before anything is made: the Hub refused a bad name in
    `create_branch`, after `create_repo` had created the repository.

    Raises:
        ValueError: naming the value and what a branch name may not hold.
    """
    if revision is None or re.fullmatch(r"refs/pr/\d+", revision):
        return
    bad = (
        not revision
        or revision == "@"
        or revision.startswith(("-", "/", "refs/"))  # refs/heads/x would be a branch named so, not x
        or revision.endswith(("/", ".", ".lock"))
        or any(part in revision for part in ("..", "@{", "//", "/."))
        or revision.startswith(".")
        or any(part.endswith(".lock") for part in revision.split("/"))
        or any(ord(char) < 0x20 or char in " ~^:?*[\\\x7f" for char in revision)
    )
    if bad:
        raise ValueError(
            f"Invalid --revision {revision!r}: a branch name (e.g. step-500 or exp/lr-3e-4) without spaces, "
            "'..', '~^:?*[\\' or a leading '-' or '.'; or refs/pr/N for an open pull request."
        )


def validate_license(license: str, license_name: str | None = None, license_link: str | None = None) -> None:
    """Check that `license` is one of the Hub's license ids (`HUB_LICENSES`), which the Hub checks a card's `license`
    against when the `README.md` is committed; `other` (a license not in the list) with `license_name` (an id of your
    own, e.g. `my-license-1.0`) and `license_link` (a URL to its text), which the Hub shows instead.

    Raises:
        ValueError: naming the value and the fix.
    """
    if license not in HUB_LICENSES:
        hint = f"use {license.lower()!r}" if license.lower() in HUB_LICENSES else "use one of the Hub's license ids"
        raise ValueError(
            f"Invalid --license {license!r}: {hint} (mit, apache-2.0, cc-by-4.0, ...: {HUB_LICENSES_URL}), or "
            "--license other with --license-name and --license-link for another license."
        )
    if license != "other":
        if license_name is not None or license_link is not None:
            raise ValueError(
                f"--license-name and --license-link go with --license other, not --license {license}: drop them, or "
                "pass --license other."
            )
        return
    if not license_name or not re.fullmatch(r"[a-z0-9][a-z0-9._+-]*", license_name):
        raise ValueError(
            f"--license other needs --license-name, an id for the license in lowercase letters, digits and "
            f"'.-_+' (e.g. my-license-1.0), got {license_name!r}."
        )
    if not license_link or not re.fullmatch(r"https?://\S+", license_link):
        raise ValueError(
            f"--license other needs --license-link, the URL of the license's text (e.g. "
            f"https://example.com/my-license), got {license_link!r}."
        )


def parse_languages(language: str) -> list[str]:
    """The card's `language` from `--language`: comma-separated ISO 639-1, 639-2 or 639-3 codes (`en`, `fr,de`), or
    one of the Hub's special values (`code`, `multilingual`), as huggingface_hub's `ModelCardData` documents them.

    Raises:
        ValueError: naming the value and the expected form.
    """
    codes = [code.strip() for code in language.split(",")]
    if not all(re.fullmatch(r"[a-z]{2,3}", code) or code in ("code", "multilingual") for code in codes):
        raise ValueError(
            f"Invalid --language {language!r}: the language(s) of the training data as ISO 639 codes in lowercase, "
            "comma-separated (e.g. en, or fr,de), or code, or multilingual."
        )
    return codes


def resolve_token(token: str | None = None) -> str:
    """The token to upload with: `token`, else `HF_TOKEN`, else the one saved by `hf auth login`.

    Raises:
        ValueError: when there is none, saying how to get one.
    """
    token = token or get_token()
    if not token:
        raise ValueError(NO_TOKEN_MESSAGE)
    return token


# --- the model and the tokenizer -------------------------------------------------------------------------------------


def _clean_key(key: str) -> str:
    """Drop the wrappers' prefixes: `module.` (DDP) in front and `_orig_mod.` (torch.compile) anywhere."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        state_dict = {}
        for shard in sorted(set(index["weight_map"].values())):
            state_dict.update(load_file(folder / shard))
        return state_dict
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _check_weights_match(folder: Path, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    """Raise a `ValueError` naming the first few keys of each kind when any weight is missing, extra or mis-shaped."""
    if missing or unexpected or mismatched:
        problems = {"missing": missing, "unexpected": unexpected, "shape mismatches": mismatched}
        details = "; ".join(f"{name}: {', '.join(keys[:5])}" for name, keys in problems.items() if keys)
        raise ValueError(f"The weights in {folder} do not match its config.json ({details}).")


@contextmanager
def _without_load_report() -> Iterator[None]:
    """Drops transformers' LOAD REPORT (a table of missing, unexpected and mis-shaped keys, logged as a warning) while
    `load_export_model` loads: its `ValueError` names the same keys on one line."""
    log = logging.getLogger("transformers.modeling_utils")  # where `log_state_dict_report` logs

    def not_the_report(record: logging.LogRecord) -> bool:
        return " LOAD REPORT" not in record.getMessage()

    log.addFilter(not_the_report)
    try:
        yield
    finally:
        log.removeFilter(not_the_report)


def load_export_model(folder: str | Path) -> GPT2ScratchForCausalLM:
    """`from_pretrained` of a `save_pretrained` export, checked: unlike `from_pretrained` alone, which gives missing
    weights random values, a weight that is missing, unexpected or mis-shaped is an error (the tied `lm_head.weight`,
    saved once with the embedding, aside).

    Raises:
        ValueError: listing missing, unexpected or mis-shaped weights.
    """
    folder = Path(folder)
    with _without_load_report():
        model, loading = GPT2ScratchForCausalLM.from_pretrained(
            folder,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # mismatches listed below, not a RuntimeError
        )
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(loading["missing_keys"]) - tied)
    mismatched = [f"{key} {tuple(saved)} vs {tuple(expected)}" for key, saved, expected in loading["mismatched_keys"]]
    _check_weights_match(folder, missing, sorted(loading["unexpected_keys"]), sorted(mismatched))
    return model.eval()


def load_checkpoint_model(folder: str | Path) -> GPT2ScratchForCausalLM:
    """Build the model saved in a training checkpoint: `config.json` + `model.safetensors` (`save_state`).

    Tolerates the `module.`/`_orig_mod.` prefixes of DDP and `torch.compile`, and a tied LM head stored under
    either name (or only once).

    Raises:
        ValueError: listing missing, unexpected or mis-shaped weights.
    """
    folder = Path(folder)
    config = GPT2ScratchConfig.from_pretrained(folder)
    model = GPT2ScratchForCausalLM(config)
    state_dict = {_clean_key(key): tensor for key, tensor in _read_state_dict(folder).items()}
    if "transformer.wte.weight" not in state_dict and "lm_head.weight" in state_dict:
        state_dict["transformer.wte.weight"] = state_dict["lm_head.weight"]  # tied: saved once, under the head
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict) - {"lm_head.weight"})
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key} {tuple(tensor.shape)} vs {tuple(expected[key].shape)}"
        for key, tensor in state_dict.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    _check_weights_match(folder, missing, unexpected, mismatched)
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    return model.eval()


def load_model(source: ModelSource) -> GPT2ScratchForCausalLM:
    """The model of `source`: `load_export_model` for an export, `load_checkpoint_model` for a checkpoint.

    Raises:
        ValueError: if the folder holds another kind of model (its `model_type` is not `gpt2_scratch`), weights
            that do not match its `config.json`, or a `config.json` or weights that cannot be read (a truncated or
            corrupt file).
    """
    config_path = source.model_dir / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:  # not JSON (cut short, corrupt), or not UTF-8
        raise ValueError(
            f"Cannot read {config_path} ({one_line(err)}): a truncated or corrupt file? Push another "
            "checkpoint, or export the run again."
        ) from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != GPT2ScratchConfig.model_type:
        raise ValueError(
            f"{source.model_dir} holds a {model_type!r} model, not a gpt2-scratch one (model_type "
            f"{GPT2ScratchConfig.model_type!r}): pass a run of train_accelerate.py, its final/ folder or a checkpoint."
        )
    try:
        if source.kind == "checkpoint":
            return load_checkpoint_model(source.model_dir)
        return load_export_model(source.model_dir)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # what a broken file raises
        raise ValueError(
            f"Cannot load the weights in {source.model_dir} ({one_line(err)}): a truncated or "
            "corrupt file? Push another checkpoint, or export the run again."
        ) from err


def load_tokenizer(source: ModelSource, model_max_length: int) -> PreTrainedTokenizerBase:
    """The run's saved tokenizer (in the export, or the run's `final/`), else a fresh GPT-2 tokenizer.

    Raises:
        ValueError: saved tokenizer files that do not load (cut short, corrupt), naming them and what to do.
    """
    candidates = [source.model_dir] + ([source.run_dir / "final"] if source.run_dir is not None else [])
    for folder in candidates:
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            try:
                return AutoTokenizer.from_pretrained(folder)
            except Exception as err:  # JSON errors, tokenizers' bare Exception, a config of the wrong type, ...
                files = " and ".join(str(folder / name) for name in TOKENIZER_FILES)
                raise ValueError(
                    f"Cannot load the tokenizer in {files} ({one_line(err)}): truncated or corrupt files? Export the "
                    "run again, or delete both (the trainer's tokenizer is GPT-2's, which is then staged afresh)."
                ) from err
    return get_hf_tokenizer(model_max_length=model_max_length)


LOADER_OPTIONS = ("is_local", "local_files_only")  # what `from_pretrained` records and `save_pretrained` writes


def _drop_loader_options(tokenizer_config: Path) -> None:
    """Remove how this machine loaded the tokenizer (a local folder) from its staged `tokenizer_config.json`."""
    if tokenizer_config.is_file():
        config = json.loads(tokenizer_config.read_text())
        if any(key in config for key in LOADER_OPTIONS):
            config = {key: value for key, value in config.items() if key not in LOADER_OPTIONS}
            tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# --- what the run recorded -------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What the model card says about training; every field may be unknown (None or empty)."""

    run_config: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    tokens_seen: int | None = None
    final_train_loss: float | None = None
    train_loss_step: int | None = None
    final_val_loss: float | None = None
    val_loss_step: int | None = None
    training_seconds: float | None = None  # the training loop's seconds, over every resume
    wall_clock_seconds: float | None = None  # the last process's, setup included (runs from before 2026-11-26)
    num_processes: int | None = None
    device: str | None = None
    device_name: str | None = None
    mixed_precision: str | None = None
    torch_version: str | None = None
    transformers_version: str | None = None
    loss_curve: Path | None = None
    loss_curve_rows: list[dict[str, Any]] = field(default_factory=list)  # a checkpoint's: redraw up to its step


RUN_FACTS = ("num_processes", "device", "device_name", "mixed_precision", "torch_version", "transformers_version")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("Ignoring %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(errors="replace").splitlines():  # a damaged byte spoils its line, not the file
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _section(run_config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`run_config[name]` when it is a mapping, else `{}`."""
    section = run_config.get(name)
    return dict(section) if isinstance(section, Mapping) else {}


def read_trainer_state(checkpoint_dir: Path) -> dict[str, Any]:
    """The training loop's `TrainState` (`step`, `tokens`, `elapsed`) saved in a checkpoint: `save_state` writes each
    object given to `register_for_checkpointing` as `custom_checkpoint_N.pkl`. Read with `weights_only=True` (plain
    values only); `{}` when no such file holds one."""
    keys = set(TrainState().state_dict())
    for path in sorted(checkpoint_dir.glob("custom_checkpoint_*.pkl")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            continue  # another object's state (the scheduler's, the loader's) that needs more than plain values
        if isinstance(state, dict) and {"step", "tokens"} <= set(state) <= keys:
            if all(isinstance(state[key], int) for key in ("step", "tokens")):
                return state
    return {}


def read_run_info(run_dir: Path | None, step: int | None = None, checkpoint_dir: Path | None = None) -> RunInfo:
    """Collect the card's facts from a run folder: `run_config.json`, `run_summary.json`, `metrics.jsonl`.

    With `step` (a checkpoint), the numbers describe that step, not the end of the run: the tokens and training time
    of the checkpoint's own trainer state (`checkpoint_dir`, `read_trainer_state`), exact also between two logged
    steps, else those `metrics.jsonl` logged at the step. A checkpoint (`checkpoint_dir`) of unknown `step` gets the
    run's configuration and hardware only: the run's numbers and loss curve, which may go past it, stay unknown.
    """
    if run_dir is None:
        return RunInfo()
    info = RunInfo(run_config=_read_json(run_dir / RUN_CONFIG_NAME))
    summary = _read_json(run_dir / RUN_SUMMARY_NAME)
    rows = _read_metrics(run_dir / METRICS_NAME)
    unknown_step = checkpoint_dir is not None and step is None
    if unknown_step:  # the run's numbers are not the checkpoint's: its hardware and software only
        summary = {key: value for key, value in summary.items() if key in RUN_FACTS}
        rows = []
    if step is not None:
        went_on = any(row["step"] > step for row in rows)
        rows = [row for row in rows if row["step"] <= step]
        if went_on:  # the run's loss.png goes past the checkpoint: its curve is drawn again, up to its step
            info.loss_curve_rows = [row for row in rows if isinstance(row.get("tokens"), int)]
    for name in RUN_FACTS:
        setattr(info, name, summary.get(name))
    if info.mixed_precision is None:
        info.mixed_precision = _section(info.run_config, "training").get("mixed_precision")
    loss_curve = run_dir / "loss.png"
    info.loss_curve = loss_curve if loss_curve.is_file() and not unknown_step else None

    summary_applies = step is None or summary.get("steps") == step
    if summary_applies and summary:
        info.steps = summary.get("steps")
        info.tokens_seen = summary.get("tokens_seen")
        info.final_train_loss = _number(summary.get("final_train_loss"))
        info.final_val_loss = _number(summary.get("final_val_loss"))
        info.val_loss_step = info.steps if info.final_val_loss is not None else None
        info.training_seconds = _number(summary.get("training_seconds"))
        info.wall_clock_seconds = _number(summary.get("wall_clock_seconds"))
    state = read_trainer_state(checkpoint_dir) if checkpoint_dir is not None else {}
    if state and state["step"] == step:  # a checkpoint's own numbers, also when its step was not logged
        if info.tokens_seen is None:
            info.tokens_seen = state["tokens"]
        if info.training_seconds is None:
            info.training_seconds = _number(state.get("elapsed"))
    if info.training_seconds is None and step is not None:  # a checkpoint: the time logged at its step
        at_step = [_number(row.get("elapsed")) for row in rows if row["step"] == step]
        info.training_seconds = at_step[-1] if at_step else None
    if info.steps is None:
        info.steps = step if step is not None else (rows[-1]["step"] if rows else None)
    if info.tokens_seen is None:
        at_step = [row for row in rows if row["step"] == info.steps and isinstance(row.get("tokens"), int)]
        batch_tokens = _section(info.run_config, "training").get("total_batch_tokens")
        if at_step:
            info.tokens_seen = at_step[-1]["tokens"]
        elif isinstance(batch_tokens, int) and info.steps is not None:
            info.tokens_seen = batch_tokens * info.steps
    if info.final_train_loss is None:
        train = [row for row in rows if _number(row.get("train_loss")) is not None]
        if train:
            info.final_train_loss, info.train_loss_step = float(train[-1]["train_loss"]), train[-1]["step"]
    if info.final_val_loss is None:
        val = [row for row in rows if _number(row.get("val_loss")) is not None]
        if val:
            info.final_val_loss, info.val_loss_step = float(val[-1]["val_loss"]), val[-1]["step"]
    return info


# --- the model card --------------------------------------------------------------------------------------------------

CARD_TEMPLATE = """\
---
{{ card_data }}
---

# {{ model_name }}

A GPT-2 language model ({{ num_parameters }} parameters) {{ origin }} with **gpt2-scratch**, GPT-2 written
from scratch in PyTorch as a Hugging Face `transformers` model.
{%- if source_note %} {{ source_note }}{% endif %}
{% if fmt == "gpt2" %}
This repository holds a plain `transformers` `GPT2LMHeadModel` (same weights and logits as the scratch model), so
any GPT-2 tool (`transformers`, vLLM, TGI, ...) opens it without remote code.
{% else %}
The model's code ships with the weights (`configuration_gpt2_scratch.py`, `modeling_gpt2_scratch.py`, which import
only `torch` and `transformers`): load it with `trust_remote_code=True`.
{% endif %}
## Model

| | |
|---|---|
{% for name, value in architecture %}| {{ name }} | {{ value }} |
{% endfor %}
## Training data

{{ data_description }}
{% if data_rows %}
| setting | value |
|---|---|
{% for name, value in data_rows %}| `{{ name }}` | {{ value }} |
{% endfor %}{% endif %}
## Training procedure
{% if hyperparameters %}
Hyperparameters (from the run's `run_config.json`):

| hyperparameter | value |
|---|---|
{% for name, value in hyperparameters %}| `{{ name }}` | {{ value }} |
{% endfor %}{% if other_settings %}
<details>
<summary>All other training settings</summary>

| setting | value |
|---|---|
{% for name, value in other_settings %}| `{{ name }}` | {{ value }} |
{% endfor %}
</details>
{% endif %}{% else %}
The run's configuration was not saved with it: hyperparameters unknown.
{% endif %}
## Results

| | |
|---|---|
{% for name, value in results %}| {{ name }} | {{ value }} |
{% endfor %}{% if loss_curve %}
![Training and validation loss against tokens seen]({{ loss_curve }})
{% endif %}
## Usage

```python
{%- if fmt != "gpt2" %}
# the model's code needs transformers>={{ min_transformers }}: pip install -U "transformers>={{ min_transformers }}"
{%- endif %}
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}"{{ load_kwargs }})  # it reads config.json first
model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}"{{ load_kwargs }})

inputs = tokenizer("Once upon a time", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=50, do_sample=True, top_k=50)
print(tokenizer.decode(out[0]))
```

With a pipeline:

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{{ repo_id }}"{{ load_kwargs }})
print(generator("Once upon a time", max_new_tokens=50, do_sample=True, top_k=50)[0]["generated_text"])
```
{% if fmt != "gpt2" %}
With the gpt2-scratch package installed, `GPT2ScratchForCausalLM.from_pretrained("{{ repo_id }}"{{ revision_kwarg }})`
loads it without remote code, and `model.to_hf_gpt2()` converts it to a `transformers` `GPT2LMHeadModel`.
{% endif %}
## Limitations

- A small base model ({{ num_parameters }} parameters, {{ tokens_seen_short }} training tokens): it continues text
  in the style of its training data, often incoherently over long spans, and states falsehoods fluently. It is not
  instruction-tuned, not aligned and not evaluated for safety: do not use its output as fact or advice.
- It reflects the biases and errors of its training data
{%- if english %} and is meant for English text.
{%- else %}; GPT-2's tokenizer was made for English text, so other languages take more tokens per word.{% endif %}
- Context of {{ context_length }} tokens; GPT-2's byte-level BPE tokenizer (50,257 tokens, `<|endoftext|>` is the
  bos, eos and pad token).
- A research and educational artifact: evaluate it on your task before any other use.
"""


def _format_count(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n < 1000:
        return str(n)
    for size, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "B")):
        if float(f"{n / size:.1f}") < 1000 or suffix == "B":  # 999,950 is 1.0M, not 1000.0k
            return f"{n / size:.1f}{suffix}"


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def _format_loss(loss: float | None) -> str:
    return "unknown" if loss is None or not math.isfinite(loss) else f"{loss:.4f}"


def _looks_like_path(value: str) -> bool:
    local = value.startswith(("/", "~", "./", "../")) or "\\" in value or _WINDOWS_DRIVE.match(value) is not None
    return local or value.endswith(DATA_FILE_SUFFIXES)


def _file_name(value: str) -> str:
    """The last part of a local path, POSIX or Windows (`C:\\Users\\alice\\runs\\q` -> `q`) on any system."""
    windows = "\\" in value or _WINDOWS_DRIVE.match(value) is not None
    return PureWindowsPath(value).name if windows else Path(value).name


def _public_value(value: Any) -> str:
    """A configuration value as a Markdown table cell; local paths become their file name (no home folders on the
    Hub)."""
    if isinstance(value, str):
        if _looks_like_path(value):
            return f"`{_file_name(value)}` (local)"
        return " ".join(value.split()).replace("|", "\\|")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_public_value(item) for item in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={_public_value(item)}" for key, item in value.items())
    return str(value)


def hub_dataset_id(dataset: Any, source: str | None = None) -> str | None:
    """`dataset` if it names a Hub dataset (`OWNER/NAME`), None for local files and anything else.

    `source` is what the trainer recorded (`"hub"` or `"local"`, in `run_config.json`'s `dataset_source`); without
    it, a name of the Hub's form that is not a path here counts as a Hub dataset.
    """
    if source == "local" or not isinstance(dataset, str) or dataset.count("/") != 1 or _looks_like_path(dataset):
        return None
    if Path(dataset).exists():
        return None
    try:
        hf_validate_repo_id(dataset)
    except HFValidationError:
        return None
    return dataset


def _init_from_is_local(model: Mapping[str, Any], run_dir: Path | None = None) -> bool:
    """Whether the run's `--init_from` (`model`: `run_config.json`'s `model` section) was a local folder, which is
    not the card's `base_model` (a Hub id). The trainer records it (`init_from_source`: `"local"` or `"hub"`); for
    runs from before it did: a path's form, a folder that exists relative to the current folder or to the run folder
    or one above it, or a name that cannot be a Hub id."""
    if model.get("init_from_source") in ("local", "hub"):
        return model["init_from_source"] == "local"
    init_from = str(model.get("init_from"))
    bases = [Path.cwd()] + ([run_dir, *run_dir.parents] if run_dir is not None else [])
    if _looks_like_path(init_from) or any((base / init_from).is_dir() for base in bases):
        return True
    try:
        hf_validate_repo_id(init_from)
    except HFValidationError:
        return True
    return False


def _architecture_rows(model: GPT2ScratchForCausalLM, fmt: Format, num_parameters: int) -> list[tuple[str, str]]:
    config = model.config
    if fmt == "gpt2":
        model_format = "`GPT2LMHeadModel` (`model_type: gpt2`)"
    else:
        model_format = "`GPT2ScratchForCausalLM` (remote code)"
    vocabulary = f"{config.tokenizer_vocab_size:,} tokens (GPT-2 BPE)"
    if fmt != "gpt2" and config.vocab_size > config.tokenizer_vocab_size:
        vocabulary += f", embedding padded to {config.vocab_size:,} rows for speed"
    return [
        ("architecture", "GPT-2 (decoder-only transformer, pre-LayerNorm, learned positions, tied embeddings)"),
        ("format", model_format),
        ("parameters", f"{num_parameters:,}"),
        ("layers", str(config.n_layer)),
        ("attention heads", str(config.n_head)),
        ("embedding size", str(config.n_embd)),
        ("MLP size", str(config.n_inner or 4 * config.n_embd)),
        ("context length", str(config.n_positions)),
        ("vocabulary", vocabulary),
        ("activation", "GELU (tanh approximation)"),
    ]


def _data_description(data: Mapping[str, Any], tokens_seen: int | None) -> tuple[str, list[tuple[str, str]]]:
    dataset = data.get("dataset")
    hub_id = hub_dataset_id(dataset, data.get("dataset_source"))
    local = dataset is not None and (data.get("dataset_source") == "local" or _looks_like_path(str(dataset)))
    if hub_id is not None:
        name = f"[{hub_id}](https://huggingface.co/datasets/{hub_id})"
        if data.get("dataset_config"):
            name += f" (`{data['dataset_config']}`)"
    elif dataset:
        name = f"a local corpus (`{_file_name(str(dataset))}`)" if local else f"`{dataset}`"
    else:
        name = "an unrecorded corpus"
    seen = f", {tokens_seen:,} tokens seen in training" if tokens_seen is not None else ""
    description = f"Trained on {name}, tokenized with GPT-2's BPE (tiktoken){seen}."
    ignored = ("split", "val_split", "dataset_config") if local else ()  # local files: the pipeline ignores these
    rows = [
        (key, f"`{_file_name(str(value))}` (local)" if key == "dataset" and local else _public_value(value))
        for key, value in data.items()
        if value is not None and key not in ignored
    ]
    return description, rows


def _training_time(info: RunInfo) -> float | None:
    """The training loop's seconds over every resume; for runs that did not record them (before 2026-11-26), the
    whole process's wall clock, which counts setup too but only the last resume."""
    return info.training_seconds if info.training_seconds is not None else info.wall_clock_seconds


def _results_rows(info: RunInfo) -> list[tuple[str, str]]:
    val = _format_loss(info.final_val_loss)
    if info.final_val_loss is not None and math.isfinite(info.final_val_loss):
        val += f" (perplexity {math.exp(min(info.final_val_loss, 50.0)):.2f})"
        if info.val_loss_step is not None and info.val_loss_step != info.steps:
            val += f", at step {info.val_loss_step:,}"
    train = _format_loss(info.final_train_loss)
    if info.final_train_loss is not None and info.train_loss_step not in (None, info.steps):
        train += f" (at step {info.train_loss_step:,})"  # a checkpoint between two logged steps
    hardware = "unknown"
    if info.device_name or info.device:
        hardware = f"{info.num_processes or 1} x {info.device_name or info.device}"
    rows = [
        ("optimizer steps", f"{info.steps:,}" if info.steps is not None else "unknown"),
        ("tokens seen", f"{info.tokens_seen:,}" if info.tokens_seen is not None else "unknown"),
        ("final train loss", train),
        ("final validation loss", val),
        ("hardware", hardware),
        ("mixed precision", info.mixed_precision or "unknown"),
        ("training time", _format_duration(_training_time(info))),
    ]
    versions = [f"torch {info.torch_version}"] if info.torch_version else []
    versions += [f"transformers {info.transformers_version}"] if info.transformers_version else []
    if versions:
        rows.append(("software", ", ".join(versions)))
    return rows


def build_model_card(
    model: GPT2ScratchForCausalLM,
    repo_id: str,
    info: RunInfo,
    fmt: Format = "scratch",
    source: ModelSource | None = None,
    license: str = DEFAULT_LICENSE,
    num_parameters: int | None = None,
    revision: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    language: str = DEFAULT_LANGUAGE,
) -> ModelCard:
    """The repository's `README.md`: YAML metadata (license, library, pipeline tag, tags, datasets, language) and
    the architecture, data, hyperparameters, results, loss curve, usage and limitations.

    `license` is the Hub's license id for the weights (`mit`, as OpenAI's GPT-2 and this code; `apache-2.0`, `other`,
    ...): the trainer's choice, which also has to fit the training data's terms; `other` with `license_name` and
    `license_link` (`validate_license`). `language`: the training data's, `--language` (`parse_languages`).
    `num_parameters`: those of the model the repository holds (`to_hf_gpt2()`'s for `fmt="gpt2"`, without the padding
    rows); default: `model`'s.
    `revision`: the branch the repository is pushed to; the usage snippets name it when it is not `main` (nor an open
    pull request's `refs/pr/N`, which is merged into `main`)."""
    if num_parameters is None:
        num_parameters = sum(p.numel() for p in model.parameters())
    data, training = _section(info.run_config, "data"), _section(info.run_config, "training")
    hub_id = hub_dataset_id(data.get("dataset"), data.get("dataset_source"))
    model_section = _section(info.run_config, "model")
    base_model = model_section.get("init_from")
    local_base = bool(base_model) and _init_from_is_local(model_section, source.run_dir if source else None)
    if base_model and not local_base:
        base_model = CANONICAL_MODEL_IDS.get(base_model, base_model)
    tags = ["gpt2", "gpt2-scratch", "text-generation", "pytorch", "causal-lm"]
    if fmt == "scratch":
        tags.append("custom_code")
    languages = parse_languages(language)
    card_data = ModelCardData(
        language=languages[0] if len(languages) == 1 else languages,
        license=license,
        license_name=license_name,
        license_link=license_link,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[hub_id] if hub_id else None,
        base_model=base_model if base_model and not local_base else None,
        base_model_relation="finetune" if base_model and not local_base else None,  # all weights trained on
    )
    if base_model:
        shown = f"`{_file_name(base_model)}` (local)" if local_base else f"`{base_model}`"
        origin = f"fine-tuned from {shown}"
    else:
        origin = "trained from scratch"
    description, data_rows = _data_description(data, info.tokens_seen)
    revision_kwarg = f", revision={json.dumps(revision)}" if _other_branch(revision) else ""  # in the usage snippets
    source_note = ""
    if source is not None and source.kind == "checkpoint" and source.step is not None:
        source_note = f"This is the training checkpoint at step {source.step:,}."
    card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        fmt=fmt,
        source_note=source_note,
        origin=origin,
        num_parameters=_format_count(num_parameters),
        architecture=_architecture_rows(model, fmt, num_parameters),
        data_description=description,
        data_rows=data_rows,
        hyperparameters=[(key, _public_value(training[key])) for key in RECIPE_KEYS if training.get(key) is not None],
        other_settings=[
            (key, _public_value(value))
            for key, value in training.items()
            if key not in RECIPE_KEYS and value is not None
        ],
        results=_results_rows(info),
        loss_curve="loss.png" if info.loss_curve is not None else None,
        min_transformers=MIN_TRANSFORMERS_VERSION,
        load_kwargs=revision_kwarg + ("" if fmt == "gpt2" else ", trust_remote_code=True"),
        revision_kwarg=revision_kwarg,
        tokens_seen_short=_format_count(info.tokens_seen),
        context_length=model.config.n_positions,
        english=languages == ["en"],
    )
    card.text = card.text.rstrip("\n") + "\n"  # Jinja drops the template's final newline
    return card


# --- staging and upload ----------------------------------------------------------------------------------------------


@dataclass
class StagedFile:
    """One file of a staged folder: its path relative to the folder and its size in bytes."""

    path: str
    size: int


def list_files(folder: Path) -> list[StagedFile]:
    """The files under `folder`, sorted, with their sizes."""
    return [
        StagedFile(path.relative_to(folder).as_posix(), path.stat().st_size)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def staged_before(folder: Path) -> bool:
    """Whether `folder` holds what `stage_folder` wrote there before (and nothing else): files of the kinds it
    stages only (`STAGED_PATTERNS`), among them a gpt2-scratch model card (`README.md` tagged `gpt2-scratch`)."""
    entries = list(folder.iterdir())
    if not all(path.is_file() and any(fnmatch.fnmatchcase(path.name, p) for p in STAGED_PATTERNS) for path in entries):
        return False
    readme = folder / "README.md"
    try:
        metadata = metadata_load(readme) if readme.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(metadata, dict) and "gpt2-scratch" in (metadata.get("tags") or [])


@contextmanager
def _staging_into(out_dir: Path) -> Iterator[None]:
    """Create `out_dir` (new, empty, or an earlier staging emptied) for the `with` body to stage into. A body that
    fails or is interrupted (a full disk, Ctrl-C) leaves nothing behind: what it wrote is removed, and `out_dir` too
    where this made it. Otherwise a retry of the same command found a folder that was neither empty nor a staging.

    Raises:
        OSError: `out_dir` cannot be created (read-only storage, a file on its path), naming it.
    """
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # was a bare "[Errno 30] Read-only file system"
        raise OSError(
            f"Cannot stage into {out_dir} ({err.strerror or one_line(err)}): pass a folder you can write to with "
            "--local-dir."
        ) from err
    try:
        yield
    except BaseException:
        with suppress(OSError):
            if created:
                shutil.rmtree(out_dir)
            else:  # all in it is this staging's: the folder was empty, or an earlier staging emptied
                for path in out_dir.iterdir():
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        raise


def stage_folder(
    source: ModelSource | str | Path,
    out_dir: str | Path,
    repo_id: str,
    fmt: Format = "scratch",
    license: str = DEFAULT_LICENSE,
    revision: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    language: str = DEFAULT_LANGUAGE,
) -> list[StagedFile]:
    """Write the Hub repository's files into `out_dir` (created; if it exists, it must be empty or hold an earlier
    staging, `staged_before`, which is replaced). A staging that fails or is interrupted leaves nothing behind: the
    files it wrote are removed, and `out_dir` too where this call created it, so the same call can be retried.

    `fmt="scratch"`: `GPT2ScratchForCausalLM.save_pretrained` (weights, `config.json` with `auto_map`, the code
    files, `generation_config.json`). `fmt="gpt2"`: `model.to_hf_gpt2().save_pretrained` (a plain `GPT2LMHeadModel`,
    no code). Both add the tokenizer, the run's `loss.png` when it has one (for a checkpoint of a run that went on,
    drawn again from `metrics.jsonl` up to the checkpoint's step), and `README.md` (`build_model_card`; `revision`:
    the branch it goes to, named in its usage snippets).

    Returns:
        The staged files and their sizes.

    Raises:
        ValueError: for an unknown `fmt`, an invalid `license` (`validate_license`) or `language`, an `out_dir` that
            holds anything but an earlier staging or is the source's own folder, or a source that is not a
            gpt2-scratch model.
        FileNotFoundError: for a missing source.
        OSError: writing the weights or the tokenizer failed (a full disk), naming `out_dir`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}.")
    validate_license(license, license_name, license_link)
    parse_languages(language)
    source = source if isinstance(source, ModelSource) else resolve_source(source)
    out_dir = Path(out_dir).expanduser()
    if out_dir.resolve() == source.model_dir.resolve():  # an earlier staging pushed again: never wipe the source
        raise ValueError(
            f"{out_dir} is the model folder being published: stage into another folder (a new or empty one), or "
            "leave out --local-dir."
        )
    if out_dir.is_dir() and staged_before(out_dir):  # e.g. a retry after a failed upload, or after a --dry-run
        logger.info("%s holds an earlier staging: staging again into it", out_dir)
        for path in out_dir.iterdir():
            path.unlink()
    elif out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder: pass a new or empty folder to stage into.")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(
            f"{out_dir} is not an empty folder, nor one staged by push_to_hub.py: pass a new or empty folder to stage "
            "into, or delete this one."
        )
    with _staging_into(out_dir):
        model = load_model(source)
        checkpoint = source.model_dir if source.kind == "checkpoint" else None
        info = read_run_info(source.run_dir, step=source.step if checkpoint else None, checkpoint_dir=checkpoint)
        logger.info("Staging %s (%s format) from %s into %s", repo_id, fmt, source.model_dir, out_dir)
        saved = model.to_hf_gpt2().eval() if fmt == "gpt2" else model
        # outside the `try`: GPT-2's BPE ranks not found is an error of its own (a FileNotFoundError), not a full disk
        tokenizer = load_tokenizer(source, model_max_length=model.config.n_positions)
        try:
            saved.save_pretrained(out_dir)
            save_tokenizer(tokenizer, out_dir)
        except (OSError, SafetensorError) as err:  # a full disk: "No space left on device (os error 28)"
            raise OSError(
                f"Staging into {out_dir} failed ({one_line(err)}): is its disk full? Free space there, or "
                "stage on another disk with --local-dir."
            ) from err
        _drop_loader_options(out_dir / "tokenizer_config.json")
        if info.loss_curve is not None and info.loss_curve_rows:
            plot_losses(info.loss_curve_rows, out_dir / "loss.png")
        elif info.loss_curve is not None:
            shutil.copyfile(info.loss_curve, out_dir / "loss.png")
        num_parameters = sum(p.numel() for p in saved.parameters())  # gpt2: GPT-2's 50,257 rows, not the padded ones
        card = build_model_card(
            model,
            repo_id,
            info,
            fmt=fmt,
            source=source,
            license=license,
            num_parameters=num_parameters,
            revision=revision,
            license_name=license_name,
            license_link=license_link,
            language=language,
        )
        card.save(out_dir / "README.md")
        return list_files(out_dir)


def _require_online() -> None:
    if hf_constants.is_offline_mode():
        raise ValueError("Offline mode is on (HF_HUB_OFFLINE=1): unset it to upload, or use --dry-run to stage only.")


def upload_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> tuple[str, str]:
    """Upload a staged folder: `create_repo(exist_ok=True)`, the branch `revision` if new, `upload_folder`.

    The commit also deletes the branch's files of the kinds staging writes (`STAGED_PATTERNS`) that the folder does
    not hold, and logs them, so a re-push leaves nothing stale (no remote code after `--format gpt2`, no old
    `loss.png` or weight shards); every other file on the branch is kept.

    Args:
        token: default: `HF_TOKEN`, else the token saved by `hf auth login`.
        private: create the repository private; an existing public one is an error, before any upload.
        revision: the branch to commit to (created from `main` if missing), or `refs/pr/N`, an open pull request's
            ref (which must exist); default `main`.
        endpoint: the Hub's URL; default: `HF_ENDPOINT`, else https://huggingface.co.

    Returns:
        The repository's URL and the commit's URL.

    Raises:
        ValueError: for an invalid repo id, no token, offline mode, `private` with an existing public repository, or
            `refs/pr/N` of a repository that does not exist (none is created).
        OSError: when a file's upload fails (nothing is committed); the Hub's HTTP errors (`HfHubHTTPError`).
    """
    validate_repo_id(repo_id)
    validate_revision(revision)
    token = resolve_token(token)
    _require_online()
    api = HfApi(endpoint=endpoint, token=token, library_name="gpt2-scratch")
    if _is_pull_request(revision):  # a pull request of a repository that exists: none is created for it
        try:
            api.repo_info(repo_id, repo_type="model")
        except RepositoryNotFoundError:  # the real Hub: 401 or 404, as for a private one this token cannot see
            raise ValueError(
                f"--revision {revision}: there is no repository {repo_id} (that this token can see), so no pull "
                "request of it; nothing was created. Push to the repository's main branch (no --revision) first."
            ) from None
        repo_url = f"{api.endpoint}/{repo_id}"
    else:
        repo_url = api.create_repo(repo_id, private=private or None, repo_type="model", exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type="model").private:
        raise ValueError(
            f"{repo_id} already exists and is public, and --private was given: nothing was uploaded. Make it private "
            f"first (in its settings on the Hub, or with huggingface_hub.HfApi().update_repo_settings({repo_id!r}, "
            "private=True)), or drop --private to push to the public repository."
        )
    if _other_branch(revision):
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)  # the Hub refuses refs/pr/N
    branch = revision or hf_constants.DEFAULT_REVISION
    where = describe_revision(branch)
    staged = {f.path for f in list_files(Path(folder))}
    remote = api.list_repo_files(repo_id, revision=branch, repo_type="model")
    stale = [path for path in filter_repo_objects(remote, allow_patterns=list(STAGED_PATTERNS)) if path not in staged]
    if stale:  # what upload_folder's delete_patterns below deletes (.gitattributes matches none)
        logger.info("Deleting from %s (%s), no longer staged: %s", repo_id, where, ", ".join(stale))
    logger.info("Uploading %s to %s (%s)", folder, repo_url, where)
    try:
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload gpt2-scratch model with push_to_hub.py",
            delete_patterns=list(STAGED_PATTERNS),  # files of other kinds on the branch are kept
        )
    except RuntimeError as err:  # a file's upload failed (huggingface_hub's LFS wrapper, hf_xet), before the commit
        reasons = [str(err)] + ([str(err.__cause__)] if err.__cause__ is not None else [])
        raise OSError(
            f"Uploading {folder} to {repo_id} ({where}) failed, nothing was committed "
            f"({one_line(' '.join(reasons))}): push again."
        ) from err
    return str(repo_url), commit.commit_url


@dataclass
class PushResult:
    """What `push_run_to_hub` did: the staged files, where they are (None for a removed temporary folder), and the
    repository and commit URLs (None for a dry run)."""

    files: list[StagedFile]
    staged_dir: Path | None
    repo_url: str | None = None
    commit_url: str | None = None


@contextmanager
def _staging_dir(local_dir: str | Path | None) -> Iterator[Path]:
    if local_dir is not None:
        yield Path(local_dir)
        return
    with tempfile.TemporaryDirectory(prefix="gpt2-scratch-hub-") as tmp:
        yield Path(tmp) / "repo"


def push_run_to_hub(
    path: str | Path,
    repo_id: str,
    *,
    fmt: Format = "scratch",
    license: str = DEFAULT_LICENSE,
    license_name: str | None = None,
    license_link: str | None = None,
    language: str = DEFAULT_LANGUAGE,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    local_dir: str | Path | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Stage a run, export or checkpoint as a Hub repository and upload it (`push_to_hub.py`'s whole job).

    Checks the repo id, the source and the token before any work; `dry_run` stages only (no token, no network).
    The staged folder is `local_dir` (kept) or a temporary folder (removed at the end).

    Raises:
        ValueError / FileNotFoundError: for bad input, with the fix in the message.
    """
    validate_repo_id(repo_id)
    validate_revision(revision)
    validate_license(license, license_name, license_link)
    parse_languages(language)
    source = resolve_source(path)
    local_dir = Path(local_dir).expanduser() if local_dir is not None else None  # as the source's path
    if not dry_run:
        token = resolve_token(token)
        _require_online()
    with _staging_dir(local_dir) as staged_dir:
        files = stage_folder(
            source,
            staged_dir,
            repo_id,
            fmt=fmt,
            license=license,
            revision=revision,
            license_name=license_name,
            license_link=license_link,
            language=language,
        )
        if dry_run:
            return PushResult(files, staged_dir if local_dir is not None else None)
        repo_url, commit_url = upload_folder_to_hub(
            staged_dir,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            endpoint=endpoint,
        )
    return PushResult(files, local_dir, repo_url, commit_url)
