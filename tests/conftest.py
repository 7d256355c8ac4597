"""Shared fixtures. The sibling folder `../shared/` (next to the repository) holds the sample corpus and tiktoken's
cache of GPT-2's BPE ranks, so tests run offline."""

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"  # <repo>/../shared


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared/` next to the repository; tests that need it are skipped where it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} not found (sample corpus and tiktoken cache)")
    return SHARED_DIR


@pytest.fixture(scope="session", autouse=True)
def _tiktoken_cache_dir() -> Iterator[None]:
    """Point tiktoken at `../shared/tiktoken_cache` (GPT-2's ranks, offline) unless TIKTOKEN_CACHE_DIR is set."""
    cache_dir = SHARED_DIR / "tiktoken_cache"
    if "TIKTOKEN_CACHE_DIR" in os.environ or not cache_dir.is_dir():
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
        yield


BLOCK_REPO = """
import sys


class BlockRepo:  # the repository's package must not be importable, even if pip-installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_gpt2_scratch":
            raise ImportError("the gpt2-scratch repository is hidden from this process")


sys.meta_path.insert(0, BlockRepo())
"""


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """Each test gets its own accelerate state, as a new process would: an `Accelerator` built by one test (the
    trainer's, or a benchmark's) must not fix the mixed precision of the next. On a CPU with bf16 the trainer's
    default is bf16, so a state left in "no" made a later benchmark test fail there only."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def run_without_repo(tmp_path) -> Callable[[str], subprocess.CompletedProcess]:
    """Run a Python script in a fresh process, offline (`HF_HUB_OFFLINE=1`), outside the repository (cwd: a temp
    folder) and with this repository's package unimportable: what a user who never saw the repo has."""

    def run(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
        return subprocess.run(
            [sys.executable, "-c", BLOCK_REPO + textwrap.dedent(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def scheduled_lrs() -> Callable[..., list[float]]:
    """The learning rate of each of the first `steps` optimizer steps under the trainer's `build_scheduler`."""

    def lrs(train_args, steps: int) -> list[float]:
        import torch

        from modeling_gpt2_scratch.training import build_scheduler

        parameter = torch.nn.Parameter(torch.zeros(1))
        scheduler = build_scheduler(torch.optim.AdamW([parameter], lr=train_args.max_lr), train_args)
        rates = []
        for _ in range(steps):
            rates.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return rates

    return lrs
