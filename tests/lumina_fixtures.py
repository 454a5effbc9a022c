"""Shared, cached tiny artifacts for the lumina tests (no network).

Import the fixtures into a test module (``from lumina_fixtures import tiny_dirs``); the artifacts
are built once per test process, whichever module asks first.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest


@functools.lru_cache(maxsize=None)
def build_tiny_dirs() -> tuple[str, str]:
    """(tokenizer_dir, model_dir) of the tiny tokenizer and tiny random Chameleon."""
    from lumina.tiny import build_tiny_chameleon, build_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="lumina_tiny_"))
    atexit.register(shutil.rmtree, root, True)
    tok = build_tiny_tokenizer(str(root / "tokenizer"))
    model = build_tiny_chameleon(str(root / "model"), tok)
    return tok, model


@pytest.fixture(scope="session")
def tiny_dirs() -> tuple[str, str]:
    return build_tiny_dirs()
