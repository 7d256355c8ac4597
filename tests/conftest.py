"""Shared fixtures. The sibling folder `../shared/` (next to the repository) holds the sample corpus and tiktoken's
cache of GPT-2's BPE ranks, so tests run offline."""

import os
from collections.abc import Iterator
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
