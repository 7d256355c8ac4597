"""Publish a training run on the Hugging Face Hub, as a repository anyone loads with the Auto classes.

    python push_to_hub.py runs/quickstart --repo-id alice/gpt2-shakespeare
    python push_to_hub.py runs/quickstart/checkpoints/step_0000050 --repo-id alice/gpt2-shakespeare --revision step-50
    python push_to_hub.py runs/quickstart --repo-id alice/gpt2-shakespeare-hf --format gpt2
    python push_to_hub.py runs/quickstart --repo-id alice/gpt2-shakespeare --dry-run --local-dir staged/

The token comes from HF_TOKEN or `hf auth login`; it is never printed. The work is done by
`modeling_gpt2_scratch.hub` (staging, model card, upload).
"""

from __future__ import annotations

import argparse
import os
import sys

from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
from transformers.utils import logging as transformers_logging

from modeling_gpt2_scratch.data import configure_cli_logging, one_line_parse_errors, unrecognized_arguments
from modeling_gpt2_scratch.hub import (
    DEFAULT_LANGUAGE,
    DEFAULT_LICENSE,
    FORMATS,
    PushResult,
    StagedFile,
    describe_revision,
    push_run_to_hub,
)

try:  # huggingface_hub's HTTP client: httpx2 (huggingface_hub >= 2), httpx (1.x)
    from httpx2 import HTTPError, TransportError
except ImportError:
    from httpx import HTTPError, TransportError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (see `--help`)."""
    parser = argparse.ArgumentParser(
        description="Stage a gpt2-scratch run (its final/ export, or a checkpoint) as a Hugging Face Hub repository "
        "with a model card, and upload it.",
    )
    parser.add_argument(
        "source",
        metavar="RUN_OR_CHECKPOINT",
        help="a run folder (train_accelerate.py --output_dir; uses its final/, else its latest checkpoint), a final/ "
        "folder, or a checkpoint folder (RUN/checkpoints/step_N)",
    )
    parser.add_argument(
        "--repo-id", "--repo_id", required=True, help="the Hub repository, USER/NAME or ORG/NAME (required)"
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="create the repository private; an existing public one is an error (nothing is uploaded)",
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="branch to push to, created if missing, and named in the card's usage snippets (default: main); or "
        "refs/pr/N, an open pull request's ref",
    )
    parser.add_argument("--commit-message", "--commit_message", default=None, help="commit message")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="scratch",
        help="scratch (default): GPT2ScratchForCausalLM with its code (trust_remote_code=True); "
        "gpt2: a plain transformers GPT2LMHeadModel (no remote code; vLLM, TGI, ...)",
    )
    parser.add_argument(
        "--license",
        default=DEFAULT_LICENSE,
        help="the model card's license for the weights, one of the Hub's license ids "
        "(https://huggingface.co/docs/hub/repositories-licenses; default: mit; e.g. apache-2.0, cc-by-4.0), or other "
        "with --license-name and --license-link: yours to choose, within the training data's terms",
    )
    parser.add_argument(
        "--license-name",
        "--license_name",
        default=None,
        help="with --license other: an id for the license, e.g. my-license-1.0",
    )
    parser.add_argument(
        "--license-link",
        "--license_link",
        default=None,
        help="with --license other: the URL of the license's text",
    )
    parser.add_argument(
        "--language",
        default=DEFAULT_LANGUAGE,
        help="the card's language: the training data's, as ISO 639 codes, comma-separated (default: en, the presets' "
        "data; e.g. fr, or fr,de), or code, or multilingual",
    )
    parser.add_argument(
        "--local-dir",
        "--local_dir",
        default=None,
        help="stage into this folder and keep it: a new or empty one, or one it staged before (a retry), whose files "
        "are replaced (default: a temp folder)",
    )
    parser.add_argument("--dry-run", "--dry_run", action="store_true", help="stage and list the files, upload nothing")
    one_line_parse_errors(parser)  # not below the usage block
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(f"{unrecognized_arguments(parser, unknown)} (see --help)")
    return args


def _format_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _file_table(files: list[StagedFile]) -> str:
    width = max((len(f.path) for f in files), default=10)
    lines = [f"  {f.path:<{width}}  {_format_size(f.size):>10}" for f in files]
    lines.append(f"  {'total':<{width}}  {_format_size(sum(f.size for f in files)):>10}")
    return "\n".join(lines)


def report(result: PushResult, args: argparse.Namespace) -> str:
    """What to tell the user: the staged files and sizes, and where they went."""
    where = f" in {result.staged_dir}" if result.staged_dir is not None else ""
    lines = [f"Staged {len(result.files)} files for {args.repo_id} ({args.format} format){where}:"]
    lines.append(_file_table(result.files))
    if args.dry_run:
        lines.append("Dry run: nothing was uploaded.")
    else:
        lines.append(f"Uploaded to {result.repo_url} ({describe_revision(args.revision)})")
        lines.append(f"Commit: {result.commit_url}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (errors: one line on stderr, status 1; the command line's: 2)."""
    configure_cli_logging("%(message)s", "modeling_gpt2_scratch")
    try:
        args = parse_args(argv)
    except ValueError as err:  # a mistyped flag, a bad --format, no --repo-id
        print(f"error: {err}", file=sys.stderr)
        return 2
    hub_bars_on = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # per-shard save/load bars for a one-file model: noise...
    if hub_bars_on:
        enable_progress_bars()  # ...but keep huggingface_hub's upload bars, which the line above turned off
    try:
        result = push_run_to_hub(
            args.source,
            args.repo_id,
            fmt=args.format,
            license=args.license,
            license_name=args.license_name,
            license_link=args.license_link,
            language=args.language,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            local_dir=args.local_dir,
            dry_run=args.dry_run,
        )
    except (ValueError, OSError, HTTPError) as err:  # OSError: missing files, the Hub's HTTP errors, failed uploads
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, TransportError):  # no answer: say where it was sent
            endpoint = hf_constants.ENDPOINT
            message = f"Cannot reach the Hub at {endpoint} ({message}): check the network, and HF_ENDPOINT if set."
        elif getattr(getattr(err, "response", None), "status_code", None) == 401:  # a wrong or revoked token
            message += f" - the Hub refused the token: {token_fix()}"
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(report(result, args))
    return 0


def token_fix() -> str:
    """What to do about a token the Hub refused, from where it came (`huggingface_hub.get_token`'s order)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            return f"set {name} to a valid token with write access, or unset it to use the one `hf auth login` saves."
    return "run `hf auth login` with a valid token that has write access, or set HF_TOKEN to one."


if __name__ == "__main__":
    sys.exit(main())
