"""Shared test fixtures: paths to the project and to ../shared (tokenizers)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZERS = ROOT.parent / "shared" / "tokenizers"
sys.path.insert(0, str(ROOT))


def shared_tokenizer(name: str) -> Path:
    """Path of an OpenLLaMA tokenizer from ../shared, or skip the test when it is absent."""
    path = SHARED_TOKENIZERS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
